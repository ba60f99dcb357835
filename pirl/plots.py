"""Figures: training curves from run logs (``pirl plot RUN_DIR [RUN_DIR ...] --out plot.png``)
and the views of a few images (``pirl show-views``).

:func:`plot_runs`: one PNG with four panels -- loss terms, learning rate and throughput over
training steps, kNN top-1 accuracy over epochs -- with several runs overlaid, one colour per run.
:func:`show_views`: images next to their image view and jigsaw patches.  Both are drawn with
matplotlib's Agg canvas directly (no pyplot), so they work headless and leave the caller's
backend alone.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from pirl.config import Config
from pirl.data.augment import to_uint8_tensor
from pirl.data.jigsaw import JigsawView
from pirl.data.views import ImageView
from pirl.logs import LOG_NAME, LogFormatError, read_log

log = logging.getLogger(__name__)

# The loss terms drawn first and their line styles; any other "loss*" field follows them.
_LOSS_ORDER = ("loss", "loss_t", "loss_img")
_LOSS_STYLES: tuple[Any, ...] = ("-", "--", ":", "-.")  # Any: matplotlib types them as Literals
_LOSS_HELP = {"loss": "loss (total)", "loss_t": "loss_t (transformed view)",
              "loss_img": "loss_img (image view)"}


@dataclass
class RunCurves:
    """The curves of one run, each a (x, y) pair of float arrays sorted by x."""

    name: str
    train: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # x = step
    knn: tuple[np.ndarray, np.ndarray] | None = None  # x = epoch
    num_records: int = 0


def find_log(run: Path) -> Path:
    """``run/log.jsonl`` (or ``run`` itself when it is the log file); FileNotFoundError if none."""
    if run.is_file() and run.suffix == ".jsonl":
        return run
    if not run.exists():
        raise FileNotFoundError(f"run folder {run} does not exist")
    path = run / LOG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{run} has no {LOG_NAME}; pass a run folder written by "
                                "`pirl pretrain` or `pirl demo`")
    return path


def _latest_per_key(records: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """One record per value of ``key`` (the last one written), sorted by that value.

    A resumed run restarts from its last checkpoint, so the steps between that checkpoint and the
    interruption are logged twice; the later records are the ones the final weights came from."""
    latest: dict[float, dict[str, Any]] = {}
    for rec in records:
        k = rec.get(key)
        if isinstance(k, (int, float)) and not isinstance(k, bool):
            latest[float(k)] = rec
    return [latest[k] for k in sorted(latest)]


def _series(records: list[dict[str, Any]], x_key: str, y_key: str
            ) -> tuple[np.ndarray, np.ndarray] | None:
    """(x, y) for the records that have a numeric ``y_key``; None when none does."""
    xs, ys = [], []
    for rec in records:
        y = rec.get(y_key)
        if isinstance(y, (int, float)) and not isinstance(y, bool) and math.isfinite(y):
            xs.append(float(rec[x_key]))
            ys.append(float(y))
    if not xs:
        return None
    return np.asarray(xs), np.asarray(ys)


def load_curves(run: Path, name: str | None = None) -> RunCurves:
    """Read one run's ``log.jsonl`` into curves (duplicate steps from a resume: last one wins)."""
    path = find_log(run)
    records = read_log(path)
    curves = RunCurves(name=name or (path.parent.name if path.name == LOG_NAME else path.stem),
                       num_records=len(records))
    train = _latest_per_key([r for r in records if r.get("kind", "train") == "train"], "step")
    keys = [k for k in _LOSS_ORDER if any(k in r for r in train)]
    keys += sorted({k for r in train for k in r if k.startswith("loss") and k not in keys})
    for key in (*keys, "lr", "samples_per_s"):
        s = _series(train, "step", key)
        if s is not None:
            curves.train[key] = s
    evals = _latest_per_key([r for r in records if r.get("kind") == "eval"], "epoch")
    curves.knn = _series(evals, "epoch", "knn_top1")
    return curves


