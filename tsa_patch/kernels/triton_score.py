"""Triton twin of ``score_keys_ref``: recent-window scoring in two passes, fp32 accumulation, no W x L tensor.

Pass 1 (``_window_stats_kernel``, ``_merge_stats_kernel``): for each of the last W queries, the log2 of the
normaliser of its causal softmax over ALL keys (online softmax, as in FlashAttention), over key splits that fill
the GPU, merged once. Pass 2 (``_key_scores_kernel``): for runs of candidate-key tiles, ``mean_w 2^(s_wj -
log2_norm_w)``. Both passes read K once per query head (L2 serves the other heads of a GQA group) and compute Q K^T
on tensor cores. Cost per head: 2 x (2 W Lk D) FLOPs; memory: K twice, Q_window and the (Hq, Lk - W) output.
Per logit, pass 2 does one fused multiply-add, an exp2 and a sum; pass 1 masks only the blocks the causal edge cuts.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .triton_import import HAS_TRITON, tl, triton

if HAS_TRITON:

    @triton.jit
    def logits_log2(q, k, scaling, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
        # q k^T * scaling, capped as SOFTCAP * tanh(x / SOFTCAP) when SOFTCAP > 0, in log2 units (for exp2)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if SOFTCAP > 0:
            s = SOFTCAP * (1.0 - 2.0 / (tl.exp2(s * (scaling * 2.0 * 1.4426950408889634 / SOFTCAP)) + 1.0))
            return s * 1.4426950408889634
        return s * (scaling * 1.4426950408889634)

    @triton.jit
    def _window_stats_kernel(Q, K, M, L, stride_qh, stride_qw, stride_kh, stride_kn, stride_mh, stride_ms,
                             kv_len, window, group, scaling, blocks_per_split,
                             BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
                             PRECISION: tl.constexpr, SOFTCAP: tl.constexpr):
        head = tl.program_id(0)
        w_block = tl.program_id(1)
        split = tl.program_id(2)
        offs_w = w_block * BLOCK_W + tl.arange(0, BLOCK_W)  # window query index, 0..W-1
        offs_d = tl.arange(0, BLOCK_D)
        q = tl.load(Q + head * stride_qh + offs_w[:, None] * stride_qw + offs_d[None, :],
                    mask=(offs_w[:, None] < window) & (offs_d[None, :] < HEAD_DIM), other=0.0)
        k_base = K + (head // group) * stride_kh
        m_i = tl.full([BLOCK_W], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_W], tl.float32)
        first = split * blocks_per_split
        # Blocks every window query sees whole (keys 0 .. kv_len - window), unmasked; then the rest, masked.
        unmasked_end = tl.minimum(tl.maximum((kv_len - window + 1) // BLOCK_N, first), first + blocks_per_split)
        for block in range(first, unmasked_end):
            offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
            k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=offs_d[None, :] < HEAD_DIM,
                        other=0.0)
            s = logits_log2(q, k, scaling, SOFTCAP, PRECISION)  # (BLOCK_W, BLOCK_N)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
            m_i = m_new
        for block in range(unmasked_end, first + blocks_per_split):
            offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
            k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :],
                        mask=(offs_n[:, None] < kv_len) & (offs_d[None, :] < HEAD_DIM), other=0.0)
            s = logits_log2(q, k, scaling, SOFTCAP, PRECISION)
            visible = (offs_n[None, :] < kv_len) & (offs_n[None, :] <= kv_len - window + offs_w[:, None])
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a split that sees no key keeps l = 0
            l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
            m_i = m_new
        out = head * stride_mh + split * stride_ms + offs_w
        tl.store(M + out, m_i, mask=offs_w < window)
        tl.store(L + out, l_i, mask=offs_w < window)

    @triton.jit
    def _merge_stats_kernel(M, L, Log2Norm, stride_mh, stride_ms, stride_oh, window, splits,
                            BLOCK_W: tl.constexpr, SPLITS: tl.constexpr):
        # Pass 1's splits merged: m + log2 l, m = max_s m_s, l = sum_s l_s 2^(m_s - m) (SPLITS >= splits)
        head = tl.program_id(0)
        offs_w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
        offs_s = tl.arange(0, SPLITS)
        part = head * stride_mh + offs_s[:, None] * stride_ms + offs_w[None, :]
        valid = (offs_s[:, None] < splits) & (offs_w[None, :] < window)
        m_s = tl.load(M + part, mask=valid, other=float("-inf"))  # (SPLITS, BLOCK_W)
        m = tl.where(offs_w < window, tl.max(m_s, 0), 0.0)
        l = tl.sum(tl.load(L + part, mask=valid, other=0.0) * tl.exp2(m_s - m[None, :]), 0)
        # l >= 1 in every query row (its max adds 2^0); lanes past the window hold 0
        tl.store(Log2Norm + head * stride_oh + offs_w, m + tl.log2(tl.maximum(l, 1.0)), mask=offs_w < window)

    @triton.jit
    def _key_scores_kernel(Q, K, Log2Norm, Out, stride_qh, stride_qw, stride_kh, stride_kn, stride_nh, stride_oh,
                           candidates, window, group, scaling, inv_window, tiles_per_program, BLOCK_W: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
                           PRECISION: tl.constexpr, SOFTCAP: tl.constexpr):
        # A run of key tiles against one window block held in registers (K loads pipelined); a window longer than
        # BLOCK_W adds its next block's share onto the stored scores. Candidate keys precede every window query, so
        # no causal mask; rows past the window get an infinite normaliser, so they add 2^-inf = 0.
        head = tl.program_id(0)
        first = tl.program_id(1) * tiles_per_program
        offs_d = tl.arange(0, BLOCK_D)
        k_base = K + (head // group) * stride_kh
        for w in range(0, window, BLOCK_W):
            tl.debug_barrier()
            offs_w = w + tl.arange(0, BLOCK_W)
            q = tl.load(Q + head * stride_qh + offs_w[:, None] * stride_qw + offs_d[None, :],
                        mask=(offs_w[:, None] < window) & (offs_d[None, :] < HEAD_DIM), other=0.0)
            log2_norm = tl.load(Log2Norm + head * stride_nh + offs_w, mask=offs_w < window, other=float("inf"))
            for tile in range(first, tl.minimum(first + tiles_per_program, tl.cdiv(candidates, BLOCK_N))):
                offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
                k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :],
                            mask=(offs_n[:, None] < candidates) & (offs_d[None, :] < HEAD_DIM), other=0.0)
                p = tl.exp2(logits_log2(q, k, scaling, SOFTCAP, PRECISION) - log2_norm[:, None])
                score = tl.sum(p, 0) * inv_window
                out = Out + head * stride_oh + offs_n
                if w > 0:  # after the barrier above: this program's own stores of the last block
                    score += tl.load(out, mask=offs_n < candidates, other=0.0)
                tl.store(out, score, mask=offs_n < candidates)

if not HAS_TRITON:  # the Triton helpers exist only with Triton (triton_gather and triton_block_select import them)
    logits_log2 = None


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


WINDOW_BLOCK = 64  # window queries per program of pass 1 and of the merge
# Pass 1's keys per step, warps, and programs per SM that its key splits aim at: the fastest of score_tiles_gpu.py
# --sweep-pass1's 24 shapes on an H100 (fp32 tiles at head dim 128: 160 KiB of shared memory; an H100 has 227).
KEY_BLOCK, STATS_WARPS, STATS_PROGRAMS_PER_SM = 128, 4, 2
MAX_SPLITS = 32  # key splits of pass 1 (Qwen2.5-0.5B on an H100: 18)
# Pass 2: window queries held per program, keys per tile, warps, and programs per SM (each takes a run of tiles):
# the fastest of score_tiles_gpu.py's 24 shapes on an H100 at 8K and 32K (within 6 % of the best everywhere).
SCORE_WINDOW_BLOCK, SCORE_TILE, SCORE_WARPS, SCORE_PROGRAMS_PER_SM = 128, 64, 4, 2


def _precision(query: Tensor) -> str:
    # fp32 inputs would otherwise be multiplied in tf32 (~1e-3 relative error); half precision is exact in fp32.
    return "ieee" if query.dtype == torch.float32 else "tf32"


def key_splits(num_heads: int, window: int, kv_len: int, device: torch.device) -> tuple[int, int]:
    """Pass 1's key splits and key blocks per split: a few programs per SM, at most ``MAX_SPLITS``."""
    programs = STATS_PROGRAMS_PER_SM * _multiprocessors(device) // (num_heads * triton.cdiv(window, WINDOW_BLOCK))
    blocks_per_split = triton.cdiv(kv_len, KEY_BLOCK * max(1, min(triton.cdiv(kv_len, 1024), MAX_SPLITS, programs)))
    return triton.cdiv(kv_len, blocks_per_split * KEY_BLOCK), blocks_per_split


