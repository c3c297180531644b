"""A candidate for TSA's token selection that sorts nothing, kept here until the GPU decides (timed by
``launch_cost.py`` as ``select_radix`` against the shipped ``triton_select.select_tokens_padded``; tested against
the reference with it in ``tests/kernels/test_triton.py``).

The shipped selection launches a head mean, two torch sorts (the ascending head-averaged scores for the coverage
rule, each head's descending scores for its K-th largest) and one kernel. On the H200 at 8K that costs 0.16 ms of
device time and 280 us of host time, most of it the sorts' (results/launch-cost-H200-20261202.json). This one
launches the head mean and one kernel: a radix search over fp32 bit patterns (4 bits a pass, 16 candidates
counted per read of the row, 8 passes) finds the value where the coverage rule's ascending tail ends and each
head's K-th largest score; the count follows from the mass below that value and the ties at it; the write-out is
the shipped kernel's (``_write_kept``). Its reads grow with 16 passes per head over the row, so it may lose at
128K what it wins at 8K: the benchmark says which.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tsa_patch.kernels.reference import coverage_distribution
from tsa_patch.kernels.triton_import import HAS_TRITON, tl, triton
from tsa_patch.kernels.triton_select import _BLOCK, _coverage_limit, _kept_after_tail, _write_kept

if HAS_TRITON:

    @triton.jit
    def _largest_bits(Row, n, target, BLOCK: tl.constexpr, MASS: tl.constexpr):
        # The largest fp32 bit pattern t (which orders the non-negative floats) in [0, +inf] whose predicate
        # holds over the row's n values, all >= 0: with MASS the sum of the values below t stays under target,
        # else at least target (>= 1) values are >= t. Both predicates hold at 0 and fail from some t on, so a
        # radix search finds t exactly: 4 bits a pass, all 16 candidates of a pass counted in one read of the
        # row, 8 passes for the 31 bits (the first pass's candidates with the sign bit set are not candidates).
        offs = tl.arange(0, BLOCK)
        digits = tl.arange(0, 16)
        prefix = tl.sum(tl.zeros([1], tl.int32), 0)
        for p in tl.static_range(8):
            candidate = prefix + (digits << (28 - 4 * p))
            valid = (candidate >= 0) & (candidate <= 0x7F800000)
            threshold = tl.where(valid, candidate, 0).to(tl.float32, bitcast=True)
            if MASS:
                acc = tl.zeros([16], tl.float32)
            else:
                acc = tl.zeros([16], tl.int32)
            for start in range(0, n, BLOCK):
                inside = start + offs < n
                if MASS:  # padding is +inf: never below a threshold
                    x = tl.load(Row + start + offs, mask=inside, other=float("inf"))
                    acc += tl.sum(tl.where(x[:, None] < threshold[None, :], x[:, None], 0.0), 0)
                else:  # padding is -1: never at or above a threshold
                    x = tl.load(Row + start + offs, mask=inside, other=-1.0)
                    acc += tl.sum((x[:, None] >= threshold[None, :]).to(tl.int32), 0)
            if MASS:
                holds = valid & (acc < target)
            else:
                holds = valid & (acc >= target)
            prefix += tl.max(tl.where(holds, digits, 0), 0) << (28 - 4 * p)
        return prefix

    @triton.jit
    def _radix_kept_count(Averaged, candidates, tau, floor, keep, BLOCK: tl.constexpr, NORMALIZE: tl.constexpr,
                          DROP_NEXT: tl.constexpr, FORCED: tl.constexpr):
        # reference.kept_count_ref on the head-averaged scores without sorting them (the shipped
        # ``triton_select._kept_count`` sums their ascending sort): the ascending tail whose cumulative mass stays
        # below the limit is dropped (the shipped ``_coverage_limit`` and ``_kept_after_tail``); then the floor
        # and the ceiling. The tail ends at the value t where the mass below t stays under the limit
        # (``_largest_bits``): every value below t, and as many of those tied at t as the limit leaves room for.
        # (A limit above the total gives t = inf, every candidate below it; tau 0 gives t = 0 and no room.)
        offs = tl.arange(0, BLOCK)
        kept = tl.sum(tl.zeros([BLOCK], tl.int32), 0) + keep
        if not FORCED:
            limit = _coverage_limit(Averaged, candidates, tau, BLOCK, NORMALIZE)
            cut = _largest_bits(Averaged, candidates, limit, BLOCK, True).to(tl.float32, bitcast=True)
            below_mass = tl.zeros([BLOCK], tl.float32)
            below_count = tl.zeros([BLOCK], tl.int32)
            tied = tl.zeros([BLOCK], tl.int32)
            for start in range(0, candidates, BLOCK):
                x = tl.load(Averaged + start + offs, mask=start + offs < candidates, other=float("inf"))
                below_mass += tl.where(x < cut, x, 0.0)
                below_count += (x < cut).to(tl.int32)
                tied += (x == cut).to(tl.int32)
            below_mass = tl.sum(below_mass, 0)
            tied = tl.sum(tied, 0)
            # the j-th value tied at the cut ends a tail of mass below_mass + j * cut
            room = tl.ceil((limit - below_mass) / tl.maximum(cut, 1e-38)) - 1
            below = tl.sum(below_count, 0) + tl.minimum(tl.maximum(room, 0.0), tied.to(tl.float32)).to(tl.int32)
            kept = _kept_after_tail(below, candidates, DROP_NEXT)
        return tl.minimum(tl.maximum(kept, floor), candidates)

    @triton.jit
    def _radix_select_kernel(Averaged, Pooled, Count, Kept, stride_p, stride_k, candidates, seq_len, tau, floor,
                             keep, BLOCK: tl.constexpr, NORMALIZE: tl.constexpr, DROP_NEXT: tl.constexpr,
                             FORCED: tl.constexpr):
        # One head: the layer's count (every program derives the same one), its K-th largest score by the radix
        # search, then the shipped kernel's write-out
        head = tl.program_id(0)
        keep = _radix_kept_count(Averaged, candidates, tau, floor, keep, BLOCK, NORMALIZE, DROP_NEXT, FORCED)
        tl.store(Count + head, (keep + seq_len - candidates).to(tl.int64))
        row = Pooled + head * stride_p
        cut = _largest_bits(row, candidates, tl.maximum(keep, 1), BLOCK, False).to(tl.float32, bitcast=True)
        cut = tl.where(keep > 0, cut, float("inf"))
        _write_kept(row, Kept + head * stride_k, cut, keep, candidates, seq_len, BLOCK)


def select_tokens_padded_radix(pooled: Tensor, seq_len: int, tau: float, min_tokens: int, coverage: str = "paper",
                               keep: int | None = None) -> tuple[Tensor, Tensor]:
    """``triton_select.select_tokens_padded`` without sorts: the same arguments and results (the count up to the
    fp32 rounding of the tail mass, the positions exactly)."""
    if pooled.stride(-1) != 1:
        raise ValueError("select_tokens_padded_radix: pooled must be contiguous along the token axis")
    heads, candidates = pooled.shape
    averaged = coverage_distribution(pooled, coverage).contiguous()
    count = torch.empty(heads, device=pooled.device, dtype=torch.int64)
    kept = torch.empty(heads, seq_len, device=pooled.device, dtype=torch.int64)
    _radix_select_kernel[(heads,)](averaged, pooled, count, kept, pooled.stride(0), kept.stride(0), candidates,
                                   seq_len, tau, max(0, min(min_tokens, candidates)), 0 if keep is None else keep,
                                   BLOCK=_BLOCK, NORMALIZE=coverage == "paper", DROP_NEXT=coverage == "paper",
                                   FORCED=keep is not None, num_warps=8)
    return kept, count
