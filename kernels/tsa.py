"""Token Sparse Attention for one sequence: the paper's steps chained, on PyTorch or Triton stages.

    score -> smooth -> coverage -> select -> compress -> attend -> decompress

The "torch" backend runs the stages of ``reference.py`` (any device); the "triton" backend swaps in the Triton
twins of the scoring, smoothing, compression and decompression stages (CUDA). Coverage and selection are the same
PyTorch code on both (sort, cumulative sum and top-k run on the GPU with one host sync for the kept count). Attention on the compact
tensors is the policy's dense kernel (``dense.py``: SDPA with cuDNN first, or flash-attn) unless the caller
passes another causal kernel as ``attend`` (the block-sparse kernel of ``block_sparse.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

# Only `from .module import name`: transformers copies a checkpoint's remote code by scanning for that form.
from .dense import dense_attention
from .reference import compress_ref, decompress_ref, query_rows, score_keys_ref, select_tokens_ref, smooth_scores_ref
from .triton_import import HAS_TRITON
from .triton_rows import compress, decompress
from .triton_score import score_keys
from .triton_smooth import smooth_scores


@dataclass(frozen=True)
class Stages:
    """The swappable stages of one backend (the PyTorch reference, or their Triton twins with equal signatures)."""

    score: Callable  # (query, key, window, scaling, softcap) -> (Hq, Lk - W) scores
    smooth: Callable  # (scores, pool_kernel) -> (Hs, C) per-head distributions
    compress: Callable  # (query, key, value, kept, rows) -> compact query, key, value
    decompress: Callable  # (out_c, rows, q_len) -> (Lq, Hq, D)


STAGES = {
    "torch": Stages(score=score_keys_ref, smooth=smooth_scores_ref, compress=compress_ref, decompress=decompress_ref),
    "triton": Stages(score=score_keys, smooth=smooth_scores, compress=compress, decompress=decompress),
}


def token_distribution(
    query: Tensor,
    key: Tensor,
    *,
    window: int,
    pool_kernel: int,
    selection: str,
    scaling: float,
    softcap: float | None = None,
    backend: str = "torch",
) -> Tensor:
    """Steps 1-2: score the candidate tokens with the last ``window`` queries, smooth, normalise per head.

    Args:
        query: (Hq, Lq, D) after RoPE, the last ``Lq`` positions; key: (Hkv, Lk, D).
        window, pool_kernel, scaling, softcap: as for ``tsa_attention``.
        selection: "query_head" gives one distribution per query head, "kv_group" one per KV head (the mean of
            its query heads' scores).
        backend: "torch" or "triton".

    Returns:
        (Hs, C) float32 distributions over the ``C`` candidates: ``Lk - window`` for a full prefill, the
        ``Lk - Lq`` earlier tokens for a chunk.
    """
    stages = STAGES[backend]
    num_heads, q_len, _ = query.shape
    kv_heads, kv_len, _ = key.shape
    candidates = kv_len - window if q_len == kv_len else kv_len - q_len
    scores = stages.score(query, key, window, scaling, softcap)[:, :candidates].contiguous()  # (Hq, C)
    if selection == "kv_group":
        scores = scores.view(kv_heads, num_heads // kv_heads, candidates).mean(dim=1)  # (Hkv, C)
    return stages.smooth(scores, pool_kernel)


def sparse_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    distribution: Tensor,
    *,
    tau: float,
    min_tokens: int,
    scaling: float,
    softcap: float | None = None,
    dense_backend: str = "auto",
    keep_fraction: float | None = None,
    backend: str = "torch",
    attend: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Steps 3-7 for one ``tau``: coverage, selection, compression, attention, decompression.

    Shapes and arguments as for ``tsa_attention``; ``distribution`` comes from ``token_distribution`` (one
    distribution serves every ``tau``, which calibration exploits).
    """
    stages = STAGES[backend]
    num_heads, q_len, _ = query.shape
    kv_len = key.shape[1]
    # 3-4. coverage (how many tokens) and selection (which ones).
    keep = None if keep_fraction is None else round(keep_fraction * distribution.shape[1])
    kept = select_tokens_ref(distribution, kv_len, tau, min_tokens, keep)  # (Hs, K')
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


def tsa_attention(
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
    softcap: float | None = None,
    dense_backend: str = "auto",
    keep_fraction: float | None = None,
    backend: str = "torch",
    attend: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Token Sparse Attention for one sequence (no batch dimension).

    A full prefill (``Lq == Lk``) follows the paper: the last ``window`` queries score the keys
    ``[0, Lk - window)``, each head keeps its top-K of them plus the window, and Q, K and V are all compressed;
    a dropped query row gets output 0. A chunk of a longer prompt (``window <= Lq < Lk``) keeps every query of
    the chunk and every chunk key, and drops only keys of the earlier context.

    Args:
        query: (Hq, Lq, D) after RoPE, the last ``Lq`` positions.
        key, value: (Hkv, Lk, D), the whole sequence (nothing is evicted from the KV cache).
        tau, window, pool_kernel, min_tokens: Dynamic Token Coverage knobs (``reference.select_tokens_ref``).
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
    distribution = token_distribution(query, key, window=window, pool_kernel=pool_kernel, selection=selection,
                                      scaling=scaling, softcap=softcap, backend=backend)
    return sparse_attention(query, key, value, distribution, tau=tau, min_tokens=min_tokens, scaling=scaling,
                            softcap=softcap, dense_backend=dense_backend, keep_fraction=keep_fraction, backend=backend,
                            attend=attend)
