"""Token Sparse Attention stages in plain PyTorch: the ground truth, the CPU fallback and the calibration path.

Jo et al., "Token Sparse Attention: Efficient Long-Context Inference with Interleaved Token Selection"
(arXiv 2602.03216). Each stage works on ONE sequence (no batch dimension: every sequence of a batch chooses
its own kept count; ``attention.py`` loops over the batch). ``tsa.py`` chains them in the paper's order:

    score -> smooth -> coverage -> select -> compress -> attend -> decompress

The Triton kernels in ``triton_score.py`` and ``triton_rows.py`` are drop-in twins of the score, compress
and decompress stages (same signatures, same results up to rounding).

Shapes: ``Hq`` query heads, ``Hkv`` key/value heads (``G = Hq // Hkv``), ``Hs`` selecting heads (``Hq`` in
"query_head" mode, ``Hkv`` in "kv_group" mode), ``Lq`` queries, ``Lk`` keys (the queries are the LAST ``Lq``
of the ``Lk`` positions), ``D`` head dim, ``W`` window, ``C`` candidate tokens, ``T = Lk - C`` the tail that
is always kept, ``K`` kept candidates per head, ``K' = K + T``.

Kept indices are sorted ascending and shared by Q, K and V of a head, so the ordinary causal mask on the
compressed sequence is exact. Example, Lk = 8, W = 2, one head keeps candidates {0, 2, 5} plus the tail
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


def score_keys_ref(query: Tensor, key: Tensor, window: int, scaling: float, softcap: float | None = None) -> Tensor:
    """Importance of every earlier key: mean over the last ``window`` queries of its exact softmax probability.

    Args:
        query: (Hq, Lq, D), the last ``Lq`` positions of the sequence; ``Lq >= window``.
        key: (Hkv, Lk, D) with ``Hq % Hkv == 0`` (GQA: query head h reads KV head ``h // G``).
        window: number of trailing queries that vote (the paper's W).
        scaling: softmax scale, usually ``D ** -0.5``.
        softcap: logit cap of models that use one (Gemma 2): logits become ``softcap * tanh(logits / softcap)``.

    Returns:
        (Hq, Lk - window) float32 scores of the keys ``[0, Lk - window)``. The probabilities are normalised
        over ALL keys each query may see (causal inside the window), so a row sums to at most 1.
    """
    num_heads, _, head_dim = query.shape
    kv_heads, kv_len, _ = key.shape
    group = num_heads // kv_heads
    q = query[:, -window:].float().reshape(kv_heads, group * window, head_dim)  # (Hkv, G*W, D)
    logits = torch.matmul(q, key.float().transpose(1, 2)) * scaling  # (Hkv, G*W, Lk)
    logits = logits.view(num_heads, window, kv_len)  # (Hq, W, Lk)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    query_pos = torch.arange(kv_len - window, kv_len, device=key.device)
    key_pos = torch.arange(kv_len, device=key.device)
    logits = logits.masked_fill(key_pos[None, None, :] > query_pos[None, :, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # (Hq, W, Lk)
    return probs[:, :, : kv_len - window].mean(dim=1)  # (Hq, Lk - W)


def smooth_scores_ref(scores: Tensor, pool_kernel: int) -> Tensor:
    """Average-pool the scores over ``pool_kernel`` neighbouring tokens (zero-padded edges, as the paper) and
    normalise each head to a distribution. scores (Hs, C) -> (Hs, C) float32, each row summing to 1."""
    pooled = F.avg_pool1d(scores.float()[:, None, :], pool_kernel, stride=1, padding=pool_kernel // 2)[:, 0]
    return pooled / pooled.sum(dim=-1, keepdim=True).clamp_min(_EPS)


def select_tokens_ref(distribution: Tensor, seq_len: int, tau: float, min_tokens: int,
                      keep: int | None = None) -> Tensor:
    """Dynamic Token Coverage: how many tokens to keep (per layer) and which ones (per head).

    From the head-averaged distribution, the least-important tail whose total mass is below ``tau`` is
    dropped; that fixes ``K`` (at least ``min_tokens``, at most ``C``). Each head then keeps its own top-``K``
    candidates, and every head keeps the tail ``[C, seq_len)``.

    Because the head average is taken over normalised per-head distributions and each head keeps its own
    top-``K``, the head-averaged kept mass is at least ``1 - tau``.

    Args:
        distribution: (Hs, C) per-head distributions over the candidates (``smooth_scores_ref``).
        seq_len: sequence length ``Lk``; the tail ``[C, Lk)`` is always kept.
        tau: coverage threshold in [0, 1); 0 keeps every token.
        min_tokens: floor on ``K`` (paper: 1024).
        keep: force ``K`` instead of deriving it from ``tau`` (benchmarks at a stated operating point);
            None (the default) applies Dynamic Token Coverage.

    Returns:
        kept_indices: (Hs, K + T) int64, ascending per head.
    """
    num_heads, candidates = distribution.shape
    tail_mass = torch.sort(distribution.mean(dim=0)).values.cumsum(dim=0)  # ascending: least important first
    # number of tail tokens whose cumulative mass stays below tau; .item() is the one host sync of the layer
    coverage_keep = candidates - int(torch.searchsorted(tail_mass, tau))
    # A forced count still pays for the coverage computation above, so benchmarks time the real work.
    keep = min(candidates, max(min_tokens, coverage_keep if keep is None else keep))
    top = distribution.topk(keep, dim=-1, sorted=False).indices.sort(dim=-1).values  # (Hs, K)
    tail = torch.arange(candidates, seq_len, device=distribution.device).expand(num_heads, -1)  # (Hs, T)
    return torch.cat([top, tail], dim=-1)


def query_rows(kept: Tensor, num_heads: int, q_len: int, kv_len: int) -> Tensor:
    """Rows of the query tensor that the compressed attention computes, per query head.

    kept (Hs, K') -> (Hq, Lq') int64 with ``Lq' = K'`` for a full prefill (``Lq == Lk``) and ``Lq' = Lq`` for a
    chunk (``Lq < Lk``; the chunk is the always-kept tail, so every query of the chunk is computed).
    """
    rows = kept.shape[1] if q_len == kv_len else q_len
    per_query_head = kept if kept.shape[0] == num_heads else kept.repeat_interleave(num_heads // kept.shape[0], dim=0)
    if q_len == kv_len:
        return per_query_head  # (Hq, K'): every kept position is a query
    return per_query_head[:, kept.shape[1] - rows :] - (kv_len - q_len)


def compress_ref(query: Tensor, key: Tensor, value: Tensor, kept: Tensor, rows: Tensor
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """Gather the kept rows of Q, K and V into compact tensors (no K/V expansion for GQA).

    Args:
        query: (Hq, Lq, D); key, value: (Hkv, Lk, D).
        kept: (Hs, K') ascending positions; ``Hs == Hq`` gathers K/V per query head from KV head ``h // G``,
            ``Hs == Hkv`` gathers them once per KV head.
        rows: (Hq, Lq') query rows to keep (``query_rows``).

    Returns:
        query_c (Hq, Lq', D), key_c and value_c (Hs, K', D), all contiguous.
    """
    kv_heads, _, head_dim = key.shape
    per_kv_head = kept.reshape(kv_heads, -1)  # (Hkv, (Hs/Hkv)*K'): query heads of a group side by side

    def gather(x: Tensor, index: Tensor) -> Tensor:
        return torch.gather(x, 1, index[:, :, None].expand(-1, -1, head_dim))

    key_c = gather(key, per_kv_head).view(kept.shape[0], kept.shape[1], head_dim)
    value_c = gather(value, per_kv_head).view(kept.shape[0], kept.shape[1], head_dim)
    return gather(query, rows), key_c, value_c


def decompress_ref(out_c: Tensor, rows: Tensor, q_len: int) -> Tensor:
    """Scatter the compact output back to its query rows; every other row is 0.

    out_c (Hq, Lq', D), rows (Hq, Lq') -> (Lq, Hq, D), the layout transformers expects from an attention function.
    """
    num_heads, _, head_dim = out_c.shape
    out = out_c.new_zeros(num_heads, q_len, head_dim)
    out.scatter_(1, rows[:, :, None].expand(-1, -1, head_dim), out_c)
    return out.transpose(0, 1)  # (Lq, Hq, D) view
