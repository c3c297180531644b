"""Candidate inner loops for the block-sparse kernel, against the shipped one and dense cuDNN in the same run.

    python benchmarks/block_kernel_variants_gpu.py --output benchmarks/results/block-kernel-variants-H200-DATE.json

The shipped kernel (``triton_block.block_sparse_attention``) scales every logit, subtracts the running maximum in a
second pass, and adds ``p @ v`` to the rescaled accumulator outside the dot. The candidates change one thing each:

- ``fma``: the FlashAttention-2 order: the running maximum is taken on the raw logits (times a positive scale), the
  logits are scaled and shifted in one fused multiply-add, and ``p @ v`` accumulates inside the dot (the tensor
  cores' accumulator), so the tile is walked once less per step;
- ``fma+tma``: the same, with K and V tiles loaded by Hopper's tensor-memory accelerator through 3-D descriptors
  (head, position, dim) at the listed block's offset, instead of per-thread pointer loads;
- ``fma+tma+ws``: the same, the key-block loop warp-specialised (producer warps load, consumer warps compute).

Shapes: Llama-3.1-8B (32 / 8 heads, d 128) and Qwen2.5-0.5B (14 / 2, d 64) attention, bf16, random inputs, block 128;
a full causal map (the same FLOPs as dense: the ratio is the kernel's throughput against cuDNN's) and a 20 % map.
Each candidate is checked against the shipped kernel on the same inputs (relative error, bf16 rounding).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from tsa_patch.bench import environment, time_cuda
from tsa_patch.kernels.dense import causal_attention, sdpa_backend
from tsa_patch.kernels.triton_block import Tiling, block_sparse_attention, default_tiling

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from block_tiling_gpu import SHAPES, random_map  # noqa: E402

BLOCK = 128
LOG2_E = 1.4426950408889634


@triton.jit
def _step(q, m_i, l_i, acc, k, v, keys, offs_m, seq_len, scale_log2, MASKED: tl.constexpr):
    # one online-softmax step in FlashAttention-2's order; k: (D, BLOCK_N), v: (BLOCK_N, D)
    qk = tl.dot(q, k)
    if MASKED:
        allowed = (keys[None, :] <= offs_m[:, None]) & (keys[None, :] < seq_len)
        qk = tl.where(allowed, qk * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        qk = qk - m_new[:, None]
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * scale_log2)
        qk = qk * scale_log2 - m_new[:, None]
    p = tl.math.exp2(qk)
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return m_new, l_i, acc


@triton.jit
def _fma_kernel(Q, K, V, Out, Index, Count, scale_log2, stride_qh, stride_ql, stride_kh, stride_kl, stride_vh,
                stride_vl, stride_oh, stride_ol, stride_ih, stride_ib, stride_ch, seq_len, group, BLOCK: tl.constexpr,
                BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
    query_block = tl.num_programs(0) - 1 - tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // group
    offs_m = query_block * BLOCK + tl.arange(0, BLOCK)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + head * stride_qh + offs_m[:, None] * stride_ql + offs_d[None, :], mask=offs_m[:, None] < seq_len,
                other=0.0)
    m_i = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK], dtype=tl.float32)
    acc = tl.zeros([BLOCK, HEAD_DIM], dtype=tl.float32)
    count = tl.load(Count + head * stride_ch + query_block)
    listing = Index + head * stride_ih + query_block * stride_ib
    k_base = K + kv_head * stride_kh
    v_base = V + kv_head * stride_vh
    for j in range(0, count - 1):
        first_key = tl.load(listing + j) * BLOCK
        for n in tl.static_range(0, BLOCK, BLOCK_N):
            keys = first_key + n + offs_n
            k = tl.load(k_base + keys[None, :] * stride_kl + offs_d[:, None])
            v = tl.load(v_base + keys[:, None] * stride_vl + offs_d[None, :])
            m_i, l_i, acc = _step(q, m_i, l_i, acc, k, v, keys, offs_m, seq_len, scale_log2, False)
    first_key = tl.load(listing + count - 1) * BLOCK
    for n in tl.static_range(0, BLOCK, BLOCK_N):
        keys = first_key + n + offs_n
        k = tl.load(k_base + keys[None, :] * stride_kl + offs_d[:, None], mask=keys[None, :] < seq_len, other=0.0)
        v = tl.load(v_base + keys[:, None] * stride_vl + offs_d[None, :], mask=keys[:, None] < seq_len, other=0.0)
        m_i, l_i, acc = _step(q, m_i, l_i, acc, k, v, keys, offs_m, seq_len, scale_log2, True)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(Out + head * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=offs_m[:, None] < seq_len)


@triton.jit
def _tma_kernel(Q, desc_k, desc_v, Out, Index, Count, scale_log2, stride_qh, stride_ql, stride_oh, stride_ol,
                stride_ih, stride_ib, stride_ch, seq_len, group, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
                HEAD_DIM: tl.constexpr, WARP_SPECIALIZE: tl.constexpr):
    query_block = tl.num_programs(0) - 1 - tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // group
    offs_m = query_block * BLOCK + tl.arange(0, BLOCK)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + head * stride_qh + offs_m[:, None] * stride_ql + offs_d[None, :], mask=offs_m[:, None] < seq_len,
                other=0.0)
    m_i = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK], dtype=tl.float32)
    acc = tl.zeros([BLOCK, HEAD_DIM], dtype=tl.float32)
    count = tl.load(Count + head * stride_ch + query_block)
    listing = Index + head * stride_ih + query_block * stride_ib
    for j in tl.range(0, count - 1, warp_specialize=WARP_SPECIALIZE):
        first_key = tl.load(listing + j) * BLOCK
        for n in tl.static_range(0, BLOCK, BLOCK_N):
            keys = first_key + n + offs_n
            k = desc_k.load([kv_head, first_key + n, 0]).reshape(BLOCK_N, HEAD_DIM)
            v = desc_v.load([kv_head, first_key + n, 0]).reshape(BLOCK_N, HEAD_DIM)
            m_i, l_i, acc = _step(q, m_i, l_i, acc, k.T, v, keys, offs_m, seq_len, scale_log2, False)
    first_key = tl.load(listing + count - 1) * BLOCK
    for n in tl.static_range(0, BLOCK, BLOCK_N):
        keys = first_key + n + offs_n
        k = desc_k.load([kv_head, first_key + n, 0]).reshape(BLOCK_N, HEAD_DIM)  # zero beyond the sequence end
        v = desc_v.load([kv_head, first_key + n, 0]).reshape(BLOCK_N, HEAD_DIM)
        m_i, l_i, acc = _step(q, m_i, l_i, acc, k.T, v, keys, offs_m, seq_len, scale_log2, True)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(Out + head * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=offs_m[:, None] < seq_len)


def candidate(variant: str, query, key, value, index, count, scaling, tiling: Tiling):
    """Run one candidate kernel (arguments as ``triton_block.block_sparse_attention``'s; head dim a power of two)."""
    num_heads, seq_len, head_dim = query.shape
    out = torch.empty_like(query)
    index, count = index.to(torch.int32).contiguous(), count.to(torch.int32).contiguous()
    grid = (triton.cdiv(seq_len, BLOCK), num_heads)
    common = dict(BLOCK=BLOCK, BLOCK_N=tiling.block_n, HEAD_DIM=head_dim, num_warps=tiling.num_warps,
                  num_stages=tiling.num_stages)
    if variant == "fma":
        _fma_kernel[grid](query, key, value, out, index, count, scaling * LOG2_E, query.stride(0), query.stride(1),
                          key.stride(0), key.stride(1), value.stride(0), value.stride(1), out.stride(0),
                          out.stride(1), index.stride(0), index.stride(1), count.stride(0), seq_len,
                          num_heads // key.shape[0], **common)
        return out
    block_shape = [1, tiling.block_n, head_dim]
    desc_k = TensorDescriptor(key, list(key.shape), list(key.stride()), block_shape)
    desc_v = TensorDescriptor(value, list(value.shape), list(value.stride()), block_shape)
    _tma_kernel[grid](query, desc_k, desc_v, out, index, count, scaling * LOG2_E, query.stride(0), query.stride(1),
                      out.stride(0), out.stride(1), index.stride(0), index.stride(1), count.stride(0), seq_len,
                      num_heads // key.shape[0], WARP_SPECIALIZE=variant.endswith("+ws"), **common)
    return out


VARIANTS = ("fma", "fma+tma", "fma+tma+ws")
TILINGS = [Tiling(128, 8, 2), Tiling(128, 8, 3), Tiling(64, 8, 2), Tiling(64, 8, 3), Tiling(64, 4, 3),
           Tiling(128, 4, 2)]


def relative(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x.float() - y.float()).norm() / y.float().norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="32768,131072")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    rows = []
    for (name, (hq, hkv, d)), length in itertools.product(SHAPES.items(), map(int, args.lengths.split(","))):
        q = torch.randn(hq, length, d, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(hkv, length, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        with sdpa_backend("cudnn", q.device):
            dense_ms = time_cuda(lambda: causal_attention(q, k, v, d**-0.5), budget_s=0.5).median_ms
        blocks = -(-length // BLOCK)
        maps = {density: random_map(hq, blocks, density) for density in (1.0, 0.2)}
        shipped = {density: block_sparse_attention(q, k, v, *m, BLOCK, d**-0.5) for density, m in maps.items()}
        for density, m in maps.items():
            ms = time_cuda(lambda: block_sparse_attention(q, k, v, *m, BLOCK, d**-0.5), budget_s=0.3).median_ms
            row = {"shape": name, "length": length, "variant": "shipped",
                   "tiling": default_tiling(BLOCK, d, q.dtype)._asdict(), "density": density,
                   "dense_cudnn_ms": round(dense_ms, 4), "ms": round(ms, 4), "vs_dense": round(dense_ms / ms, 3)}
            print(json.dumps(row), flush=True)
            rows.append(row)
        for variant, tiling in itertools.product(VARIANTS, TILINGS):
            for density, m in maps.items():
                row = {"shape": name, "length": length, "variant": variant, "tiling": tiling._asdict(),
                       "density": density, "dense_cudnn_ms": round(dense_ms, 4)}
                try:
                    out = candidate(variant, q, k, v, *m, d**-0.5, tiling)
                    row["error_vs_shipped"] = relative(out, shipped[density])
                    row["finite"] = bool(out.isfinite().all())
                    ms = time_cuda(lambda: candidate(variant, q, k, v, *m, d**-0.5, tiling), budget_s=0.3).median_ms
                    row.update(ms=round(ms, 4), vs_dense=round(dense_ms / ms, 3))
                except Exception as err:  # noqa: BLE001 - a candidate that does not compile here is recorded
                    row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
                print(json.dumps(row), flush=True)
                rows.append(row)
        del q, k, v, maps, shipped
        torch.cuda.empty_cache()
    record = {**environment(), "command": " ".join(["python"] + sys.argv), "block": BLOCK, "rows": rows}
    with open(args.output, "w") as f:
        json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
