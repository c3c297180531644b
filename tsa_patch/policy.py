"""Policy files and applying a policy to a loaded model.

The schema itself (``TsaPolicy``) lives in ``tsa_patch.kernels.policy``, the file that also ships inside
exported checkpoints, so the CLI and the runtime validate with the same code.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import PolicyError
from .kernels.policy import ATTENTION_KEY, CONFIG_KEY, TsaPolicy

if TYPE_CHECKING:
    import torch

DEFAULT_POLICY_FILE = "tsa_policy.json"


def read_policy(path: str | os.PathLike) -> TsaPolicy:
    """Read and validate a policy file written by ``tsa-patch calibrate`` (or by hand).

    Raises:
        PolicyError: missing file, invalid JSON, or a schema violation (the message names the field).
    """
    path = Path(path)
    if not path.is_file():
        raise PolicyError(f"policy file '{path}' does not exist; run `tsa-patch calibrate` first or pass --policy.")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PolicyError(f"policy file '{path}' is not valid JSON ({err}); fix it or re-run `tsa-patch calibrate`.") from None
    try:
        return TsaPolicy.from_dict(data)
    except (ValueError, TypeError) as err:
        raise PolicyError(f"policy file '{path}': {err}") from None


def write_policy(policy: TsaPolicy, path: str | os.PathLike) -> Path:
    """Write the policy as indented JSON, atomically (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(policy.to_dict(), f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
    return path


def check_policy_fits(policy: TsaPolicy, num_layers: int, where: str) -> None:
    """Raise ``PolicyError`` unless the policy has one entry per decoder layer of the model."""
    if policy.num_layers != num_layers:
        raise PolicyError(
            f"the policy has {policy.num_layers} layers but {where} has {num_layers}; "
            "calibrate a policy for this model."
        )


def apply_policy_(model: "torch.nn.Module", policy: TsaPolicy) -> "torch.nn.Module":
    """Make a loaded native model run Token Sparse Attention with ``policy`` (in place; returns the model).

    ``model.set_attn_implementation("sdpa")`` turns it back into the dense model.
    """
    from .kernels.attention import mark_tsa_runtime_, register_tsa_attention  # imports transformers: when needed

    check_policy_fits(policy, model.config.num_hidden_layers, "the model")
    register_tsa_attention()
    mark_tsa_runtime_(model)
    setattr(model.config, CONFIG_KEY, policy.to_dict())
    model.set_attn_implementation(ATTENTION_KEY)
    return model


@contextlib.contextmanager
def emulated_block_sparse(enabled: bool = True) -> Iterator[None]:
    """Within the block, block-sparse layers off CUDA run their block selection in PyTorch (what the GPU kernel
    computes, slowly) instead of dense attention; calibration and evaluation measure them so. Restores the
    previous setting."""
    from .kernels.attention import EMULATE_BLOCK_SPARSE_ENV

    previous = os.environ.get(EMULATE_BLOCK_SPARSE_ENV)
    if enabled:
        os.environ[EMULATE_BLOCK_SPARSE_ENV] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(EMULATE_BLOCK_SPARSE_ENV, None)
        else:
            os.environ[EMULATE_BLOCK_SPARSE_ENV] = previous
