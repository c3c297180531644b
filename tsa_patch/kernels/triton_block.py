"""Block-sparse causal attention in Triton: each query block attends only to the key blocks listed for it.

One program computes one (query block, query head) tile with the online-softmax recurrence of FlashAttention,
looping over that tile's key-block list in sub-tiles of ``BLOCK_N`` keys. The list is ascending and causal, so
every block but the last lies wholly below the diagonal and runs without any mask; only the last (the diagonal
block) applies causality and the sequence end. A query head of a GQA group reads its KV head directly.
``block_sparse.block_sparse_attention_ref`` is its PyTorch twin.

The online softmax runs in FlashAttention-2's order (``online_step``): the running maximum on the raw logits,
scale and shift in one fused multiply-add, ``p @ v`` accumulated inside the dot (with the logits scaled first where
tiles load by pointer at head dims up to 64: fewer registers, ``benchmarks/kernel_registers.py``). On a Hopper-class
GPU (compute capability 9 or later), for 16-bit inputs with a power-of-two head dim, ``key_tile`` loads each K and
V tile through a tensor descriptor (the tensor-memory accelerator copies the listed block's tile; a few % faster
than loads by pointer). Elsewhere tiles load by pointer, the head dim padded to a power of two. The kept-keys
kernel (``triton_kept_keys.py``) shares ``key_tile`` and the online softmax.
"""

from __future__ import annotations

from collections import namedtuple

import torch
from torch import Tensor

from .triton_import import HAS_TRITON, TensorDescriptor, tl, triton

_LOG2_E = 1.4426950408889634

