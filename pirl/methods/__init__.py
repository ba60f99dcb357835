"""The methods: PIRL, the baselines it is compared with, and supervised pre-training.  Open
:mod:`pirl.methods.pirl` first.

==========  =====================================  ====================  ========================
method      a training sample holds                model returns         objective
==========  =====================================  ====================  ========================
pirl        image [3,S,S] and, by pretext, patches  z_img, z_t [B,D]      Eq. 5 against the bank
            [P,3,p,p] (jigsaw; jigsaw+rotation:
            cut from the rotated crop) or rotated
            [3,S,S] (rotation)
npid        image                                   z_img                 NCE against the bank
jigsaw      patches ordered by a permutation of     logits [B,n]          cross-entropy
            the set, perm_label ()
rotation    rotated, rotation ()                    logits [B,4]          cross-entropy
supervised  image, label () (the data's class)      logits [B,K]          cross-entropy
==========  =====================================  ====================  ========================

This registry is the one place that tells the methods apart by name: everything else asks
:func:`get_method` for the :class:`Method` of ``cfg.objective.method`` and reads its fields.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from pirl.config import METHODS, Config, ConfigError, check_explicit_negatives
from pirl.data.jigsaw import maximal_hamming_permutations
from pirl.data.source import ImageSource
from pirl.data.views import SampleViews, TrainTransform
from pirl.memory_bank import MemoryBank
from pirl.methods import jigsaw, npid, pirl, rotation, supervised


class Objective(Protocol):
    """A method's loss and its state.  Per step: ``loss(out, batch)`` -> backward -> optimizer
    step -> ``after_step(out, batch)``.  ``loss`` returns the scalar to minimise and its terms for
    the log as detached 0-dim tensors (no host synchronisation in the step)."""

    @property
    def bank(self) -> MemoryBank | None: ...

    def loss(self, out: dict[str, Tensor], batch: dict[str, Tensor]
             ) -> tuple[Tensor, dict[str, Tensor]]: ...

    def after_step(self, out: dict[str, Tensor], batch: dict[str, Tensor]) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, sd: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class Method:
    """Everything the rest of the package needs to know about one method.

    views: what a training sample holds (drawn by :class:`pirl.data.views.TrainTransform`).
    build_model: the network, randomly initialised; forward(batch) -> the outputs its objective
        reads.  Every model has ``.trunk``, the product that is kept.
    build_objective: ``(cfg, |D|, device)`` -> its :class:`Objective`.
    uses_bank: the objective keeps a memory bank of |D| rows and draws
        ``objective.num_negatives`` from it (the config caps N at |D| - 1; an N set explicitly
        must be below |D|).
    needs_permutations: the views order patches by a fixed permutation set, which training
        builds from ``train.seed`` and saves in the checkpoint.
    has_f_and_g: the model has both heads f and g, so evaluation loads the whole model and the
        invariance protocol measures ``||f(v_I) - g(v_I^t)||``.
    transfer_lr_rule: the learning-rate rule detection fine-tuning starts such a trunk with, as
        the paper does: ``contrastive`` (a low lr, long warm-up) for PIRL and NPID++ trunks,
        ``supervised`` for the rest (see :mod:`pirl.evaluate.detection.schedule`).
    needs_labels: the objective trains on the data's labels (``batch["label"]``) and the model
        has ``objective.num_classes`` outputs, which :func:`fit_to_dataset` takes from the data.
    """

    name: str
    views: Callable[[Config], SampleViews]
    build_model: Callable[[Config], nn.Module]
    build_objective: Callable[[Config, int, torch.device | str], Objective]
    uses_bank: bool
    needs_permutations: bool
    has_f_and_g: bool
    transfer_lr_rule: str
    needs_labels: bool


REGISTRY: dict[str, Method] = {m.name: m for m in (
    Method("pirl", pirl.views, pirl.build_model, pirl.PIRLObjective,
           uses_bank=True, needs_permutations=False, has_f_and_g=True,
           transfer_lr_rule="contrastive", needs_labels=False),
    Method("npid", npid.views, npid.build_model, npid.NPIDObjective,
           uses_bank=True, needs_permutations=False, has_f_and_g=False,
           transfer_lr_rule="contrastive", needs_labels=False),
    Method("jigsaw", jigsaw.views, jigsaw.build_model, jigsaw.build_objective,
           uses_bank=False, needs_permutations=True, has_f_and_g=False,
           transfer_lr_rule="supervised", needs_labels=False),
    Method("rotation", rotation.views, rotation.build_model, rotation.build_objective,
           uses_bank=False, needs_permutations=False, has_f_and_g=False,
           transfer_lr_rule="supervised", needs_labels=False),
    Method("supervised", supervised.views, supervised.build_model, supervised.build_objective,
           uses_bank=False, needs_permutations=False, has_f_and_g=False,
           transfer_lr_rule="supervised", needs_labels=True),
)}
if set(REGISTRY) != set(METHODS):  # the config lists the names, torch-free; each needs an entry
    raise ImportError(f"pirl.methods: registry {sorted(REGISTRY)} != config.METHODS "
                      f"{sorted(METHODS)}")


def get_method(name_or_cfg: str | Config) -> Method:
    """The :class:`Method` of a name or of ``cfg.objective.method``."""
    name = name_or_cfg if isinstance(name_or_cfg, str) else name_or_cfg.objective.method
    if name not in REGISTRY:
        raise ValueError(f"objective.method={name!r}: choose one of {list(METHODS)}")
    return REGISTRY[name]


def fit_to_dataset(cfg: Config, dataset_size: int, source: ImageSource | None = None,
                   where: str = "the training data") -> list[str]:
    """Adapt ``cfg`` to a dataset of ``dataset_size`` (|D|) images, in place, so that a preset
    works on a dataset of a few hundred images and for a run of a single epoch.

    For a method that ``uses_bank``, a number of negatives above |D| - 1 is capped there when it
    comes from a preset (an upper bound) and refused when it was set explicitly
    (:meth:`pirl.config.Config.is_explicit`); a warm-up as long as the run shrinks to a tenth of
    it.  For a method that ``needs_labels``, given the images (``source``, found at ``where``):
    every image must be labelled, and ``objective.num_classes`` becomes the number of classes of
    the data unless it was set explicitly, when it must equal it (fewer outputs cannot score
    every label; more train outputs no image asks for).  Returns one human-readable note per
    change (the caller prints them).  Raises :class:`pirl.config.ConfigError` (one line) for
    fewer than 2 images or unlabelled data.  It lives here, not in the config, because what it
    adapts depends on the method.
    """
    o, op = cfg.objective, cfg.optim
    if dataset_size < 2:
        raise ConfigError(f"dataset has {dataset_size} image(s): need at least 2")
    notes: list[str] = []
    method = get_method(cfg)
    permutation_count(cfg)  # refuses a |T| the views cannot use, before the run folder is made
    uses_bank = method.uses_bank
    # f (and g) exist only in the embedding methods, the ones with a memory bank; elsewhere an
    # MLP head would be silently ignored.
    if cfg.model.head != "linear" and not uses_bank:
        raise ConfigError(f"model.head={cfg.model.head}: method {method.name} has no embedding "
                          "head f / g; leave model.head=linear")
    if uses_bank and cfg.is_explicit("objective.num_negatives"):
        check_explicit_negatives(o.num_negatives, dataset_size)
    if uses_bank and o.num_negatives > dataset_size - 1:
        notes.append(f"objective.num_negatives={o.num_negatives} exceeds |D| - 1 = "
                     f"{dataset_size - 1}; using {dataset_size - 1}")
        o.num_negatives = dataset_size - 1
    # A preset's warm-up (e.g. 2 epochs) must not swallow a short run (`--epochs 1`): shrink it
    # to a tenth of the run, as the negatives above, and say so.
    if op.warmup_epochs >= op.epochs:
        notes.append(f"optim.warmup_epochs={op.warmup_epochs} does not fit in optim.epochs="
                     f"{op.epochs}; using {op.epochs / 10:g} (a tenth of the run)")
        op.warmup_epochs = op.epochs / 10
    if method.needs_labels and source is not None:
        k = supervised.labelled_classes(source, where)
        if cfg.is_explicit("objective.num_classes") and o.num_classes != k:
            raise ConfigError(f"objective.num_classes={o.num_classes}: {where} has {k} classes; "
                              "leave it unset to take the data's")
        if o.num_classes != k:
            notes.append(f"objective.num_classes={k}: the classes of {where}")
            o.num_classes = k
    return notes


def build_model(cfg: Config) -> nn.Module:
    """The network of ``cfg.objective.method``, randomly initialised."""
    return get_method(cfg).build_model(cfg)


def build_objective(cfg: Config, dataset_size: int,
                    device: torch.device | str = "cpu") -> Objective:
    """The objective of ``cfg.objective.method`` for a dataset of ``dataset_size`` images, its
    state (a memory bank, if any) on ``device``."""
    return get_method(cfg).build_objective(cfg, dataset_size, device)


def permutation_count(cfg: Config) -> int:
    """The size of the fixed permutation set the views of ``cfg`` draw from; 0: none.

    ``objective.num_permutations`` for a method that ``needs_permutations`` (the Jigsaw
    baseline); ``objective.num_pirl_permutations`` (0 = any of P!) for views with shuffled
    patches (PIRL's jigsaw pretexts).  A non-zero ``num_pirl_permutations`` for views without
    shuffled patches is a ConfigError: it would change nothing."""
    method, k = get_method(cfg), cfg.objective.num_pirl_permutations
    most = math.factorial(cfg.views.grid**2)
    if not 0 <= k <= most:
        raise ConfigError(f"objective.num_pirl_permutations={k}: 0 (all) or 1..{most}")
    if method.needs_permutations:
        return cfg.objective.num_permutations
    if k and method.views(cfg).patches != "shuffled":
        raise ConfigError(f"objective.num_pirl_permutations={k}: method {method.name!r} with "
                          f"pretext {cfg.objective.pretext!r} shuffles no jigsaw patches")
    return k


def permutation_set(cfg: Config, seed: int, saved: Tensor | None = None,
                    resuming: bool = False) -> Tensor | None:
    """The permutation set of a run (Long ``[n,P]``, or None when :func:`permutation_count` is
    0): ``maximal_hamming_permutations(count, views.grid, seed)``, the same call for the Jigsaw
    baseline and PIRL, or, when ``resuming``, the set ``saved`` in the checkpoint, which must
    have the size the config asks for (ConfigError otherwise)."""
    k = permutation_count(cfg)
    if resuming:
        if (saved is None) != (k == 0) or (saved is not None and len(saved) != k):
            have = 0 if saved is None else len(saved)
            raise ConfigError(f"the checkpoint holds {have} jigsaw permutations but this run asks "
                              f"for {k} (0 = none / all P!); use another --out folder or the "
                              "same objective.num_permutations / num_pirl_permutations")
        return saved
    return maximal_hamming_permutations(k, cfg.views.grid, seed=seed) if k else None


def build_train_transform(cfg: Config, permutations: Tensor | None = None,
                          defer_colour: bool = False) -> TrainTransform:
    """The training transform of ``cfg.objective.method`` (its :class:`Method` ``views``).

    ``permutations`` Long ``[n, P]``: the permutation set of the views (:func:`permutation_count`
    > 0); when None, :func:`permutation_set` with ``train.seed``, the set training builds.  With
    ``defer_colour`` the colour is left to :class:`pirl.data.views.ColourCollate`."""
    method = get_method(cfg)
    if permutations is None:
        permutations = permutation_set(cfg, seed=cfg.train.seed)
    return TrainTransform(cfg.views, method.views(cfg), permutations, defer_colour=defer_colour)


__all__ = ["METHODS", "REGISTRY", "Method", "Objective", "build_model", "build_objective",
           "build_train_transform", "fit_to_dataset", "get_method", "permutation_count",
           "permutation_set"]
