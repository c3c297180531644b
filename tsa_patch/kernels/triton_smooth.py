"""Triton twin of ``smooth_scores_ref``: average pooling of the token scores in one launch.

One program per (selecting head, block of candidates) reads the ``pool_kernel`` shifted windows of its block (they
hit L1/L2) and writes the pooled scores. It replaces the PyTorch pooling ops whose launch cost dominated the
selection stage at short lengths.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .triton_import import HAS_TRITON, tl, triton

if HAS_TRITON:

    @triton.jit
    def _smooth_kernel(Scores, Out, stride_s, stride_o, candidates, BLOCK: tl.constexpr, POOL: tl.constexpr):
        head = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        pooled = tl.zeros([BLOCK], tl.float32)
        for j in tl.static_range(POOL):  # the POOL-wide window centred on each offset; zeros outside [0, C)
            src = offs + (j - POOL // 2)
            pooled += tl.load(Scores + head * stride_s + src, mask=(src >= 0) & (src < candidates),
                              other=0.0).to(tl.float32)
        tl.store(Out + head * stride_o + offs, pooled * (1.0 / POOL), mask=offs < candidates)


_BLOCK = 1024


def smooth_scores(scores: Tensor, pool_kernel: int) -> Tensor:
    """Triton twin of ``reference.smooth_scores_ref``: scores (Hs, C) -> (Hs, C) float32 pooled scores."""
    if scores.stride(-1) != 1:
        raise ValueError("smooth_scores: scores must be contiguous along the token axis")
    heads, candidates = scores.shape
    out = torch.empty(heads, candidates, device=scores.device, dtype=torch.float32)
    _smooth_kernel[(heads, triton.cdiv(candidates, _BLOCK))](scores, out, scores.stride(0), out.stride(0), candidates,
                                                             BLOCK=_BLOCK, POOL=pool_kernel, num_warps=4)
    return out
