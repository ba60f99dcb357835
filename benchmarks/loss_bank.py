"""Memory-bank loss benchmark (issue 6, target 2): forward, backward and update time, peak memory.

Compares, at ImageNet scale by default (bank 1,281,167 x 128, N = 32,000, batch 256, the paper's
NCE loss, one query per sample as in NPID / the issue's reference measurement):

* ``naive per-sample``: gather the ``[B,N,D]`` negatives, then a batched matrix product (the class
  of implementation of NPID / VISSL; the reference the targets are measured against);
* ``fast per-sample``: :func:`pirl.kernels.bank_scores.gather_scores` (chunked gather, no
  ``[B,N,D]`` kept, backward by a weighted ``embedding_bag`` or a chunked re-gather);
* ``shared``: one ``[N,D]`` gather and one matrix product for the whole batch;

each with a float32 and a float16 bank.  Forward = negative sampling + scores + loss; backward =
``loss.backward()``; update = the bank update of one batch.  Times are medians over ``--repeats``
after one warm-up.  Peak memory is the growth of the process's peak resident set size (VmHWM,
reset through ``/proc/self/clear_refs`` before each mode, with glibc's mmap threshold fixed so
freed buffers leave the RSS) over its resident size before the mode, measured on one
step, in a pass after the timings: what the step allocates beyond the bank itself (Linux
only; "n/a" elsewhere).

    python benchmarks/loss_bank.py            # ImageNet scale (needs ~6 GB RAM for the naive row)
    python benchmarks/loss_bank.py --quick    # seconds

Other engineers share this machine's two cores, so numbers are noisy; ratios come from one run.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from pirl.kernels.bank_scores import gather_scores, gather_scores_reference, shared_scores
from pirl.losses import nce_from_logits
from pirl.memory_bank import MemoryBank

TAU = 0.07


def _status_kb(key: str) -> int | None:
    """A ``/proc/self/status`` field in kB (Linux), or None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _fixed_mmap_threshold() -> bool:
    """Make glibc return every freed block of 64 KiB or more to the OS at once.

    By default glibc raises its mmap threshold (up to 32 MiB) after large frees, so buffers of an
    earlier step stay resident and a later step's allocations would not show in the RSS peak.
    Fixing the threshold (``mallopt(M_MMAP_THRESHOLD, 64 KiB)``) makes the RSS growth equal to
    what each mode allocates.  Linux / glibc only; False elsewhere."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 64 * 1024))  # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def _trim() -> None:
    """Hand free heap memory back to the OS (``malloc_trim``), so that blocks freed before the
    threshold was fixed cannot be reused unseen by the next measurement."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False when not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _step_fn(mode: str, bank: MemoryBank, n: int, batch: int, queries: int,
             gen: torch.Generator) -> Callable[[], tuple[float, float, float]]:
    """One timed step: returns (forward s, backward s, update s)."""
    idx = torch.randperm(bank.size, generator=gen)[:batch]
    shape = (batch, bank.dim) if queries == 1 else (batch, queries, bank.dim)

    def step() -> tuple[float, float, float]:
        q = F.normalize(torch.randn(*shape, generator=gen), dim=-1).requires_grad_()
        t0 = time.perf_counter()
        q3 = q if queries > 1 else q.unsqueeze(1)
        pos = (q3 * bank.positives(idx).unsqueeze(1)).sum(-1) / TAU  # [B,Q]
        if mode == "shared":
            neg_idx = bank.negative_indices(idx, n, "shared", gen)
            neg = shared_scores(q3 / TAU, bank.rows, neg_idx)
        elif mode == "fast":
            neg_idx = bank.negative_indices(idx, n, "per-sample", gen)
            neg = gather_scores(q3 / TAU, bank.rows, neg_idx)
        else:  # the reference class of implementation, as written in NPID / VISSL
            neg_idx = bank.negative_indices(idx, n, "per-sample", gen)
            neg = gather_scores_reference(q3, bank.rows, neg_idx) / TAU
        loss = sum(nce_from_logits(pos[:, k], neg[:, k]).mean() for k in range(queries))
        t1 = time.perf_counter()
        assert isinstance(loss, torch.Tensor)
        loss.backward()
        t2 = time.perf_counter()
        bank.update(idx, q3[:, -1].detach(), 0.5)
        t3 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2

    return step


_LABELS = {"naive": "naive per-sample (gather [B,N,D] + bmm)",
           "fast": "fast per-sample (chunked gather)",
           "shared": "shared (one [N,D] gather + matmul)"}


