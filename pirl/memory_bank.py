"""The memory bank (docs/method.md, "Memory bank") and the draw of negatives from it.

One L2-normalised row m_I per training image, initialised with random unit vectors from a seed (so
every rank of a data-parallel job builds the same bank without communicating).  After each step
``m_I <- normalize(momentum * m_I + (1 - momentum) * f(v_I))`` with the detached embedding of the
untransformed image; scoring always uses the bank *before* the step's update.  Scoring a batch
against the bank's rows is fast code and lives in :mod:`pirl.kernels.bank_scores`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pirl.config import BANK_DTYPES, NEGATIVE_MODES

# About this many values are drawn per chunk when the bank is initialised.  Chunks hold a multiple
# of 16 rows: the CPU generator draws normals in blocks of 16 values, so a chunk boundary at a
# whole block cannot change the stream, provided no chunk has under 16 values (those are drawn by
# another method).  Checked by a test; other boundaries do change the stream.
_INIT_CHUNK_VALUES = 1 << 24

# The config's names are torch's dtype names.
_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in BANK_DTYPES}


def bank_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"float32" | "float16" | "bfloat16"`` (config ``objective.bank_dtype``) -> torch dtype."""
    if isinstance(name, torch.dtype):
        if name not in _DTYPES.values():
            raise ValueError(f"memory bank dtype {name}: choose one of {list(_DTYPES)}")
        return name
    if name not in _DTYPES:
        raise ValueError(f"objective.bank_dtype={name!r}: choose one of {list(_DTYPES)}")
    return _DTYPES[name]


