"""End-to-end measurement of candidate policies, as users experience them (``continuation.py``'s protocol).

``EndToEnd`` holds the calibration and held-out samples in two kinds, natural continuations and long-range recall
probes built from the same text, with the dense model's reference continuations computed once. ``metrics`` applies
a policy and returns its KL and top-1 agreement against dense; the budget holds on the worse of the two kinds
(natural continuations hardly notice a damaged far token; recall probes are what retrieval needs).
"""

from __future__ import annotations

from collections.abc import Callable

from tsa_patch.calibration.continuation import compare_with_dense, dense_reference, recall_probe
from tsa_patch.kernels.attention import block_sparse_emulation
from tsa_patch.kernels.policy import ATTENTION_KEY, TsaPolicy

# Tokens copied from far back to cue a long-range recall probe (``continuation.recall_probe``).
RECALL_CUE = 16
KINDS = ("natural", "recall")


class EndToEnd:
    """Candidate policies measured end to end on calibration and held-out samples.

    Args:
        model: the dense model (policies are applied to it in turn).
        samples: {"calibration": [...], "held_out": [...]} token lists of ``prompt_len`` + continuation tokens.
        prompt_len: tokens prefilled with TSA; the rest of each sample is the continuation, decoded densely.
        seed: recall probes' seed.
        make_policy: ``make_policy(taus, block_layers) -> TsaPolicy`` for the measured model.
        start: progress, ``start(description, total) -> advance`` (or a no-op).
    """

    def __init__(self, model, samples: dict[str, list[list[int]]], prompt_len: int, seed: int,
                 make_policy: Callable[[tuple, set], TsaPolicy], start: Callable[[str, int], Callable | None]):
        self.model, self.prompt_len, self.make_policy = model, prompt_len, make_policy
        self.sequences: dict[tuple[str, str], list[list[int]]] = {}
        for which, texts in samples.items():
            self.sequences[which, "natural"] = texts
            self.sequences[which, "recall"] = [recall_probe(s, prompt_len, RECALL_CUE, seed=seed * 1000 + i)
                                               for i, s in enumerate(texts)]
        self.references = {key: dense_reference(model, texts, prompt_len,
                                                on_sample=start(f"Dense reference continuations ({' '.join(key)})",
                                                                len(texts)))
                           for key, texts in self.sequences.items()}

    def metrics(self, taus, which: str, block_layers=()) -> dict:
        """End-to-end metrics of the policy with ``taus`` (and the block-sparse kernel in ``block_layers``) on the
        ``which`` samples ("calibration" or "held_out"): ``kl`` (the worse kind), ``top1_agreement`` (the worse
        kind), ``attention_cost`` (mean of the kinds), and each kind's metrics."""
        from tsa_patch.models import apply_policy_

        apply_policy_(self.model, self.make_policy(taus, set(block_layers)))
        # Block-sparse layers are measured with their block selection, emulated where the Triton kernel cannot run.
        with block_sparse_emulation(self.model):
            natural, recall = (compare_with_dense(self.model, self.sequences[which, kind], self.prompt_len,
                                                  self.references[which, kind], ATTENTION_KEY).as_dict()
                               for kind in KINDS)
        return {"kl": max(natural["kl"], recall["kl"]),
                "top1_agreement": min(natural["top1_agreement"], recall["top1_agreement"]),
                "attention_cost": round((natural["attention_cost"] + recall["attention_cost"]) / 2, 4),
                "natural": natural, "recall": recall}
