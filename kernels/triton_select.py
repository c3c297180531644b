"""Triton twin of ``reference.select_tokens_padded_ref``: Dynamic Token Coverage and the ordered kept positions.

Four launches where the PyTorch steps take some 25 small ones (and their host time set a sparse layer's cost
below 16K): the head-averaged scores (one reduction), their ascending sort, each head's descending sort (only
its values: the K-th largest is the cut), and ``_select_kernel``, one program per head: the cumulative tail
mass, the coverage rule and the clamps (every program derives the same count), then the candidates above the
cut and those tied at it in position order until K, written ascending by a prefix sum, then the always-kept
tail and the padding. Nothing is read back to the host: the count stays on the device, so the same selection
serves the synced path (which then reads it once) and a CUDA graph."""

from __future__ import annotations

import torch
from torch import Tensor

from .reference import coverage_distribution
from .triton_import import HAS_TRITON, tl, triton

if HAS_TRITON:

    @triton.jit
    def _coverage_limit(Averaged, candidates, tau, BLOCK: tl.constexpr, NORMALIZE: tl.constexpr):
        # The tail mass the coverage rule may drop: tau, of the total when NORMALIZE (the authors' mean / (sum + 1e-8))
        limit = tau
        if NORMALIZE:
            offs = tl.arange(0, BLOCK)
            total = tl.zeros([BLOCK], tl.float32)
            for start in range(0, candidates, BLOCK):
                total += tl.load(Averaged + start + offs, mask=start + offs < candidates, other=0.0)
            limit = tau * (tl.sum(total, 0) + 1e-8)
        return limit

    @triton.jit
    def _kept_after_tail(below, candidates, DROP_NEXT: tl.constexpr):
        # The candidates left once the ``below`` tail tokens whose cumulative mass stays under the limit are
        # dropped, one more with DROP_NEXT (the authors' rule: nothing when there are none)
        dropped = below
        if DROP_NEXT:
            dropped = tl.where(below > 0, below + 1, below)
        return candidates - dropped

    @triton.jit
    def _kept_count(Ascending, candidates, tau, floor, keep, BLOCK: tl.constexpr, NORMALIZE: tl.constexpr,
                    DROP_NEXT: tl.constexpr, FORCED: tl.constexpr):
        # reference.kept_count_ref on the ascending head-averaged scores: the tail whose cumulative mass stays
        # below the limit is dropped (``_coverage_limit``, ``_kept_after_tail``); then the floor and the ceiling
        offs = tl.arange(0, BLOCK)
        kept = tl.sum(tl.zeros([BLOCK], tl.int32), 0) + keep
        if not FORCED:
            limit = _coverage_limit(Ascending, candidates, tau, BLOCK, NORMALIZE)
            carry = tl.sum(tl.zeros([BLOCK], tl.float32), 0)
            below = tl.sum(tl.zeros([BLOCK], tl.int32), 0)
            for start in range(0, candidates, BLOCK):
                inside = start + offs < candidates
                x = tl.load(Ascending + start + offs, mask=inside, other=0.0)
                running = carry + tl.cumsum(x, 0)
                below += tl.sum((inside & (running < limit)).to(tl.int32), 0)
                carry += tl.sum(x, 0)
            kept = _kept_after_tail(below, candidates, DROP_NEXT)
        return tl.minimum(tl.maximum(kept, floor), candidates)

    @triton.jit
    def _write_kept(Row, Out, cut, keep, candidates, seq_len, BLOCK: tl.constexpr):
        # One head's kept positions, given its K-th largest score ``cut`` (inf when keep is 0): the candidates
        # above it and those tied at it in position order until ``keep`` (ties go to the earlier token),
        # ascending by a prefix sum, then the tail [C, seq_len), then padding (seq_len - 1, never read)
        offs = tl.arange(0, BLOCK)
        greater = tl.sum(tl.zeros([BLOCK], tl.int32), 0)
        for start in range(0, candidates, BLOCK):
            x = tl.load(Row + start + offs, mask=start + offs < candidates, other=float("-inf"))
            greater += tl.sum((x > cut).to(tl.int32), 0)
        ties_kept = keep - greater
        written = tl.sum(tl.zeros([BLOCK], tl.int32), 0)
        ties_seen = tl.sum(tl.zeros([BLOCK], tl.int32), 0)
        for start in range(0, candidates, BLOCK):
            position = start + offs
            x = tl.load(Row + position, mask=position < candidates, other=float("-inf"))
            tie = x == cut
            tie_rank = ties_seen + tl.cumsum(tie.to(tl.int32), 0)  # 1-based among the ties so far
            chosen = (x > cut) | (tie & (tie_rank <= ties_kept))
            slot = written + tl.cumsum(chosen.to(tl.int32), 0) - 1
            tl.store(Out + slot, position.to(tl.int64), mask=chosen)
            written += tl.sum(chosen.to(tl.int32), 0)
            ties_seen += tl.sum(tie.to(tl.int32), 0)
        for start in range(0, seq_len - keep, BLOCK):
            position = candidates + start + offs  # the tail, then padding
            tl.store(Out + keep + start + offs, tl.minimum(position, seq_len - 1).to(tl.int64),
                     mask=keep + start + offs < seq_len)

    @triton.jit
    def _select_kernel(Ascending, Pooled, Descending, Count, Kept, stride_p, stride_d, stride_k, candidates, seq_len,
                       tau, floor, keep, BLOCK: tl.constexpr, NORMALIZE: tl.constexpr,
                       DROP_NEXT: tl.constexpr, FORCED: tl.constexpr):
        # One head: the layer's count (every program derives the same one: cheaper than a second launch), then
        # the head's top ``keep`` candidates (the K-th largest score read from the descending sort)
        head = tl.program_id(0)
        keep = _kept_count(Ascending, candidates, tau, floor, keep, BLOCK, NORMALIZE, DROP_NEXT, FORCED)
        tl.store(Count + head, (keep + seq_len - candidates).to(tl.int64))
        cut = tl.load(Descending + head * stride_d + tl.maximum(keep - 1, 0))
        cut = tl.where(keep > 0, cut, float("inf"))
        _write_kept(Pooled + head * stride_p, Kept + head * stride_k, cut, keep, candidates, seq_len, BLOCK)


