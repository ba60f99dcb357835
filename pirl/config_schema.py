"""The run configuration's schema: the lists of allowed names and one dataclass per section.

Every hyper-parameter has exactly one home here, one name and one help text (the field's
``metadata["help"]``); defaults are the paper's ImageNet recipe.  :mod:`pirl.config` re-exports
all of it and holds what works on a config (overrides, files, presets, validation), so callers
import :mod:`pirl.config` only.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

# The method names; pirl.methods.REGISTRY holds what each one is (it imports torch and this
# module, so the names live here, where the config can list them without importing it).
METHODS = ("pirl", "jigsaw", "rotation", "npid", "supervised")
PRETEXTS = ("jigsaw", "rotation", "jigsaw+rotation")
LOSSES = ("nce", "nce-fixed-z", "infonce")
NEGATIVE_MODES = ("per-sample", "shared")
ARCHS = ("resnet18", "resnet34", "resnet50")
WIDTHS = (1, 2, 4)  # channel multipliers of every trunk stage (PIRL-c2x: 2)
HEADS = ("linear", "mlp")
BANK_DTYPES = ("float32", "float16", "bfloat16")
BN_STATS = ("image", "all")
COLOUR_BACKENDS = ("auto", "numba", "torch")  # pirl.kernels.colour.photometric_jobs


def _f(default: Any, help: str, **kw: Any) -> Any:  # noqa: A002 - "help" reads best here
    """A dataclass field carrying its help text."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ViewConfig:
    """Geometry and photometric augmentation of the image view and the jigsaw view."""

    image_size: int = _f(224, "side of the image view I (random resized crop output), px")
    image_scale_min: float = _f(0.08, "smallest area fraction of the image view's random crop")
    jigsaw_crop: int = _f(255, "side the jigsaw crop is resized to before cutting the grid, px")
    jigsaw_scale_min: float = _f(0.6, "smallest area fraction of the jigsaw crop (paper: 0.6)")
    grid: int = _f(3, "jigsaw grid is grid x grid cells (paper: 3, i.e. 9 patches)")
    cell: int = _f(85, "side of one grid cell, px (paper: 85 = 255 / 3)")
    patch: int = _f(64, "side of the patch cut from each cell at a random offset, px (paper: 64)")
    brightness: float = _f(0.4, "colour jitter brightness strength")
    contrast: float = _f(0.4, "colour jitter contrast strength")
    saturation: float = _f(0.4, "colour jitter saturation strength")
    hue: float = _f(0.2, "colour jitter hue strength (authors' release: 0.2)")
    jitter_prob: float = _f(1.0, "probability of applying colour jitter to a view / patch")
    grayscale_prob: float = _f(0.2, "probability of converting a view / patch to grayscale")
    flip_prob: float = _f(0.5, "probability of a horizontal flip of a view / patch")
    photometric_ops: str = _f("", "ops after the jitter: 'release' or a comma list; '' = off")
    photometric_prob: float = _f(0.66, "probability a view / patch gets photometric_ops (release)")
    eval_resize: int = _f(256, "evaluation: resize the shorter side to this, then centre-crop "
                          "image_size")
    colour_backend: str = _f("auto", f"implementation of the colour augmentation, one of "
                             f"{COLOUR_BACKENDS}: numba (pip install pirl[fast]) makes the "
                             "paper preset's views 1.6x faster per image than torch; auto takes "
                             "numba when installed; same pixels to float rounding")


@dataclass
class ModelConfig:
    """The trunk phi and the projection heads f and g."""

    arch: str = _f("resnet50", f"trunk architecture, one of {ARCHS}")
    small_stem: bool = _f(False, "3x3 stride-1 conv1 and no max-pool: for 32-64 px images")
    width: int = _f(1, f"channel multiplier of every trunk stage, conv1 included, one of {WIDTHS}")
    head: str = _f("linear", f"f and g, one of {HEADS}: linear (paper) or mlp (C->C, ReLU, ->D)")
    embed_dim: int = _f(128, "dimension of f(v_I), g(v_I^t) and the memory bank rows")
    bn_stats: str = _f("image", f"one of {BN_STATS}: which trunk calls update BatchNorm's running "
                       "statistics (what evaluation normalises with); image = the image view "
                       "only, all = the transformed view (patches) too")


