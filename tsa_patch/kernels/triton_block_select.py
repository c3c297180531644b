"""Triton twin of the block selection (``block_sparse.block_pattern``'s PyTorch steps), in eight launches.

``block_masses``, the first step: how much of the last query block's attention falls in each key block (column
mass) and in each band of diagonals (slash mass), at block resolution, without the (Hq, W, L) probability tensor.
Pass 1 is TSA's own (``triton_score.window_log2_norms``: the log2 of each of the W last queries' softmax
normaliser over all keys, split over several programs, merged once). Pass 2 (``_block_masses_kernel``): one program
per (query head, key block) recomputes its logits against the W queries, normalises them and sums them:
over the whole tile for the column mass, and over the tile's diagonals by band for the slash mass (band k holds
the offsets query position minus key position in ``[kB, (k + 1)B)``; a tile of W <= B queries and B keys
touches at most three bands, which it adds atomically). Measured on Qwen2.5-Coder-0.5B at 32K, the PyTorch
version of this step (an fp32 (14, 128, 32000) tensor written and read six times) dominated the block selection.

``select_blocks``, the rest: the blocks mean-pooled (``_pool_kernel``), their estimated block map (one fp32
matmul), then one program per (query head, query block) (``_select_blocks_kernel``) for the JS test, the row's
cover (its cut found by bisection over fp32 bit patterns, ``_cut``: no sort), the forced sink and diagonal blocks
and the ordered index list (a prefix sum). The PyTorch steps took some 50 small launches, whose host time set a
block-sparse layer's cost below 32K.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .triton_import import HAS_TRITON, tl, triton
from .triton_score import WINDOW_BLOCK, _block_d, _precision, logits_log2, window_log2_norms

if HAS_TRITON:

    @triton.jit
    def _block_masses_kernel(Q, K, Log2Norm, Column, Band, stride_qh, stride_qw, stride_kh, stride_kn, stride_mh,
                             stride_ch, stride_bh, kv_len, window, group, scaling, inv_window, blocks,
                             BLOCK: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
                             PRECISION: tl.constexpr):
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
            log2_norm = tl.load(Log2Norm + head * stride_mh + offs_w, mask=offs_w < window, other=float("inf"))
            query_pos = kv_len - window + offs_w
            visible = (offs_w[:, None] < window) & (offs_n[None, :] <= query_pos[:, None])
            s = logits_log2(q, k, scaling, 0.0, PRECISION)  # (BLOCK_W, BLOCK)
            p = tl.where(visible, tl.exp2(s - log2_norm[:, None]), 0.0)
            column += tl.sum(tl.sum(p, 1), 0)
            offset = query_pos[:, None] - offs_n[None, :]  # >= 0 wherever p > 0
            first_band = tl.maximum(kv_len - window + w - key_block * BLOCK - BLOCK + 1, 0) // BLOCK
            for t in tl.static_range(3):
                band = first_band + t
                mass = tl.sum(tl.sum(tl.where(offset // BLOCK == band, p, 0.0), 1), 0)
                tl.atomic_add(Band + head * stride_bh + band, mass * inv_window, mask=(band < blocks) & (mass > 0))
        tl.store(Column + head * stride_ch + key_block, column * inv_window)

    @triton.jit
    def _pool_kernel(X, Out, stride_xh, stride_xl, stride_oh, stride_ob, seq_len, BLOCK: tl.constexpr,
                     BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
        # the fp32 mean of one block of rows of one head (a short last block averages its own rows)
        head = tl.program_id(0)
        block_id = tl.program_id(1)
        offs_l = block_id * BLOCK + tl.arange(0, BLOCK)
        offs_d = tl.arange(0, BLOCK_D)
        x = tl.load(X + head * stride_xh + offs_l[:, None] * stride_xl + offs_d[None, :],
                    mask=(offs_l[:, None] < seq_len) & (offs_d[None, :] < HEAD_DIM), other=0.0)
        rows = tl.minimum(seq_len - block_id * BLOCK, BLOCK)
        tl.store(Out + head * stride_oh + block_id * stride_ob + offs_d, tl.sum(x.to(tl.float32), 0) / rows,
                 mask=offs_d < HEAD_DIM)

    @triton.jit
    def _cut(values, valid, gamma, min_count):
        # The smallest value kept when the valid entries of ``values`` (all >= 0) keep their highest ones: the
        # fewest covering ``gamma`` of their sum, and at least ``min_count`` of them (at least one, at most all).
        # Bisection over the fp32 bit patterns, which order non-negative floats: 31 steps reach the exact value.
        # Entries tied at the cut are all kept (``block_sparse._keep_top``'s rule).
        values = tl.where(valid, values, 0.0)
        bits = values.to(tl.int32, bitcast=True)
        target = gamma * tl.sum(values, 0) * (1 - 1e-6)  # as _keep_top: rounding must not push a full cover past all
        need = tl.minimum(tl.maximum(min_count, 1), tl.sum(valid.to(tl.int32), 0))
        low = tl.sum(tl.zeros([1], tl.int32), 0)  # keeping every valid entry always qualifies
        high = low + 0x7F800000  # the bits of +inf: keeping nothing never qualifies
        for _ in range(31):
            middle = low + (high - low) // 2
            kept = valid & (bits >= middle)
            enough = (tl.sum(tl.where(kept, values, 0.0), 0) >= target) & (tl.sum(kept.to(tl.int32), 0) >= need)
            low = tl.where(enough, middle, low)
            high = tl.where(enough, high, middle)
        return low.to(tl.float32, bitcast=True)

    @triton.jit
    def _select_blocks_kernel(Logits, Column, Band, Index, Count, QueryAware, stride_lh, stride_lr, stride_ch,
                              stride_bh, stride_ih, stride_ir, stride_nh, blocks, scaling, gamma, js_threshold,
                              min_blocks, density, BLOCKS: tl.constexpr, FORCED: tl.constexpr):
        # one (query head, query block) row of the block map: block_sparse.block_pattern's steps 2-3 and its
        # ordered index list
        head = tl.program_id(0)
        row = tl.program_id(1)
        offs = tl.arange(0, BLOCKS)
        inside = offs < blocks
        causal = offs <= row
        column = tl.load(Column + head * stride_ch + offs, mask=inside, other=0.0)
        # the head is query-aware if the pooled estimate's last row is close to the exact last-block masses (every
        # row of the head recomputes this Nb-wide test: cheaper than another launch)
        last = tl.load(Logits + head * stride_lh + (blocks - 1) * stride_lr + offs, mask=inside,
                       other=float("-inf")) * scaling
        p = tl.exp(last - tl.max(last, 0))
        p = p / tl.sum(p, 0)
        q = column / tl.maximum(tl.sum(column, 0), 1e-12)
        log_m = tl.log(tl.maximum((p + q) / 2, 1e-12))
        kl_p = tl.sum(tl.where(p > 0, p * (tl.log(tl.maximum(p, 1e-12)) - log_m), 0.0), 0)
        kl_q = tl.sum(tl.where(q > 0, q * (tl.log(tl.maximum(q, 1e-12)) - log_m), 0.0), 0)
        aware = tl.sqrt(tl.maximum((kl_p + kl_q) / 2, 0.0)) < js_threshold
        logits = tl.load(Logits + head * stride_lh + row * stride_lr + offs, mask=causal,
                         other=float("-inf")) * scaling
        estimate = tl.exp(logits - tl.max(logits, 0))
        estimate = estimate / tl.sum(estimate, 0)
        if FORCED:  # benchmarks: exactly this fraction of the row's causal blocks, by the estimate
            wanted = tl.maximum(tl.math.ceil(density * (row + 1).to(tl.float32)), 1.0).to(tl.int32)
            keep = estimate >= _cut(estimate, causal, 0.0, wanted)
            aware = row >= 0  # every head counts as query-aware, as in block_pattern
        elif aware:
            keep = estimate >= _cut(estimate, causal, gamma, min_blocks)
        else:  # vertical-slash: the kept columns, and the kept bands of diagonals (band k reaches offsets k, k + 1)
            band_base = Band + head * stride_bh
            band_cut = _cut(tl.load(band_base + offs, mask=inside, other=0.0), inside, gamma, min_blocks)
            distance = row - offs
            slash = causal & (tl.load(band_base + distance, mask=causal, other=0.0) >= band_cut)
            slash |= (distance >= 1) & (tl.load(band_base + distance - 1, mask=distance >= 1, other=0.0) >= band_cut)
            keep = slash | (column >= _cut(column, inside, gamma, min_blocks))
        keep = (keep | (offs == 0) | (offs == row)) & causal  # the sink block and the diagonal block always
        kept_so_far = tl.cumsum(keep.to(tl.int32), 0)
        count = tl.sum(keep.to(tl.int32), 0)
        # kept blocks first, ascending; then the others as padding (values >= blocks, never read), ascending
        slot = tl.where(keep, kept_so_far - 1, count + offs - kept_so_far)
        tl.store(Index + head * stride_ih + row * stride_ir + slot, tl.where(keep, offs, offs + blocks), mask=inside)
        tl.store(Count + head * stride_nh + row, count)
        tl.store(QueryAware + head, aware.to(tl.uint8), mask=row == 0)


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
    norm = window_log2_norms(q_window, key, scaling)  # log2 of each window query's softmax normaliser
    column = torch.empty(num_heads, blocks, device=query.device, dtype=torch.float32)
    band = torch.zeros(num_heads, blocks, device=query.device, dtype=torch.float32)
    _block_masses_kernel[(num_heads, blocks)](
        q_window, key, norm, column, band, q_window.stride(0), q_window.stride(1), key.stride(0), key.stride(1),
        norm.stride(0), column.stride(0), band.stride(0), seq_len, window, num_heads // kv_heads, scaling, 1.0 / window,
        blocks, BLOCK=block, BLOCK_W=min(WINDOW_BLOCK, block), BLOCK_D=_block_d(head_dim), HEAD_DIM=head_dim,
        PRECISION=_precision(query), num_warps=4, num_stages=2)
    return column, band


def select_blocks(query: Tensor, key: Tensor, column: Tensor, band: Tensor, *, gamma: float, block: int,
                  min_blocks: int, js_threshold: float, scaling: float,
                  density: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Triton twin of the rest of ``block_sparse.block_pattern`` after ``block_masses``: the pooled estimate, the
    JS test, the query-aware or vertical-slash cover of each row, the forced blocks and the ordered index list.

    Four launches (two pooling kernels, one fp32 matmul of the pooled blocks, one selection kernel with a program
    per (query head, query block)) where the PyTorch steps take some 50 small ones.

    Args:
        query: (Hq, L, D); key: (Hkv, L, D); head dim unit-stride.
        column, band: (Hq, Nb) float32, ``block_masses``' output.
        gamma, block, js_threshold, scaling, density: as for ``block_sparse.block_pattern``.
        min_blocks: blocks every row keeps at least (``block_pattern``'s ``min_budget`` in whole blocks).

    Returns:
        index (Hq, Nb, Nb) int32, count (Hq, Nb) int32 and query_aware (Hq,) bool, ``BlockPattern``'s fields.
    """
    num_heads, seq_len, head_dim = query.shape
    kv_heads = key.shape[0]
    if query.stride(-1) != 1 or key.stride(-1) != 1:
        raise ValueError("select_blocks: the head dim of query and key must be contiguous")
    blocks = triton.cdiv(seq_len, block)
    pooled = []
    for x in (query, key):
        out = torch.empty(x.shape[0], blocks, head_dim, device=x.device, dtype=torch.float32)
        _pool_kernel[(x.shape[0], blocks)](x, out, x.stride(0), x.stride(1), out.stride(0), out.stride(1), seq_len,
                                           BLOCK=block, BLOCK_D=_block_d(head_dim), HEAD_DIM=head_dim, num_warps=4)
        pooled.append(out)
    # (Hkv, group * Nb, D) x (Hkv, D, Nb): the query heads of a GQA group share their KV head's pooled keys
    logits = torch.matmul(pooled[0].view(kv_heads, -1, head_dim), pooled[1].transpose(1, 2))
    logits = logits.view(num_heads, blocks, blocks)
    index = torch.empty(num_heads, blocks, blocks, device=query.device, dtype=torch.int32)
    count = torch.empty(num_heads, blocks, device=query.device, dtype=torch.int32)
    query_aware = torch.empty(num_heads, device=query.device, dtype=torch.uint8)
    _select_blocks_kernel[(num_heads, blocks)](
        logits, column, band, index, count, query_aware, logits.stride(0), logits.stride(1), column.stride(0),
        band.stride(0), index.stride(0), index.stride(1), count.stride(0), blocks, scaling, gamma, js_threshold,
        min_blocks, 0.0 if density is None else density, BLOCKS=triton.next_power_of_2(blocks),
        FORCED=density is not None, num_warps=4)
    return index, count, query_aware.view(torch.bool)


__all__ = ["block_masses", "select_blocks"]