def smooth(y: np.ndarray, span: float) -> np.ndarray:
    """Bias-corrected exponential moving average with ``beta = 1 - 1/span``.

    ``s_t = beta*s_{t-1} + (1-beta)*y_t`` starting from 0, divided by ``1 - beta^(t+1)`` so the
    first values are not pulled towards zero.  ``span <= 1`` returns ``y`` unchanged."""
    y = np.asarray(y, dtype=float)
    if span <= 1 or y.size == 0:
        return y.copy()
    beta = 1.0 - 1.0 / span
    out = np.empty_like(y)
    acc = 0.0
    for t, v in enumerate(y):
        acc = beta * acc + (1.0 - beta) * v
        out[t] = acc / (1.0 - beta ** (t + 1))
    return out


def _auto_span(n: int) -> float:
    """About 1/30 of the curve: flattens per-batch noise but keeps the shape of the schedule."""
    return max(1.0, n / 30.0)


def _unique_names(runs: Sequence[Path]) -> list[str]:
    """Folder names, lengthened with parent folders until they differ (runs/a/demo, runs/b/demo)."""
    paths = [Path(r).resolve() for r in runs]
    paths = [p.parent if p.is_file() else p for p in paths]
    depth = 1
    while True:
        names = ["/".join(p.parts[-depth:]) for p in paths]
        if len(set(names)) == len(names) or depth >= max(len(p.parts) for p in paths):
            return names
        depth += 1


