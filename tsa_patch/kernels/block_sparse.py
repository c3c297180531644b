"""Block-sparse prefill attention with adaptive block selection in the style of FlexPrefill.

Lai et al., "FlexPrefill: A Context-Aware Sparse Attention Mechanism for Efficient Long-Sequence Inference"
(ICLR 2025). The sequence is cut into blocks of ``block`` tokens; each (head, query block) attends only to a
list of key blocks, chosen per head from the attention of the LAST query block:

1. The last query block attends to every key (exact softmax). Its probabilities summed per key column give the
   *vertical* scores, summed per diagonal (query position minus key position) the *slash* scores.
2. A cheap estimate of the whole block map: mean-pooled queries against mean-pooled keys, softmax over causal
   key blocks. If its last row is close to the exact last-block distribution over key blocks (square root of
   the Jensen-Shannon divergence below ``js_threshold``), the head is *query-aware*: every query block keeps its highest-scored
   key blocks until they cover ``gamma`` of its estimated mass.
3. Otherwise the head follows the *vertical-slash* pattern: the fewest column blocks covering ``gamma`` of the
   vertical mass and the fewest diagonal bands covering ``gamma`` of the slash mass, mapped to the blocks they
   cross.

Every query block always keeps the first key block (attention sinks) and its own diagonal block, and at least
``min_budget`` tokens' worth of blocks (of columns and of diagonal bands, for vertical-slash heads).

The block map feeds ``triton_block.block_sparse_attention`` on CUDA, or its PyTorch twin ``block_sparse_attention_ref``
(the same result computed head by head) elsewhere. Only full prefills (``Lq == Lk``) go through
here; ``attention.py`` and ``tsa.py`` decide when.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# Only `from .module import name`: transformers copies a checkpoint's remote code by scanning for that form.
from .triton_block import block_sparse_attention
from .triton_block_select import block_masses, select_blocks

_EPS = 1e-12


@dataclass(frozen=True)
class BlockPattern:
    """Which key blocks each (query head, query block) attends to.

    Attributes:
        index: (Hq, Nb, Nb) int32; row ``[h, i]`` lists the kept key blocks in ascending order in its first
            ``count[h, i]`` entries (the rest is padding).
        count: (Hq, Nb) int32 number of kept key blocks per query block.
        query_aware: (Hq,) bool, True where the head used the query-aware estimate, False for vertical-slash.
        block: block size in tokens.
    """

    index: Tensor
    count: Tensor
    query_aware: Tensor
    block: int

    @property
    def density(self) -> float:
        """Kept fraction of the causal block map (1.0 = dense); one host sync."""
        return float(self.density_on_device())

    def density_on_device(self) -> Tensor:
        """``density`` as a 0-dim float32 tensor on the pattern's device: no host sync."""
        blocks = self.count.shape[1]
        return self.count.sum(dtype=torch.float32) / (self.count.shape[0] * blocks * (blocks + 1) / 2)

    def mask(self) -> Tensor:
        """(Hq, Nb, Nb) bool block map, True = computed."""
        return block_mask(self.index, self.count)


def block_mask(index: Tensor, count: Tensor) -> Tensor:
    """(Hq, Nb, Nb) bool block map, True = computed, from the key-block lists ``index`` (Hq, Nb, M) and their
    lengths ``count`` (Hq, Nb) (``BlockPattern``'s layout)."""
    heads, blocks = count.shape
    listed = torch.arange(index.shape[-1], device=count.device) < count[..., None]
    mask = torch.zeros(heads, blocks, blocks + 1, dtype=torch.bool, device=count.device)
    return mask.scatter_(2, torch.where(listed, index.long(), blocks), True)[..., :blocks]


def block_lists(mask: Tensor) -> tuple[Tensor, Tensor]:
    """``BlockPattern``'s index and count from an (Hq, Nb, Nb) bool block map (``block_mask``'s inverse): each row's
    kept blocks first, ascending, then padding that holds values >= Nb and is never read; int32."""
    blocks = mask.shape[-1]
    order = torch.arange(blocks, device=mask.device, dtype=torch.int32)
    return torch.where(mask, order, order + blocks).sort(dim=-1).values, mask.sum(dim=-1, dtype=torch.int32)


