"""Options shared by several commands, defined once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tsa_patch.policy_file import DEFAULT_POLICY_FILE

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout (progress stays on stderr).")]
PolicyOpt = Annotated[Path, typer.Option("--policy", "-p", help="Policy file written by `tsa-patch calibrate`.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu or cuda. auto uses a CUDA GPU when one is visible.")]

DEFAULT_POLICY_PATH = Path(DEFAULT_POLICY_FILE)


def resolve_device(device: str) -> str:
    """'cpu' or 'cuda' for a --device value; raises TsaError for an unknown value or a missing GPU."""
    import torch

    from tsa_patch.errors import TsaError

    if device not in ("auto", "cpu", "cuda"):
        raise TsaError(f"--device must be auto, cpu or cuda; got '{device}'.")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise TsaError("--device cuda needs a CUDA GPU, and none is visible; use --device cpu.")
    return device