def window_log2_norms(q_window: Tensor, key: Tensor, scaling: float, softcap: float | None = None) -> Tensor:
    """Pass 1: the log2 of each window query's causal softmax normaliser, ``log2 sum_j 2^(s_wj)`` with the logits
    ``s`` in log2 units (max included, so ``2^(s - it)`` are the probabilities): (Hq, W) fp32."""
    num_heads, window, head_dim = q_window.shape
    kv_heads, kv_len, _ = key.shape
    splits, blocks_per_split = key_splits(num_heads, window, kv_len, q_window.device)
    m, l = (torch.empty(num_heads, splits, window, device=q_window.device, dtype=torch.float32) for _ in range(2))
    _window_stats_kernel[(num_heads, triton.cdiv(window, WINDOW_BLOCK), splits)](
        q_window, key, m, l, q_window.stride(0), q_window.stride(1), key.stride(0), key.stride(1),
        m.stride(0), m.stride(1), kv_len, window, num_heads // kv_heads, scaling, blocks_per_split,
        BLOCK_W=WINDOW_BLOCK, BLOCK_N=KEY_BLOCK, BLOCK_D=_block_d(head_dim), HEAD_DIM=head_dim,
        PRECISION=_precision(q_window), SOFTCAP=float(softcap or 0.0), num_warps=STATS_WARPS, num_stages=3)
    log2_norm = torch.empty(num_heads, window, device=q_window.device, dtype=torch.float32)
    _merge_stats_kernel[(num_heads, triton.cdiv(window, WINDOW_BLOCK))](
        m, l, log2_norm, m.stride(0), m.stride(1), log2_norm.stride(0), window, splits, BLOCK_W=WINDOW_BLOCK,
        SPLITS=triton.next_power_of_2(splits))
    return log2_norm


