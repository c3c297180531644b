"""Triton twins of ``compress_ref`` and ``decompress_ref``: gather kept rows, scatter them back into zeros.

Both are pure data movement (memory-bound). Compression reads each kept row of Q, K and V once and writes it
once; a query head of a GQA group reads its KV head directly, so K/V are never expanded in memory.
Decompression writes the compact output straight into the (Lq, Hq, D) layout transformers expects, so no
transpose copy follows.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except ImportError:  # the checkpoint still loads; attention.py then uses the PyTorch reference
    _HAS_TRITON = False

if _HAS_TRITON:

    @triton.jit
    def _gather_rows_kernel(Src, Index, Dst, stride_sh, stride_sl, stride_ih, stride_dh, stride_dl,
                            rows, heads_per_src, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                            HEAD_DIM: tl.constexpr):
        head = tl.program_id(0)
        offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_d = tl.arange(0, BLOCK_D)
        in_range = offs_r < rows
        index = tl.load(Index + head * stride_ih + offs_r, mask=in_range, other=0)
        mask = in_range[:, None] & (offs_d[None, :] < HEAD_DIM)
        x = tl.load(Src + (head // heads_per_src) * stride_sh + index[:, None] * stride_sl + offs_d[None, :], mask=mask)
        tl.store(Dst + head * stride_dh + offs_r[:, None] * stride_dl + offs_d[None, :], x, mask=mask)

    @triton.jit
    def _scatter_rows_kernel(Src, Index, Dst, stride_sh, stride_sl, stride_ih, stride_dl, stride_dh, rows,
                             BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
        head = tl.program_id(0)
        offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_d = tl.arange(0, BLOCK_D)
        in_range = offs_r < rows
        index = tl.load(Index + head * stride_ih + offs_r, mask=in_range, other=0)
        mask = in_range[:, None] & (offs_d[None, :] < HEAD_DIM)
        x = tl.load(Src + head * stride_sh + offs_r[:, None] * stride_sl + offs_d[None, :], mask=mask)
        tl.store(Dst + index[:, None] * stride_dl + head * stride_dh + offs_d[None, :], x, mask=mask)


_BLOCK_R = 64


def _gather(src: Tensor, index: Tensor) -> Tensor:
    """rows ``index[h]`` of ``src[h // (H / Hsrc)]`` -> (H, R, D) contiguous."""
    heads, rows = index.shape
    head_dim = src.shape[-1]
    dst = torch.empty(heads, rows, head_dim, device=src.device, dtype=src.dtype)
    _gather_rows_kernel[(heads, triton.cdiv(rows, _BLOCK_R))](
        src, index, dst, src.stride(0), src.stride(1), index.stride(0), dst.stride(0), dst.stride(1),
        rows, heads // src.shape[0], BLOCK_R=_BLOCK_R, BLOCK_D=triton.next_power_of_2(head_dim),
        HEAD_DIM=head_dim, num_warps=4)
    return dst


def compress(query: Tensor, key: Tensor, value: Tensor, kept: Tensor, rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Triton twin of ``reference.compress_ref`` (same arguments and results).

    Args:
        query: (Hq, Lq, D); key, value: (Hkv, Lk, D); head dim unit-stride.
        kept: (Hs, K') int64 ascending positions, ``Hs`` in {Hq, Hkv}.
        rows: (Hq, Lq') query rows to keep.

    Returns:
        query_c (Hq, Lq', D), key_c and value_c (Hs, K', D), contiguous.
    """
    for name, x in (("query", query), ("key", key), ("value", value)):
        if x.stride(-1) != 1:
            raise ValueError(f"compress: the head dim of {name} must be contiguous")
    kept, rows = kept.contiguous(), rows.contiguous()
    return _gather(query, rows), _gather(key, kept), _gather(value, kept)


def decompress(out_c: Tensor, rows: Tensor, q_len: int) -> Tensor:
    """Triton twin of ``reference.decompress_ref``: out_c (Hq, Lq', D), rows (Hq, Lq') -> (Lq, Hq, D), zeros elsewhere."""
    num_heads, count, head_dim = out_c.shape
    out_c, rows = out_c.contiguous(), rows.contiguous()
    out = torch.zeros(q_len, num_heads, head_dim, device=out_c.device, dtype=out_c.dtype)
    _scatter_rows_kernel[(num_heads, triton.cdiv(count, _BLOCK_R))](
        out_c, rows, out, out_c.stride(0), out_c.stride(1), rows.stride(0), out.stride(0), out.stride(1), count,
        BLOCK_R=_BLOCK_R, BLOCK_D=triton.next_power_of_2(head_dim), HEAD_DIM=head_dim, num_warps=4)
    return out
