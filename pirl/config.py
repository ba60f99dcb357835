"""Typed run configuration: defaults = the paper's ImageNet recipe (docs/method.md); presets
scale it down.

Every hyper-parameter has exactly one home, one name and one help text (the field's
``metadata["help"]``) in :mod:`pirl.config_schema`, whose names this module re-exports; here is
what works on a config: overrides, YAML files, presets, validation and the help table.  Field
names are unique across sections, so a command-line override may use either the dotted form
``optim.base_lr=0.06`` or the bare form ``base_lr=0.06``.

Errors are raised as :class:`ConfigError` with one line naming the key and the value at fault; the
CLI turns them into exit code 2 before any heavy work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
from dataclasses import fields
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

# The schema, re-exported (see __all__): callers import pirl.config only.
from pirl.config_schema import (
    ARCHS,
    BANK_DTYPES,
    BN_STATS,
    COLOUR_BACKENDS,
    HEADS,
    LOSSES,
    METHODS,
    NEGATIVE_MODES,
    PRETEXTS,
    SECTIONS,
    WIDTHS,
    Config,
    ModelConfig,
    ObjectiveConfig,
    OptimConfig,
    TrainConfig,
    ViewConfig,
)
from pirl.errors import ConfigError
from pirl.presets import photo_ops, preset_overrides


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


__all__ = [
    "ARCHS", "BANK_DTYPES", "BN_STATS", "COLOUR_BACKENDS", "HEADS", "LOSSES", "METHODS",
    "NEGATIVE_MODES", "PRETEXTS", "SECTIONS", "WIDTHS", "Config", "ModelConfig",
    "ObjectiveConfig", "OptimConfig", "TrainConfig", "ViewConfig", "ConfigError", "set_value",
    "apply_mapping", "apply_overrides", "load_yaml", "from_preset", "to_dict", "from_dict",
    "save_yaml", "validate", "check_explicit_negatives", "help_table",
]