def _no_data(ax: Any, what: str) -> None:
    ax.text(0.5, 0.5, f"no data\n({what} not in the logs)", transform=ax.transAxes,
            ha="center", va="center", color="0.45", fontsize=11)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_runs(run_dirs: Sequence[Path | str], out: Path | str, smoothing: float | None = None,
              title: str | None = None) -> Path:
    """Draw the training curves of one or more runs into one PNG; returns its path.

    Args:
        run_dirs: run folders holding ``log.jsonl`` (or the log files themselves).
        out: PNG to write (parent folders are created).
        smoothing: EMA span in logged points for loss and throughput (None = about 1/30 of each
            curve, 1 = raw only).  Raw values are drawn faintly behind the smoothed ones.
        title: figure title (default: "pirl training curves").

    Panels: loss terms over step (total solid, loss_t dashed, loss_img dotted), learning rate over
    step, throughput (samples/s) over step, kNN top-1 (%) over epoch.  A metric no run logged
    leaves its panel saying "no data".  Raises FileNotFoundError naming the run folder without a
    ``log.jsonl`` and :class:`pirl.logs.LogFormatError` for a damaged log.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    if not run_dirs:
        raise ValueError("plot_runs needs at least one run folder")
    paths = [Path(r) for r in run_dirs]
    names = _unique_names(paths)
    runs = [load_curves(p, n) for p, n in zip(paths, names, strict=True)]
    for run, p in zip(runs, paths, strict=True):
        if run.num_records == 0:
            log.warning("%s: the log has no records yet", p)

    fig = Figure(figsize=(13, 8.5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    ax_loss, ax_lr, ax_tput, ax_knn = axes[0, 0], axes[0, 1], axes[1, 0], axes[1, 1]
    # tab10 is colour-blind friendlier than the default cycle's neighbours; cycle past 10 runs.
    colors = [f"C{i % 10}" for i in range(len(runs))]

    def draw(ax: Any, run_idx: int, xy: tuple[np.ndarray, np.ndarray], style: str,
             smoothed: bool) -> bool:
        """Plot one curve; True when it was smoothed (raw drawn faintly behind)."""
        x, y = xy
        color = colors[run_idx]
        span = _auto_span(len(y)) if smoothing is None else smoothing
        if smoothed and span > 1:
            ax.plot(x, y, style, color=color, alpha=0.2, linewidth=0.8)
            ax.plot(x, smooth(y, span), style, color=color, linewidth=1.8)
            return True
        ax.plot(x, y, style, color=color, linewidth=1.6, marker="o" if len(x) < 3 else None)
        return False

    def step_axis(ax: Any, title: str, ylabel: str, any_smoothed: bool) -> None:
        ax.set_title(title + (" (smoothed; raw values faint)" if any_smoothed else ""))
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 2.5, 5, 10]))
        ax.grid(True, alpha=0.3)

    # Loss terms: colour = run, line style = term.
    loss_keys: list[str] = []
    for run in runs:
        loss_keys += [k for k in run.train if k.startswith("loss") and k not in loss_keys]
    any_smoothed = False
    for i, run in enumerate(runs):
        for k in loss_keys:
            if k in run.train:
                style = _LOSS_STYLES[loss_keys.index(k) % len(_LOSS_STYLES)]
                any_smoothed |= draw(ax_loss, i, run.train[k], style, smoothed=True)
    if loss_keys:
        step_axis(ax_loss, "Loss terms", "loss", any_smoothed)
        handles = [Line2D([], [], color="0.2", linestyle=_LOSS_STYLES[j % len(_LOSS_STYLES)],
                          label=_LOSS_HELP.get(k, k)) for j, k in enumerate(loss_keys)]
        ax_loss.legend(handles=handles, loc="upper right", fontsize=9, title="term",
                       title_fontsize=9)
    else:
        ax_loss.set_title("Loss terms")
        _no_data(ax_loss, "loss")

    # Learning rate: a schedule, not noisy -> drawn raw.
    if any("lr" in r.train for r in runs):
        for i, run in enumerate(runs):
            if "lr" in run.train:
                draw(ax_lr, i, run.train["lr"], "-", smoothed=False)
        step_axis(ax_lr, "Learning rate", "learning rate", False)
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        ax_lr.set_ylim(bottom=0)
    else:
        ax_lr.set_title("Learning rate")
        _no_data(ax_lr, "lr")

    if any("samples_per_s" in r.train for r in runs):
        any_smoothed = False
        for i, run in enumerate(runs):
            if "samples_per_s" in run.train:
                any_smoothed |= draw(ax_tput, i, run.train["samples_per_s"], "-", smoothed=True)
        step_axis(ax_tput, "Throughput", "images / s (all processes)", any_smoothed)
        ax_tput.set_ylim(bottom=0)
    else:
        ax_tput.set_title("Throughput")
        _no_data(ax_tput, "samples_per_s")

    if any(r.knn is not None for r in runs):
        for i, run in enumerate(runs):
            if run.knn is None:
                continue
            x, y = run.knn
            ax_knn.plot(x, y, "-o", color=colors[i], linewidth=1.6, markersize=4)
            # The final accuracy is the number people look for: print it at the last point.
            ax_knn.annotate(f"{y[-1]:.1f}%", (x[-1], y[-1]), textcoords="offset points",
                            xytext=(5, 5), fontsize=9, color=colors[i],
                            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none",
                                  "alpha": 0.8})
        ax_knn.set_title("kNN top-1 accuracy on the validation set")
        ax_knn.set_xlabel("epoch")
        ax_knn.set_ylabel("kNN top-1 (%)")
        ax_knn.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax_knn.margins(x=0.08, y=0.12)
        ax_knn.grid(True, alpha=0.3)
    else:
        ax_knn.set_title("kNN top-1 accuracy")
        _no_data(ax_knn, "knn_top1")

    # One legend for the runs (colour) for the whole figure, below the panels (placed above,
    # constrained layout draws it over the suptitle).
    run_handles = [Line2D([], [], color=colors[i], linewidth=2.5, label=r.name)
                   for i, r in enumerate(runs)]
    fig.suptitle(title or "pirl training curves", fontsize=14)
    fig.legend(handles=run_handles, loc="outside lower center", ncols=min(len(runs), 4),
               fontsize=10, title="runs (colour)", title_fontsize=10, frameon=False)

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def add_plot_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``pirl plot`` to the ``pirl`` command's sub-parsers; its handler is ``args.func``."""
    p = subparsers.add_parser(
        "plot", help="draw loss terms, learning rate, throughput and kNN accuracy of one or "
        "more runs into one PNG",
        description="Draw the training curves of one or more run folders (their log.jsonl) "
        "into one PNG, runs overlaid.")
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                   help="run folder(s) written by `pirl pretrain` / `pirl demo`")
    p.add_argument("--out", type=Path, default=Path("plot.png"),
                   help="PNG to write (default: plot.png)")
    p.add_argument("--smooth", type=float, default=None, metavar="SPAN",
                   help="EMA span in logged points for loss and throughput "
                   "(default: ~1/30 of each curve; 1 = no smoothing)")
    p.add_argument("--title", default=None, help="figure title")
    p.set_defaults(func=cmd_plot)
    return p


