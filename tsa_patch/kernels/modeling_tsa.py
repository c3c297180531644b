"""Remote code of a tsa-patch checkpoint: the native model class with Token Sparse Attention as its default.

Load with ``AutoModelForCausalLM.from_pretrained(path_or_repo, trust_remote_code=True)``. Importing this file
registers the attention function under a versioned key; the subclass makes that key the default attention
implementation, while an explicit ``attn_implementation="sdpa"`` still gives the dense model (for A/B tests).
The weights and every other behaviour are the native model's. No I/O, no network, no other dependency.
"""

from __future__ import annotations

import contextlib
import functools

from transformers import (
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    LlamaForCausalLM,
    MistralForCausalLM,
    Phi3ForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)

from .attention import (dense_everywhere, emulate_block_sparse_, mark_tsa_runtime_, policy_from_config,
                        record_dense_forward, register_tsa_attention, tsa_statistics)
from .dense import model_sdpa_backend
from .policy import ATTENTION_KEY

register_tsa_attention()


def _with_sdpa_order(forward):
    """The native forward; running TSA, with SDPA's backend order set once for all layers rather than in each (that
    costs tens of microseconds a layer). An input that no layer can reduce (shorter than the policy's activation
    length, shorter than its window, decode steps) runs exactly as the native model runs it: transformers' own SDPA
    path in every layer, with SDPA's own backend choice unless the policy names a ``dense_backend`` (with "auto",
    cuDNN first would cost more CPU time per call than the native choice, which shows on launch-bound short
    prompts). ``functools.wraps`` keeps the native signature, which generate() reads."""

    @functools.wraps(forward)
    def tsa_forward(self, *args, **kwargs):
        if self.config._attn_implementation != ATTENTION_KEY:  # e.g. attn_implementation="sdpa": the native model
            return forward(self, *args, **kwargs)
        policy = policy_from_config(self.config)
        lengths = _input_lengths(args, kwargs)
        native = (lengths is not None and dense_everywhere(policy, *lengths) and not self.training
                  and getattr(self.config, "attn_logit_softcapping", None) is None)  # SDPA cannot cap logits
        if not native:
            with model_sdpa_backend(policy.dense_backend, self.device):
                return forward(self, *args, **kwargs)
        order = contextlib.nullcontext() if policy.dense_backend == "auto" else \
            model_sdpa_backend(policy.dense_backend, self.device)
        with order, _attention_implementation(self.config, "sdpa"):
            out = forward(self, *args, **kwargs)
        record_dense_forward(self.__dict__["_tsa_attention_modules"], *lengths)
        return out

    return tsa_forward


def _input_lengths(args: tuple, kwargs: dict) -> tuple[int, int] | None:
    """(new tokens, new + cached tokens) of a forward called with ``input_ids`` or ``inputs_embeds`` and no cache or
    a dynamic one; None otherwise (the layers then decide for themselves)."""
    if len(args) > 1:
        return None
    tokens = args[0] if args else kwargs.get("input_ids")
    if tokens is None:
        tokens = kwargs.get("inputs_embeds")
    cache = kwargs.get("past_key_values")
    if tokens is None or tokens.dim() < 2 or (cache is not None and type(cache).__name__ != "DynamicCache"):
        return None
    q_len = tokens.shape[1]
    return q_len, q_len + (cache.get_seq_length() if cache is not None else 0)


@contextlib.contextmanager
def _attention_implementation(config, name: str):
    """``config`` reports ``name`` as its attention implementation within the block (its layers read it on every
    forward), then what it reported before."""
    previous = config._attn_implementation_internal
    config._attn_implementation_internal = name
    try:
        yield
    finally:
        config._attn_implementation_internal = previous


class _TsaMixin:
    """Makes Token Sparse Attention the default attention implementation of a native ``*ForCausalLM``."""

    def __init__(self, config, *args, **kwargs):
        if getattr(config, "_attn_implementation_internal", None) is None:
            config._attn_implementation_internal = ATTENTION_KEY
        super().__init__(config, *args, **kwargs)
        mark_tsa_runtime_(self)
        # the attention modules, for the statistics of forwards that ran transformers' SDPA path (not submodules)
        self.__dict__["_tsa_attention_modules"] = [m for m in self.modules()
                                                   if hasattr(m, "layer_idx") and hasattr(m, "is_causal")]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.forward = _with_sdpa_order(super(_TsaMixin, cls).forward)

    def emulate_block_sparse(self, enabled: bool = True):
        """Without CUDA, run block-sparse layers' block selection in PyTorch (slow; what a GPU computes) instead of
        dense attention; ``enabled=False`` undoes it."""
        return emulate_block_sparse_(self, enabled)

    def tsa_statistics(self) -> list[dict]:
        """Per-layer statistics (path taken, kept tokens per head) of the last prefill."""
        return tsa_statistics(self)

    def save_pretrained(self, *args, **kwargs):
        """``save_pretrained`` that keeps ``attn_implementation`` in config.json.

        transformers does not write it back; without it a later load without ``trust_remote_code`` would silently
        build the dense native model instead of failing loudly.
        """
        self.config.__dict__["attn_implementation"] = ATTENTION_KEY  # serialised by to_dict() as a plain key
        try:
            return super().save_pretrained(*args, **kwargs)
        finally:
            self.config.__dict__.pop("attn_implementation", None)


class TsaLlamaForCausalLM(_TsaMixin, LlamaForCausalLM):
    """``LlamaForCausalLM`` running Token Sparse Attention in the layers its policy selects."""


class TsaQwen2ForCausalLM(_TsaMixin, Qwen2ForCausalLM):
    """``Qwen2ForCausalLM`` (Qwen2, Qwen2.5) running Token Sparse Attention in the layers its policy selects."""


class TsaQwen3ForCausalLM(_TsaMixin, Qwen3ForCausalLM):
    """``Qwen3ForCausalLM`` running Token Sparse Attention in the layers its policy selects."""


class TsaMistralForCausalLM(_TsaMixin, MistralForCausalLM):
    """``MistralForCausalLM``; layers are dense wherever the prompt exceeds the sliding window."""


class TsaGemma2ForCausalLM(_TsaMixin, Gemma2ForCausalLM):
    """``Gemma2ForCausalLM``; sliding layers beyond their window stay dense; logit soft-capping is kept."""


class TsaGemma3ForCausalLM(_TsaMixin, Gemma3ForCausalLM):
    """``Gemma3ForCausalLM`` (text); sliding layers beyond their window stay dense."""


class TsaPhi3ForCausalLM(_TsaMixin, Phi3ForCausalLM):
    """``Phi3ForCausalLM``; layers are dense wherever the prompt exceeds the sliding window."""


# model_type in config.json -> the class that runs TSA on it: the one table of supported architectures.
TSA_CLASSES = {
    "llama": TsaLlamaForCausalLM,
    "qwen2": TsaQwen2ForCausalLM,
    "qwen3": TsaQwen3ForCausalLM,
    "mistral": TsaMistralForCausalLM,
    "gemma2": TsaGemma2ForCausalLM,
    "gemma3_text": TsaGemma3ForCausalLM,
    "phi3": TsaPhi3ForCausalLM,
}
