"""Token Sparse Attention in plain PyTorch: the ground truth, the CPU fallback and the calibration path.

Jo et al., "Token Sparse Attention: Efficient Long-Context Inference with Interleaved Token Selection"
(arXiv 2602.03216). The functions below follow the paper's steps in order, for ONE sequence (no batch
dimension: every sequence of a batch chooses its own kept count; ``attention.py`` loops over the batch):

    score -> smooth -> coverage -> select -> gather -> attend -> scatter

Shapes: ``Hq`` query heads, ``Hkv`` key/value heads, ``Hs`` selecting heads (``Hq`` in "query_head" mode,
``Hkv`` in "kv_group" mode), ``Lq`` queries, ``Lk`` keys (the queries are the LAST ``Lq`` of the ``Lk``
positions), ``D`` head dim, ``W`` window, ``C = Lk - W`` candidate tokens, ``K`` kept candidates per head.

Kept indices are sorted ascending and shared by Q, K and V of a head, so the ordinary causal mask on the
compressed sequence is exact. Example, Lk = 8, W = 2, one head keeps candidates {0, 2, 5} plus the window
{6, 7}::

    original positions   0 1 2 3 4 5 6 7        compressed causal mask (query rows, key columns)
    kept                 x . x . . x x x             0 2 5 6 7
                                                  0  1 . . . .
    rows 1, 3, 4 of this head's output are 0      2  1 1 . . .
    (the residual stream carries those tokens)    5  1 1 1 . .
                                                  6  1 1 1 1 .
                                                  7  1 1 1 1 1
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Numerical floor for per-head normalisation (a head whose scores are all ~0 stays finite).
_EPS = 1e-12


def score_keys_ref(query: Tensor, key: Tensor, window: int, scaling: float) -> Tensor:
    """Importance of every candidate key: mean over the last ``window`` queries of its exact softmax probability.

    Args:
        query: (Hq, Lq, D), the last ``Lq`` positions of the sequence; ``Lq >= window``.
        key: (Hkv, Lk, D) with ``Hq % Hkv == 0`` (GQA: query head h reads KV head ``h // (Hq // Hkv)``).
        window: number of trailing queries that vote (the paper's W).
        scaling: softmax scale, usually ``D ** -0.5``.

    Returns:
        (Hq, Lk - window) float32 scores for the candidate keys ``[0, Lk - window)``. The probabilities are
        normalised over ALL keys each query may see (causal inside the window), so a row sums to at most 1.
    """
    num_heads, _, head_dim = query.shape
    kv_heads, kv_len, _ = key.shape
    group = num_heads // kv_heads
    q = query[:, -window:].float().reshape(kv_heads, group * window, head_dim)  # (Hkv, G*W, D)
    logits = torch.matmul(q, key.float().transpose(1, 2)) * scaling  # (Hkv, G*W, Lk)
    logits = logits.view(num_heads, window, kv_len)  # (Hq, W, Lk)
    query_pos = torch.arange(kv_len - window, kv_len, device=key.device)
    key_pos = torch.arange(kv_len, device=key.device)
    logits = logits.masked_fill(key_pos[None, None, :] > query_pos[None, :, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # (Hq, W, Lk)
    return probs[:, :, : kv_len - window].mean(dim=1)  # (Hq, C)


def select_tokens_ref(scores: Tensor, seq_len: int, tau: float, pool_kernel: int, min_tokens: int) -> Tensor:
    """Dynamic Token Coverage: how many tokens to keep (per layer) and which ones (per head).

    Scores are smoothed with an average pool of width ``pool_kernel`` (zero-padded edges) and normalised per
    head. From the head-averaged distribution, the least-important tail whose total mass is below ``tau`` is
    dropped; that fixes ``K`` (at least ``min_tokens``, at most ``C``). Each head then keeps its own top-``K``
    candidates, and every head keeps the window ``[C, seq_len)``.

    Because the head average is taken over normalised per-head distributions and each head keeps its own
    top-``K``, the head-averaged kept mass is at least ``1 - tau``.

    Args:
        scores: (Hs, C) non-negative candidate scores (``score_keys_ref``, possibly averaged over a KV group).
        seq_len: sequence length ``Lk``; the window is ``W = seq_len - C``.
        tau: coverage threshold in [0, 1); 0 keeps every token.
        pool_kernel: odd smoothing width (paper: 7).
        min_tokens: floor on ``K`` (paper: 1024).

    Returns:
        kept_indices: (Hs, K + W) int64, ascending per head.
    """
    num_heads, candidates = scores.shape
    pooled = F.avg_pool1d(scores.float()[:, None, :], pool_kernel, stride=1, padding=pool_kernel // 2)[:, 0]
    distribution = pooled / pooled.sum(dim=-1, keepdim=True).clamp_min(_EPS)  # (Hs, C), rows sum to 1
    head_mean = distribution.mean(dim=0)  # (C,)
    tail_mass = torch.sort(head_mean).values.cumsum(dim=0)  # ascending: least important first
    num_dropped = int((tail_mass < tau).sum())  # the one host sync of the layer
    keep = min(candidates, max(min_tokens, candidates - num_dropped))
    top = distribution.topk(keep, dim=-1, sorted=False).indices.sort(dim=-1).values  # (Hs, K)
    window = torch.arange(candidates, seq_len, device=scores.device).expand(num_heads, -1)  # (Hs, W)
    return torch.cat([top, window], dim=-1)


def gather_rows_ref(x: Tensor, indices: Tensor) -> Tensor:
    """Compress: rows ``indices`` of every head. x (H, L, D), indices (H, K') -> (H, K', D)."""
    return torch.gather(x, 1, indices[:, :, None].expand(-1, -1, x.shape[-1]))


def scatter_rows_ref(rows: Tensor, indices: Tensor, length: int) -> Tensor:
    """Decompress: rows back to their positions in zeros. rows (H, K', D), indices (H, K') -> (H, length, D)."""
    out = rows.new_zeros(rows.shape[0], length, rows.shape[-1])
    return out.scatter_(1, indices[:, :, None].expand(-1, -1, rows.shape[-1]), rows)


def causal_attention_ref(query: Tensor, key: Tensor, value: Tensor, scaling: float) -> Tensor:
    """Dense causal attention for one sequence whose queries are the last ``Lq`` of ``Lk`` positions.

    query (Hq, Lq, D), key/value (Hkv, Lk, D) -> (Hq, Lq, D). The causal mask is aligned bottom-right.
    """
    q_len, kv_len = query.shape[1], key.shape[1]
    gqa = query.shape[0] != key.shape[0]
    if q_len == kv_len:
        out = F.scaled_dot_product_attention(query[None], key[None], value[None], is_causal=True, scale=scaling,
                                             enable_gqa=gqa)
    else:
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
        out = F.scaled_dot_product_attention(query[None], key[None], value[None], attn_mask=mask, scale=scaling,
                                             enable_gqa=gqa)
    return out[0]


def tsa_attention_ref(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    tau: float,
    window: int,
    pool_kernel: int,
    min_tokens: int,
    selection: str,
    scaling: float,
) -> tuple[Tensor, Tensor]:
    """Token Sparse Attention for one sequence.

    Args:
        query: (Hq, Lq, D), the last ``Lq`` positions; ``window <= Lq <= Lk``.
        key, value: (Hkv, Lk, D), the full sequence (nothing is evicted from the KV cache).
        tau, window, pool_kernel, min_tokens: see ``select_tokens_ref``.
        selection: "query_head" (each query head selects; K/V expanded to Hq heads, as the paper) or
            "kv_group" (the heads of a KV group average their scores and share one selection; no expansion).
        scaling: softmax scale.

    Returns:
        out: (Hq, Lq, D). For head h, a query row kept by h equals dense causal attention restricted to h's
            kept keys; a dropped row is exactly 0.
        kept_indices: (Hs, K + W) ascending positions in ``[0, Lk)``.
    """
    num_heads, q_len, _ = query.shape
    kv_heads, kv_len, _ = key.shape
    group = num_heads // kv_heads

    # 1. score: the last W queries vote for every earlier key (probabilities computed in fp32).
    scores = score_keys_ref(query, key, window, scaling)  # (Hq, C)
    if selection == "kv_group":
        scores = scores.view(kv_heads, group, -1).mean(dim=1)  # (Hkv, C)
    else:
        key = key.repeat_interleave(group, dim=0)  # (Hq, Lk, D)
        value = value.repeat_interleave(group, dim=0)

    # 2-4. smooth, coverage, select.
    kept = select_tokens_ref(scores, kv_len, tau, pool_kernel, min_tokens)  # (Hs, K')
    kept_per_query_head = kept.repeat_interleave(num_heads // kept.shape[0], dim=0)  # (Hq, K')

    # 5. gather: compact K/V (and Q when every query is present).
    key_c = gather_rows_ref(key, kept)  # (Hs, K', D)
    value_c = gather_rows_ref(value, kept)
    if q_len == kv_len:
        # 6. attend: shared sorted indices make the plain causal mask exact on the compressed sequence.
        query_c = gather_rows_ref(query, kept_per_query_head)  # (Hq, K', D)
        out_c = causal_attention_ref(query_c, key_c, value_c, scaling)  # (Hq, K', D)
        # 7. scatter: dropped rows stay 0.
        return scatter_rows_ref(out_c, kept_per_query_head, q_len), kept

    # Chunked prefill (Lq < Lk): queries are not all present, so mask by original positions instead.
    query_pos = torch.arange(kv_len - q_len, kv_len, device=query.device)  # (Lq,)
    visible = kept_per_query_head[:, None, :] <= query_pos[None, :, None]  # (Hq, Lq, K')
    key_q = key_c.repeat_interleave(num_heads // key_c.shape[0], dim=0)  # (Hq, K', D)
    value_q = value_c.repeat_interleave(num_heads // value_c.shape[0], dim=0)
    out = F.scaled_dot_product_attention(query, key_q, value_q, attn_mask=visible, scale=scaling)  # (Hq, Lq, D)
    member = torch.zeros(num_heads, kv_len, dtype=torch.bool, device=query.device)
    member.scatter_(1, kept_per_query_head, True)
    row_kept = member[:, kv_len - q_len:, None]  # (Hq, Lq, 1)
    # where(), not multiply: a dropped row may have no visible key, and NaN * 0 is NaN.
    return torch.where(row_kept, out, torch.zeros_like(out)), kept
