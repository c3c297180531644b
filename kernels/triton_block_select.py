"""Triton twin of the block selection's first step (``block_sparse._last_block_masses_ref``): how much of the last
query block's attention falls in each key block (column mass) and in each band of diagonals (slash mass), at block
resolution, without the (Hq, W, L) probability tensor.

Pass 1 is TSA's own (``triton_score.window_stats``: each of the W last queries' softmax max and normaliser over
all keys, split over several programs). Pass 2 (``_block_masses_kernel``): one program per (query head, key
block) recomputes its logits against the W queries, normalises them with the merged statistics and sums them:
over the whole tile for the column mass, and over the tile's diagonals by band for the slash mass (band k holds
the offsets query position minus key position in ``[kB, (k + 1)B)``; a tile of W <= B queries and B keys
touches at most three bands, which it adds atomically). Measured on Qwen2.5-Coder-0.5B at 32K, the PyTorch
version of this step (an fp32 (14, 128, 32000) tensor written and read six times) dominated the block selection.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .triton_import import HAS_TRITON, tl, triton
from .triton_score import WINDOW_BLOCK, _block_d, _precision, logits_log2, merged_window_stats, window_stats

if HAS_TRITON:

    @triton.jit
    def _block_masses_kernel(Q, K, M, L, Column, Band, stride_qh, stride_qw, stride_kh, stride_kn, stride_mh,
                             stride_ms, stride_ch, stride_bh, kv_len, window, group, scaling, inv_window, splits,
                             blocks, BLOCK: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr,
                             HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
        head = tl.program_id(0)
        key_block = tl.program_id(1)
        offs_n = key_block * BLOCK + tl.arange(0, BLOCK)
        offs_d = tl.arange(0, BLOCK_D)
        k = tl.load(K + (head // group) * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                    mask=(offs_n[:, None] < kv_len) & (offs_d[None, :] < HEAD_DIM), other=0.0)
        column = tl.sum(tl.zeros([BLOCK], tl.float32), 0)
        for w in range(0, window, BLOCK_W):
            offs_w = w + tl.arange(0, BLOCK_W)
            q = tl.load(Q + head * stride_qh + offs_w[:, None] * stride_qw + offs_d[None, :],
                        mask=(offs_w[:, None] < window) & (offs_d[None, :] < HEAD_DIM), other=0.0)
            m, inv_l = merged_window_stats(M, L, head, stride_mh, stride_ms, offs_w, window, splits, BLOCK_W)
            query_pos = kv_len - window + offs_w
            visible = (offs_w[:, None] < window) & (offs_n[None, :] <= query_pos[:, None])
            s = logits_log2(q, k, scaling, 0.0, PRECISION)  # (BLOCK_W, BLOCK)
            p = tl.where(visible, tl.exp2(s - m[:, None]) * inv_l[:, None], 0.0)
            column += tl.sum(tl.sum(p, 1), 0)
            offset = query_pos[:, None] - offs_n[None, :]  # >= 0 wherever p > 0
            first_band = tl.maximum(kv_len - window + w - key_block * BLOCK - BLOCK + 1, 0) // BLOCK
            for t in tl.static_range(3):
                band = first_band + t
                mass = tl.sum(tl.sum(tl.where(offset // BLOCK == band, p, 0.0), 1), 0)
                tl.atomic_add(Band + head * stride_bh + band, mass * inv_window, mask=(band < blocks) & (mass > 0))
        tl.store(Column + head * stride_ch + key_block, column * inv_window)


def block_masses(query: Tensor, key: Tensor, block: int, scaling: float) -> tuple[Tensor, Tensor]:
    """Triton twin of ``block_sparse._last_block_masses_ref`` (same arguments, same result up to rounding).

    Args:
        query: (Hq, L, D) after RoPE; key: (Hkv, L, D), ``Hq % Hkv == 0``; head dim unit-stride; on a CUDA device
            (or any device under ``TRITON_INTERPRET=1``).
        block: block size in tokens (a power of two, at least 16).
        scaling: softmax scale.

    Returns:
        column, band: (Hq, Nb) float32. ``column[h, b]``: the mean over the last ``min(block, L)`` queries of their
        causal attention on key block b; ``band[h, k]``: the same for the keys whose offset from the query is in
        ``[kB, (k + 1)B)``.
    """
    num_heads, seq_len, head_dim = query.shape
    kv_heads = key.shape[0]
    if query.stride(-1) != 1 or key.stride(-1) != 1:
        raise ValueError("block_masses: the head dim of query and key must be contiguous")
    window = min(block, seq_len)
    blocks = triton.cdiv(seq_len, block)
    q_window = query[:, seq_len - window:]
    m, l = window_stats(q_window, key, scaling)
    column = torch.empty(num_heads, blocks, device=query.device, dtype=torch.float32)
    band = torch.zeros(num_heads, blocks, device=query.device, dtype=torch.float32)
    _block_masses_kernel[(num_heads, blocks)](
        q_window, key, m, l, column, band, q_window.stride(0), q_window.stride(1), key.stride(0), key.stride(1),
        m.stride(0), m.stride(1), column.stride(0), band.stride(0), seq_len, window, num_heads // kv_heads, scaling,
        1.0 / window, m.shape[1], blocks, BLOCK=block, BLOCK_W=min(WINDOW_BLOCK, block),
        BLOCK_D=_block_d(head_dim), HEAD_DIM=head_dim, PRECISION=_precision(query), num_warps=4, num_stages=2)
    return column, band


__all__ = ["block_masses"]