class MemoryBank(nn.Module):
    """``|D|`` unit-norm rows of dimension D, stored in ``dtype`` (scores are always float32).

    A float16 / bfloat16 bank halves the memory and the gather traffic of the loss; rows are
    re-normalised in float32 on every update, so the rounding does not accumulate.
    """

    rows: Tensor

    def __init__(self, size: int, dim: int, dtype: torch.dtype | str = torch.float32,
                 seed: int = 0) -> None:
        super().__init__()
        if size < 2:
            raise ValueError(f"memory bank needs at least 2 rows (one per image); got size={size}")
        if dim < 1:
            raise ValueError(f"memory bank dim must be positive; got {dim}")
        self.size, self.dim, self.dtype = size, dim, bank_dtype(dtype)
        # Uniform on the sphere, drawn in chunks of rows straight into the storage dtype: the same
        # numbers as one randn(size, dim) (the generator's stream does not depend on the chunking),
        # without a float32 copy of the whole bank (51 GB at 100M rows x 128) next to a half one.
        gen = torch.Generator().manual_seed(seed)
        rows = torch.empty(size, dim, dtype=self.dtype)
        step = max(16, _INIT_CHUNK_VALUES // dim // 16 * 16)  # rows: whole blocks of 16 values
        lo = 0
        while lo < size:
            n = min(step, size - lo)
            if (size - lo - n) * dim < 16:  # a last chunk under 16 values would be drawn
                n = size - lo               # differently: take it with this one
            rows[lo:lo + n] = F.normalize(torch.randn(n, dim, generator=gen), dim=1)
            lo += n
        self.register_buffer("rows", rows)

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, dtype={self.dtype}"

    def positives(self, idx: Tensor) -> Tensor:
        """Rows m_I of the given images: ``idx`` Long ``[B]`` -> float32 ``[B,D]``."""
        return self.rows.index_select(0, idx.to(self.rows.device)).float()

    def negative_indices(self, idx: Tensor, n: int, mode: str,
                         generator: torch.Generator | None = None) -> Tensor:
        """Draw N negatives, uniform over the bank excluding the positives.

        ``idx`` Long ``[B]``: the batch's own rows.  ``generator`` must live on the bank's device.

        * ``per-sample`` -> Long ``[B,N]``: row b never contains ``idx[b]``.  Each entry is uniform
          over the other ``|D| - 1`` rows: draw r in ``[0, |D|-1)`` and shift ``r >= idx[b]`` up by
          one (exact, and no rejection loop).  Drawn *with replacement*, as NPID / VISSL do
          (at the paper's 32,000 of 1.28M rows a repeat is rare); a row may equal another
          sample's positive, as in the paper.
        * ``shared`` -> Long ``[N]``: one draw for the whole batch, excluding every row of the
          batch, so no sample ever sees its own or a batch-mate's row as a negative.  Without
          replacement when N is more than 5% of the |D| - B rows left (small datasets, where
          repeats would matter) and fits; otherwise with replacement, where the expected share of
          repeated rows, N / (2 x rows left), is below 2.5% and an O(|D|) draw per step is saved.

        Neither mode reads anything back from the device (no data-dependent shapes), so a GPU
        step never waits here.
        """
        if idx.dim() != 1:
            raise ValueError(f"idx must be Long [B]; got shape {tuple(idx.shape)}")
        dev = self.rows.device
        idx = idx.to(dev)
        if n < 1:
            raise ValueError(f"number of negatives must be positive; got {n}")
        if mode == "per-sample":
            r = torch.randint(0, self.size - 1, (idx.shape[0], n), generator=generator,
                              device=dev)
            return r.add_(r >= idx.unsqueeze(1))  # in place: [B,N] is 65 MB at ImageNet scale
        if mode == "shared":
            return self._shared_negatives(idx, n, generator)
        raise ValueError(f"objective.negatives={mode!r}: choose one of {list(NEGATIVE_MODES)}")

    def _shared_negatives(self, idx: Tensor, n: int, generator: torch.Generator | None) -> Tensor:
        """One draw of N rows for the whole batch ``idx`` Long ``[B]`` (repeats allowed in
        ``idx``), none of them a batch row -> Long ``[N]``.

        Only fixed shapes, so nothing waits for the device: how many distinct rows the batch has
        stays a device scalar.  Whether to draw without replacement is decided from |D| - B, a
        host-side lower bound of the rows left (exact when the batch has no repeats).
        """
        dev, b = self.rows.device, idx.shape[0]
        if b >= self.size and torch.unique(idx).numel() >= self.size:  # shapes only, then exact
            raise ValueError(f"shared negatives: the batch covers all {self.size} bank rows; "
                             "nothing is left to draw from")
        if b == 0:
            return torch.randint(0, self.size, (n,), generator=generator, device=dev)
        rest = self.size - b
        if 0 < n <= rest and 20 * n > rest:
            # Without replacement: a random key per row, the batch's rows pushed past every other
            # key, and the N smallest keys; their order is the keys', so it is random too.
            keys = torch.rand(self.size, generator=generator, device=dev)
            keys.index_fill_(0, idx, 2.0)
            return torch.topk(keys, n, largest=False).indices
        srt = torch.sort(idx).values  # [B]
        first = torch.ones(b, dtype=torch.bool, device=dev)
        first[1:] = srt[1:] != srt[:-1]  # the first of each run of equal rows
        below = torch.cumsum(first, 0) - 1  # [B]: distinct batch rows smaller than this one
        free = self.size - below[-1] - 1  # device scalar: rows left to draw from
        # r: a uniform rank among the allowed rows (float64: exact far beyond 100M rows).
        u = torch.rand(n, generator=generator, device=dev, dtype=torch.float64)
        r = torch.minimum((u * free).long(), free - 1)
        # The k-th distinct excluded row u_k has u_k - k allowed rows below it, so the answer is
        # r + #{k : u_k - k <= r}.  Repeats get |D| (above every r), which keeps the offsets
        # sorted-able with a fixed shape and never counts them.
        offsets = torch.where(first, srt - below, torch.full_like(srt, self.size))
        return r + torch.searchsorted(torch.sort(offsets).values, r, right=True)

    @torch.no_grad()
    def update(self, idx: Tensor, z: Tensor, momentum: float) -> None:
        """``m_I <- normalize(momentum * m_I + (1 - momentum) * z_I)`` for ``idx`` Long ``[B]``,
        ``z`` ``[B,D]`` (detached embeddings of the untransformed images), in float32.

        An index that occurs more than once in ``idx`` (a padded last batch, or a sample repeated
        by the distributed sampler) is updated once, from the old row, with its *last* occurrence:
        every replica receives the same gathered order, so the result is the same everywhere.
        Every duplicate position writes that same new row, so the order in which the device
        performs the writes does not matter, and nothing waits for the device (no data-dependent
        shapes, no reads to the host) except the index range check on a CPU bank.
        """
        if idx.dim() != 1 or z.dim() != 2 or z.shape[0] != idx.shape[0]:
            raise ValueError(f"update needs idx [B] and z [B,D]; got {tuple(idx.shape)} and "
                             f"{tuple(z.shape)}")
        if z.shape[1] != self.dim:
            raise ValueError(f"update: embedding dim {z.shape[1]} != memory bank dim {self.dim}")
        dev = self.rows.device
        idx, z = idx.to(dev), z.to(dev)
        # A readable error on CPU, where reading the range costs no device round trip; on a GPU
        # an out-of-range index still stops the run, through index_select's device assertion.
        if dev.type == "cpu" and idx.numel() and (int(idx.min()) < 0
                                                  or int(idx.max()) >= self.size):
            raise IndexError(f"memory bank update: index out of range [0, {self.size}): "
                             f"min {int(idx.min())}, max {int(idx.max())}")
        z = z[_last_occurrence(idx)]  # [B,D]: each position gets its index's last embedding
        old = self.rows.index_select(0, idx).float()
        new = F.normalize(momentum * old + (1.0 - momentum) * z.float(), dim=1)
        self.rows.index_copy_(0, idx, new.to(self.dtype))

    @torch.no_grad()
    def checksum(self) -> float:
        """A position-sensitive fingerprint of the rows (replicas on every rank must agree): the
        sum of the rows plus the row sums weighted by their row number."""
        s = self.rows.sum(dim=1, dtype=torch.float64)  # no float64 copy of the whole bank
        w = torch.arange(1, self.size + 1, device=s.device, dtype=torch.float64) / self.size
        return float(s.sum() + (s * w).sum())

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any,
                              **kwargs: Any) -> None:
        key = prefix + "rows"
        if key in state_dict:
            rows = state_dict[key]
            if rows.dim() != 2 or rows.shape[1] != self.dim:
                raise ValueError(f"memory bank state {key!r}: shape {tuple(rows.shape)}, expected "
                                 f"[{self.size}, {self.dim}]")
            if rows.shape[0] != self.size:
                raise ValueError(f"memory bank state {key!r}: bank rows {rows.shape[0]} != |D| = "
                                 f"{self.size} (the checkpoint was trained on a dataset of "
                                 f"{rows.shape[0]} images)")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _last_occurrence(idx: Tensor) -> Tensor:
    """For each position of ``idx`` Long [B], the position of the last occurrence of its value
    -> Long [B] (a position that is its value's last occurrence maps to itself).

    Fixed shapes only (no boolean-mask indexing, whose output size would have to be read back
    from the device): sort stably, mark where each run of equal values ends, and spread each
    run's end back over the run with a reversed cumulative minimum.
    """
    b = idx.shape[0]
    order = torch.sort(idx, stable=True).indices  # equal values keep their order: last = latest
    s = idx[order]
    pos = torch.arange(b, device=idx.device)
    ends = torch.full_like(pos, b)
    ends[-1:] = b - 1
    ends[:-1] = torch.where(s[1:] != s[:-1], pos[:-1], b)
    run_end = torch.flip(torch.cummin(torch.flip(ends, (0,)), dim=0).values, (0,))  # [B] sorted
    out = torch.empty_like(pos)
    out[order] = order[run_end]
    return out

