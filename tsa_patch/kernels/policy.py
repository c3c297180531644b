"""The Token Sparse Attention policy: which layers go sparse, with which coverage threshold tau.

This file ships inside exported checkpoints (flat, next to ``modeling_tsa.py``) and is also the schema the
``tsa-patch`` CLI reads and writes, so the runtime and the tool validate a policy with the same code.
It imports nothing beyond the standard library.

A policy is stored in ``config.json`` under ``CONFIG_KEY`` and as a standalone JSON file written by
``tsa-patch calibrate``::

    {"format_version": 5, "window": 128, "pool_kernel": 7, "min_tokens": 1024, "activation_length": 2048,
     "selection": "query_head", "coverage": "paper", "rows": "all", "local_keys": 128, "dense_backend": "auto",
     "block_size": 128, "block_gamma": 0.95, "block_min_budget": 1024, "block_js_threshold": 0.1,
     "layers": [{"enabled": false, "tau": 0.0, "kernel": "dense"},
                {"enabled": true, "tau": 0.005, "kernel": "block_sparse", "activation_length": 16384}, ...],
     "tool_version": "0.1.0", "source_model": "...", "calibration": {...}}
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

# Version 2 added ``coverage`` (version 1 policies are read with the rule their runtime used, "normalized");
# version 3 a layer's own ``activation_length`` (version 2 policies are read unchanged: they have none);
# version 4 ``rows`` (version 3 policies are read with the paper's "kept"); version 5 ``local_keys`` (version 4
# policies are read with 0).
POLICY_FORMAT_VERSION = 5
# Attention and mask functions are registered under this key. The registry is process-global, so the key
# carries the format version: two checkpoints with incompatible runtimes never overwrite each other.
ATTENTION_KEY = f"tsa_v{POLICY_FORMAT_VERSION}"
CONFIG_KEY = "tsa_policy"

# "query_head": each query head keeps its own tokens; K/V are expanded to the query heads (the paper's choice).
# "kv_group": the query heads sharing a KV head vote together and keep one token set; K/V are never expanded.
SELECTION_MODES = ("query_head", "kv_group")
# How Dynamic Token Coverage counts the tokens to drop (``reference.kept_count_ref``): "paper" is the authors' rule
# (the mean of the heads' raw pooled scores, normalised; the tail below tau plus one token); "normalized" is a
# variant of ours (the mean of per-head normalised distributions; the tail below tau).
COVERAGE_RULES = ("paper", "normalized")
# Which query rows a sparse layer's full prefill computes. "kept" (the paper): only the kept tokens' rows, so a
# dropped token gets output 0 from that head; a policy without the key gets it. "all" (a variant of ours, what
# calibration chooses unless told): every row attends to the head's kept keys, so only keys are dropped
# (``tsa.tsa_attention_kept_keys``); it computes more (a kept key at position p is seen by L - p rows) and
# perturbs the dropped tokens' hidden states less. Layers that also run the block-sparse kernel keep "kept" (the
# kernel runs on the compact tensors). With "all", ``local_keys`` (a variant of ours; 0 in policies without the
# key) lets every row also see the keys just before it, kept or not: the selection scores tokens by the last
# queries' attention, but each token's own neighbourhood is what its row needs most in early layers.
ROWS_MODES = ("kept", "all")
# Dense attention kernel used on the compressed tensors (and on dense layers). "auto" prefers cuDNN, then
# flash, then memory-efficient SDPA on CUDA (the order measured fastest on H200); "flash_attn" uses the
# flash-attn package when installed. On CPU every value means PyTorch's default choice.
DENSE_BACKENDS = ("auto", "cudnn", "flash", "efficient", "math", "flash_attn")
# The attention kernel of a layer's long prefills (on the compact tensors when the layer also runs TSA):
# "dense" (``dense_backend``) or "block_sparse" (``block_sparse.py``: FlexPrefill-style adaptive block selection
# and a Triton kernel on CUDA; dense attention elsewhere unless emulated: attention.emulate_block_sparse_).
KERNELS = ("dense", "block_sparse")


# The policy's knobs besides its layers: what calibration copies into every policy it writes, and what the CLI
# offers as options (their defaults are TsaPolicy's).
POLICY_KNOBS = ("window", "pool_kernel", "min_tokens", "activation_length", "selection", "coverage", "rows",
                "local_keys", "dense_backend", "block_size", "block_gamma", "block_min_budget", "block_js_threshold")


@dataclass(frozen=True)
class LayerPolicy:
    """What one decoder layer does on a long prefill.

    Args:
        enabled: run Token Sparse Attention in this layer; ``False`` keeps the layer dense.
        tau: token-coverage threshold in [0, 1): each prefill drops the least-important tail of tokens whose
            head-averaged attention mass is below ``tau``. ``0`` drops nothing (the layer behaves densely).
        kernel: one of ``KERNELS``: the attention kernel of long prefills, with or without TSA.
        activation_length: inputs with fewer keys than this run the layer dense; None: the policy's
            ``activation_length``. Calibration on a GPU sets it from the layer's own measured crossover.
    """

    enabled: bool = False
    tau: float = 0.0
    kernel: str = "dense"
    activation_length: int | None = None

    @property
    def active(self) -> bool:
        """True when the layer actually drops tokens."""
        return self.enabled and self.tau > 0.0

    @property
    def block_sparse(self) -> bool:
        """True when long prefills of the layer run the block-sparse kernel."""
        return self.kernel == "block_sparse"


@dataclass(frozen=True)
class TsaPolicy:
    """A versioned, validated per-layer Token Sparse Attention policy.

    Args:
        layers: one ``LayerPolicy`` per decoder layer, in order.
        window: the last ``window`` queries score every earlier key, and the last ``window`` tokens are always
            kept (paper default 128: long enough to see the question at the end of a prompt).
        pool_kernel: width of the average pool that smooths scores over neighbouring tokens (paper: 7), odd.
        min_tokens: a sparse layer keeps at least this many tokens besides the window (paper: 1024), so short
            prompts are never reduced to a handful of tokens.
        activation_length: sequences shorter than this run dense; TSA's scoring cost is not repaid on them.
        selection: one of ``SELECTION_MODES`` (how GQA heads choose tokens).
        coverage: one of ``COVERAGE_RULES`` (how many tokens a layer drops for its tau).
        rows: one of ``ROWS_MODES`` (which query rows a sparse layer computes).
        local_keys: with ``rows="all"``, every query row of a sparse layer also attends to the ``local_keys`` keys
            ending at its own position, kept or not (0: the kept keys only; must be 0 with ``rows="kept"``).
        dense_backend: one of ``DENSE_BACKENDS``.
        block_size: block-sparse layers: tokens per block (a power of two, at least 16; FlexPrefill: 128).
        block_gamma: block-sparse layers: attention mass the kept blocks cover, in (0, 1] (paper: 0.95).
        block_min_budget: block-sparse layers: tokens every query block attends to at least (paper: 1024).
        block_js_threshold: block-sparse layers: a head whose pooled block estimate is this close (square-root
            Jensen-Shannon divergence) to its exact last-block attention uses the estimate (paper: 0.1).
        format_version: schema version; only ``POLICY_FORMAT_VERSION`` is understood.
        tool_version: version of tsa-patch that wrote the policy ("" when written by hand).
        source_model: the model the policy was calibrated on (hub id, folder or GGUF file), if known.
        calibration: free-form provenance (method, data, samples, sequence length, seed, measurements).
    """

    layers: tuple[LayerPolicy, ...]
    window: int = 128
    pool_kernel: int = 7
    min_tokens: int = 1024
    activation_length: int = 2048
    selection: str = "query_head"
    coverage: str = "paper"
    rows: str = "kept"
    local_keys: int = 0
    dense_backend: str = "auto"
    block_size: int = 128
    block_gamma: float = 0.95
    block_min_budget: int = 1024
    block_js_threshold: float = 0.1
    format_version: int = POLICY_FORMAT_VERSION
    tool_version: str = ""
    source_model: str | None = None
    calibration: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        _check(self.format_version == POLICY_FORMAT_VERSION, "format_version", self.format_version,
               f"this runtime understands format_version {POLICY_FORMAT_VERSION}; re-export with a matching tsa-patch")
        _check(len(self.layers) > 0, "layers", "[]", "give one entry per decoder layer")
        for i, layer in enumerate(self.layers):
            _check(isinstance(layer, LayerPolicy), f"layers[{i}]", layer, "each layer is a LayerPolicy")
            _check(isinstance(layer.enabled, bool), f"layers[{i}].enabled", layer.enabled, "use true or false")
            _check(_is_number(layer.tau) and 0.0 <= layer.tau < 1.0, f"layers[{i}].tau", layer.tau,
                   "tau must be in [0, 1); typical values are 0.005 to 0.02, and 0 keeps the layer dense")
            _check(layer.kernel in KERNELS, f"layers[{i}].kernel", layer.kernel, f"use one of {list(KERNELS)}")
            _check(layer.activation_length is None or (_is_int(layer.activation_length)
                                                       and layer.activation_length > self.window),
                   f"layers[{i}].activation_length", layer.activation_length,
                   f"use null or an integer larger than window ({self.window})")
        _check(_is_int(self.window) and self.window >= 1, "window", self.window, "use a positive integer such as 128")
        _check(_is_int(self.pool_kernel) and self.pool_kernel >= 1 and self.pool_kernel % 2 == 1, "pool_kernel",
               self.pool_kernel, "use a positive odd integer such as 7")
        _check(_is_int(self.min_tokens) and self.min_tokens >= 0, "min_tokens", self.min_tokens,
               "use a non-negative integer such as 1024")
        _check(_is_int(self.activation_length) and self.activation_length > self.window, "activation_length",
               self.activation_length, f"use an integer larger than window ({self.window})")
        _check(self.selection in SELECTION_MODES, "selection", self.selection, f"use one of {list(SELECTION_MODES)}")
        _check(self.coverage in COVERAGE_RULES, "coverage", self.coverage, f"use one of {list(COVERAGE_RULES)}")
        _check(self.rows in ROWS_MODES, "rows", self.rows, f"use one of {list(ROWS_MODES)}")
        _check(_is_int(self.local_keys) and self.local_keys >= 0, "local_keys", self.local_keys,
               "use a non-negative integer such as 128")
        _check(self.local_keys == 0 or self.rows == "all", "local_keys", self.local_keys,
               "local keys need rows \"all\" (the paper's compression drops whole query rows); set it to 0")
        _check(self.dense_backend in DENSE_BACKENDS, "dense_backend", self.dense_backend,
               f"use one of {list(DENSE_BACKENDS)}")
        _check(_is_int(self.block_size) and self.block_size >= 16 and self.block_size & (self.block_size - 1) == 0,
               "block_size", self.block_size, "use a power of two of at least 16, such as 128")
        _check(_is_number(self.block_gamma) and 0.0 < self.block_gamma <= 1.0, "block_gamma", self.block_gamma,
               "use a coverage in (0, 1] such as 0.95")
        _check(_is_int(self.block_min_budget) and self.block_min_budget >= 0, "block_min_budget",
               self.block_min_budget, "use a non-negative integer such as 1024")
        _check(_is_number(self.block_js_threshold) and self.block_js_threshold >= 0.0, "block_js_threshold",
               self.block_js_threshold, "use a non-negative number such as 0.1")
        _check(isinstance(self.tool_version, str), "tool_version", self.tool_version, "use a string")
        _check(self.source_model is None or isinstance(self.source_model, str), "source_model", self.source_model,
               "use a string or null")
        _check(isinstance(self.calibration, dict), "calibration", self.calibration, "use a JSON object")

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def sparse_layers(self) -> list[int]:
        """Indices of the layers that drop tokens."""
        return [i for i, layer in enumerate(self.layers) if layer.active]

    @property
    def block_sparse_layers(self) -> list[int]:
        """Indices of the layers whose long prefills run the block-sparse kernel."""
        return [i for i, layer in enumerate(self.layers) if layer.block_sparse]

    def activation_of(self, layer: LayerPolicy) -> int:
        """The fewest keys from which ``layer`` may reduce attention: its own activation length, else the policy's."""
        return self.activation_length if layer.activation_length is None else layer.activation_length

    def to_dict(self) -> dict:
        """A JSON-ready dict; ``from_dict(to_dict())`` gives an equal policy. A layer's activation length is written
        only where it has its own."""
        data = asdict(self)
        data["layers"] = [{k: v for k, v in asdict(layer).items() if k != "activation_length" or v is not None}
                          for layer in self.layers]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> TsaPolicy:
        """Build a policy from its dict form.

        Raises:
            ValueError: on unknown keys, a missing or unknown ``format_version``, or any out-of-range field;
                the message names the field, the value and the fix.
        """
        _check(isinstance(data, dict), "policy", type(data).__name__, "a policy is a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        _check(not unknown, "policy", unknown, f"remove the unknown keys; known keys are {sorted(known)}")
        _check("format_version" in data, "format_version", "missing", f"add \"format_version\": {POLICY_FORMAT_VERSION}")
        if data["format_version"] == 1:  # version 1 had no coverage field; its runtime used the "normalized" rule
            _check("coverage" not in data, "coverage", data.get("coverage"), "format_version 1 has no coverage field")
            data = {**data, "format_version": 2, "coverage": "normalized"}
        if data["format_version"] in (2, 3, 4):  # no per-layer activation length (2), rows (3), local keys (4)
            data = {**data, "format_version": POLICY_FORMAT_VERSION}
        _check("layers" in data, "layers", "missing", "give one {\"enabled\", \"tau\"} entry per decoder layer")
        _check(isinstance(data["layers"], list), "layers", data["layers"], "layers is a JSON list")
        layers = []
        for i, entry in enumerate(data["layers"]):
            _check(isinstance(entry, dict) and set(entry) <= {"enabled", "tau", "kernel", "activation_length"},
                   f"layers[{i}]", entry, "each layer is {\"enabled\": bool, \"tau\": float, \"kernel\": \"dense\" or "
                   "\"block_sparse\", optionally \"activation_length\": int}")
            layers.append(LayerPolicy(**entry))
        return cls(**{**data, "layers": layers})

    @classmethod
    def uniform(cls, num_layers: int, tau: float, sparse_layers: list[int] | None = None, **options) -> TsaPolicy:
        """A policy with one ``tau`` for ``sparse_layers`` (all layers when None) and dense elsewhere."""
        chosen = set(range(num_layers) if sparse_layers is None else sparse_layers)
        layers = [LayerPolicy(enabled=i in chosen, tau=tau if i in chosen else 0.0) for i in range(num_layers)]
        return cls(layers=tuple(layers), **options)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check(ok: bool, name: str, value, fix: str) -> None:
    # Explicit raise, never `assert`: `python -O` strips asserts and would accept any policy.
    if not ok:
        raise ValueError(f"invalid TSA policy: {name} = {value!r}; {fix}.")


def knob_defaults() -> dict:
    """The default value of every knob in ``POLICY_KNOBS`` (``TsaPolicy``'s field defaults)."""
    return {f.name: f.default for f in fields(TsaPolicy) if f.name in POLICY_KNOBS}