@dataclass
class ObjectiveConfig:
    """What is learned: the method, its pretext, the loss, the memory bank and its negatives."""

    method: str = _f("pirl", f"training objective, one of {METHODS}")
    pretext: str = _f("jigsaw", f"PIRL's transformation t, one of {PRETEXTS}")
    loss: str = _f("nce", f"contrastive loss, one of {LOSSES} (nce = the paper's Eqs. 3-4)")
    tau: float = _f(0.07, "temperature of the similarity scores")
    num_negatives: int = _f(32000, "negatives N drawn from the memory bank per step; an upper "
                            "bound: on a smaller dataset |D| - 1 is used")
    negatives: str = _f("per-sample", f"negative sampling, one of {NEGATIVE_MODES}: per-sample = "
                        "each data point draws its own N (paper); shared = one draw per step")
    lam: float = _f(0.5, "lambda of Eq. 5: weight of the jigsaw term; 0 gives NPID")
    bank_momentum: float = _f(0.5, "memory bank update m <- normalize(momentum*m + (1-momentum)*f)")
    bank_dtype: str = _f("float32", f"storage dtype of the memory bank, one of {BANK_DTYPES}")
    num_permutations: int = _f(1000, "jigsaw baseline: size of the maximal-Hamming permutation set")
    num_pirl_permutations: int = _f(0, "pirl |T|: orders drawn from the jigsaw set; 0 = any of P!")
    num_classes: int = _f(0, "supervised: outputs of the classifier; unless set, the number of "
                          "classes of the training data, filled in when training starts "
                          "(config.yaml and the checkpoint record the number used)")


@dataclass
class OptimConfig:
    """SGD with linear warm-up and cosine decay; lr scales linearly with the global batch."""

    epochs: int = _f(800, "passes over the training set")
    batch_size: int = _f(1024, "global batch size (all processes together)")
    base_lr: float = _f(0.03, "learning rate per 256 images; lr = base_lr * batch_size / 256")
    momentum: float = _f(0.9, "SGD momentum")
    weight_decay: float = _f(1e-4, "weight decay; not applied to BatchNorm parameters and biases")
    warmup_epochs: float = _f(5.0, "linear warm-up length in epochs (0 disables)")
    min_lr_ratio: float = _f(1e-3, "cosine schedule ends at lr * min_lr_ratio")


@dataclass
class TrainConfig:
    """Everything about running a job that is not the recipe itself."""

    seed: int = _f(0, "random seed (each rank and worker derives its own from it)")
    workers: int = _f(4, "DataLoader worker processes per rank (0 = load in the main process)")
    amp: bool = _f(True, "bfloat16 autocast on GPU (ignored on CPU)")
    channels_last: bool = _f(True, "channels_last memory format on GPU (ignored on CPU)")
    deterministic: bool = _f(False, "deterministic algorithms (slower); exact resume on CPU")
    log_every: int = _f(20, "write a log line every this many steps; also when the ranks agree "
                        "on stopping: a stop signal (SIGTERM, SIGUSR1, Ctrl-C) or a non-finite "
                        "loss takes effect at the next such step or at the end of the epoch")
    checkpoint_every: int = _f(0, "also checkpoint every this many steps (0 = once per epoch)")
    knn_every: int = _f(1, "run the kNN monitor on --val-data every this many epochs (0 = never)")
    knn_k: int = _f(200, "k of the kNN monitor and of `pirl eval knn`")
    strict_data: bool = _f(False, "stop on the first unreadable image instead of skipping it")
    quiet: bool = _f(False, "no progress bars (logs and CI)")


@dataclass
class Config:
    """A whole run: one section per concern.

    ``explicit`` holds the dotted keys (``"objective.num_negatives"``) that were set on purpose,
    through :func:`set_value` and what calls it (a config file, the command line), but not by a
    preset: a preset's value may be adapted to the data (:func:`fit_to_dataset`), an explicit one
    must be honoured or refused.  It is an attribute rather than a field, so it is never written
    to config.yaml or a checkpoint and plays no part in comparing two configs.
    """

    views: ViewConfig = field(default_factory=ViewConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        self.explicit: set[str] = set()

    def is_explicit(self, key: str) -> bool:
        """Whether the dotted ``key`` (e.g. ``"objective.num_negatives"``) was set on purpose."""
        return key in self.explicit


SECTIONS = tuple(f.name for f in fields(Config))
