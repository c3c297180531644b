"""Numeric bounds of the tests, each derived from the dtype's precision and the magnitude it applies to.

``eps`` is the dtype's machine epsilon (fp32 1.2e-7, fp16 9.8e-4, bf16 7.8e-3); a correctly rounded operation errs by
at most eps / 2 relative. Every bound below says how many such roundings it allows and why, so the suite holds on
any x86 CPU and BLAS (which may order a dot product's accumulation differently), not only on one machine.
"""

from __future__ import annotations

import torch


def eps(dtype: torch.dtype) -> float:
    """Machine epsilon of ``dtype``."""
    return torch.finfo(dtype).eps


# ||out - ref|| / ||ref|| of an attention-like result (softmax-weighted sums over up to a few thousand keys) against
# float64 math on the same inputs. fp32: accumulation error grows like sqrt(L) eps, about 64 eps at L = 4K; 128 eps
# leaves a factor 2. fp16 / bf16: the probabilities and the output are rounded to the dtype, a few eps in all.
ATTENTION_RELATIVE = {torch.float32: 128 * eps(torch.float32), torch.float16: 5 * eps(torch.float16),
                      torch.bfloat16: 3 * eps(torch.bfloat16)}


def layout_atol(reference: torch.Tensor, roundings: int = 32) -> float:
    """Absolute bound for the same computation on differently laid-out (padded, sliced, strided) copies of the
    inputs: kernels may then accumulate in another order, ``roundings`` roundings at the values' magnitude."""
    return roundings * eps(reference.dtype) * reference.abs().max().item()
