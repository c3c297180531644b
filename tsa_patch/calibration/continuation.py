"""Measure what users get: prefill a long prompt with TSA, then score the continuation densely, as decode sees it.

TSA scores tokens with the last queries of the prompt, so it optimises the prefill for the END of the prompt,
where generation starts. Teacher-forced metrics averaged over the whole prompt overstate its damage (rows in
the middle lose keys they needed). The protocol here, used by calibration and evaluation alike:

1. dense: prefill ``prompt`` with SDPA, then run the ``continuation`` tokens over the KV cache with SDPA;
2. TSA: prefill ``prompt`` with the TSA implementation, then the same continuation with SDPA over its cache;
3. compare the next-token distributions that predict each continuation token (the first one comes from the
   prefill's last position): KL(dense || TSA), top-1 agreement, and the continuation's negative log-likelihood.

Natural continuations depend mostly on nearby text, so they hardly notice when a far token's representation is
damaged. ``recall_probe`` builds the complementary case from the same text: the prompt ends with a cue copied
from far back and the continuation is what followed it there, which the model can only predict by attending to
that distant span (what needle-in-a-haystack retrieval needs). ``aggregation_probe`` asks for what no single span
holds: the prompt ends with a request to list the words used most often in the text above, and the continuation is
that list, counted from the prompt, so every listed word depends on occurrences spread over the whole context (what
counting tasks such as common-word extraction need). Calibration holds TSA to its budget on all three.
"""

from __future__ import annotations

import inspect
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tsa_patch.kernels.attention import attention_summary, tsa_statistics


@dataclass(frozen=True)
class ContinuationMetrics:
    """Averages over every continuation token of every sample.

    Attributes:
        kl: mean KL(dense || TSA) of the next-token distributions, in nats.
        top1_agreement: fraction of positions where dense and TSA predict the same next token.
        dense_nll, tsa_nll: mean negative log-likelihood of the true continuation tokens.
        last_prompt_kl: KL at the prompt's last position only (the first generated token).
        attention_cost: fraction of dense causal attention FLOPs the TSA prefills computed, averaged over the
            layers and samples (``attention.attention_summary``).
    """

    kl: float
    top1_agreement: float
    dense_nll: float
    tsa_nll: float
    last_prompt_kl: float
    attention_cost: float = 1.0

    def as_dict(self) -> dict:
        return {k: round(v, 6) for k, v in self.__dict__.items()}