def block_pattern(query: Tensor, key: Tensor, *, gamma: float, block: int, min_budget: int, js_threshold: float,
                  scaling: float, density: float | None = None, backend: str = "torch") -> BlockPattern:
    """Choose the key blocks of every (query head, query block) for one full prefill.

    Args:
        query: (Hq, L, D) after RoPE; key: (Hkv, L, D), ``Hq % Hkv == 0``.
        gamma: attention mass the kept blocks (or columns and diagonals) must cover, in (0, 1].
        block: block size in tokens.
        min_budget: tokens every query block keeps at least (rounded up to whole blocks).
        js_threshold: square-root Jensen-Shannon divergence below which a head trusts the pooled estimate
            (query-aware; FlexPrefill's tau, 0.1).
        scaling: softmax scale.
        density: benchmarks only: every head keeps this fraction of each row's causal key blocks, ranked by the
            pooled estimate, after all the estimation work is done (random inputs have no sparse structure).
        backend: "torch" (the PyTorch steps below, any device) or "triton" (``triton_block_select``: the same
            steps in seven launches; CUDA, or any device under ``TRITON_INTERPRET=1``).

    Returns:
        The ``BlockPattern``.
    """
    num_heads, seq_len, _ = query.shape
    blocks = math.ceil(seq_len / block)
    budget_blocks = min(blocks, max(1, math.ceil(min_budget / block)))
    if backend == "triton":
        column_mass, band_mass = block_masses(query, key, block, scaling)
        index, count, query_aware = select_blocks(query, key, column_mass, band_mass, gamma=gamma, block=block,
                                                  min_blocks=budget_blocks, js_threshold=js_threshold,
                                                  scaling=scaling, density=density)
        return BlockPattern(index=index, count=count, query_aware=query_aware, block=block)
    group = num_heads // key.shape[0]
    device = query.device

    # 1. exact attention of the last query block, per key block (columns) and per band of diagonals: (Hq, Nb) each
    column_mass, band_mass = _last_block_masses_ref(query, key, block, scaling)

    # 2. pooled estimate of the whole block map: (Hq, Nb, Nb), rows softmaxed over causal key blocks
    pooled_q = _pool(query, block, blocks)  # (Hq, Nb, D)
    pooled_k = _pool(key, block, blocks).repeat_interleave(group, dim=0)  # (Hq, Nb, D)
    causal = torch.ones(blocks, blocks, dtype=torch.bool, device=device).tril()
    estimate = (torch.matmul(pooled_q, pooled_k.transpose(1, 2)) * scaling).masked_fill(~causal, float("-inf"))
    estimate = torch.softmax(estimate, dim=-1)
    query_aware = _js_distance(estimate[:, -1], column_mass) < js_threshold  # (Hq,)

    forced = causal & (torch.eye(blocks, dtype=torch.bool, device=device) | (torch.arange(blocks, device=device) == 0))
    if density is not None:
        keep = (density * torch.arange(1, blocks + 1, device=device)).ceil().clamp_min(1)  # (Nb,)
        mask = _keep_top(estimate, count=keep[None, :].expand(num_heads, -1))
        query_aware = torch.ones_like(query_aware)
    else:
        aware = _keep_top(estimate, gamma, budget_blocks)
        slashed = _vertical_slash_blocks(column_mass, band_mass, gamma, budget_blocks, blocks)
        mask = torch.where(query_aware[:, None, None], aware, slashed)
    index, count = block_lists((mask | forced) & causal)
    return BlockPattern(index=index, count=count, query_aware=query_aware, block=block)


