"""Triton twin of ``smooth_scores_ref``: average pooling and per-head normalisation in one launch.

One program per selecting head reads its scores twice (sum, then normalised write); the ``pool_kernel``
shifted loads of a block hit L1/L2. It replaces four PyTorch ops whose launch cost dominated the selection
stage at short lengths.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .triton_import import HAS_TRITON, tl, triton

if HAS_TRITON:

    @triton.jit
    def _pooled_block(S, offs, candidates, POOL: tl.constexpr):
        # Sum of scores over the POOL-wide window centred on each offset; zeros outside [0, C).
        pooled = tl.zeros(offs.shape, tl.float32)
        for j in tl.static_range(POOL):
            src = offs + (j - POOL // 2)
            pooled += tl.load(S + src, mask=(src >= 0) & (src < candidates), other=0.0).to(tl.float32)
        return pooled

    @triton.jit
    def _smooth_kernel(Scores, Out, stride_s, stride_o, candidates, BLOCK: tl.constexpr, POOL: tl.constexpr):
        head = tl.program_id(0)
        s_row = Scores + head * stride_s
        total = tl.zeros([BLOCK], tl.float32)
        for start in range(0, candidates, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            total += tl.where(offs < candidates, _pooled_block(s_row, offs, candidates, POOL), 0.0)
        inv_total = 1.0 / tl.maximum(tl.sum(total, 0), 1e-30)  # the 1/POOL of the mean cancels here
        for start in range(0, candidates, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            pooled = _pooled_block(s_row, offs, candidates, POOL)
            tl.store(Out + head * stride_o + offs, pooled * inv_total, mask=offs < candidates)


def smooth_scores(scores: Tensor, pool_kernel: int) -> Tensor:
    """Triton twin of ``reference.smooth_scores_ref``: scores (Hs, C) -> (Hs, C) float32 per-head distributions."""
    if scores.stride(-1) != 1:
        raise ValueError("smooth_scores: scores must be contiguous along the token axis")
    heads, candidates = scores.shape
    out = torch.empty(heads, candidates, device=scores.device, dtype=torch.float32)
    _smooth_kernel[(heads,)](scores, out, scores.stride(0), out.stride(0), candidates, BLOCK=1024,
                             POOL=pool_kernel, num_warps=4)
    return out
