"""Peak memory of the memory bank and of frozen-feature evaluation as the dataset grows.

Every case runs in a fresh Python process and reports that process's peak resident memory
(``ru_maxrss``) minus the peak of a process that only imported torch and pirl, so each row is what
the case itself added.  The cases use random data of the real shapes; no images are read.

* ``bank``: one training step's memory-bank work at ImageNet settings -- a bank of R rows x 128
  (float32 or float16), per-sample negatives for a batch of 256 (N = 32,000: a Long [256, 32000]
  index), both PIRL queries scored against them with :func:`pirl.kernels.bank_scores.gather_scores`
  plus its backward, and the bank update.
* ``knn``: the kNN protocol's vote for 1,000 queries against R training features of 2,048
  values (ResNet-50 res5), as :func:`pirl.evaluate.knn.knn_scores` does it.

Rows that the machine cannot hold (100M bank rows are 51 GB in float32) are extrapolated from the
measured ones with a straight line through the two largest measured sizes of the same case, and
are marked as such.  The cached linear probe's feature memory is a formula of the code
(:func:`pirl.evaluate.linear_mode.cached_feature_bytes`); the table prints it for ImageNet next to
the streaming probe, whose memory does not grow with the dataset (``benchmarks/linear_stream.py``
measures both on Imagenette).

    python benchmarks/memory.py                # the table of docs/performance.md
    python benchmarks/memory.py --quick        # small sizes, a smoke run
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20


def _peak_mib() -> float:
    """Peak resident memory of this process in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _case(kind: str, rows: int, dtype: str) -> None:
    """Run one case in this process and print its peak RSS as JSON (the child side)."""
    import torch
    import torch.nn.functional as F

    import pirl  # noqa: F401  (the baseline imports it too)

    torch.set_num_threads(2)
    if kind == "baseline":
        pass
    elif kind == "bank":
        from pirl.kernels.bank_scores import gather_scores
        from pirl.memory_bank import MemoryBank

        b, n, d = 256, 32000, 128
        bank = MemoryBank(rows, d, dtype=dtype, seed=0)
        gen = torch.Generator().manual_seed(1)
        idx = torch.randint(0, rows, (b,), generator=gen)
        q = F.normalize(torch.randn(b, 2, d), dim=2).requires_grad_(True)  # g(v_I^t), f(v_I)
        neg = bank.negative_indices(idx, n, "per-sample", gen)  # [B, N]
        scores = gather_scores(q, bank.rows, neg)  # [B, 2, N]
        scores.logsumexp(dim=2).sum().backward()
        bank.update(idx, q.detach()[:, 1], 0.5)
    elif kind == "knn":
        from pirl.evaluate.knn import knn_scores

        feats = torch.randn(rows, 2048, dtype=getattr(torch, dtype))
        labels = torch.randint(0, 1000, (rows,))
        knn_scores(feats, labels, torch.randn(1000, 2048), 1000, k=200)
    else:
        raise SystemExit(f"unknown case {kind!r}")
    print(json.dumps({"peak_mib": _peak_mib()}))


def measure(kind: str, rows: int, dtype: str) -> float:
    """Peak RSS (MiB) of a fresh process running one case."""
    out = subprocess.run([sys.executable, __file__, "--case", kind, "--rows", str(rows),
                          "--dtype", dtype], check=True, capture_output=True, text=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"])


def _fmt_rows(n: int) -> str:
    return f"{n / 1e6:g}M" if n >= 1_000_000 else f"{n / 1e3:g}k"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--rows", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    args = ap.parse_args(argv)
    if args.case:
        _case(args.case, args.rows, args.dtype)
        return 0

    bank_rows = [100_000, 1_000_000] if args.quick else [1_000_000, 10_000_000]
    knn_rows = [20_000, 50_000] if args.quick else [100_000, 400_000]
    targets = {"bank": [100_000_000], "knn": [1_281_167]}
    base = measure("baseline", 0, "float32")
    print(f"baseline (python + torch + pirl imported): {base:.0f} MiB peak RSS\n")
    print("| case | rows | dtype | peak RSS added (MiB) | measured or extrapolated |")
    print("|---|---|---|---|---|")
    plan = [("bank", bank_rows, "float32"), ("bank", bank_rows, "float16"),
            ("knn", knn_rows, "float32"), ("knn", knn_rows, "float16")]
    for kind, sizes, dtype in plan:
        got = [(r, measure(kind, r, dtype) - base) for r in sizes]
        for r, mib in got:
            print(f"| {kind} | {_fmt_rows(r)} | {dtype} | {mib:,.0f} | measured |", flush=True)
        (r0, m0), (r1, m1) = got[-2], got[-1]
        slope = (m1 - m0) / (r1 - r0)
        for r in targets[kind]:
            print(f"| {kind} | {_fmt_rows(r)} | {dtype} | {m1 + slope * (r - r1):,.0f} | "
                  f"extrapolated ({slope * MIB:,.0f} bytes per row) |", flush=True)

    from pirl.evaluate.linear_mode import cached_feature_bytes

    print("\nCached linear probe, features held in memory (formula of the code), ImageNet "
          "(1,281,167 train, 50,000 val), ResNet-50:\n")
    print("| stages | training copies held | GiB |")
    print("|---|---|---|")
    res5 = {"res5": 2048}
    every = {"conv1": 9216, "res2": 9216, "res3": 8192, "res4": 9216, "res5": 2048}
    for name, dims in (("res5", res5), ("all five", every)):
        for copies in (1, 2):
            gib = cached_feature_bytes(1_281_167, 50_000, copies, dims, disk_cache=False) / 2**30
            print(f"| {name} | {copies} | {gib:,.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
