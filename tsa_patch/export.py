"""``export``: write a checkpoint that runs Token Sparse Attention with ``trust_remote_code=True``.

The export folder holds the source's safetensors weights byte for byte (verified by SHA-256), its tokenizer and
generation config, a ``config.json`` carrying the policy, the flat remote code from ``tsa_patch/kernels``, a model
card and a provenance file. It is written to a temporary folder next to ``OUT_DIR`` and renamed into place, so a
failure leaves nothing half-written.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from tsa_patch import __version__, kernels
from tsa_patch.card import render_model_card
from tsa_patch.errors import OutputExistsError, PolicyError
from tsa_patch.kernels.policy import ATTENTION_KEY, CONFIG_KEY, TsaPolicy
from tsa_patch.models import ModelSource
from tsa_patch.policy_file import check_policy_fits

KERNELS_DIR = Path(kernels.__file__).resolve().parent
REMOTE_ENTRY_FILE = "modeling_tsa.py"
PROVENANCE_FILE = "tsa_provenance.json"
EVAL_FILE = "tsa_eval.json"
# Files besides config.json and weights that a user of the export needs: tokenizer, chat template, generation
# defaults, licence. Anything else in the source (its README, other formats, remote code) is left behind.
_COPIED_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*", "merges.txt",
                    "*.model", "chat_template*", "generation_config.json", "LICENSE*", "NOTICE*")


@dataclass(frozen=True)
class ExportResult:
    """What ``export`` wrote: the folder, and the SHA-256 of each weight and remote-code file."""

    out_dir: Path
    weights: dict[str, str]
    remote_code: dict[str, str]


def remote_code_files() -> list[Path]:
    """The runtime files that ship inside every export (flat; they import each other relatively)."""
    return sorted(p for p in KERNELS_DIR.glob("*.py") if p.name != "__init__.py")


def export(source: ModelSource, policy: TsaPolicy, out_dir: str | os.PathLike, *, overwrite: bool = False,
           command: str | None = None, evaluation: dict | None = None) -> ExportResult:
    """Write the patched checkpoint for ``source`` with ``policy`` into ``out_dir``.

    Args:
        source: the resolved model (``tsa_patch.models.resolve_model``).
        policy: the policy to embed; must have one entry per decoder layer.
        out_dir: destination folder; must be absent or empty unless ``overwrite``.
        overwrite: replace an existing non-empty ``out_dir``.
        command: the command line that created the export (recorded in the card and provenance).
        evaluation: a ``tsa-patch eval`` report to put in the card (and in ``tsa_eval.json``).

    Raises:
        OutputExistsError: ``out_dir`` is a non-empty folder (or a file) and ``overwrite`` is False.
        PolicyError: the policy does not fit the model, or the source has no safetensors weights.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputExistsError(f"OUT_DIR '{out_dir}' is a file; choose a folder path.")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise OutputExistsError(f"OUT_DIR '{out_dir}' is not empty; choose another folder or pass --overwrite.")
    config = source.config
    check_policy_fits(policy, config["num_hidden_layers"], f"model '{source.spec}'")
    weight_files = sorted(source.path.glob("*.safetensors")) + sorted(source.path.glob("*.safetensors.index.json"))
    if not any(p.suffix == ".safetensors" for p in weight_files):
        raise PolicyError(f"model '{source.spec}' has no .safetensors weights; re-save it with save_pretrained() first.")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        weights = {p.name: _copy_verified(p, staging / p.name) for p in weight_files}
        for pattern in _COPIED_PATTERNS:
            for p in sorted(source.path.glob(pattern)):
                if p.is_file():
                    shutil.copyfile(p, staging / p.name)
        code = {p.name: _copy_verified(p, staging / p.name) for p in remote_code_files()}
        _write_json(staging / "config.json", patched_config(config, policy, source.remote_class))
        provenance = {
            "tool": "tsa-patch",
            "tool_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": command,
            "source_model": {"spec": source.spec, "model_type": source.model_type},
            "weights_sha256": weights,
            "remote_code_sha256": code,
            "versions": {"python": sys.version.split()[0], "torch": version("torch"),
                         "transformers": version("transformers")},
            "policy": policy.to_dict(),
        }
        _write_json(staging / PROVENANCE_FILE, provenance)
        if evaluation is not None:
            _write_json(staging / EVAL_FILE, evaluation)
        (staging / "README.md").write_text(render_model_card(source, policy, provenance, evaluation))
        staging.chmod(0o755)
        _replace_dir(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ExportResult(out_dir=out_dir, weights=weights, remote_code=code)


def patched_config(config: dict, policy: TsaPolicy, remote_class: str) -> dict:
    """The source ``config.json`` plus the policy, the remote-code class and the load guard.

    ``attn_implementation`` names the TSA key: a load without ``trust_remote_code=True`` then fails loudly
    ("attn_implementation ... is not supported") instead of silently building the dense native model.
    """
    patched = dict(config)
    patched["architectures"] = [remote_class]
    patched["auto_map"] = {"AutoModelForCausalLM": f"{Path(REMOTE_ENTRY_FILE).stem}.{remote_class}"}
    patched["attn_implementation"] = ATTENTION_KEY
    patched[CONFIG_KEY] = policy.to_dict()
    return patched


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _copy_verified(src: Path, dst: Path) -> str:
    shutil.copyfile(src, dst)
    expected, written = sha256_file(src), sha256_file(dst)
    if expected != written:
        raise OSError(f"copy of '{src}' is corrupt (sha256 {written} != {expected}); check the disk and retry.")
    return written


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _replace_dir(staging: Path, out_dir: Path) -> None:
    """Move the finished ``staging`` folder to ``out_dir``; an existing folder is swapped out, then deleted."""
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        out_dir.rename(old)
        staging.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(out_dir)