def run(args: argparse.Namespace) -> list[dict[str, object]]:
    """Time every mode (default allocator), then measure each mode's peak memory in a second pass
    (fixed mmap threshold, which would slow the timed steps with page faults)."""
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(0)
    rows: list[dict[str, object]] = []
    modes = [("naive", "float32"), ("fast", "float32"), ("fast", "float16"),
             ("shared", "float32"), ("shared", "float16")]
    if args.skip_naive:
        modes = modes[1:]
    banks: dict[str, MemoryBank] = {}
    steps = {}
    for mode, dtype in modes:
        if dtype not in banks:
            banks[dtype] = MemoryBank(args.bank_size, args.dim, dtype=dtype, seed=0)
        bank = banks[dtype]
        step = steps[mode, dtype] = _step_fn(mode, bank, args.negatives, args.batch,
                                             args.queries, gen)
        step()  # warm-up
        times = [step() for _ in range(args.repeats)]
        fwd = statistics.median(t[0] for t in times)
        bwd = statistics.median(t[1] for t in times)
        upd = statistics.median(t[2] for t in times)
        rows.append({"mode": _LABELS[mode], "bank": dtype, "forward_s": fwd, "backward_s": bwd,
                     "update_ms": upd * 1000, "fwd_bwd_s": fwd + bwd, "peak_extra_mb": None,
                     "bank_mb": bank.rows.numel() * bank.rows.element_size() / 2**20})
        print(f"  {_LABELS[mode]:42s} {dtype:8s} fwd {fwd:.3f}s bwd {bwd:.3f}s", flush=True)
    if _fixed_mmap_threshold():
        for row, key in zip(rows, modes, strict=True):
            _trim()
            can_peak = _reset_peak()
            rss0 = _status_kb("VmRSS")
            steps[key]()
            hwm = _status_kb("VmHWM")
            if can_peak and hwm is not None and rss0 is not None:
                row["peak_extra_mb"] = (hwm - rss0) / 1024
    base = next((r["fwd_bwd_s"] for r in rows if str(r["mode"]).startswith("naive")), None)
    for r in rows:
        r["speedup_vs_naive"] = (float(base) / float(r["fwd_bwd_s"])  # type: ignore[arg-type]
                                 if base else None)
    return rows


def table(rows: list[dict[str, object]]) -> str:
    head = ("| mode | bank | bank MB | forward s | backward s | fwd+bwd s | update ms | "
            "peak extra MB | speed-up vs naive |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        peak = "n/a" if r["peak_extra_mb"] is None else f"{r['peak_extra_mb']:.0f}"
        sp = "-" if r["speedup_vs_naive"] is None else f"{r['speedup_vs_naive']:.1f}x"
        lines.append(f"| {r['mode']} | {r['bank']} | {r['bank_mb']:.0f} | {r['forward_s']:.3f} | "
                     f"{r['backward_s']:.3f} | {r['fwd_bwd_s']:.3f} | {r['update_ms']:.1f} | "
                     f"{peak} | {sp} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--bank-size", type=int, default=1_281_167, help="memory bank rows |D|")
    p.add_argument("--negatives", type=int, default=32_000, help="negatives N per sample")
    p.add_argument("--batch", type=int, default=256, help="batch size B")
    p.add_argument("--dim", type=int, default=128, help="embedding dimension D")
    p.add_argument("--queries", type=int, default=1,
                   help="queries per sample sharing the negatives (2 = PIRL's z_t and z_img)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median) after a warm-up")
    p.add_argument("--quick", action="store_true",
                   help="small sizes (bank 50,000, N 4,096, batch 64, 2 repeats) for a smoke run")
    p.add_argument("--skip-naive", action="store_true", help="leave out the slow reference row")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    if args.quick:
        args.bank_size, args.negatives, args.batch, args.repeats = 50_000, 4096, 64, 2
    if args.negatives >= args.bank_size:
        p.error(f"--negatives={args.negatives} must be below --bank-size={args.bank_size}")
    print(f"# loss + bank: bank {args.bank_size} x {args.dim}, N {args.negatives}, batch "
          f"{args.batch}, queries {args.queries}, torch {torch.__version__}, 2 threads, median of "
          f"{args.repeats}", flush=True)
    rows = run(args)
    print()
    print(table(rows))
    print("\npeak extra MB: growth of the peak resident set size (VmHWM, reset via "
          "/proc/self/clear_refs, glibc mmap threshold fixed at 64 KiB) over the resident size "
          "before the step; the bank itself is not included. The CPU is shared with other jobs: "
          "times are noisy.")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