def _last_block_masses_ref(query: Tensor, key: Tensor, block: int, scaling: float) -> tuple[Tensor, Tensor]:
    """The last query block's exact causal attention (its last ``min(block, L)`` queries, fp32), averaged over its
    queries and summed per key block (column mass) and per band of diagonals (slash mass; band k holds the offsets
    query position minus key position in ``[kB, (k + 1)B)``). query (Hq, L, D), key (Hkv, L, D) -> two (Hq, Nb)."""
    num_heads, seq_len, head_dim = query.shape
    kv_heads = key.shape[0]
    group = num_heads // kv_heads
    blocks = math.ceil(seq_len / block)
    last = min(block, seq_len)
    q_last = (query[:, seq_len - last:].float() * scaling).reshape(kv_heads, group * last, head_dim)
    logits = torch.matmul(q_last, key.float().transpose(1, 2)).view(num_heads, last, seq_len)
    future = torch.ones(last, last, dtype=torch.bool, device=query.device).triu(1)  # only the last keys can be ahead
    logits[:, :, seq_len - last:].masked_fill_(future, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    del logits
    column = _per_block(probs.mean(dim=1), block, blocks)
    return column, _per_block(_diagonal_means(probs), block, blocks)


def _diagonal_means(probs: Tensor) -> Tensor:
    """Slash scores: ``out[h, d]`` = mean over the ``W`` query rows of ``probs[h, i, p_i - d]``, where query row i
    sits at position ``p_i = L - W + i``. probs (H, W, L), zero above the causal diagonal -> (H, L).

    Reversing the keys turns each diagonal into a column shifted by ``W - 1 - i`` in row i; a strided view over
    the right-padded rows undoes the shift, so one reduction sums every diagonal.
    """
    heads, rows, seq_len = probs.shape
    padded = torch.nn.functional.pad(probs.flip(-1), (0, rows)).contiguous()  # (H, W, L + W)
    row_stride = seq_len + rows
    aligned = padded.as_strided((heads, rows, seq_len), (rows * row_stride, row_stride - 1, 1), rows - 1)
    return aligned.sum(dim=1) / rows


def _pool(x: Tensor, block: int, blocks: int) -> Tensor:
    """Mean over each block of tokens: (H, L, D) -> (H, Nb, D) float32 (a short last block averages its own rows)."""
    heads, seq_len, head_dim = x.shape
    full = seq_len // block
    pooled = x[:, : full * block].reshape(heads, full, block, head_dim).sum(dim=2, dtype=torch.float32) / block
    if full < blocks:  # the short last block
        pooled = torch.cat([pooled, x[:, full * block:].mean(dim=1, keepdim=True, dtype=torch.float32)], dim=1)
    return pooled


def _per_block(scores: Tensor, block: int, blocks: int) -> Tensor:
    """Sum per-token scores per block: (H, L) -> (H, Nb)."""
    padded = scores.new_zeros(scores.shape[0], blocks * block)
    padded[:, : scores.shape[1]] = scores
    return padded.view(scores.shape[0], blocks, block).sum(dim=-1)


def _js_distance(p: Tensor, q: Tensor) -> Tensor:
    """Square root of the Jensen-Shannon divergence (nats) between the rows of two (H, N) distributions."""
    p = p / p.sum(-1, keepdim=True).clamp_min(_EPS)
    q = q / q.sum(-1, keepdim=True).clamp_min(_EPS)
    m = (p + q) / 2

    def kl(a: Tensor) -> Tensor:
        return torch.where(a > 0, a * (a.clamp_min(_EPS).log() - m.clamp_min(_EPS).log()), 0.0).sum(-1)

    return ((kl(p) + kl(q)) / 2).clamp_min(0).sqrt()


def _keep_top(scores: Tensor, gamma: float = 1.0, min_count: int = 1, count: Tensor | None = None) -> Tensor:
    """Boolean mask of the highest entries of each row (last dim) of ``scores``: the fewest whose mass reaches
    ``gamma`` of the row's total, at least ``min_count``; or the highest ``count[...]`` entries when given. Entries
    tied at the cut are all kept (as ``triton_block_select``'s bisection)."""
    ordered = scores.sort(dim=-1, descending=True).values
    if count is None:
        cumulative = ordered.cumsum(dim=-1)
        target = gamma * cumulative[..., -1:] * (1 - 1e-6)  # rounding must not push a full cover past the end
        count = ((cumulative < target).sum(dim=-1) + 1).clamp_min(min_count)
    cut = ordered.gather(-1, (count.long().clamp(1, scores.shape[-1]) - 1)[..., None])
    return scores >= cut


def _vertical_slash_blocks(column_mass: Tensor, band_mass: Tensor, gamma: float, min_blocks: int,
                           blocks: int) -> Tensor:
    """Block map of the vertical-slash pattern: (Hq, Nb, Nb) bool (causality applied by the caller).

    From the last block's column and band masses (``_last_block_masses_ref``), each head keeps the fewest column
    blocks covering ``gamma`` of the vertical mass and the fewest diagonal bands covering ``gamma`` of the slash mass
    (at least ``min_blocks`` of each). The band of offsets ``[kB, (k + 1)B)`` crosses, from query block i, key
    blocks i - k and i - k - 1.
    """
    columns = _keep_top(column_mass, gamma, min_blocks)
    bands = _keep_top(band_mass, gamma, min_blocks)
    bands = bands | torch.nn.functional.pad(bands, (1, 0))[:, :blocks]  # band k also reaches block offset k + 1
    rows = torch.arange(blocks, device=column_mass.device)
    distance = (rows[:, None] - rows[None, :]).clamp_min(0)  # (Nb, Nb) block offset of (query block, key block)
    return columns[:, None, :] | bands[:, distance]


def block_sparse_attention_ref(query: Tensor, key: Tensor, value: Tensor, index: Tensor, count: Tensor,
                               block: int, scaling: float) -> Tensor:
    """PyTorch twin of ``triton_block.block_sparse_attention`` (same arguments, any device): causal attention of
    each query block over its listed key blocks only.

    query (Hq, L, D), key/value (Hkv, L, D) -> (Hq, L, D); ``index``/``count`` as ``BlockPattern``'s. One head at a
    time, so the token-level mask is at most (L, L) booleans; each row's softmax runs over the keys it may see.
    """
    num_heads, seq_len, _ = query.shape
    group = num_heads // key.shape[0]
    blocks_kept = block_mask(index, count)
    visible = torch.ones(seq_len, seq_len, dtype=torch.bool, device=query.device).tril()
    out = torch.empty_like(query)
    for h in range(num_heads):
        token_mask = blocks_kept[h].repeat_interleave(block, 0)[:seq_len].repeat_interleave(
            block, 1)[:, :seq_len] & visible
        out[h] = torch.nn.functional.scaled_dot_product_attention(
            query[h][None], key[h // group][None], value[h // group][None], attn_mask=token_mask[None],
            scale=scaling)[0]
    return out


def block_sparse_prefill(query: Tensor, key: Tensor, value: Tensor, *, gamma: float, block: int, min_budget: int,
                         js_threshold: float, scaling: float, density: float | None = None,
                         backend: str = "torch") -> tuple[Tensor, BlockPattern]:
    """Choose a block pattern and attend through it, for one full prefill of one sequence.

    Args:
        query: (Hq, L, D); key, value: (Hkv, L, D).
        gamma, block, min_budget, js_threshold, density: as for ``block_pattern``.
        scaling: softmax scale.
        backend: "triton" (CUDA) or "torch" (``block_sparse_attention_ref``).

    Returns:
        out: (Hq, L, D); the pattern it used.
    """
    pattern = block_pattern(query, key, gamma=gamma, block=block, min_budget=min_budget, js_threshold=js_threshold,
                            scaling=scaling, density=density, backend=backend)
    attend = block_sparse_attention if backend == "triton" else block_sparse_attention_ref
    return attend(query, key, value, pattern.index, pattern.count, block, scaling), pattern

