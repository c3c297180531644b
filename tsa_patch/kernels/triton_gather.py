"""Triton twin of ``gathered_attention_ref``: TSA's compress, attend and decompress in one launch, without a host
synchronisation.

The kept positions and their count stay on the device: one program computes one (block of kept rows, query head)
tile, reading its query rows and the key/value rows of its kept tokens straight from the full tensors by index
(no compact copy), running the FlashAttention online softmax over the kept tokens up to its own (causal in the
compact order, which is exact because the positions are ascending), and writing each row to its original
position of the (L, Hq, D) output. Tiles past a head's count exit at once, so the grid can be sized by the bound
known on the host (every token kept). A query head of a GQA group reads its KV head directly.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from .triton_import import HAS_TRITON, tl, triton
from .triton_score import logits_log2

if HAS_TRITON:

    @triton.jit
    def _online_step(q, Kept_row, K_head, V_head, offs_n, n_valid, offs_m, stride_kl, stride_vl, offs_d, d_valid,
                     row_max, row_sum, acc, scaling, CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr,
                     PRECISION: tl.constexpr):
        # One block of kept keys: gather their rows, update the online softmax of the tile's query rows.
        cols = tl.load(Kept_row + offs_n, mask=n_valid, other=0)
        k = tl.load(K_head + cols[:, None] * stride_kl + offs_d[None, :], mask=n_valid[:, None] & d_valid[None, :],
                    other=0.0)  # (BLOCK_N, BLOCK_D)
        s = logits_log2(q, k, scaling, SOFTCAP, PRECISION)  # (BLOCK_M, BLOCK_N), base 2, capped if SOFTCAP > 0
        allowed = n_valid[None, :]
        if CAUSAL:
            allowed = allowed & (offs_n[None, :] <= offs_m[:, None])
        s = tl.where(allowed, s, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(s, 1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # a row that sees nothing yet
        p = tl.math.exp2(s - safe_max[:, None])
        correction = tl.math.exp2(row_max - safe_max)
        v = tl.load(V_head + cols[:, None] * stride_vl + offs_d[None, :], mask=n_valid[:, None] & d_valid[None, :],
                    other=0.0)
        acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        return new_max, row_sum * correction + tl.sum(p, 1), acc

    @triton.jit
    def _gathered_attention_kernel(Q, K, V, Out, Kept, Count, scaling, stride_qh, stride_ql, stride_kh,
                                   stride_kl, stride_vh, stride_vl, stride_ol, stride_oh, stride_eh, kv_group,
                                   sel_group, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                                   HEAD_DIM: tl.constexpr, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
        m_block = tl.num_programs(0) - 1 - tl.program_id(0)  # the longest rows first: better load balance
        head = tl.program_id(1)
        selecting = head // sel_group
        count = tl.load(Count + selecting)
        m_start = m_block * BLOCK_M
        if m_start < count:  # tiles past the head's kept count have nothing to do
            offs_m = m_start + tl.arange(0, BLOCK_M)
            m_valid = offs_m < count
            offs_d = tl.arange(0, BLOCK_D)
            d_valid = offs_d < HEAD_DIM
            kept_row = Kept + selecting * stride_eh
            rows = tl.load(kept_row + offs_m, mask=m_valid, other=0)  # original positions of the tile's queries
            q = tl.load(Q + head * stride_qh + rows[:, None] * stride_ql + offs_d[None, :],
                        mask=m_valid[:, None] & d_valid[None, :], other=0.0)
            k_head = K + (head // kv_group) * stride_kh
            v_head = V + (head // kv_group) * stride_vh
            row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
            row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
            acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
            # Key blocks wholly before the tile need no causal mask; the diagonal block (BLOCK_N == BLOCK_M) does.
            for n_start in range(0, m_start, BLOCK_N):
                offs_n = n_start + tl.arange(0, BLOCK_N)
                row_max, row_sum, acc = _online_step(q, kept_row, k_head, v_head, offs_n, offs_n < count, offs_m,
                                                     stride_kl, stride_vl, offs_d, d_valid, row_max, row_sum, acc,
                                                     scaling, False, SOFTCAP, PRECISION)
            offs_n = m_start + tl.arange(0, BLOCK_N)
            row_max, row_sum, acc = _online_step(q, kept_row, k_head, v_head, offs_n, offs_n < count, offs_m,
                                                 stride_kl, stride_vl, offs_d, d_valid, row_max, row_sum, acc,
                                                 scaling, True, SOFTCAP, PRECISION)
            out = acc / tl.where(row_sum == 0.0, 1.0, row_sum)[:, None]
            tl.store(Out + rows[:, None] * stride_ol + head * stride_oh + offs_d[None, :],
                     out.to(Out.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])

    def _configs():
        return [triton.Config({"BLOCK": block}, num_warps=warps, num_stages=stages)
                for block, warps, stages in ((64, 4, 3), (128, 4, 2), (128, 8, 3), (64, 8, 2))]

    @triton.autotune(configs=_configs(), key=["HEAD_DIM", "SOFTCAP", "PRECISION"])
    @triton.jit
    def _tuned_kernel(Q, K, V, Out, Kept, Count, scaling, stride_qh, stride_ql, stride_kh, stride_kl,
                      stride_vh, stride_vl, stride_ol, stride_oh, stride_eh, kv_group, sel_group,
                      BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, SOFTCAP: tl.constexpr,
                      PRECISION: tl.constexpr):
        _gathered_attention_kernel(Q, K, V, Out, Kept, Count, scaling, stride_qh, stride_ql, stride_kh,
                                   stride_kl, stride_vh, stride_vl, stride_ol, stride_oh, stride_eh, kv_group,
                                   sel_group, BLOCK, BLOCK, BLOCK_D, HEAD_DIM, SOFTCAP, PRECISION)


# Under TRITON_INTERPRET=1 (CPU tests) autotuning cannot time anything: one fixed tile size.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def gathered_attention(query: Tensor, key: Tensor, value: Tensor, kept: Tensor, count: Tensor, scaling: float,
                       softcap: float | None = None) -> Tensor:
    """Triton twin of ``reference.gathered_attention_ref`` (same arguments, same result up to rounding), with no
    host synchronisation: ``count`` is read on the device.

    Args:
        query: (Hq, L, D); key, value: (Hkv, L, D); head dim unit-stride; fp16, bf16 or fp32.
        kept: (Hs, M) int positions, ascending in the first ``count[s]`` entries of each row; ``Hs`` in {Hq, Hkv}.
        count: (Hs,) int kept positions per selecting head, at most ``M``.
        scaling, softcap: softmax scale; logit cap (Gemma 2) or None.

    Returns:
        (L, Hq, D) in the dtype of ``query``; rows a head did not keep are 0.
    """
    for name, x in (("query", query), ("key", key), ("value", value)):
        if x.stride(-1) != 1:
            raise ValueError(f"gathered_attention: the head dim of {name} must be contiguous")
    num_heads, seq_len, head_dim = query.shape
    selecting, buffer = kept.shape
    kept, count = kept.contiguous(), count.contiguous()
    out = torch.zeros(seq_len, num_heads, head_dim, device=query.device, dtype=query.dtype)
    precision = "ieee" if query.dtype == torch.float32 else "tf32"  # fp32 inputs: exact fp32, not TF32
    args = (query, key, value, out, kept, count, scaling, query.stride(0),
            query.stride(1), key.stride(0), key.stride(1), value.stride(0), value.stride(1), out.stride(0),
            out.stride(1), kept.stride(0), num_heads // key.shape[0], num_heads // selecting)
    block_d = max(16, triton.next_power_of_2(head_dim))
    if _INTERPRETED or not query.is_cuda:
        block = 32
        _gathered_attention_kernel[(triton.cdiv(buffer, block), num_heads)](
            *args, BLOCK_M=block, BLOCK_N=block, BLOCK_D=block_d, HEAD_DIM=head_dim, SOFTCAP=float(softcap or 0.0),
            PRECISION=precision)
    else:
        _tuned_kernel[lambda meta: (triton.cdiv(buffer, meta["BLOCK"]), num_heads)](
            *args, BLOCK_D=block_d, HEAD_DIM=head_dim, SOFTCAP=float(softcap or 0.0), PRECISION=precision)
    return out