def recall_probe(ids: list[int], prompt_len: int, cue: int = 16, seed: int = 0) -> list[int]:
    """A long-range recall variant of a sample (``prompt_len`` prompt tokens, then the continuation).

    A span is drawn from the first half of the prompt; the probe's prompt is the original prompt with its last
    ``cue`` tokens replaced by the span's first ``cue`` tokens, and its continuation is what followed the cue in
    the span. Same lengths as the sample; deterministic for ``seed``.
    """
    continuation = len(ids) - prompt_len
    if continuation < 1 or prompt_len < 4 * (cue + continuation):
        raise ValueError(f"a recall probe needs a prompt of at least {4 * (cue + continuation)} tokens.")
    start = random.Random(seed).randrange(prompt_len // 8, prompt_len // 2 - cue - continuation)
    span = ids[start : start + cue + continuation]
    return ids[: prompt_len - cue] + span


AGGREGATION_QUESTION = "\n\nThe words used most often in the text above, most frequent first:"
_WORD = re.compile(r"[A-Za-z]{5,}")  # words of five letters or more: few are function words


def aggregation_probe(ids: list[int], prompt_len: int, tokenizer) -> list[int]:
    """A counting variant of a sample (``prompt_len`` prompt tokens, then the continuation), same lengths.

    The prompt is the sample's text cut short to end with ``AGGREGATION_QUESTION``; the continuation lists the
    words of five letters or more of that text, most frequent first (ties in order of first use), as
    " word, word, ...", cut to the continuation's length. Deterministic.

    Raises:
        ValueError: the text has no such words, or is too short to hold the question.
    """
    question = tokenizer(AGGREGATION_QUESTION, add_special_tokens=False).input_ids
    continuation = len(ids) - prompt_len
    body = ids[: prompt_len - len(question)]
    if continuation < 1 or len(body) < 4 * len(question):
        raise ValueError(f"an aggregation probe needs a prompt of at least {5 * len(question)} tokens.")
    counts = Counter(_WORD.findall(tokenizer.decode(body)))
    if not counts:
        raise ValueError("the calibration text has no words of five letters or more for the aggregation probe; "
                         "give natural-language text.")
    ranked = [word for word, _ in counts.most_common(continuation)]  # each a token at least
    listing = tokenizer(" " + ", ".join(ranked) + ",", add_special_tokens=False).input_ids
    repeats = -(-continuation // len(listing))  # a short text's list starts over
    return body + question + (listing * repeats)[:continuation]


def dense_implementation(model) -> str:
    """The dense attention implementation to compare against: "sdpa", or "eager" for models that have no SDPA
    path (Gemma 2, whose logit soft-capping SDPA cannot apply)."""
    return "sdpa" if getattr(model, "_supports_sdpa", True) else "eager"


def cache_argument(model) -> str:
    """The KV-cache keyword of ``model.forward``: ``cache`` on newer transformers 5.x, ``past_key_values`` on 5.17.

    transformers renamed the argument and output field (the old name is deprecated until 5.40); drop this helper
    once the oldest supported transformers has ``cache``.
    """
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _plain_prefill(model, prompt: torch.Tensor):
    return model(prompt, use_cache=True, logits_to_keep=1)


@torch.no_grad()
def prefill_then_continue(model, prompt: torch.Tensor, continuation: torch.Tensor, prefill_impl: str,
                          dense_impl: str, prefill: Callable | None = None) -> torch.Tensor:
    """Log-probabilities (Lc, V) predicting each continuation token: prefill ``prompt`` (1, Lp) with one
    implementation, then run ``continuation`` (1, Lc) densely over its cache. ``prefill(model, prompt)`` replaces
    the plain prefill forward (it must return the model's output with logits and cache)."""
    model.set_attn_implementation(prefill_impl)
    out = (prefill or _plain_prefill)(model, prompt)
    model.set_attn_implementation(dense_impl)
    name = cache_argument(model)
    rest = model(continuation[:, :-1], **{name: getattr(out, name)}) if continuation.shape[1] > 1 else None
    logits = out.logits[0, -1:] if rest is None else torch.cat([out.logits[0, -1:], rest.logits[0]])
    return torch.log_softmax(logits.float(), dim=-1)


def position_kl(dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
    """KL(dense || TSA) at each position (Lc,), from the two log-probabilities (Lc, V)."""
    return (dense.exp() * (dense - sparse)).sum(-1)


class Comparison:
    """Running sums of TSA-vs-dense continuation metrics over samples (``ContinuationMetrics`` at the end)."""

    def __init__(self):
        self.kl = self.agree = self.dense_nll = self.tsa_nll = self.last_kl = self.cost = 0.0
        self.tokens = self.samples = 0

    def add(self, dense: torch.Tensor, sparse: torch.Tensor, continuation: torch.Tensor, attention_cost: float):
        """One sample: dense and TSA log-probabilities (Lc, V) of the continuation tokens (Lc,)."""
        per_position_kl = position_kl(dense, sparse)
        target = continuation[:, None]
        self.kl += per_position_kl.sum().item()
        self.last_kl += per_position_kl[0].item()
        self.agree += (dense.argmax(-1) == sparse.argmax(-1)).sum().item()
        self.dense_nll -= dense.gather(-1, target).sum().item()
        self.tsa_nll -= sparse.gather(-1, target).sum().item()
        self.cost += attention_cost
        self.tokens += continuation.shape[0]
        self.samples += 1

    def result(self) -> ContinuationMetrics:
        return ContinuationMetrics(kl=self.kl / self.tokens, top1_agreement=self.agree / self.tokens,
                                   dense_nll=self.dense_nll / self.tokens, tsa_nll=self.tsa_nll / self.tokens,
                                   last_prompt_kl=self.last_kl / self.samples,
                                   attention_cost=self.cost / self.samples)


@torch.no_grad()
def dense_reference(model, samples: list[list[int]], prompt_len: int, dense_impl: str | None = None,
                    on_sample: Callable[[], None] | None = None) -> list[torch.Tensor]:
    """The dense model's log-probabilities (Lc, V) over each sample's continuation (computed once, reused).

    Leaves ``dense_impl`` (default: ``dense_implementation(model)``) set on the model.
    """
    dense_impl = dense_impl or dense_implementation(model)
    device = next(model.parameters()).device
    reference = []
    for ids in samples:
        tokens = torch.tensor([ids], device=device)
        reference.append(prefill_then_continue(model, tokens[:, :prompt_len], tokens[:, prompt_len:], dense_impl,
                                               dense_impl))
        if on_sample is not None:
            on_sample()
    return reference


@torch.no_grad()
def compare_with_dense(model, samples: list[list[int]], prompt_len: int, reference: list[torch.Tensor],
                       sparse_impl: str, dense_impl: str | None = None,
                       on_sample: Callable[[], None] | None = None) -> ContinuationMetrics:
    """TSA prefill, dense continuation, compared with ``dense_reference`` of the same samples.

    The model is left with ``sparse_impl`` set.
    """
    dense_impl = dense_impl or dense_implementation(model)
    device = next(model.parameters()).device
    comparison = Comparison()
    try:
        for ids, dense in zip(samples, reference):
            tokens = torch.tensor([ids], device=device)
            sparse = prefill_then_continue(model, tokens[:, :prompt_len], tokens[:, prompt_len:], sparse_impl,
                                           dense_impl)
            comparison.add(dense, sparse, tokens[0, prompt_len:],
                           attention_summary(tsa_statistics(model))["attention_cost"])  # of the prefill just run
            if on_sample is not None:
                on_sample()
    finally:
        model.set_attn_implementation(sparse_impl)
    return comparison.result()


def continuation_metrics(model, samples: list[list[int]], prompt_len: int, sparse_impl: str,
                         dense_impl: str | None = None) -> ContinuationMetrics:
    """Compare TSA with dense on the continuation of each sample (``sample[prompt_len:]``).

    Args:
        model: a model whose config carries a TSA policy, with ``sparse_impl`` registered.
        samples: token id lists longer than ``prompt_len``.
        prompt_len: tokens prefilled; the rest of each sample is the continuation.
        sparse_impl: attention implementation of the TSA prefill (``ATTENTION_KEY``).
        dense_impl: the dense implementation (reference prefill and every continuation).
    """
    reference = dense_reference(model, samples, prompt_len, dense_impl)
    return compare_with_dense(model, samples, prompt_len, reference, sparse_impl, dense_impl)
