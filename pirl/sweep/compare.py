"""Is a swept value better than a baseline value beyond the seed noise?

Cells of the same seed share their initial weights and the order of the data, so the fair
comparison of value ``v`` with the baseline ``b`` pairs them by seed: per seed the difference
``d_s = metric(v, s) - metric(b, s)``, then a paired t-test on the differences (two-sided,
``scipy.stats.ttest_rel``; with n seeds it has n - 1 degrees of freedom, so with three seeds
only a large and consistent difference reaches p < 0.05).  Used by ``pirl sweep --baseline``.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from pirl.evaluate.metrics import markdown_table
from pirl.sweep.report import METRICS, Row, collect
from pirl.sweep.spec import SweepSpec


@dataclass(frozen=True)
class Paired:
    """One metric of value ``v`` against the baseline, over the seeds both have finished."""

    seeds: tuple[int, ...]
    diffs: tuple[float, ...]  # metric(v, seed) - metric(baseline, seed), in the seeds' order
    p: float | None  # the paired t-test's two-sided p-value; None for < 2 seeds or no spread

    def text(self) -> str:
        if not self.diffs:
            return "-"
        per_seed = ", ".join(f"{d:+.2f}" for d in self.diffs)
        p = "" if self.p is None else f"; p = {self.p:.3f}"
        return f"{statistics.fmean(self.diffs):+.2f} ({per_seed}{p})"


def paired(row: Row, base: Row, metric: str) -> Paired:
    """``row`` minus ``base`` on ``metric``, paired by seed."""
    from scipy import stats

    ours = dict(zip(row.seeds, row.metrics[metric].values, strict=True))
    theirs = dict(zip(base.seeds, base.metrics[metric].values, strict=True))
    seeds = tuple(s for s in row.seeds if s in theirs)
    diffs = tuple(ours[s] - theirs[s] for s in seeds)
    p = None
    if len(diffs) > 1 and statistics.stdev(diffs) > 0:
        p = float(stats.ttest_rel([ours[s] for s in seeds], [theirs[s] for s in seeds]).pvalue)
    return Paired(seeds, diffs, p)


def baseline_table(rows: list[Row], baseline: str) -> str:
    """A markdown table: every (series, value) other than ``baseline`` against the baseline
    value of its own series, per metric the mean difference, the per-seed differences and the
    paired t-test's p.  Raises ValueError naming ``baseline`` if no series has that value."""
    bases = {r.series: r for r in rows if r.value == baseline}
    if not bases:
        known = sorted({r.value for r in rows})
        raise ValueError(f"--baseline {baseline!r}: not a value of this sweep ({', '.join(known)})")
    one = len({r.series for r in rows}) == 1
    headers = [*([] if one else ["series"]), "value", "seeds",
               *(f"{name} - baseline (per seed; paired p)" for _, name in METRICS)]
    lines: list[list[object]] = []
    for r in rows:
        base = bases.get(r.series)
        if base is None or r is base:
            continue
        cols = [paired(r, base, k) for k, _ in METRICS]
        lines.append([*([] if one else [r.series]), r.value, len(cols[0].seeds),
                      *(c.text() for c in cols)])
    return markdown_table(headers, lines)


def append_baseline(spec: SweepSpec, seeds: tuple[int, ...], out: Path, baseline: str) -> str:
    """Add the comparison with ``baseline`` to ``<out>/summary.md`` (written just before by
    :func:`pirl.sweep.report.write_summary`); returns the section's text."""
    rows = collect(spec, seeds, out)
    key = spec.series[0].key
    text = (f"Against {key} = {baseline}, paired by seed: mean difference in points (the "
            "per-seed differences; the paired t-test's two-sided p-value)\n\n"
            + baseline_table(rows, baseline))
    md = out / "summary.md"
    md.write_text(md.read_text() + "\n" + text + "\n")
    return text
