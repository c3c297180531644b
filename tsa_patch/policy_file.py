"""Policy files: reading, validating and writing the JSON that ``tsa-patch calibrate`` writes.

The schema itself (``TsaPolicy``) lives in ``tsa_patch.kernels.policy``, the file that also ships inside
exported checkpoints, so the CLI and the runtime validate with the same code.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from tsa_patch.errors import PolicyError
from tsa_patch.kernels.policy import TsaPolicy

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
