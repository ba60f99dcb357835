"""What a sweep is: a base recipe, one or two swept config keys, seeds; and its presets.

A sweep is a grid of *cells*.  Each :class:`Series` is one line of the plot: fixed overrides of
its own and a list of :class:`Value` s along the x axis, each value a set of ``key=value``
overrides (usually one: the swept key).  A cell is one (series, value, seed): one pretraining run
with its own folder.  Two swept keys (``--vary`` twice) give one series per value of the second
key.  The presets are the paper's ablations: Fig. 6 (lambda), Fig. 7 (the number of
permutations |T|, PIRL against Jigsaw), Fig. 8 (the number of negatives N) and Table 5 (the
pretext tasks).

Nothing here imports torch: the spec is planned, checked and listed (``--dry-run``) before any
heavy work starts.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field, replace
from math import factorial

from pirl import config as C
from pirl.errors import ConfigError


@dataclass(frozen=True)
class Value:
    """One point on the x axis: its label (the table's row, the tick) and its overrides."""

    label: str
    overrides: tuple[str, ...]


@dataclass(frozen=True)
class Series:
    """One line of the plot: a legend label, overrides of its own and its x values."""

    label: str
    key: str  # the swept key, for the axis label ("objective.lam"), or a name ("pretext")
    values: tuple[Value, ...]
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class SweepSpec:
    """A whole sweep (see the module doc).  ``paper`` names the entry of
    :data:`pirl.sweep.report.PAPER` overlaid on the plot; ``log_x`` draws the x axis in log scale
    (as the paper's figure does); ``categorical`` x values are names, not numbers."""

    name: str
    series: tuple[Series, ...]
    preset: str = "imagenette-small"
    overrides: tuple[str, ...] = ()
    log_x: bool = False
    categorical: bool = False
    paper: str | None = None
    title: str = ""


@dataclass(frozen=True)
class Cell:
    """One run of the sweep: series ``si``, value ``vi`` (indices into the spec), ``seed``."""

    si: int
    vi: int
    seed: int
    folder: str = field(default="", compare=False)  # relative to the sweep's folder


def _swept(key: str, values: tuple[str, ...] | list[str]) -> tuple[Value, ...]:
    return tuple(Value(str(v), (f"{key}={v}",)) for v in values)


def _nine_factorial() -> str:
    return str(factorial(9))


# The presets.  The x values are taken from the range of the paper's figures; at the CPU scale
# (2,000 images) Fig. 8's values above |D| - 1 are refused, so docs/sweeps.md's command passes
# smaller ones with --values.  Jigsaw's |T| stops at 1,000: the greedy maximal-Hamming set costs
# O(|T| x 9!) to build, minutes beyond that on a CPU.
SWEEPS: dict[str, SweepSpec] = {
    "fig6-lambda": SweepSpec(
        name="fig6-lambda", title="Fig. 6: lambda of Eq. 5 (0 = NPID)", paper="fig6",
        series=(Series("PIRL", "objective.lam",
                       _swept("objective.lam", ("0", "0.25", "0.5", "0.75", "1"))),),
        overrides=("objective.method=pirl", "objective.pretext=jigsaw")),
    "fig7-permutations": SweepSpec(
        name="fig7-permutations", title="Fig. 7: number of permutations |T|", paper="fig7",
        log_x=True,
        series=(
            Series("PIRL", "objective.num_pirl_permutations",
                   _swept("objective.num_pirl_permutations",
                          ("1", "10", "100", "1000", "10000", _nine_factorial())),
                   overrides=("objective.method=pirl", "objective.pretext=jigsaw")),
            Series("Jigsaw", "objective.num_permutations",
                   _swept("objective.num_permutations", ("10", "100", "1000")),
                   overrides=("objective.method=jigsaw",)))),
    "fig8-negatives": SweepSpec(
        name="fig8-negatives", title="Fig. 8: number of negatives N", paper="fig8", log_x=True,
        series=(Series("PIRL", "objective.num_negatives",
                       _swept("objective.num_negatives",
                              ("256", "1024", "4096", "16384", "32000"))),),
        overrides=("objective.method=pirl", "objective.pretext=jigsaw")),
    "table5-pretexts": SweepSpec(
        name="table5-pretexts", title="Table 5: pretext tasks", paper="table5", categorical=True,
        series=(Series("", "pretext", (
            Value("PIRL-Jigsaw", ("objective.method=pirl", "objective.pretext=jigsaw")),
            Value("PIRL-Rotation", ("objective.method=pirl", "objective.pretext=rotation")),
            Value("PIRL-Jigsaw+Rotation", ("objective.method=pirl",
                                           "objective.pretext=jigsaw+rotation")),
            Value("NPID", ("objective.method=npid",)))),)),
}


def parse_list(text: str, what: str) -> list[str]:
    """``"0,0.5, 1"`` -> ``["0", "0.5", "1"]``; an empty item or list is refused."""
    items = [t.strip() for t in text.split(",")]
    if not items or any(not t for t in items):
        raise ConfigError(f"{what} {text!r}: expected a comma-separated list without empty items")
    return items


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"0,1,2"`` -> (0, 1, 2); ``"3"`` -> (3,).  Seeds must be distinct non-negative ints."""
    try:
        seeds = tuple(int(s) for s in parse_list(text, "--seeds"))
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: expected integers, e.g. 0,1,2") from None
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r}: seeds must be distinct and non-negative")
    return seeds


def custom_spec(vary: list[str], name: str = "custom") -> SweepSpec:
    """A sweep from ``--vary KEY=v1,v2,...`` given once or twice: the first key is the x axis,
    each value of the second (if any) is a series of its own."""
    if not 1 <= len(vary) <= 2:
        raise ConfigError(f"--vary given {len(vary)} times: a sweep varies one or two keys")
    parsed: list[tuple[str, list[str]]] = []
    for item in vary:
        if "=" not in item:
            raise ConfigError(f"--vary {item!r}: expected KEY=v1,v2,...")
        key, raw = item.split("=", 1)
        parsed.append((key.strip(), parse_list(raw, f"--vary {key.strip()}")))
    (xkey, xvals) = parsed[0]
    numeric = all(_is_number(v) for v in xvals)
    if len(parsed) == 1:
        series: tuple[Series, ...] = (Series("", xkey, _swept(xkey, xvals)),)
    else:
        skey, svals = parsed[1]
        series = tuple(Series(f"{skey}={v}", xkey, _swept(xkey, xvals), (f"{skey}={v}",))
                       for v in svals)
    return SweepSpec(name=name, series=series, categorical=not numeric)


def with_values(spec: SweepSpec, values: list[str]) -> SweepSpec:
    """``spec`` with the swept key of every series taking ``values`` (``--values``); refused for
    a preset whose x values are named bundles of overrides (table5-pretexts)."""
    if spec.categorical:
        raise ConfigError(f"--values: sweep {spec.name!r} has named x values; use --vary instead")
    return replace(spec, series=tuple(replace(s, values=_swept(s.key, values))
                                      for s in spec.series))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def slug(text: str) -> str:
    """A folder-name-safe form of a label (``objective.lam=0.25`` -> ``objective.lam=0.25``,
    ``jigsaw+rotation`` -> ``jigsaw+rotation``, spaces and slashes -> ``_``)."""
    return re.sub(r"[^A-Za-z0-9.=+_-]", "_", text) or "_"


def plan_cells(spec: SweepSpec, seeds: tuple[int, ...]) -> list[Cell]:
    """Every cell, in the order a single device runs them: seed-major, so a sweep stopped
    halfway already has one seed of every value (a complete curve) rather than every seed of the
    first values."""
    cells = []
    for seed in seeds:
        for si, s in enumerate(spec.series):
            for vi, v in enumerate(s.values):
                parts = [slug(s.label)] if len(spec.series) > 1 else []
                folder = "/".join([*parts, slug(f"{s.key}={v.label}"), f"seed{seed}"])
                cells.append(Cell(si, vi, seed, folder))
    return cells


def assign_round_robin(cells: list[Cell], n_workers: int) -> list[list[Cell]]:
    """Cell k goes to worker k mod n (one worker per GPU); each worker keeps the cells' order."""
    if n_workers < 1:
        raise ValueError(f"need at least one worker, got {n_workers}")
    return [cells[w::n_workers] for w in range(n_workers)]


@dataclass(frozen=True)
class Scale:
    """How big each cell's run is, on top of the spec: the user's ``--set`` overrides (applied
    after the sweep's own, before the series' and the swept values, so the sweep always wins),
    ``--epochs`` / ``--batch-size`` (None: the preset's) and the DataLoader workers."""

    overrides: tuple[str, ...] = ()
    epochs: int | None = None
    batch_size: int | None = None
    workers: int = 1


def cell_config(spec: SweepSpec, cell: Cell, scale: Scale) -> C.Config:
    """The resolved config of one cell.  An unknown key is refused naming the sweep and the
    cell: a preset may name a key that this version of the package does not have."""
    series, value = spec.series[cell.si], spec.series[cell.si].values[cell.vi]
    cfg = C.from_preset(spec.preset)
    layers = (("the sweep", spec.overrides), ("--set", scale.overrides),
              (f"series {series.label!r}", series.overrides),
              (f"value {value.label!r}", value.overrides))
    for where, overrides in layers:
        try:
            C.apply_overrides(cfg, list(overrides))
        except ConfigError as e:
            extra = (" (this version of pirl does not have that key; the sweep needs a newer "
                     "one)" if "unknown config key" in str(e) else "")
            raise ConfigError(f"sweep {spec.name!r}, {where}: {e}{extra}") from None
    if scale.epochs is not None:
        C.set_value(cfg, "optim.epochs", scale.epochs)
    if scale.batch_size is not None:
        C.set_value(cfg, "optim.batch_size", scale.batch_size)
    C.set_value(cfg, "train.seed", cell.seed)
    C.set_value(cfg, "train.workers", scale.workers)
    cfg.train.quiet = True
    cfg.train.knn_every = 0  # evaluated once at the end, the same way for every cell
    try:
        C.validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"sweep {spec.name!r}, cell {cell.folder}: {e}") from None
    return cfg


def copy_config(cfg: C.Config) -> C.Config:
    """A deep copy that keeps the record of explicit keys (pretrain fits its config in place)."""
    return copy.deepcopy(cfg)
