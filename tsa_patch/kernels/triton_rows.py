"""Triton twins of ``compress_ref`` and ``decompress_ref``: gather kept rows, scatter them back into zeros.

Both are pure data movement (memory-bound). Compression reads each kept row of Q, K and V once and writes it
once; a query head of a GQA group reads its KV head directly, so K/V are never expanded in memory.
Decompression writes the compact output straight into the (Lq, Hq, D) layout transformers expects, so no
transpose copy follows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .triton_import import HAS_TRITON, tl, triton

if HAS_TRITON:

    @triton.jit
    def _gather_rows(Src, Index, Dst, head, stride_sh, stride_sl, stride_ih, stride_dh, stride_dl, heads, rows,
                     heads_per_src, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
        # Rows Index[head, block] of source head head // heads_per_src into Dst[head, block].
        offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_d = tl.arange(0, BLOCK_D)
        in_range = (offs_r < rows) & (head < heads)
        index = tl.load(Index + head * stride_ih + offs_r, mask=in_range, other=0)
        mask = in_range[:, None] & (offs_d[None, :] < HEAD_DIM)
        x = tl.load(Src + (head // heads_per_src) * stride_sh + index[:, None] * stride_sl + offs_d[None, :], mask=mask)
        tl.store(Dst + head * stride_dh + offs_r[:, None] * stride_dl + offs_d[None, :], x, mask=mask)

    @triton.jit
    def _compress_kernel(Q, K, V, Qc, Kc, Vc, Rows, Kept, stride_qh, stride_ql, stride_kh, stride_kl, stride_rh,
                         stride_eh, stride_qch, stride_qcl, stride_kch, stride_kcl, num_heads, q_rows, sel_heads,
                         kept_rows, group_q, group_kv, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                         HEAD_DIM: tl.constexpr):
        # One launch for all three tensors: axis 2 picks Q (0), K (1) or V (2).
        head = tl.program_id(0)
        which = tl.program_id(2)
        if which == 0:
            _gather_rows(Q, Rows, Qc, head, stride_qh, stride_ql, stride_rh, stride_qch, stride_qcl, num_heads,
                         q_rows, group_q, BLOCK_R, BLOCK_D, HEAD_DIM)
        elif which == 1:
            _gather_rows(K, Kept, Kc, head, stride_kh, stride_kl, stride_eh, stride_kch, stride_kcl, sel_heads,
                         kept_rows, group_kv, BLOCK_R, BLOCK_D, HEAD_DIM)
        else:
            _gather_rows(V, Kept, Vc, head, stride_kh, stride_kl, stride_eh, stride_kch, stride_kcl, sel_heads,
                         kept_rows, group_kv, BLOCK_R, BLOCK_D, HEAD_DIM)

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


def _unit_stride(x: Tensor) -> Tensor:
    """``x`` itself when its last axis is unit-stride (the kernels take the other strides), else a contiguous copy:
    the synced path's kept positions are a slice of a wider buffer."""
    return x if x.stride(-1) == 1 else x.contiguous()


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
    if key.stride() != value.stride():
        raise ValueError("compress: key and value must have the same strides")
    kept, rows = _unit_stride(kept), _unit_stride(rows)
    num_heads, head_dim = query.shape[0], query.shape[2]
    sel_heads, kept_rows = kept.shape
    query_c = torch.empty(num_heads, rows.shape[1], head_dim, device=query.device, dtype=query.dtype)
    key_c = torch.empty(sel_heads, kept_rows, head_dim, device=key.device, dtype=key.dtype)
    value_c = torch.empty_like(key_c)
    grid = (num_heads, triton.cdiv(max(rows.shape[1], kept_rows), _BLOCK_R), 3)
    _compress_kernel[grid](
        query, key, value, query_c, key_c, value_c, rows, kept, query.stride(0), query.stride(1), key.stride(0),
        key.stride(1), rows.stride(0), kept.stride(0), query_c.stride(0), query_c.stride(1), key_c.stride(0),
        key_c.stride(1), num_heads, rows.shape[1], sel_heads, kept_rows, 1, sel_heads // key.shape[0],
        BLOCK_R=_BLOCK_R, BLOCK_D=triton.next_power_of_2(head_dim), HEAD_DIM=head_dim, num_warps=4)
    return query_c, key_c, value_c


def decompress(out_c: Tensor, rows: Tensor, q_len: int) -> Tensor:
    """Triton twin of ``reference.decompress_ref``: out_c (Hq, Lq', D), rows (Hq, Lq') -> (Lq, Hq, D), zeros elsewhere."""
    num_heads, count, head_dim = out_c.shape
    out_c, rows = _unit_stride(out_c), _unit_stride(rows)
    out = torch.zeros(q_len, num_heads, head_dim, device=out_c.device, dtype=out_c.dtype)
    _scatter_rows_kernel[(num_heads, triton.cdiv(count, _BLOCK_R))](
        out_c, rows, out, out_c.stride(0), out_c.stride(1), rows.stride(0), out.stride(0), out.stride(1), count,
        BLOCK_R=_BLOCK_R, BLOCK_D=triton.next_power_of_2(head_dim), HEAD_DIM=head_dim, num_warps=4)
    return out
