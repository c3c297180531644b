"""Triton twin of ``reference.select_tokens_padded_ref``: Dynamic Token Coverage and the ordered kept positions.

Two implementations with the same results, chosen by the number of candidates (timings: benchmarks/README.md):

- below ``RADIX_BELOW`` candidates, ``select_tokens_padded_radix``: the head-averaged scores (one launch) and one
  kernel, one program per head. A radix search over fp32 bit patterns finds where the coverage rule's ascending
  tail ends (``MASS_BITS`` a pass, a sum per candidate) and the head's K-th largest score (``COUNT_BITS`` a pass,
  a histogram of the pass's digit, stopping once exactly K scores lie at or above a candidate).
- from ``RADIX_BELOW`` on, ``select_tokens_padded_sorted``: the head-averaged scores, their ascending sort, each
  head's descending sort (only its values: the K-th largest is the cut) and one kernel. The radix passes read a
  head's whole row up to 27 times in one program, so they lose to the sorts on long rows.

Both kernels derive the layer's count in every program (cheaper than a second launch), then write the candidates
above the head's cut and those tied at it in position order until K, ascending by a prefix sum, then the
always-kept tail and the padding. A forced count (``keep``, benchmarks) skips the coverage rule and its
head-averaged scores. Nothing is read back to the host: the count stays on the device, so the same
selection serves the synced path (which then reads it once) and a CUDA graph."""

from __future__ import annotations

import torch
from torch import Tensor

from .reference import coverage_distribution
from .triton_import import HAS_TRITON, tl, triton