_BLOCK = 1024


def select_tokens_padded(pooled: Tensor, seq_len: int, tau: float, min_tokens: int, coverage: str = "paper",
                         keep: int | None = None) -> tuple[Tensor, Tensor]:
    """Triton twin of ``reference.select_tokens_padded_ref`` (same arguments, same results).

    The count equals the reference's up to the fp32 rounding of the cumulative tail mass (a different summation
    order), so only where that mass lies within rounding of ``tau``; given the count, the kept positions are
    identical (the K-th largest score is found exactly, ties at it go to the earlier token).

    Returns:
        kept: (Hs, Lk) int64; row h holds its ``count[h]`` kept positions in ascending order, then ``Lk - 1``.
        count: (Hs,) int64 on the device, ``K + T`` for every head.
    """
    if pooled.stride(-1) != 1:
        raise ValueError("select_tokens_padded: pooled must be contiguous along the token axis")
    heads, candidates = pooled.shape
    ascending = torch.sort(coverage_distribution(pooled, coverage)).values
    descending = torch.sort(pooled, dim=-1, descending=True).values
    count = torch.empty(heads, device=pooled.device, dtype=torch.int64)
    kept = torch.empty(heads, seq_len, device=pooled.device, dtype=torch.int64)
    _select_kernel[(heads,)](ascending, pooled, descending, count, kept, pooled.stride(0), descending.stride(0),
                             kept.stride(0), candidates, seq_len, tau, max(0, min(min_tokens, candidates)),
                             0 if keep is None else keep, BLOCK=_BLOCK, NORMALIZE=coverage == "paper",
                             DROP_NEXT=coverage == "paper", FORCED=keep is not None, num_warps=4)
    return kept, count


__all__ = ["select_tokens_padded"]
