"""A sweep's summary, regenerated from its cells' result.json files: a markdown table and a plot.

Per (series, value): the mean and the sample standard deviation (n - 1 in the denominator; 0 for
a single seed) over the seeds finished so far, of kNN and linear-probe top-1.  The plot draws
the mean as a line and the min-max range over seeds as a band, one colour per series, with the
paper's points (where :data:`PAPER` has them) on a second y axis: the paper's numbers are
ImageNet linear top-1 of a ResNet-50 after hundreds of epochs, so only their shape is comparable
with a CPU-scale sweep, not their level.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pirl.evaluate.metrics import markdown_table
from pirl.sweep.spec import SweepSpec, plan_cells

RESULT = "result.json"  # the same name as pirl.sweep.run.RESULT (no torch import here)
METRICS = (("knn_top1", "kNN top-1"), ("linear_top1", "linear top-1"))


@dataclass(frozen=True)
class PaperPoints:
    """The paper's numbers for one figure: series label (the spec's, "" for a sweep of one
    series) -> x label -> top-1 (%)."""

    source: str
    points: dict[str, dict[str, float]] = field(default_factory=dict)


# The paper's numbers, with the figure they come from.  Only Table 5 is transcribed here; Figs.
# 6-8 are curves whose points are not given as numbers in the text, so none are overlaid (add
# them as {"PIRL": {"0.5": 62.2, ...}} to draw them).
PAPER: dict[str, PaperPoints] = {
    "table5": PaperPoints("Table 5: ResNet-50, 400 epochs, ImageNet linear top-1",
                          {"": {"PIRL-Rotation": 60.2, "PIRL-Jigsaw": 62.2,
                                "PIRL-Jigsaw+Rotation": 63.1}}),
    "fig6": PaperPoints("Fig. 6 (lambda): points not transcribed"),
    "fig7": PaperPoints("Fig. 7 (|T|): points not transcribed"),
    "fig8": PaperPoints("Fig. 8 (N): points not transcribed"),
}


@dataclass(frozen=True)
class Stat:
    """One metric of one (series, value) over its finished seeds."""

    values: tuple[float, ...]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    def text(self) -> str:
        return f"{self.mean:.2f} ± {self.std:.2f}" if self.values else "-"


@dataclass(frozen=True)
class Row:
    """A (series, value) of the sweep with the seeds finished and the metrics over them."""

    series: str
    value: str
    seeds: tuple[int, ...]
    metrics: dict[str, Stat]
    paper: float | None


def collect(spec: SweepSpec, seeds: tuple[int, ...], out: Path) -> list[Row]:
    """One row per (series, value), in the spec's order, from the result.json files present."""
    found: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for cell in plan_cells(spec, seeds):
        path = out / cell.folder / RESULT
        if path.is_file():
            found.setdefault((cell.si, cell.vi), []).append(json.loads(path.read_text()))
    paper = PAPER[spec.paper].points if spec.paper else {}
    rows = []
    for si, s in enumerate(spec.series):
        for vi, v in enumerate(s.values):
            res = sorted(found.get((si, vi), []), key=lambda r: int(r["seed"]))
            rows.append(Row(s.label, v.label, tuple(int(r["seed"]) for r in res),
                            {k: Stat(tuple(float(r[k]) for r in res)) for k, _ in METRICS},
                            paper.get(s.label, {}).get(v.label)))
    return rows


def table(spec: SweepSpec, rows: list[Row]) -> str:
    """The markdown table: mean ± std over seeds; the paper's number where it has one."""
    key = spec.series[0].key if len({s.key for s in spec.series}) == 1 else "value"
    one = len(spec.series) == 1  # no series column for a single line
    headers = [*([] if one else ["series"]), key, "seeds", *(name for _, name in METRICS)]
    with_paper = any(r.paper is not None for r in rows)
    if with_paper:
        headers.append("paper")
    lines = []
    for r in rows:
        line: list[object] = [*([] if one else [r.series]), r.value, len(r.seeds),
                              *(r.metrics[k].text() for k, _ in METRICS)]
        if with_paper:
            line.append("-" if r.paper is None else f"{r.paper:.1f}")
        lines.append(line)
    return markdown_table(headers, lines)