if HAS_TRITON:

    @triton.jit
    def _accumulate(logits, row_max, shift, row_sum, acc, v, PRECISION: tl.constexpr):
        # the online-softmax update with the logits already scaled and shifted by ``shift``
        p = tl.math.exp2(logits)
        correction = tl.math.exp2(row_max - shift)
        row_sum = row_sum * correction + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * correction[:, None], input_precision=PRECISION)
        return row_sum, acc

    @triton.jit
    def allowed_step(q, row_max, row_sum, acc, k, v, allowed, scale_log2, PRECISION: tl.constexpr):
        # One online-softmax step over the keys ``allowed`` (BLOCK_M, BLOCK_N) lets each row see; a row that has
        # seen nothing keeps its maximum at -inf (so any later key still counts in full).
        logits = tl.dot(q, k, input_precision=PRECISION)  # unscaled; the scale is positive, so the maximum commutes
        logits = tl.where(allowed, logits * scale_log2, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(logits, 1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # a row with nothing visible yet
        row_sum, acc = _accumulate(logits - shift[:, None], row_max, shift, row_sum, acc, v, PRECISION)
        return new_max, row_sum, acc

    @triton.jit
    def online_step(q, row_max, row_sum, acc, k, v, keys, offs_m, seq_len, scale_log2, MASKED: tl.constexpr,
                    PRECISION: tl.constexpr, RAW_MAX: tl.constexpr):
        # One online-softmax step; k: (HEAD_DIM, BLOCK_N), v: (BLOCK_N, HEAD_DIM). MASKED: a key is visible to a
        # row when its position (``keys``) is at most the row's and inside the sequence (``allowed_step``).
        # Unmasked with RAW_MAX, FlashAttention-2's order: the maximum on the raw logits, scale and shift in one
        # fused multiply-add; else the logits are scaled first, which holds fewer registers live (see
        # ``_block_sparse_kernel``).
        if MASKED:
            allowed = (keys[None, :] <= offs_m[:, None]) & (keys[None, :] < seq_len)
            new_max, row_sum, acc = allowed_step(q, row_max, row_sum, acc, k, v, allowed, scale_log2, PRECISION)
        elif RAW_MAX:
            logits = tl.dot(q, k, input_precision=PRECISION)
            new_max = tl.maximum(row_max, tl.max(logits, 1) * scale_log2)
            row_sum, acc = _accumulate(logits * scale_log2 - new_max[:, None], row_max, new_max, row_sum, acc, v,
                                       PRECISION)
        else:
            logits = tl.dot(q, k, input_precision=PRECISION) * scale_log2
            new_max = tl.maximum(row_max, tl.max(logits, 1))
            row_sum, acc = _accumulate(logits - new_max[:, None], row_max, new_max, row_sum, acc, v, PRECISION)
        return new_max, row_sum, acc

    @triton.jit
    def key_tile(K, V, head, n_start, keys, in_range, offs_d, d_valid, stride_kh, stride_kl, stride_vh, stride_vl,
                 BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, DESCRIPTORS: tl.constexpr):
        # k (BLOCK_D, BLOCK_N) and v (BLOCK_N, BLOCK_D) of head ``head``'s keys [n_start, n_start + BLOCK_N): through
        # (head, position, dim) tensor descriptors with DESCRIPTORS (tiles past the end load as zeros), else by
        # pointer, keys outside ``in_range`` and the head dim's padding as zeros
        if DESCRIPTORS:
            k = K.load([head, n_start, 0]).reshape(BLOCK_N, HEAD_DIM).T
            v = V.load([head, n_start, 0]).reshape(BLOCK_N, HEAD_DIM)
        else:
            k = tl.load(K + head * stride_kh + keys[None, :] * stride_kl + offs_d[:, None],
                        mask=in_range[None, :] & d_valid[:, None], other=0.0)
            v = tl.load(V + head * stride_vh + keys[:, None] * stride_vl + offs_d[None, :],
                        mask=in_range[:, None] & d_valid[None, :], other=0.0)
        return k, v

    @triton.jit
    def _block_sparse_kernel(Q, K, V, Out, Index, Count, scale_log2, stride_qh, stride_ql, stride_kh, stride_kl,
                             stride_vh, stride_vl, stride_oh, stride_ol, stride_ih, stride_ib, stride_ch, seq_len,
                             group, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                             HEAD_DIM: tl.constexpr, DESCRIPTORS: tl.constexpr, PRECISION: tl.constexpr):
        # K and V by pointer, or (head, position, dim) tensor descriptors with DESCRIPTORS. The unmasked steps run
        # in FlashAttention-2's order (RAW_MAX) except by pointer at head dims up to 64, where that order takes 143
        # registers a thread on an H100 against 125 with the logits scaled first: one program per SM, not two
        RAW_MAX: tl.constexpr = DESCRIPTORS or HEAD_DIM > 64
        query_block = tl.num_programs(0) - 1 - tl.program_id(0)  # the longest rows first: better load balance
        head = tl.program_id(1)
        kv_head = head // group
        offs_m = query_block * BLOCK + tl.arange(0, BLOCK)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_valid = offs_d < HEAD_DIM
        q = tl.load(Q + head * stride_qh + offs_m[:, None] * stride_ql + offs_d[None, :],
                    mask=(offs_m[:, None] < seq_len) & d_valid[None, :], other=0.0)
        row_max = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
        row_sum = tl.zeros([BLOCK], dtype=tl.float32)
        acc = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
        count = tl.load(Count + head * stride_ch + query_block)
        listing = Index + head * stride_ih + query_block * stride_ib
        for j in range(0, count - 1):  # ascending and causal: all but the last listed block are full, unmasked
            first_key = tl.load(listing + j) * BLOCK
            for n in tl.static_range(0, BLOCK, BLOCK_N):
                keys = first_key + n + offs_n
                k, v = key_tile(K, V, kv_head, first_key + n, keys, keys < seq_len, offs_d, d_valid, stride_kh,
                                stride_kl, stride_vh, stride_vl, BLOCK_N, HEAD_DIM, DESCRIPTORS)
                row_max, row_sum, acc = online_step(q, row_max, row_sum, acc, k, v, keys, offs_m, seq_len, scale_log2,
                                                    False, PRECISION, RAW_MAX)
        first_key = tl.load(listing + count - 1) * BLOCK  # the diagonal block, wherever the pattern keeps it
        for n in tl.static_range(0, BLOCK, BLOCK_N):
            keys = first_key + n + offs_n
            k, v = key_tile(K, V, kv_head, first_key + n, keys, keys < seq_len, offs_d, d_valid, stride_kh, stride_kl,
                            stride_vh, stride_vl, BLOCK_N, HEAD_DIM, DESCRIPTORS)
            row_max, row_sum, acc = online_step(q, row_max, row_sum, acc, k, v, keys, offs_m, seq_len, scale_log2,
                                                True, PRECISION, RAW_MAX)
        out = acc / tl.where(row_sum == 0.0, 1.0, row_sum)[:, None]
        tl.store(Out + head * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :], out.to(Out.dtype.element_ty),
                 mask=(offs_m[:, None] < seq_len) & d_valid[None, :])


# Launch shape of ``_block_sparse_kernel``: keys per inner step (a divisor of the block), warps, pipeline stages.
Tiling = namedtuple("Tiling", ["block_n", "num_warps", "num_stages"])


def default_tiling(block: int, head_dim: int, dtype: torch.dtype) -> Tiling:
    """The launch shape ``block_sparse_attention`` uses: the fastest of ``benchmarks/block_tiling_gpu.py``'s sweep on
    an H200 for blocks of 128 in bf16 (``benchmarks/README.md``, "the block-sparse kernel's launch shape")."""
    if dtype == torch.float32:  # fp32 tiles of 128 x 128 fit shared memory only without pipelining
        return Tiling(block, 8, 1) if block >= 128 and head_dim > 64 else Tiling(block, 4, 3)
    if block < 128:
        return Tiling(block, 4, 3)
    return Tiling(128, 8, 2) if head_dim > 64 else Tiling(64, 8, 2)


def uses_descriptors(query: Tensor, key: Tensor, value: Tensor) -> bool:
    """Whether ``block_sparse_attention`` takes the tensor-descriptor kernel for these inputs: a CUDA GPU of compute
    capability 9 or later, fp16 or bf16, a power-of-two head dim of at least 16, and K and V strides that the
    tensor-memory accelerator accepts (16-byte aligned, unit-stride head dim)."""
    if not (query.is_cuda and torch.cuda.get_device_capability(query.device)[0] >= 9):
        return False
    head_dim = query.shape[-1]
    if query.dtype not in (torch.float16, torch.bfloat16) or head_dim < 16 or head_dim & (head_dim - 1):
        return False
    size = key.element_size()
    return all(x.stride(-1) == 1 and x.data_ptr() % 16 == 0 and all(s * size % 16 == 0 for s in x.stride()[:-1])
               for x in (key, value))


def key_value_tiles(key: Tensor, value: Tensor, block_n: int, descriptors: bool) -> tuple[object, object, int]:
    """The K and V operands that ``key_tile`` reads, and the kernels' BLOCK_D: with ``descriptors``, (head, position,
    dim) tensor descriptors of ``[1, block_n, D]`` tiles and the head dim itself; else the tensors themselves and the
    head dim padded to a power of two (at least 16)."""
    head_dim = key.shape[-1]
    if not descriptors:
        return key, value, max(16, triton.next_power_of_2(head_dim))
    tile = [1, block_n, head_dim]
    key_d, value_d = (TensorDescriptor(x, list(x.shape), list(x.stride()), tile) for x in (key, value))
    return key_d, value_d, head_dim


def block_sparse_attention(query: Tensor, key: Tensor, value: Tensor, index: Tensor, count: Tensor, block: int,
                           scaling: float, tiling: Tiling | None = None, descriptors: bool | None = None) -> Tensor:
    """Triton twin of ``block_sparse.block_sparse_attention_ref`` (same arguments and result up to rounding).

    Args:
        query: (Hq, L, D); key, value: (Hkv, L, D), ``Hq % Hkv == 0``; head dim unit-stride.
        index: (Hq, Nb, M) int32 key-block indices per query block, ascending and causal in the first ``count``
            entries.
        count: (Hq, Nb) int32 number of listed key blocks, at least 1.
        block: block size in tokens (a power of two, at least 16).
        scaling: softmax scale.
        tiling: the launch shape; ``default_tiling`` when None (benchmarks compare others).
        descriptors: load K and V through tensor descriptors; None decides by
            ``uses_descriptors``; True forces it (power-of-two head dims only; tests run it under the interpreter).

    Returns:
        (Hq, L, D) in the dtype of ``query``. fp32 inputs are multiplied in full fp32 (no TF32).
    """
    for name, x in (("query", query), ("key", key), ("value", value)):
        if x.stride(-1) != 1:
            raise ValueError(f"block_sparse_attention: the head dim of {name} must be contiguous")
    num_heads, seq_len, head_dim = query.shape
    tiling = tiling or default_tiling(block, head_dim, query.dtype)
    index, count = index.to(torch.int32).contiguous(), count.to(torch.int32).contiguous()
    out = torch.empty_like(query)
    grid = (triton.cdiv(seq_len, block), num_heads)
    block_n = min(tiling.block_n, block)
    precision = "ieee" if query.dtype == torch.float32 else "tf32"
    use_descriptors = uses_descriptors(query, key, value) if descriptors is None else descriptors
    key_tiles, value_tiles, block_d = key_value_tiles(key, value, block_n, use_descriptors)
    _block_sparse_kernel[grid](
        query, key_tiles, value_tiles, out, index, count, scaling * _LOG2_E, query.stride(0), query.stride(1),
        key.stride(0), key.stride(1), value.stride(0), value.stride(1), out.stride(0), out.stride(1), index.stride(0),
        index.stride(1), count.stride(0), seq_len, num_heads // key.shape[0], BLOCK=block, BLOCK_N=block_n,
        BLOCK_D=block_d, HEAD_DIM=head_dim, DESCRIPTORS=use_descriptors, PRECISION=precision,
        num_warps=tiling.num_warps, num_stages=tiling.num_stages)
    return out
