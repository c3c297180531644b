"""Block-sparse causal attention in Triton: each query block attends only to the key blocks listed for it.

One program computes one (query block, query head) tile with the online-softmax recurrence of FlashAttention,
looping over that tile's key-block list (ascending, so the causal diagonal block comes last). A query head of a
GQA group reads its KV head directly. ``block_sparse.block_sparse_attention_ref`` is its PyTorch twin.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .triton_import import HAS_TRITON, tl, triton

_LOG2_E = 1.4426950408889634

if HAS_TRITON:

    @triton.jit
    def _block_sparse_kernel(Q, K, V, Out, Index, Count, scale_log2, stride_qh, stride_ql, stride_kh, stride_kl,
                             stride_vh, stride_vl, stride_oh, stride_ol, stride_ih, stride_ib, stride_ch, seq_len,
                             group, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
                             PRECISION: tl.constexpr):
        query_block = tl.num_programs(0) - 1 - tl.program_id(0)  # the longest rows first: better load balance
        head = tl.program_id(1)
        kv_head = head // group
        offs_m = query_block * BLOCK + tl.arange(0, BLOCK)
        offs_n = tl.arange(0, BLOCK)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HEAD_DIM
        q = tl.load(Q + head * stride_qh + offs_m[:, None] * stride_ql + offs_d[None, :],
                    mask=(offs_m[:, None] < seq_len) & d_mask[None, :], other=0.0)
        row_max = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
        row_sum = tl.zeros([BLOCK], dtype=tl.float32)
        acc = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
        count = tl.load(Count + head * stride_ch + query_block)
        for j in range(0, count):
            key_block = tl.load(Index + head * stride_ih + query_block * stride_ib + j)
            keys = key_block * BLOCK + offs_n
            k = tl.load(K + kv_head * stride_kh + keys[None, :] * stride_kl + offs_d[:, None],
                        mask=(keys[None, :] < seq_len) & d_mask[:, None], other=0.0)  # (BLOCK_D, BLOCK)
            logits = tl.dot(q, k, input_precision=PRECISION) * scale_log2  # base-2 logits, fp32
            allowed = (keys[None, :] <= offs_m[:, None]) & (keys[None, :] < seq_len)
            logits = tl.where(allowed, logits, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(logits, 1))
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # a row with nothing visible yet
            p = tl.math.exp2(logits - safe_max[:, None])
            correction = tl.math.exp2(row_max - safe_max)
            row_sum = row_sum * correction + tl.sum(p, 1)
            v = tl.load(V + kv_head * stride_vh + keys[:, None] * stride_vl + offs_d[None, :],
                        mask=(keys[:, None] < seq_len) & d_mask[None, :], other=0.0)
            acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            row_max = new_max
        out = acc / tl.where(row_sum == 0.0, 1.0, row_sum)[:, None]
        tl.store(Out + head * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :], out.to(Out.dtype.element_ty),
                 mask=(offs_m[:, None] < seq_len) & d_mask[None, :])


def block_sparse_attention(query: Tensor, key: Tensor, value: Tensor, index: Tensor, count: Tensor, block: int,
                           scaling: float) -> Tensor:
    """Triton twin of ``block_sparse.block_sparse_attention_ref`` (same arguments and result up to rounding).

    Args:
        query: (Hq, L, D); key, value: (Hkv, L, D), ``Hq % Hkv == 0``; head dim unit-stride.
        index: (Hq, Nb, M) int32 key-block indices per query block, ascending in the first ``count`` entries.
        count: (Hq, Nb) int32 number of listed key blocks.
        block: block size in tokens (a power of two, at least 16).
        scaling: softmax scale.

    Returns:
        (Hq, L, D) in the dtype of ``query``. fp32 inputs are multiplied in full fp32 (no TF32).
    """
    for name, x in (("query", query), ("key", key), ("value", value)):
        if x.stride(-1) != 1:
            raise ValueError(f"block_sparse_attention: the head dim of {name} must be contiguous")
    num_heads, seq_len, head_dim = query.shape
    index, count = index.to(torch.int32).contiguous(), count.to(torch.int32).contiguous()
    out = torch.empty_like(query)
    grid = (triton.cdiv(seq_len, block), num_heads)
    big = block >= 128 and head_dim > 64
    fp32 = query.dtype == torch.float32  # fp32 tiles of 128 x 128 fit shared memory only without pipelining
    _block_sparse_kernel[grid](
        query, key, value, out, index, count, scaling * _LOG2_E, query.stride(0), query.stride(1), key.stride(0),
        key.stride(1), value.stride(0), value.stride(1), out.stride(0), out.stride(1), index.stride(0),
        index.stride(1), count.stride(0), seq_len, num_heads // key.shape[0], BLOCK=block,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), HEAD_DIM=head_dim, num_warps=8 if big else 4,
        num_stages=(1 if fp32 else 2) if big else 3, PRECISION="ieee" if fp32 else "tf32")
    return out