if HAS_TRITON:

    @triton.jit
    def _head_mean_kernel(Pooled, Out, stride_p, heads, candidates, HEADS: tl.constexpr, BLOCK: tl.constexpr):
        # The mean over heads of a block of candidates' pooled scores (every head's row read at once)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        rows = tl.arange(0, HEADS)
        x = tl.load(Pooled + rows[:, None] * stride_p + offs[None, :],
                    mask=(rows[:, None] < heads) & (offs[None, :] < candidates), other=0.0)
        tl.store(Out + offs, tl.sum(x, 0) / heads, mask=offs < candidates)

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
    def _largest_bits(Row, n, target, BLOCK: tl.constexpr, MASS: tl.constexpr, BITS: tl.constexpr):
        # The largest fp32 bit pattern t (which orders the non-negative floats) in [0, +inf] whose predicate
        # holds over the row's n values, all >= 0: with MASS the sum of the values below t stays under target,
        # else at least target (>= 1) values are >= t. Both predicates hold at 0 and fail from some t on, so a
        # radix search finds t exactly: BITS bits a pass (1, 2, 4; 8 without MASS), all 2**BITS candidates of a
        # pass counted in one read of the row (those with the sign bit set are not candidates). Without MASS it
        # also returns how many values exceed t (with MASS, 0), and stops early where a candidate c > 0 has exactly
        # target values at or above it (the target largest): it returns c - 1 (one ulp below: no ties) and target.
        RADIX: tl.constexpr = 1 << BITS
        offs = tl.arange(0, BLOCK)
        digits = tl.arange(0, RADIX)
        prefix = tl.sum(tl.zeros([1], tl.int32), 0)
        done = prefix  # 0, or 1 once a candidate had exactly target values at or above it
        greater = prefix
        for p in tl.static_range(32 // BITS):
            shift = 32 - BITS * (p + 1)
            candidate = prefix + (digits << shift)
            valid = (candidate >= 0) & (candidate <= 0x7F800000)
            if MASS:
                threshold = tl.where(valid, candidate, 0).to(tl.float32, bitcast=True)
                below = tl.zeros([BLOCK, RADIX], tl.float32)  # summed once a pass, not once a step
                end = n
            else:
                prefix_high = (prefix >> shift) >> BITS  # the prefix's bits above this pass's digit
                acc = tl.zeros([RADIX], tl.int32)
                above = tl.zeros([BLOCK], tl.int32)
                end = tl.where(done > 0, 0, n)  # stopped: no more reads
            for start in range(0, end, BLOCK):
                inside = start + offs < n
                if MASS:  # padding is +inf: never below a threshold
                    x = tl.load(Row + start + offs, mask=inside, other=float("inf"))
                    below += tl.where(x[:, None] < threshold[None, :], x[:, None], 0.0)
                else:  # by bits: above the prefix counts for every candidate, at it by its digit (padding -1: below)
                    x = tl.load(Row + start + offs, mask=inside, other=-1.0)
                    bits = x.to(tl.int32, bitcast=True) >> shift  # (-0.0 is below 0 here: digit 0 holds anyway)
                    above += ((bits >> BITS) > prefix_high).to(tl.int32)
                    acc += tl.histogram(bits & (RADIX - 1), RADIX, mask=(bits >> BITS) == prefix_high)
            if MASS:
                holds = valid & (tl.sum(below, 0) < target)
                prefix += tl.max(tl.where(holds, digits, 0), 0) << shift
            else:  # values >= each candidate: those above, and those at the prefix with a digit at least its own
                above_all = tl.sum(above, 0)
                at_least = above_all + tl.sum(acc, 0) - tl.cumsum(acc, 0) + acc
                holds = valid & (at_least >= target)  # once done, nothing holds: the prefix stays
                digit = tl.max(tl.where(holds, digits, 0), 0)
                prefix += digit << shift
                exact = (done == 0) & (prefix > 0) & (tl.sum(tl.where(holds & (digits == digit), at_least, 0), 0)
                                                     == target)
                # after the last pass, the values above t: those at or above the next candidate
                greater = tl.where(digit < RADIX - 1, tl.sum(tl.where(digits == digit + 1, at_least, 0), 0),
                                   above_all)
                done = tl.where(exact, 1, done)
        if MASS:  # one return: the compiler checks every return's types, the pruned branch's too
            result = prefix
        else:
            result, greater = prefix - done, tl.where(done > 0, target, greater)
        return result, greater

    @triton.jit
    def _sorted_tail(Ascending, candidates, limit, BLOCK: tl.constexpr):
        # How many of the ascending scores make a tail whose cumulative mass stays below ``limit``
        offs = tl.arange(0, BLOCK)
        carry = tl.sum(tl.zeros([BLOCK], tl.float32), 0)
        below = tl.sum(tl.zeros([BLOCK], tl.int32), 0)
        for start in range(0, candidates, BLOCK):
            inside = start + offs < candidates
            x = tl.load(Ascending + start + offs, mask=inside, other=0.0)
            running = carry + tl.cumsum(x, 0)
            below += tl.sum((inside & (running < limit)).to(tl.int32), 0)
            carry += tl.sum(x, 0)
        return below

    @triton.jit
    def _radix_tail(Averaged, candidates, limit, BLOCK: tl.constexpr, BITS: tl.constexpr):
        # ``_sorted_tail`` without the sort: the ascending tail ends at the value t where the mass below t stays
        # under the limit (``_largest_bits``): every value below t, and as many of those tied at t as the limit
        # leaves room for. (A limit above the total gives t = inf, every value below it; tau 0 gives t = 0.)
        offs = tl.arange(0, BLOCK)
        cut, _ = _largest_bits(Averaged, candidates, limit, BLOCK, True, BITS)
        cut = cut.to(tl.float32, bitcast=True)
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
        return tl.sum(below_count, 0) + tl.minimum(tl.maximum(room, 0.0), tied.to(tl.float32)).to(tl.int32)

    @triton.jit
    def _kept_count(Averaged, candidates, tau, floor, keep, BLOCK: tl.constexpr, NORMALIZE: tl.constexpr,
                    DROP_NEXT: tl.constexpr, FORCED: tl.constexpr, SORTED: tl.constexpr,
                    MASS_BITS: tl.constexpr):
        # reference.kept_count_ref on the head-averaged scores (ascending when SORTED): unless FORCED, the tail
        # whose cumulative mass stays below the limit (``_coverage_limit``) is dropped, one more with DROP_NEXT
        # (the authors' rule: nothing when the tail is empty); then the floor and the ceiling
        kept = tl.sum(tl.zeros([BLOCK], tl.int32), 0) + keep  # a tensor (an argument of 1 is a constant)
        if not FORCED:
            limit = _coverage_limit(Averaged, candidates, tau, BLOCK, NORMALIZE)
            if SORTED:
                below = _sorted_tail(Averaged, candidates, limit, BLOCK)
            else:
                below = _radix_tail(Averaged, candidates, limit, BLOCK, MASS_BITS)
            if DROP_NEXT:
                below = tl.where(below > 0, below + 1, below)
            kept = candidates - below
        return tl.minimum(tl.maximum(kept, floor), candidates)

    @triton.jit
    def _count_greater(Row, cut, candidates, BLOCK: tl.constexpr):
        # How many of the row's candidates exceed ``cut``
        offs = tl.arange(0, BLOCK)
        greater = tl.sum(tl.zeros([BLOCK], tl.int32), 0)
        for start in range(0, candidates, BLOCK):
            x = tl.load(Row + start + offs, mask=start + offs < candidates, other=float("-inf"))
            greater += tl.sum((x > cut).to(tl.int32), 0)
        return greater

    @triton.jit
    def _write_kept(Row, Out, cut, greater, keep, candidates, seq_len, BLOCK: tl.constexpr):
        # One head's kept positions, given its K-th largest score ``cut`` (inf when keep is 0) and how many
        # candidates exceed it: those, and those tied at it in position order until ``keep`` (ties go to the
        # earlier token), ascending by a prefix sum, then the tail [C, seq_len), then padding (seq_len - 1,
        # never read)
        offs = tl.arange(0, BLOCK)
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
        keep = _kept_count(Ascending, candidates, tau, floor, keep, BLOCK, NORMALIZE, DROP_NEXT, FORCED, True, 4)
        tl.store(Count + head, (keep + seq_len - candidates).to(tl.int64))
        cut = tl.load(Descending + head * stride_d + tl.maximum(keep - 1, 0))
        cut = tl.where(keep > 0, cut, float("inf"))
        row = Pooled + head * stride_p
        _write_kept(row, Kept + head * stride_k, cut, _count_greater(row, cut, candidates, BLOCK), keep, candidates,
                    seq_len, BLOCK)

    @triton.jit
    def _radix_select_kernel(Averaged, Pooled, Count, Kept, stride_p, stride_k, candidates, seq_len, tau, floor,
                             keep, BLOCK: tl.constexpr, NORMALIZE: tl.constexpr, DROP_NEXT: tl.constexpr,
                             FORCED: tl.constexpr, COUNT_BITS: tl.constexpr, MASS_BITS: tl.constexpr):
        # One head: the layer's count (every program derives the same one), its K-th largest score by the radix
        # search, then the write-out
        head = tl.program_id(0)
        keep = _kept_count(Averaged, candidates, tau, floor, keep, BLOCK, NORMALIZE, DROP_NEXT, FORCED, False,
                           MASS_BITS)
        tl.store(Count + head, (keep + seq_len - candidates).to(tl.int64))
        row = Pooled + head * stride_p
        cut, greater = _largest_bits(row, candidates, tl.maximum(keep, 1), BLOCK, False, COUNT_BITS)
        cut = tl.where(keep > 0, cut.to(tl.float32, bitcast=True), float("inf"))
        _write_kept(row, Kept + head * stride_k, cut, tl.where(keep > 0, greater, 0), keep, candidates, seq_len,
                    BLOCK)


# Candidates per step of the serial loops, warps per program (one program per head) and the radix search's bits a
# pass for the K-th largest (a histogram) and for the coverage rule's tail (a sum per candidate: 8 bits would hold
# 2**8 sums a value): the fastest of benchmarks/select_shape_gpu.py's sweeps on an H100
# (results/select-shape-H100-20261207.json; --digits: results/select-digits-H100-20261207.json).
BLOCK, SORTED_WARPS, RADIX_WARPS, COUNT_BITS, MASS_BITS = 4096, 8, 16, 4, 2
# The candidate count from which the sorts outrun the radix search under the coverage rule (the --digits sweep:
# the radix ahead at 32K, behind at 48K on Qwen2.5-0.5B's heads and at 64K on Llama-3.1-8B's).
RADIX_BELOW = 36864


def _checked(pooled: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
    """Empty count and kept buffers for ``pooled`` (Hs, C), which must be contiguous along the token axis."""
    if pooled.stride(-1) != 1:
        raise ValueError("select_tokens_padded: pooled must be contiguous along the token axis")
    heads = pooled.shape[0]
    count = torch.empty(heads, device=pooled.device, dtype=torch.int64)
    kept = torch.empty(heads, seq_len, device=pooled.device, dtype=torch.int64)
    return count, kept


def _averaged(pooled: Tensor, coverage: str, keep: int | None) -> Tensor:
    """The head-averaged scores that the coverage rule reads (``reference.coverage_distribution``), contiguous:
    for "paper" in one launch (a third of torch's reduction). A forced count reads none: ``pooled`` stands in."""
    if keep is not None:
        return pooled
    if coverage != "paper":
        return coverage_distribution(pooled, coverage).contiguous()
    heads, candidates = pooled.shape
    out = torch.empty(candidates, device=pooled.device, dtype=torch.float32)
    block = 64
    _head_mean_kernel[(triton.cdiv(candidates, block),)](pooled, out, pooled.stride(0), heads, candidates,
                                                         HEADS=triton.next_power_of_2(heads), BLOCK=block)
    return out


def select_tokens_padded_sorted(pooled: Tensor, seq_len: int, tau: float, min_tokens: int, coverage: str = "paper",
                                keep: int | None = None) -> tuple[Tensor, Tensor]:
    """``select_tokens_padded`` by two sorts and one kernel (the faster on long rows)."""
    count, kept = _checked(pooled, seq_len)
    heads, candidates = pooled.shape
    averaged = _averaged(pooled, coverage, keep)
    ascending = averaged if keep is not None else torch.sort(averaged).values
    descending = torch.sort(pooled, dim=-1, descending=True).values
    _select_kernel[(heads,)](ascending, pooled, descending, count, kept, pooled.stride(0), descending.stride(0),
                             kept.stride(0), candidates, seq_len, tau, max(0, min(min_tokens, candidates)),
                             0 if keep is None else keep, BLOCK=BLOCK, NORMALIZE=coverage == "paper",
                             DROP_NEXT=coverage == "paper", FORCED=keep is not None, num_warps=SORTED_WARPS)
    return kept, count


def select_tokens_padded_radix(pooled: Tensor, seq_len: int, tau: float, min_tokens: int, coverage: str = "paper",
                               keep: int | None = None) -> tuple[Tensor, Tensor]:
    """``select_tokens_padded`` by a radix search in one kernel, no sorts (the faster on short rows)."""
    count, kept = _checked(pooled, seq_len)
    heads, candidates = pooled.shape
    averaged = _averaged(pooled, coverage, keep)
    _radix_select_kernel[(heads,)](averaged, pooled, count, kept, pooled.stride(0), kept.stride(0), candidates,
                                   seq_len, tau, max(0, min(min_tokens, candidates)), 0 if keep is None else keep,
                                   BLOCK=BLOCK, NORMALIZE=coverage == "paper", DROP_NEXT=coverage == "paper",
                                   FORCED=keep is not None, COUNT_BITS=COUNT_BITS, MASS_BITS=MASS_BITS,
                                   num_warps=RADIX_WARPS)
    return kept, count


def select_tokens_padded(pooled: Tensor, seq_len: int, tau: float, min_tokens: int, coverage: str = "paper",
                         keep: int | None = None) -> tuple[Tensor, Tensor]:
    """Triton twin of ``reference.select_tokens_padded_ref`` (same arguments, same results): the radix search
    below ``RADIX_BELOW`` candidates, the sorts from there on.

    The count equals the reference's up to the fp32 rounding of the cumulative tail mass (a different summation
    order), so only where that mass lies within rounding of ``tau``; given the count, the kept positions are
    identical (the K-th largest score is found exactly, ties at it go to the earlier token).

    Returns:
        kept: (Hs, Lk) int64; row h holds its ``count[h]`` kept positions in ascending order, then ``Lk - 1``.
        count: (Hs,) int64 on the device, ``K + T`` for every head.
    """
    select = select_tokens_padded_radix if pooled.shape[-1] < RADIX_BELOW else select_tokens_padded_sorted
    return select(pooled, seq_len, tau, min_tokens, coverage, keep)


__all__ = ["RADIX_BELOW", "select_tokens_padded", "select_tokens_padded_radix", "select_tokens_padded_sorted"]