def _xs(spec: SweepSpec, all_labels: list[str], labels: list[str]) -> list[float]:
    """x coordinates of ``labels``: the numbers themselves, or for named values their position
    in the series' list (``all_labels``)."""
    if spec.categorical:
        return [float(all_labels.index(lb)) for lb in labels]
    return [float(lb) for lb in labels]


def plot(spec: SweepSpec, rows: list[Row], path: Path) -> Path:
    """kNN and linear top-1 against the swept value: mean over seeds, min-max band (error bars
    for named values); the paper's points on the linear panel's right axis."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    source = PAPER[spec.paper] if spec.paper else None
    for ax, (metric, name) in zip(axes, METRICS, strict=True):
        for i, s in enumerate(spec.series):
            mine = [r for r in rows if r.series == s.label and r.metrics[metric].values]
            if not mine:
                continue
            x = _xs(spec, [v.label for v in s.values], [r.value for r in mine])
            st = [r.metrics[metric] for r in mine]
            name_part = f"{s.label}: " if s.label else ""
            label = f"{name_part}mean of {max(len(t.values) for t in st)} seed(s)"
            mean, lo, hi = ([t.mean for t in st], [min(t.values) for t in st],
                            [max(t.values) for t in st])
            if spec.categorical:  # named values: no line between them, min-max as error bars
                ax.errorbar(x, mean, yerr=[[m - a for m, a in zip(mean, lo, strict=True)],
                                           [b - m for m, b in zip(mean, hi, strict=True)]],
                            fmt="o", capsize=4, color=f"C{i % 10}", label=label)
            else:
                ax.plot(x, mean, "o-", color=f"C{i % 10}", label=label)
                ax.fill_between(x, lo, hi, color=f"C{i % 10}", alpha=0.2, linewidth=0)
        if metric == "linear_top1" and source and source.points:
            twin = ax.twinx()
            for s in spec.series:
                pts = source.points.get(s.label, {})
                labels = [v.label for v in s.values if v.label in pts]
                if labels:
                    xs = _xs(spec, [v.label for v in s.values], labels)
                    twin.plot(xs, [pts[lb] for lb in labels],
                              "k*" if spec.categorical else "k*--", markersize=10,
                              label=f"paper, {s.label}" if s.label else "paper")
            twin.set_ylabel(f"paper ({source.source})", fontsize=8)
            twin.legend(loc="lower right", fontsize=8)
        if spec.log_x:
            ax.set_xscale("log")
        if spec.categorical:
            labels = [v.label for v in spec.series[0].values]
            ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel(spec.series[0].key if len({s.key for s in spec.series}) == 1
                      else " / ".join(s.key for s in spec.series))
        ax.set_ylabel(f"{name} (%)")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(f"{spec.title or spec.name}: mean over seeds, min-max range over seeds")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def write_summary(spec: SweepSpec, seeds: tuple[int, ...], out: Path,
                  command: str = "") -> tuple[Path, Path, str]:
    """``<out>/summary.md`` (the table, with the command) and ``<out>/summary.png`` from the
    cells' result.json files; returns both paths and the table."""
    rows = collect(spec, seeds, out)
    text = table(spec, rows)
    done = sum(len(r.seeds) for r in rows)
    total = len(seeds) * sum(len(s.values) for s in spec.series)
    head = [f"# {spec.title or spec.name}", ""]
    if command:
        head += ["    " + command, ""]
    head += [f"{done} of {total} cells finished; mean ± sample std over seeds "
             f"({', '.join(map(str, seeds))}).", "", ""]
    md = out / "summary.md"
    md.write_text("\n".join(head) + text + "\n")
    png = plot(spec, rows, out / "summary.png")
    return md, png, text
