"""Token Sparse Attention for one sequence: the paper's steps chained, on PyTorch or Triton stages.

    score -> smooth -> coverage -> select -> compress -> attend -> decompress

Two paths give the same result (the same kept tokens; the attention up to rounding):

- ``tsa_attention`` reads the kept count back to the host once (it sizes compact copies of Q, K and V), then runs
  the policy's dense kernel on them (``dense.py``: SDPA with cuDNN first, or flash-attn) unless the caller passes
  another causal kernel as ``attend`` (the block-sparse kernel). In eager mode it is the faster path at every
  length measured on an H200: cuDNN on the compact copies outruns attention by index.
- ``tsa_attention_sync_free`` keeps the count on the device: the selection writes the kept positions into a
  buffer sized for keeping every token, and one kernel attends by index over them and scatters its rows back
  (``triton_gather.py``). Nothing waits for the GPU, so a CUDA graph can capture it (a host sync cannot be
  captured), which removes the launches that set a short prompt's time.

A third path computes more: ``tsa_attention_kept_keys`` (a policy's ``rows="all"``, a variant of ours) drops keys
only. The same tokens are selected, and every query row attends to its head's kept keys (``triton_kept_keys.py``),
so a dropped token's row gets attention over the kept keys instead of 0. It never reads the count back either.

The "torch" backend runs the stages of ``reference.py`` (any device); the "triton" backend swaps in their Triton
twins (CUDA). All paths share the selection, which leaves the kept count on the device
(``select_tokens_padded_ref`` or ``triton_select.select_tokens_padded``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

# Only `from .module import name`: transformers copies a checkpoint's remote code by scanning for that form.
from .dense import dense_attention
from .reference import (compress_ref, decompress_ref, gathered_attention_ref, kept_keys_attention_ref, kept_keys_cost,
                        query_rows, score_keys_ref, select_tokens_padded_ref, smooth_scores_ref)
from .triton_gather import gathered_attention
from .triton_import import HAS_TRITON
from .triton_kept_keys import kept_keys_attention
from .triton_rows import compress, decompress
from .triton_score import score_keys
from .triton_select import select_tokens_padded
from .triton_smooth import smooth_scores


@dataclass(frozen=True)
class Stages:
    """The swappable stages of one backend (the PyTorch reference, or their Triton twins with equal signatures)."""

    score: Callable  # (query, key, window, scaling, softcap) -> (Hq, Lk - W) scores
    smooth: Callable  # (scores, pool_kernel) -> (Hs, C) pooled scores
    select: Callable  # (pooled, Lk, tau, min_tokens, coverage, keep) -> kept (Hs, Lk) ascending, count (Hs,)
    compress: Callable  # (query, key, value, kept, rows) -> compact query, key, value
    decompress: Callable  # (out_c, rows, q_len) -> (Lq, Hq, D)
    gathered: Callable  # (query, key, value, kept, count, scaling, softcap) -> (L, Hq, D): the sync-free attention
    kept_keys: Callable  # (query, key, value, kept, count, scaling, local_keys=) -> (L, Hq, D) every row over the
    # kept keys and its own local keys, and a device tensor whose sum is the share of dense attention computed


def _kept_keys_torch(query: Tensor, key: Tensor, value: Tensor, kept: Tensor, count: Tensor, scaling: float,
                     softcap: float | None = None, local_keys: int = 0) -> tuple[Tensor, Tensor]:
    """The kept-keys stage in PyTorch: ``kept_keys_attention_ref`` and ``kept_keys_cost``."""
    out = kept_keys_attention_ref(query, key, value, kept, count, scaling, softcap, local_keys)
    return out, kept_keys_cost(kept, count, query.shape[1], local_keys)


STAGES = {
    "torch": Stages(score=score_keys_ref, smooth=smooth_scores_ref, select=select_tokens_padded_ref,
                    compress=compress_ref, decompress=decompress_ref, gathered=gathered_attention_ref,
                    kept_keys=_kept_keys_torch),
    "triton": Stages(score=score_keys, smooth=smooth_scores, select=select_tokens_padded, compress=compress,
                     decompress=decompress, gathered=gathered_attention, kept_keys=kept_keys_attention),
}


def token_scores(query: Tensor, key: Tensor, *, window: int, pool_kernel: int, selection: str, scaling: float,
                 softcap: float | None = None, backend: str = "torch") -> Tensor:
    """Steps 1-2: score the candidate tokens with the last ``window`` queries, and smooth the scores.

    Args:
        query: (Hq, Lq, D) after RoPE, the last ``Lq`` positions; key: (Hkv, Lk, D).
        window, pool_kernel, scaling, softcap: as for ``tsa_attention``.
        selection: "query_head" gives scores per query head, "kv_group" per KV head (the mean of its query heads').
        backend: "torch" or "triton".

    Returns:
        (Hs, C) float32 pooled scores of the ``C`` candidates: ``Lk - window`` for a full prefill, the ``Lk - Lq``
        earlier tokens for a chunk.
    """
    stages = STAGES[backend]
    num_heads, q_len, _ = query.shape
    kv_heads, kv_len, _ = key.shape
    candidates = kv_len - window if q_len == kv_len else kv_len - q_len
    scores = stages.score(query, key, window, scaling, softcap)[:, :candidates].contiguous()  # (Hq, C)
    if selection == "kv_group":
        scores = scores.view(kv_heads, num_heads // kv_heads, candidates).mean(dim=1)  # (Hkv, C)
    return stages.smooth(scores, pool_kernel)


def select_tokens(pooled: Tensor, kv_len: int, *, tau: float, min_tokens: int, coverage: str,
                  keep_fraction: float | None, backend: str) -> tuple[Tensor, Tensor]:
    """Steps 3-4, shared by every path: coverage (how many tokens) and selection (which ones), on the device.

    Returns the (Hs, Lk) ascending kept positions, padded past the count, and the (Hs,) count
    (``reference.select_tokens_padded_ref``); ``keep_fraction`` forces the count (benchmarks).
    """
    keep = None if keep_fraction is None else round(keep_fraction * pooled.shape[1])
    return STAGES[backend].select(pooled, kv_len, tau, min_tokens, coverage, keep)


def sparse_attention(query: Tensor, key: Tensor, value: Tensor, pooled: Tensor, *, tau: float, min_tokens: int,
                     scaling: float, coverage: str = "paper", softcap: float | None = None, dense_backend: str = "auto",
                     keep_fraction: float | None = None, backend: str = "torch",
                     attend: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Steps 3-7 for one ``tau``: coverage, selection, compression, attention, decompression (one host sync).

    Shapes and arguments as for ``tsa_attention``; ``pooled`` comes from ``token_scores`` (one set of scores
    serves every ``tau``, which calibration exploits).
    """
    stages = STAGES[backend]
    num_heads, q_len, _ = query.shape
    kv_len = key.shape[1]
    # 3-4. coverage (how many tokens) and selection (which ones), then the one host sync: K' sizes the compact copies.
    kept, count = select_tokens(pooled, kv_len, tau=tau, min_tokens=min_tokens, coverage=coverage,
                                keep_fraction=keep_fraction, backend=backend)
    kept = kept[:, : int(count[0])]  # (Hs, K')
    rows = query_rows(kept, num_heads, q_len, kv_len)  # (Hq, Lq')
    # 5. compress: shared sorted indices make the causal mask on the compact sequence exact.
    query_c, key_c, value_c = stages.compress(query, key, value, kept, rows)
    # 6. attend with a dense kernel, or the caller's causal kernel.
    if attend is None:
        out_c = dense_attention(query_c, key_c, value_c, scaling, dense_backend, softcap)  # (Hq, Lq', D)
    else:
        out_c = attend(query_c, key_c, value_c)
    del query_c, key_c, value_c  # at most one compact copy of Q/K/V is alive, and not during decompression
    # 7. decompress: dropped rows stay 0; the residual stream carries those tokens.
    return stages.decompress(out_c, rows, q_len), kept


def tsa_attention(query: Tensor, key: Tensor, value: Tensor, *, tau: float, window: int, pool_kernel: int,
                  min_tokens: int, selection: str, scaling: float, coverage: str = "paper",
                  softcap: float | None = None, dense_backend: str = "auto", keep_fraction: float | None = None,
                  backend: str = "torch",
                  attend: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Token Sparse Attention for one sequence (no batch dimension).

    A full prefill (``Lq == Lk``) follows the paper: the last ``window`` queries score the keys
    ``[0, Lk - window)``, each head keeps its top-K of them plus the window, and Q, K and V are all compressed;
    a dropped query row gets output 0. A chunk of a longer prompt (``window <= Lq < Lk``) keeps every query of
    the chunk and every chunk key, and drops only keys of the earlier context.

    Args:
        query: (Hq, Lq, D) after RoPE, the last ``Lq`` positions.
        key, value: (Hkv, Lk, D), the whole sequence (nothing is evicted from the KV cache).
        tau, window, pool_kernel, min_tokens, coverage: Dynamic Token Coverage knobs
            (``reference.kept_count_ref``).
        selection: "query_head" (each query head keeps its own tokens; K/V rows are gathered per query head, as
            in the paper) or "kv_group" (the query heads of a KV group average their scores and share one set,
            so K/V stay at Hkv heads).
        scaling: softmax scale.
        softcap: attention logit cap of models that use one (Gemma 2), applied in scoring and attention.
        dense_backend: the kernel that attends on the compact tensors (``dense.dense_attention``).
        keep_fraction: benchmarks only: keep this fraction of the candidates instead of deriving the count
            from ``tau`` (to time a stated operating point on random weights); None (the default) uses tau.
        backend: "torch" or "triton".
        attend: causal attention on the compact tensors, ``attend(query_c (Hq, Lq', D), key_c, value_c (Hs, K', D))
            -> (Hq, Lq', D)`` with ``Lq' == K'`` (full prefills only); None uses ``dense_attention``.

    Returns:
        out: (Lq, Hq, D). For head h, a computed row equals dense causal attention restricted to h's kept
            keys; a dropped row is exactly 0.
        kept_indices: (Hs, K') ascending positions in ``[0, Lk)``.
    """
    pooled = token_scores(query, key, window=window, pool_kernel=pool_kernel, selection=selection,
                          scaling=scaling, softcap=softcap, backend=backend)
    return sparse_attention(query, key, value, pooled, tau=tau, min_tokens=min_tokens, scaling=scaling,
                            coverage=coverage, softcap=softcap, dense_backend=dense_backend,
                            keep_fraction=keep_fraction, backend=backend, attend=attend)


def tsa_attention_sync_free(query: Tensor, key: Tensor, value: Tensor, *, tau: float, window: int, pool_kernel: int,
                            min_tokens: int, selection: str, scaling: float, coverage: str = "paper",
                            softcap: float | None = None, keep_fraction: float | None = None,
                            backend: str = "triton") -> tuple[Tensor, Tensor, Tensor]:
    """``tsa_attention`` for a full prefill (``Lq == Lk``) without a host synchronisation (same arguments).

    Returns:
        out: (L, Hq, D), as ``tsa_attention``'s.
        kept: (Hs, L) int64 buffer; row h holds its kept positions, ascending, in its first ``count[h]`` entries.
        count: (Hs,) int64 on the device.
    """
    pooled = token_scores(query, key, window=window, pool_kernel=pool_kernel, selection=selection,
                          scaling=scaling, softcap=softcap, backend=backend)
    kept, count = select_tokens(pooled, key.shape[1], tau=tau, min_tokens=min_tokens, coverage=coverage,
                                keep_fraction=keep_fraction, backend=backend)
    return STAGES[backend].gathered(query, key, value, kept, count, scaling, softcap), kept, count


def tsa_attention_kept_keys(query: Tensor, key: Tensor, value: Tensor, *, tau: float, window: int, pool_kernel: int,
                            min_tokens: int, selection: str, scaling: float, coverage: str = "paper",
                            softcap: float | None = None, keep_fraction: float | None = None, local_keys: int = 0,
                            backend: str = "triton") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A full prefill (``Lq == Lk``) that drops keys only (``rows="all"``): the tokens ``tsa_attention`` keeps are
    selected the same way, and every query row attends causally to its head's kept keys and to the ``local_keys``
    keys ending at its own position, so a dropped token still gets this layer's attention output (computed over
    fewer keys) instead of 0. No host synchronisation. Same arguments as ``tsa_attention``; a soft-capped layer
    runs the PyTorch twin (the kernel cannot cap logits).

    Returns:
        out: (L, Hq, D); kept: (Hs, L) int64 buffer, the kept positions ascending in the first ``count[h]``
        entries of row h; count: (Hs,) int64 on the device; cost: a device tensor whose sum is the share of dense
        causal attention's query-key pairs computed (``reference.kept_keys_cost``).
    """
    pooled = token_scores(query, key, window=window, pool_kernel=pool_kernel, selection=selection,
                          scaling=scaling, softcap=softcap, backend=backend)
    return sparse_attention_kept_keys(query, key, value, pooled, tau=tau, min_tokens=min_tokens, scaling=scaling,
                                      coverage=coverage, softcap=softcap, keep_fraction=keep_fraction,
                                      local_keys=local_keys, backend=backend)


def sparse_attention_kept_keys(query: Tensor, key: Tensor, value: Tensor, pooled: Tensor, *, tau: float,
                               min_tokens: int, scaling: float, coverage: str = "paper", softcap: float | None = None,
                               keep_fraction: float | None = None, local_keys: int = 0,
                               backend: str = "triton") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``tsa_attention_kept_keys`` after scoring: coverage, selection and kept-keys attention for one ``tau`` on
    ``pooled`` (``token_scores``), as ``sparse_attention`` is for the paper's compression."""
    kept, count = select_tokens(pooled, key.shape[1], tau=tau, min_tokens=min_tokens, coverage=coverage,
                                keep_fraction=keep_fraction, backend=backend)
    if softcap is not None:  # the kernel cannot cap logits
        out, cost = _kept_keys_torch(query, key, value, kept, count, scaling, softcap, local_keys)
    else:
        out, cost = STAGES[backend].kept_keys(query, key, value, kept, count, scaling, local_keys=local_keys)
    return out, kept, count, cost


__all__ = ["HAS_TRITON", "STAGES", "Stages", "select_tokens", "sparse_attention", "token_scores", "tsa_attention",
           "sparse_attention_kept_keys", "tsa_attention_kept_keys", "tsa_attention_sync_free"]
