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


def comma_separated(text: str, cast, name: str) -> tuple:
    """The values of a comma-separated option ``--name``, each through ``cast``; raises TsaError when one fails."""
    from tsa_patch.errors import TsaError

    try:
        return tuple(cast(x.strip()) for x in text.split(",") if x.strip())
    except ValueError:
        raise TsaError(f"--{name} must be a comma-separated list; got '{text}'.") from None


def check_writable(path: Path, option: str) -> None:
    """Raise TsaError unless a file can be created at ``path`` (checked before minutes of work, by creating and
    removing a probe file in the nearest existing folder; as root, permissions alone say nothing)."""
    import tempfile

    from tsa_patch.errors import TsaError

    if path.is_dir():
        raise TsaError(f"{option} '{path}' is a folder; give a file path.")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".tsa-patch-probe-"):
            pass
    except OSError as err:
        raise TsaError(f"{option} '{path}' cannot be written ({err.strerror or err}); choose a writable path.") from None
