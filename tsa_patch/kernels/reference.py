"""Token Sparse Attention stages in plain PyTorch: the ground truth, the CPU fallback and the calibration path.

Jo et al., "Token Sparse Attention: Efficient Long-Context Inference with Interleaved Token Selection"
(arXiv 2602.03216). Each stage works on ONE sequence (no batch dimension: every sequence of a batch chooses
its own kept count; ``attention.py`` loops over the batch). ``tsa.py`` chains them in the paper's order:

    score -> smooth -> coverage -> select -> compress -> attend -> decompress

The Triton kernels in ``triton_score.py``, ``triton_smooth.py``, ``triton_select.py`` and ``triton_rows.py``
are drop-in twins of the score, smooth, select, compress and decompress stages (same signatures, same results
up to rounding).

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
    """Average-pool the scores over ``pool_kernel`` neighbouring tokens (zero-padded edges, as the paper).
    scores (Hs, C) -> (Hs, C) float32 pooled scores (not normalised: each coverage rule normalises as it needs,
    and a head's top-K does not depend on its scale)."""
    return F.avg_pool1d(scores.float()[:, None, :], pool_kernel, stride=1, padding=pool_kernel // 2)[:, 0]


def coverage_distribution(pooled: Tensor, coverage: str) -> Tensor:
    """The head-averaged candidate scores (C,) whose least-important tail Dynamic Token Coverage drops: for
    "paper" the mean over heads of the raw pooled scores (``kept_count_ref`` normalises it, as the authors' code),
    for "normalized" the mean of each head's normalised distribution."""
    if coverage == "paper":
        return pooled.mean(dim=0)
    return (pooled / pooled.sum(dim=-1, keepdim=True).clamp_min(_EPS)).mean(dim=0)


def kept_count_ref(pooled: Tensor, tau: float, min_tokens: int, coverage: str = "paper",
                   keep: int | None = None) -> Tensor:
    """Dynamic Token Coverage: how many candidates every head keeps, as a 0-dim int64 tensor on the scores' device
    (no host synchronisation).

    The least-important tail of the head-averaged distribution whose cumulative mass stays below ``tau`` is
    dropped. ``coverage`` is how heads are averaged and how much is dropped:

    - "paper" (the authors' code, reference/paper.md section 3.3): the mean over heads of the raw pooled scores,
      normalised; the tail of n tokens with cumulative mass < tau, plus one more (mass >= tau), is dropped, and
      nothing when n = 0.
    - "normalized" (a variant of ours): the mean over heads of each head's normalised distribution (every head
      counts equally, however little mass it puts on the candidates); the n tokens are dropped. With it, the
      head-averaged kept mass is at least 1 - tau.

    The count is at least ``min_tokens`` and at most ``C``; ``keep`` forces it (benchmarks at a stated operating
    point still pay for the coverage computation).

    Args:
        pooled: (Hs, C) pooled scores (``smooth_scores_ref``).
        tau: coverage threshold in [0, 1); 0 keeps every candidate.
        min_tokens: floor on the count (paper: 1024).
        coverage: "paper" or "normalized".
        keep: force the count instead of deriving it from ``tau``; None (the default) applies the rule.
    """
    candidates = pooled.shape[1]
    averaged = coverage_distribution(pooled, coverage)
    if coverage == "paper":
        averaged = averaged / (averaged.sum() + 1e-8)  # the authors' normalisation, eps included
    tail_mass = torch.sort(averaged).values.cumsum(dim=0)  # ascending: least important first
    below = torch.searchsorted(tail_mass, tau)  # 0-dim: the tail tokens whose cumulative mass stays below tau
    dropped = torch.where(below > 0, below + 1, below) if coverage == "paper" else below
    count = candidates - dropped if keep is None else torch.full_like(dropped, keep)
    return count.clamp(max(0, min(min_tokens, candidates)), candidates)


def select_tokens_padded_ref(pooled: Tensor, seq_len: int, tau: float, min_tokens: int, coverage: str = "paper",
                             keep: int | None = None) -> tuple[Tensor, Tensor]:
    """Dynamic Token Coverage: how many tokens to keep (per layer) and which ones (per head), with nothing read
    back to the host.

    ``kept_count_ref`` fixes ``K``; each head then keeps its own top-``K`` candidates (a stable descending sort
    ranks them; ties go to the earlier token), and a prefix sum over their mask writes them in ascending order,
    followed by the tail ``[C, seq_len)`` that every head keeps. The buffer is sized for keeping everything: the
    synced path reads the count back once and slices it, the sync-free path reads the count on the device.

    Args:
        pooled: (Hs, C) pooled scores (``smooth_scores_ref``).
        seq_len: sequence length ``Lk``; the tail ``[C, Lk)`` is always kept.
        tau, min_tokens, coverage, keep: as for ``kept_count_ref``.

    Returns:
        kept: (Hs, Lk) int64; row h holds its ``count[h]`` kept positions in ascending order, then padding
            (``Lk - 1``, never read).
        count: (Hs,) int64 on the device, ``K + T`` for every head.
    """
    num_heads, candidates = pooled.shape
    device = pooled.device
    keep_count = kept_count_ref(pooled, tau, min_tokens, coverage, keep)  # 0-dim, on the device
    order = pooled.argsort(dim=-1, descending=True, stable=True)  # (Hs, C)
    ranked = (torch.arange(candidates, device=device) < keep_count).expand(num_heads, -1)
    mask = torch.zeros(num_heads, candidates, dtype=torch.bool, device=device).scatter_(1, order, ranked)
    slots = torch.where(mask, mask.cumsum(dim=-1) - 1, seq_len)  # ascending slot of each kept candidate
    kept = torch.full((num_heads, seq_len + 1), seq_len - 1, dtype=torch.int64, device=device)  # + a discard column
    positions = torch.arange(seq_len, device=device)
    kept.scatter_(1, slots, positions[:candidates].expand(num_heads, -1))
    tail_slots = (keep_count + torch.arange(seq_len - candidates, device=device)).expand(num_heads, -1)
    kept.scatter_(1, tail_slots, positions[candidates:].expand(num_heads, -1))
    return kept[:, :seq_len], (keep_count + seq_len - candidates).expand(num_heads).clone()


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
    key_c, value_c = gather_kept(key, value, kept)
    return torch.gather(query, 1, rows[:, :, None].expand(-1, -1, query.shape[-1])), key_c, value_c


def gather_kept(key: Tensor, value: Tensor, kept: Tensor) -> tuple[Tensor, Tensor]:
    """The kept rows of K and V, per selecting head: key (Hkv, Lk, D), kept (Hs, K') -> key_c, value_c (Hs, K', D),
    contiguous. ``Hs == Hq`` gathers them per query head from KV head ``h // G``; ``Hs == Hkv`` once per KV head."""
    kv_heads, _, head_dim = key.shape
    per_kv_head = kept.reshape(kv_heads, -1)[:, :, None].expand(-1, -1, head_dim)  # query heads of a group side by side
    return (torch.gather(key, 1, per_kv_head).view(*kept.shape, head_dim),
            torch.gather(value, 1, per_kv_head).view(*kept.shape, head_dim))


def decompress_ref(out_c: Tensor, rows: Tensor, q_len: int) -> Tensor:
    """Scatter the compact output back to its query rows; every other row is 0.

    out_c (Hq, Lq', D), rows (Hq, Lq') -> (Lq, Hq, D), the layout transformers expects from an attention function.
    """
    num_heads, _, head_dim = out_c.shape
    out = out_c.new_zeros(num_heads, q_len, head_dim)
    out.scatter_(1, rows[:, :, None].expand(-1, -1, head_dim), out_c)
    return out.transpose(0, 1)  # (Lq, Hq, D) view


def gathered_attention_ref(query: Tensor, key: Tensor, value: Tensor, kept: Tensor, count: Tensor, scaling: float,
                           softcap: float | None = None) -> Tensor:
    """Compress, attend and decompress in one step: the PyTorch twin of ``triton_gather.gathered_attention``.

    For every query head h and its selecting head s (``s = h`` in "query_head" mode, ``h // G`` in "kv_group"
    mode), the first ``count[s]`` positions of ``kept[s]`` are its tokens: each attends causally to the kept
    tokens up to itself; every other row of head h is 0. Full prefills only (``Lq == Lk``).

    Args:
        query: (Hq, L, D); key, value: (Hkv, L, D).
        kept: (Hs, M) ascending positions per selecting head in the first ``count`` entries (``M >= count``).
        count: (Hs,) int64 number of kept positions per selecting head (read back to the host here: this twin is
            a reference, not the sync-free path).
        scaling, softcap: as for ``score_keys_ref``.

    Returns:
        (L, Hq, D), the layout transformers expects.
    """
    num_heads, seq_len, head_dim = query.shape
    selecting, kv_heads = kept.shape[0], key.shape[0]
    out = query.new_zeros(seq_len, num_heads, head_dim)
    for h in range(num_heads):
        s = h if selecting == num_heads else h // (num_heads // selecting)
        positions = kept[s, : int(count[s])]
        q = query[h, positions].float()  # (K', D)
        k = key[h // (num_heads // kv_heads), positions].float()
        v = value[h // (num_heads // kv_heads), positions].float()
        logits = q @ k.T * scaling  # (K', K')
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        causal = torch.ones_like(logits, dtype=torch.bool).tril()
        weights = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
        out[positions, h] = (weights @ v).to(out.dtype)
    return out


def padded_positions(kept: Tensor, count: Tensor, seq_len: int) -> Tensor:
    """kept (Hs, M) with ``count[s]`` positions in each row, count (Hs,) -> (Hs, M) with every entry past the count
    set to ``seq_len``: still ascending, and never visible to a query (computed on the device)."""
    slots = torch.arange(kept.shape[1], device=kept.device)
    return torch.where(slots[None, :] < count[:, None], kept, seq_len)


def kept_keys_attention_ref(query: Tensor, key: Tensor, value: Tensor, kept: Tensor, count: Tensor, scaling: float,
                            softcap: float | None = None, local_keys: int = 0, rows_per_step: int = 256) -> Tensor:
    """Every query row attends causally to its head's kept keys (``rows="all"``), and to the ``local_keys`` keys
    ending at its own position, kept or not: the PyTorch twin of ``triton_kept_keys.kept_keys_attention``.

    Row ``m`` of query head h attends to the keys at positions ``m - local_keys < p <= m`` and to the kept keys of
    its selecting head at positions ``p <= m - local_keys``; a row that sees none is 0 (possible only without local
    keys). Full prefills only (``Lq == Lk``). Computed in float32, ``rows_per_step`` query rows at a time, each step
    over only the kept keys its last row can see (the positions ascend, so they are a prefix; their lengths are read
    to the host once) and its rows' local keys, by SDPA with a mask: memory ``Hq * rows_per_step * M``.

    Args:
        query: (Hq, L, D); key, value: (Hkv, L, D).
        kept: (Hs, M) ascending positions per selecting head in the first ``count`` entries (``M >= count``).
        count: (Hs,) int number of kept positions per selecting head, on the device.
        scaling, softcap: as for ``score_keys_ref``.
        local_keys: how many of the latest keys every row sees whatever the selection (0: the kept keys only).

    Returns:
        (L, Hq, D), the layout transformers expects.
    """
    num_heads, seq_len, _ = query.shape
    group = num_heads // kept.shape[0]
    kv_group = num_heads // key.shape[0]
    first_rows = padded_positions(kept, count, seq_len) + local_keys  # the first row that sees each kept key
    key_c, value_c = (x.float() for x in gather_kept(key, value, kept))  # (Hs, M, D)
    if group > 1:  # kv_group selection: the query heads of a group share their KV head's kept keys
        first_rows, key_c, value_c = (x.repeat_interleave(group, dim=0) for x in (first_rows, key_c, value_c))
    starts = range(0, seq_len, rows_per_step)
    ends = [min(start + rows_per_step, seq_len) for start in starts]
    step_ends = torch.tensor(ends, device=query.device).expand(num_heads, -1).contiguous()
    reaches = torch.searchsorted(first_rows, step_ends).amax(0).tolist()  # how many kept keys each step can see
    out = torch.zeros_like(query)
    for start, end, reach in zip(starts, ends, reaches):
        first_local = max(0, start - local_keys + 1) if local_keys else end  # the step's local keys: [first, end)
        if reach == 0 and first_local == end:
            continue
        rows = torch.arange(start, end, device=query.device)[:, None]
        local = torch.arange(first_local, end, device=query.device)[None, :]
        visible = torch.cat([first_rows[:, None, :reach] <= rows[None],
                             ((local <= rows) & (local > rows - local_keys)).expand(num_heads, -1, -1)], dim=-1)
        q = query[:, start:end].float()
        k, v = (torch.cat([compact[:, :reach], full[:, first_local:end].float().repeat_interleave(kv_group, dim=0)],
                          dim=1) for compact, full in ((key_c, key), (value_c, value)))  # (Hq, reach + local, D)
        if softcap is None:
            step = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scaling)
        else:
            logits = softcap * torch.tanh(torch.einsum("hqd,hkd->hqk", q, k) * scaling / softcap)
            step = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1) @ v
        out[:, start:end] = torch.where(visible.any(-1, keepdim=True), step, 0.0).to(query.dtype)  # unseen rows: 0
    return out.transpose(0, 1)


def kept_keys_cost(kept: Tensor, count: Tensor, seq_len: int, local_keys: int = 0) -> Tensor:
    """The share of dense causal attention's query-key pairs that kept-keys attention computes, averaged over the
    selecting heads: a kept key at position ``p`` is seen by the ``seq_len - p - local_keys`` rows from
    ``p + local_keys`` on, and row ``m`` by ``min(local_keys, m + 1)`` local keys. A 0-dim float32 tensor on the
    device."""
    positions = padded_positions(kept, count, seq_len)
    pairs = (seq_len - positions - local_keys).clamp_min(0).sum(dim=-1, dtype=torch.float64)  # padding: nothing
    band = min(local_keys, seq_len)
    local_pairs = band * (band + 1) / 2 + (seq_len - band) * band
    return ((pairs + local_pairs) / (seq_len * (seq_len + 1) / 2)).mean().float()
