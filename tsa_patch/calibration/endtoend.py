"""End-to-end measurement of candidate policies, as users experience them (``continuation.py``'s protocol).

``EndToEnd`` holds the calibration and held-out samples in three kinds built from the same text: natural
continuations, long-range recall probes and aggregation (word-counting) probes, with the dense model's reference
continuations computed once. ``metrics`` applies a policy and returns its KL and top-1 agreement against dense;
the budget holds on the worst of the kinds (natural continuations hardly notice a damaged far token; recall probes
are what retrieval needs; aggregation probes what counting over the whole context needs).

What does not change between candidates is not computed again. A prefill under a policy is recorded as a
*trace* (every decoder layer's output for the prompt, the KV cache it left, the layer's statistics). Two policies
that agree on layers ``0 .. g-1`` compute exactly the same thing there, so a later prefill replays those layers
from the stored trace that agrees longest with it (the dense reference's, or the last candidate's) and computes
only layers ``g`` onwards; the continuation then runs densely over the combined cache, as before. Candidates
along the front mostly differ in a few late layers, so most of a prefill is replayed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tsa_patch.calibration.continuation import (Comparison, aggregation_probe, cache_argument, dense_implementation,
                                                prefill_then_continue, recall_probe)
from tsa_patch.calibration.drift import decoder_layers
from tsa_patch.kernels.attention import (DENSE, STATS_ATTR, attention_summary, block_sparse_emulation, layer_path,
                                         tsa_statistics)
from tsa_patch.kernels.policy import ATTENTION_KEY, TsaPolicy

# Tokens copied from far back to cue a long-range recall probe (``continuation.recall_probe``).
RECALL_CUE = 16
KINDS = ("natural", "recall", "aggregation")
# Share of the device's memory (RAM on CPU) that stored traces may take; beyond it prefills are computed whole.
_TRACE_MEMORY_SHARE = 0.3


def probe_sequences(texts: list[list[int]], prompt_len: int, tokenizer, seed: int) -> dict[str, list[list[int]]]:
    """Every kind of ``KINDS`` built from the same samples (``prompt_len`` prompt tokens, then the continuation):
    the samples themselves, their recall probes (seeded by ``seed`` and the sample's place) and their aggregation
    probes."""
    return {"natural": texts,
            "recall": [recall_probe(s, prompt_len, RECALL_CUE, seed=seed * 1000 + i) for i, s in enumerate(texts)],
            "aggregation": [aggregation_probe(s, prompt_len, tokenizer) for s in texts]}


@dataclass
class _Trace:
    """One prefill of one prompt under one policy: per decoder layer, its output (1, L, hidden), the keys and
    values it left in the cache, and its attention statistics. ``signature`` is the policy, layer by layer."""

    signature: tuple
    outputs: list[torch.Tensor]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    stats: list[dict | None]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.outputs, *self.keys, *self.values))

    def agreement(self, signature: tuple) -> int:
        """How many leading layers this trace's policy shares with ``signature``."""
        for i, (mine, theirs) in enumerate(zip(self.signature, signature)):
            if mine != theirs:
                return i
        return len(signature)


class _Replay(torch.nn.Module):
    """Stands in for decoder layer ``index`` during a prefill: returns the output recorded in ``trace`` and puts
    the recorded keys and values into the cache, without computing anything."""

    def __init__(self, trace: _Trace, index: int, attention: torch.nn.Module):
        super().__init__()
        self.trace, self.index, self.attention = trace, index, attention

    def forward(self, hidden_states, *args, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # renamed in transformers 5.2x
        if cache is not None:
            cache.update(self.trace.keys[self.index], self.trace.values[self.index], self.index)
        stats = self.trace.stats[self.index]
        if stats is not None:
            setattr(self.attention, STATS_ATTR, stats)
        elif hasattr(self.attention, STATS_ATTR):
            delattr(self.attention, STATS_ATTR)
        return self.trace.outputs[self.index]


class EndToEnd:
    """Candidate policies measured end to end on calibration and held-out samples.

    Args:
        model: the dense model (policies are applied to it in turn).
        samples: {"calibration": [...], "held_out": [...]} token lists of ``prompt_len`` + continuation tokens.
        prompt_len: tokens prefilled with TSA; the rest of each sample is the continuation, decoded densely.
        tokenizer: the model's tokenizer (the aggregation probes' question and word lists).
        seed: recall probes' seed.
        make_policy: ``make_policy(taus, block_layers, **knobs) -> TsaPolicy`` for the measured model (``knobs``
            override the calibration's, e.g. the paper rule's coverage).
        start: progress, ``start(description, total) -> advance`` (or a no-op).
        measure: a context (``measure.measuring``) that the dense prefills of the natural calibration samples run
            in: the dense reference and the per-layer measurement pass are one forward.
    """

    def __init__(self, model, samples: dict[str, list[list[int]]], prompt_len: int, tokenizer, seed: int,
                 make_policy: Callable[..., TsaPolicy], start: Callable[[str, int], Callable | None],
                 measure: Callable[[], contextlib.AbstractContextManager] | None = None):
        self.model, self.prompt_len, self.make_policy = model, prompt_len, make_policy
        self.dense_impl = dense_implementation(model)
        self.sequences: dict[tuple[str, str], list[list[int]]] = {}
        for which, texts in samples.items():
            for kind, sequences in probe_sequences(texts, prompt_len, tokenizer, seed).items():
                self.sequences[which, kind] = sequences
        self._traces: dict[tuple, list[_Trace]] = {}  # per sequence: the dense trace, then the latest candidate's
        self._budget = _trace_budget(next(model.parameters()).device)
        self._measure = measure
        self.references = self._reference(start)

    def metrics(self, taus, which: str, block_layers=(), **knobs) -> dict:
        """End-to-end metrics of the policy with ``taus`` (and the block-sparse kernel in ``block_layers``; ``knobs``
        as for ``make_policy``) on the ``which`` samples ("calibration" or "held_out"): ``kl`` (the worst kind),
        ``top1_agreement`` (the worst kind), ``attention_cost`` (mean of the kinds), and each kind's metrics."""
        from tsa_patch.models import apply_policy_

        policy = self.make_policy(tuple(taus), set(block_layers), **knobs)
        apply_policy_(self.model, policy)
        signature = self._signature(policy)
        kinds = {kind: self._compare(which, kind, signature).as_dict() for kind in KINDS}
        return {"kl": max(m["kl"] for m in kinds.values()),
                "top1_agreement": min(m["top1_agreement"] for m in kinds.values()),
                "attention_cost": round(sum(m["attention_cost"] for m in kinds.values()) / len(kinds), 4),
                **kinds}

    def _signature(self, policy: TsaPolicy) -> tuple:
        """What each layer computes in a prefill of ``prompt_len`` tokens under ``policy``: two policies with equal
        leading entries compute the same leading layers (a block-sparse layer counts as sparse, kernel or emulation)."""
        return tuple((layer.tau, layer.kernel, policy.coverage, policy.selection, policy.rows, policy.local_keys)
                     if layer_path(policy, layer, self.prompt_len, self.prompt_len, "triton") != DENSE
                     else "dense" for layer in policy.layers)

    def _reference(self, start) -> dict:
        """The dense model's continuation log-probabilities of every sequence (and its dense traces)."""
        from tsa_patch.models import apply_policy_

        policy = self.make_policy(tuple(0.0 for _ in range(self.model.config.num_hidden_layers)), set())
        apply_policy_(self.model, policy)  # dense, with the runtime's dense kernel
        dense = self._signature(policy)
        references = {}
        for key, texts in self.sequences.items():
            measured = self._measure is not None and key == ("calibration", "natural")
            step = start(f"Measuring {len(dense)} layers on the calibration samples, densely" if measured else
                         f"Dense reference continuations ({' '.join(key)})", len(texts))
            for i, ids in enumerate(texts):
                references[(*key, i)] = self._continuation(key, i, ids, dense, self._measure if measured else None)
                if step is not None:
                    step()
        return references

    def _compare(self, which: str, kind: str, signature: tuple):
        comparison = Comparison()
        for i, ids in enumerate(self.sequences[which, kind]):
            # Block-sparse layers are measured with their block selection, emulated where the kernel cannot run.
            with block_sparse_emulation(self.model):
                sparse = self._continuation((which, kind), i, ids, signature)
            comparison.add(self.references[which, kind, i], sparse, torch.tensor(ids[self.prompt_len:]).to(sparse.device),
                           attention_summary(tsa_statistics(self.model))["attention_cost"])  # of that prefill
        return comparison.result()

    def _continuation(self, key: tuple, index: int, ids: list[int], signature: tuple,
                      context: Callable[[], contextlib.AbstractContextManager] | None = None) -> torch.Tensor:
        tokens = torch.tensor([ids], device=next(self.model.parameters()).device)

        def prefill(model, prompt):
            with context() if context is not None else contextlib.nullcontext():
                return self._traced_prefill((*key, index), prompt, signature)

        return prefill_then_continue(self.model, tokens[:, : self.prompt_len], tokens[:, self.prompt_len :],
                                     ATTENTION_KEY, self.dense_impl, prefill=prefill)

    @torch.no_grad()
    def _traced_prefill(self, key: tuple, prompt: torch.Tensor, signature: tuple):
        """The prefill forward of ``prompt`` under the applied policy (``signature``), replaying the leading layers
        it shares with a stored trace, and recording its own trace."""
        stored = self._traces.get(key, [])
        base = max(stored, key=lambda t: t.agreement(signature), default=None)
        shared = base.agreement(signature) if base is not None else 0
        layers = decoder_layers(self.model)
        outputs: dict[int, torch.Tensor] = {}
        with _replacing(layers, {i: _Replay(base, i, layers[i].self_attn) for i in range(shared)}), \
                _recording(layers, outputs, first=shared):
            out = self.model(prompt, use_cache=True, logits_to_keep=1)
        cache = getattr(out, cache_argument(self.model))
        trace = _Trace(signature=signature,
                       outputs=[base.outputs[i] if i < shared else outputs[i] for i in range(len(layers))],
                       keys=[cache.layers[i].keys for i in range(len(layers))],
                       values=[cache.layers[i].values for i in range(len(layers))],
                       stats=[getattr(layer.self_attn, STATS_ATTR, None) for layer in layers])
        self._store(key, trace)
        return out

    def _store(self, key: tuple, trace: _Trace) -> None:
        """Keep each sequence's first trace (the dense reference's) and its latest, within the memory budget;
        when the latest does not fit, only the first."""
        stored = self._traces.get(key, [])
        others = sum(t.nbytes for k, traces in self._traces.items() if k != key for t in traces)
        kept = stored[:1] + [trace]
        if others + sum(t.nbytes for t in kept) <= self._budget:
            self._traces[key] = kept


@contextlib.contextmanager
def _replacing(layers: torch.nn.ModuleList, replacements: dict[int, torch.nn.Module]):
    """Put ``replacements`` in place of the listed decoder layers within the block."""
    originals = {i: layers[i] for i in replacements}
    try:
        for i, module in replacements.items():
            layers[i] = module
        yield
    finally:
        for i, module in originals.items():
            layers[i] = module


@contextlib.contextmanager
def _recording(layers: torch.nn.ModuleList, into: dict[int, torch.Tensor], first: int):
    """Record the output of every decoder layer from ``first`` on into ``into`` during the block."""

    def hook(index):
        def record(module, args, output):
            into[index] = output[0] if isinstance(output, tuple) else output
        return record

    handles = [layers[i].register_forward_hook(hook(i)) for i in range(first, len(layers))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _trace_budget(device: torch.device) -> int:
    """Bytes that stored traces may take on ``device``: a share of its free memory (of the RAM on CPU)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(_TRACE_MEMORY_SHARE * free)
    return int(_TRACE_MEMORY_SHARE * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
