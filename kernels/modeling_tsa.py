"""Remote code of a tsa-patch checkpoint: the native model class with Token Sparse Attention as its default.

Load with ``AutoModelForCausalLM.from_pretrained(path_or_repo, trust_remote_code=True)``. Importing this file
registers the attention function under a versioned key; the subclass makes that key the default attention
implementation, while an explicit ``attn_implementation="sdpa"`` still gives the dense model (for A/B tests).
The weights and every other behaviour are the native model's. No I/O, no network, no other dependency.
"""

from __future__ import annotations

from transformers import LlamaForCausalLM

from .attention import register_tsa_attention, tsa_statistics
from .policy import ATTENTION_KEY

register_tsa_attention()


class _TsaMixin:
    """Makes Token Sparse Attention the default attention implementation of a native ``*ForCausalLM``."""

    def __init__(self, config, *args, **kwargs):
        if getattr(config, "_attn_implementation_internal", None) is None:
            config._attn_implementation_internal = ATTENTION_KEY
        super().__init__(config, *args, **kwargs)

    def tsa_statistics(self) -> list[dict]:
        """Per-layer statistics (path taken, kept tokens per head) of the last prefill."""
        return tsa_statistics(self)


class TsaLlamaForCausalLM(_TsaMixin, LlamaForCausalLM):
    """``LlamaForCausalLM`` running Token Sparse Attention in the layers its policy selects."""