def score_keys(query: Tensor, key: Tensor, window: int, scaling: float, softcap: float | None = None) -> Tensor:
    """Triton twin of ``reference.score_keys_ref`` (same arguments, same result up to rounding).

    Args:
        query: (Hq, Lq, D) with ``Lq >= window``; key: (Hkv, Lk, D); fp16, bf16 or fp32, on a CUDA device (or
            any device under ``TRITON_INTERPRET=1``). The head dim must be unit-stride.
        window, scaling, softcap: as for the reference.

    Returns:
        (Hq, Lk - window) float32 scores.
    """
    num_heads, q_len, head_dim = query.shape
    kv_heads, kv_len, _ = key.shape
    if num_heads % kv_heads or q_len < window or window < 1 or key.shape[2] != head_dim:
        raise ValueError(f"score_keys: bad shapes query {tuple(query.shape)}, key {tuple(key.shape)}, window {window}")
    if query.stride(-1) != 1 or key.stride(-1) != 1:
        raise ValueError("score_keys: the head dim of query and key must be contiguous")
    q_window = query[:, q_len - window :]  # (Hq, W, D) view
    log2_norm = window_log2_norms(q_window, key, scaling, softcap)
    candidates = kv_len - window
    out = torch.empty(num_heads, candidates, device=query.device, dtype=torch.float32)
    if candidates > 0:
        tiles = triton.cdiv(candidates, SCORE_TILE)
        per_head = max(1, min(tiles, SCORE_PROGRAMS_PER_SM * _multiprocessors(query.device) // num_heads))
        tiles_per_program = triton.cdiv(tiles, per_head)
        _key_scores_kernel[(num_heads, triton.cdiv(tiles, tiles_per_program))](
            q_window, key, log2_norm, out, q_window.stride(0), q_window.stride(1), key.stride(0), key.stride(1),
            log2_norm.stride(0), out.stride(0), candidates, window, num_heads // kv_heads, scaling, 1.0 / window,
            tiles_per_program, BLOCK_W=SCORE_WINDOW_BLOCK, BLOCK_N=SCORE_TILE, BLOCK_D=_block_d(head_dim),
            HEAD_DIM=head_dim, PRECISION=_precision(query), SOFTCAP=float(softcap or 0.0),
            num_warps=SCORE_WARPS, num_stages=3)
    return out


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter runs programs one after another
