"""Typed run configuration: defaults = the paper's ImageNet recipe (docs/method.md); presets
scale it down.

Every hyper-parameter has exactly one home here, one name and one help text (the field's
``metadata["help"]``).  Field names are unique across sections, so a command-line override may use
either the dotted form ``optim.base_lr=0.06`` or the bare form ``base_lr=0.06``.

Errors are raised as :class:`ConfigError` with one line naming the key and the value at fault; the
CLI turns them into exit code 2 before any heavy work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from pirl.errors import ConfigError
from pirl.presets import photo_ops, preset_overrides

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


def _field_index() -> dict[str, tuple[str, dataclasses.Field[Any]]]:
    """Bare field name -> (section, field).  Names are unique across sections by design."""
    index: dict[str, tuple[str, dataclasses.Field[Any]]] = {}
    for sec in fields(Config):
        for fld in fields(_section_type(sec.name)):
            assert fld.name not in index, f"duplicate config field name {fld.name}"
            index[fld.name] = (sec.name, fld)
    return index


def _section_type(name: str) -> type:
    return type(getattr(Config(), name))


def _coerce(key: str, value: Any, target: Any) -> Any:
    """Convert ``value`` (from YAML or a command-line string) to the field type, or fail clearly."""
    origin = get_origin(target)
    if origin in (Union, types.UnionType):
        target = next(a for a in get_args(target) if a is not type(None))
    if target is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}={value!r}: expected true or false")
    if target is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected an integer")
        if isinstance(value, int):
            return value
        try:
            return int(str(value))
        except ValueError:
            raise ConfigError(f"{key}={value!r}: expected an integer") from None
    if target is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected a number")
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{key}={value!r}: expected a number") from None
        if not math.isfinite(number):
            # nan slips through every range check (all comparisons are false), inf through most
            raise ConfigError(f"{key}={value!r}: expected a finite number")
        return number
    if target is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected a string")
        return str(value)
    raise ConfigError(f"{key}: unsupported field type {target}")  # pragma: no cover


def _resolve_key(key: str) -> tuple[str, str]:
    """'optim.base_lr' or 'base_lr' -> ('optim', 'base_lr'); unknown keys get a did-you-mean."""
    index = _field_index()
    if "." in key:
        section, name = key.split(".", 1)
        if section in SECTIONS and name in index and index[name][0] == section:
            return section, name
    elif key in index:
        return index[key][0], key
    candidates = list(index) + [f"{s}.{n}" for n, (s, _) in index.items()]
    close = difflib.get_close_matches(key, candidates, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"unknown config key {key!r}{hint}")


def set_value(cfg: Config, key: str, value: Any, explicit: bool = True) -> None:
    """Set one field by dotted or bare name, converting and type-checking the value.

    ``explicit``: record the key in ``cfg.explicit`` (False for a preset's values)."""
    section, name = _resolve_key(key)
    sec_obj = getattr(cfg, section)
    hints = get_type_hints(type(sec_obj))
    setattr(sec_obj, name, _coerce(f"{section}.{name}", value, hints[name]))
    if explicit:
        cfg.explicit.add(f"{section}.{name}")


def apply_mapping(cfg: Config, mapping: dict[str, Any], source: str = "config",
                  explicit: bool = True) -> None:
    """Apply a nested ({section: {field: value}}) or flat ({field: value}) mapping (``explicit``
    as :func:`set_value`)."""
    if not isinstance(mapping, dict):
        raise ConfigError(f"{source}: expected a mapping of keys to values, got "
                          f"{type(mapping).__name__}")
    for key, value in mapping.items():
        if key in SECTIONS and isinstance(value, dict):
            for sub, subval in value.items():
                set_value(cfg, f"{key}.{sub}", subval, explicit)
        elif key in SECTIONS:
            raise ConfigError(f"{source}: section {key!r} must be a mapping of keys to values, "
                              f"got {value!r}")
        else:
            set_value(cfg, str(key), value, explicit)


def apply_overrides(cfg: Config, overrides: list[str]) -> None:
    """Apply ``key=value`` strings from the command line (values parsed as YAML scalars)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not a valid YAML scalar "
                              f"({str(e).splitlines()[0]})") from None
        set_value(cfg, key.strip(), value)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file with the safe loader (nothing in it is executed)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config file ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
    return data or {}


def from_preset(name: str) -> Config:
    """A fresh config: the paper's defaults with a preset's overrides applied."""
    presets = preset_overrides()
    if name not in presets:
        close = difflib.get_close_matches(name, list(presets), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown preset {name!r}{hint}; choose one of {list(presets)}")
    cfg = Config()
    apply_mapping(cfg, presets[name], source=f"preset {name}", explicit=False)
    return cfg


def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """Plain nested dict (for YAML and checkpoints)."""
    return dataclasses.asdict(cfg)


def from_dict(data: dict[str, Any]) -> Config:
    """Inverse of :func:`to_dict`; unknown keys fail (a checkpoint from another version says so).
    Nothing counts as explicit: a saved config records values, not which of them were asked for."""
    cfg = Config()
    apply_mapping(cfg, data, source="saved config", explicit=False)
    return cfg


def save_yaml(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _check(cond: bool, key: str, value: Any, why: str) -> None:
    if not cond:
        raise ConfigError(f"{key}={value!r}: {why}")


def validate(cfg: Config) -> None:
    """Check every value; raise :class:`ConfigError` on the first impossible one.  Changes
    nothing: what depends on the data is :func:`fit_to_dataset`'s."""
    v, m, o, op, t = cfg.views, cfg.model, cfg.objective, cfg.optim, cfg.train
    _check(m.arch in ARCHS, "model.arch", m.arch, f"choose one of {list(ARCHS)}")
    _check(m.width in WIDTHS, "model.width", m.width, f"choose one of {list(WIDTHS)}")
    _check(m.head in HEADS, "model.head", m.head, f"choose one of {list(HEADS)}")
    _check(o.method in METHODS, "objective.method", o.method, f"choose one of {list(METHODS)}")
    _check(o.pretext in PRETEXTS, "objective.pretext", o.pretext,
           f"choose one of {list(PRETEXTS)}")
    _check(o.loss in LOSSES, "objective.loss", o.loss, f"choose one of {list(LOSSES)}")
    _check(o.negatives in NEGATIVE_MODES, "objective.negatives", o.negatives,
           f"choose one of {list(NEGATIVE_MODES)}")
    _check(cfg.model.bn_stats in BN_STATS, "model.bn_stats", cfg.model.bn_stats,
           f"choose one of {list(BN_STATS)}")
    _check(o.bank_dtype in BANK_DTYPES, "objective.bank_dtype", o.bank_dtype,
           f"choose one of {list(BANK_DTYPES)}")
    _check(v.image_size >= 8, "views.image_size", v.image_size, "must be at least 8 px")
    _check(0 < v.image_scale_min <= 1, "views.image_scale_min", v.image_scale_min,
           "must be in (0, 1]")
    _check(0 < v.jigsaw_scale_min <= 1, "views.jigsaw_scale_min", v.jigsaw_scale_min,
           "must be in (0, 1]")
    _check(v.grid >= 2, "views.grid", v.grid, "must be at least 2")
    _check(v.cell >= 1, "views.cell", v.cell, "must be positive")
    _check(1 <= v.patch <= v.cell, "views.patch", v.patch,
           f"a patch must fit in its cell (views.cell={v.cell})")
    _check(v.cell * v.grid <= v.jigsaw_crop, "views.cell", v.cell,
           f"grid x cell = {v.grid * v.cell} exceeds views.jigsaw_crop={v.jigsaw_crop}")
    for name in ("brightness", "contrast", "saturation"):
        val = getattr(v, name)
        _check(val >= 0, f"views.{name}", val, "must be non-negative")
    _check(0 <= v.hue <= 0.5, "views.hue", v.hue, "must be in [0, 0.5]")
    photo_ops(v.photometric_ops)
    for name in ("jitter_prob", "grayscale_prob", "flip_prob", "photometric_prob"):
        val = getattr(v, name)
        _check(0 <= val <= 1, f"views.{name}", val, "a probability must be in [0, 1]")
    _check(v.eval_resize >= v.image_size, "views.eval_resize", v.eval_resize,
           f"must be at least views.image_size={v.image_size}")
    _check(v.colour_backend in COLOUR_BACKENDS, "views.colour_backend", v.colour_backend,
           f"must be one of {COLOUR_BACKENDS}")
    _check(m.embed_dim >= 1, "model.embed_dim", m.embed_dim, "must be positive")
    _check(o.tau > 0, "objective.tau", o.tau, "must be positive")
    _check(o.num_negatives >= 1, "objective.num_negatives", o.num_negatives, "must be positive")
    _check(0 <= o.lam <= 1, "objective.lam", o.lam, "must be in [0, 1]")
    _check(0 <= o.bank_momentum < 1, "objective.bank_momentum", o.bank_momentum,
           "must be in [0, 1)")
    _check(o.num_permutations >= 2, "objective.num_permutations", o.num_permutations,
           "need at least 2 permutations")
    _check(o.num_classes >= 0, "objective.num_classes", o.num_classes,
           "must be non-negative (0: not known yet)")
    _check(op.epochs >= 1, "optim.epochs", op.epochs, "must be at least 1")
    _check(op.batch_size >= 2, "optim.batch_size", op.batch_size,
           "must be at least 2 (BatchNorm needs more than one sample)")
    _check(op.base_lr > 0, "optim.base_lr", op.base_lr, "must be positive")
    _check(0 <= op.momentum < 1, "optim.momentum", op.momentum, "must be in [0, 1)")
    _check(op.weight_decay >= 0, "optim.weight_decay", op.weight_decay, "must be non-negative")
    _check(op.warmup_epochs >= 0, "optim.warmup_epochs", op.warmup_epochs, "must be non-negative")
    _check(0 < op.min_lr_ratio <= 1, "optim.min_lr_ratio", op.min_lr_ratio, "must be in (0, 1]")
    _check(t.workers >= 0, "train.workers", t.workers, "must be non-negative")
    _check(t.log_every >= 1, "train.log_every", t.log_every, "must be at least 1")
    _check(t.checkpoint_every >= 0, "train.checkpoint_every", t.checkpoint_every,
           "must be non-negative")
    _check(t.knn_every >= 0, "train.knn_every", t.knn_every, "must be non-negative")
    _check(t.knn_k >= 1, "train.knn_k", t.knn_k, "must be positive")


def check_explicit_negatives(num_negatives: int, dataset_size: int) -> None:
    """An explicitly requested N (command line or file, not a preset) must be below |D|."""
    if num_negatives >= dataset_size:
        raise ConfigError(f"objective.num_negatives={num_negatives}: must be below the number of "
                          f"images ({dataset_size}); every negative must differ from the positive")


def help_table(cfg: Config) -> str:
    """The resolved config as YAML-like text with each field's help as a comment."""
    lines: list[str] = []
    for sec in fields(cfg):
        sec_obj = getattr(cfg, sec.name)
        lines.append(f"{sec.name}:  # {(type(sec_obj).__doc__ or sec.name).splitlines()[0]}")
        for fld in fields(sec_obj):
            val = yaml.safe_dump(getattr(sec_obj, fld.name), default_flow_style=True).strip()
            val = val.removesuffix("\n...").removesuffix("...").strip()
            lines.append(f"  {fld.name}: {val}  # {fld.metadata.get('help', '')}")
    return "\n".join(lines)