def cmd_plot(args: argparse.Namespace) -> int:
    """Handler of ``pirl plot``: 0 on success, 2 for a missing or damaged log (message on
    stderr)."""
    try:
        out = plot_runs(args.run_dirs, args.out, smoothing=args.smooth, title=args.title)
    except (FileNotFoundError, LogFormatError) as e:
        print(f"pirl plot: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


# ----------------------------------------------------------------------------- views


class _Source(Protocol):
    def __len__(self) -> int: ...
    def load(self, i: int) -> Image.Image: ...


def _chw_to_hwc(x: Tensor) -> Any:
    return x.permute(1, 2, 0).numpy()


def show_views(source: _Source | Sequence[Image.Image], cfg: Config, out: str, n: int = 4,
               seed: int = 0) -> list[Tensor]:
    """Draw ``n`` images, one per row: the original, its image view, and its jigsaw patches in
    the order the network receives them, each titled with the grid cell it was cut from.

    ``source`` is an :class:`~pirl.data.source.ImageSource` (anything with ``len`` and
    ``load(i)``) or a sequence of PIL images; the rows are spread evenly over it, so an
    ImageFolder (sorted by class) shows several classes.  The orders come from the permutation
    set training would draw from (``objective.num_pirl_permutations`` for PIRL, the Jigsaw
    baseline's ``num_permutations``; any of P! when there is none).  Writes a PNG to ``out``;
    returns each row's order (Long ``[P]``).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from pirl.methods import permutation_set

    size = len(source)
    if size == 0:
        raise ValueError("show_views: the source holds no images")
    n = min(n, size)
    indices = sorted({round(i * (size - 1) / max(n - 1, 1)) for i in range(n)})
    g = torch.Generator().manual_seed(seed)
    image_view = ImageView(cfg.views, generator=g)
    orders = permutation_set(cfg, seed=cfg.train.seed)  # the set of a run of this config
    jigsaw_view = JigsawView(cfg.views, rotate=cfg.objective.pretext == "jigsaw+rotation",
                             generator=g, orders=orders)
    drawn: list[Tensor] = []
    P, grid = jigsaw_view.num_patches, cfg.views.grid
    cols = 2 + P
    fig = Figure(figsize=(1.3 * cols, 1.5 * len(indices)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(indices), cols, squeeze=False)
    for row, i in enumerate(indices):
        img = source.load(i) if hasattr(source, "load") else source[i]
        img = img.convert("RGB")
        view = image_view(img)
        patches, order = jigsaw_view(img)[:2]
        drawn.append(order)
        assert isinstance(view, Tensor)
        panels = [(_chw_to_hwc(to_uint8_tensor(img)), f"#{i} {img.width}x{img.height}"),
                  (_chw_to_hwc(view), f"view {cfg.views.image_size}")]
        for k, c in enumerate(order.tolist()):
            panels.append((_chw_to_hwc(patches[k]), f"cell {c} ({c // grid},{c % grid})"))
        for ax, (pixels, title) in zip(axes[row], panels, strict=True):
            ax.imshow(pixels, interpolation="nearest")
            ax.set_title(title, fontsize=7)
            ax.axis("off")
    orders_text = f"orders from a set of {len(orders)}" if orders is not None else "any order"
    fig.suptitle(f"image view and {P} jigsaw patches (crop {cfg.views.jigsaw_crop}, cell "
                 f"{cfg.views.cell}, patch {cfg.views.patch}); patches in network order, "
                 f"{orders_text}", fontsize=8)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return drawn
