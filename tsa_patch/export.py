"""``export``: write a checkpoint that runs Token Sparse Attention with ``trust_remote_code=True``.

The export folder holds the source's safetensors weights byte for byte (verified by SHA-256), its tokenizer and
generation config, a ``config.json`` carrying the policy, the flat remote code from ``tsa_patch/kernels``, a model
card and a provenance file that records the SHA-256 of every other file.

Nothing is lost and nothing is half-written:

- The export is written to a staging folder next to ``OUT_DIR`` (``.NAME.tsa-staging-XXXXXXXX``) and renamed into
  place. A new ``OUT_DIR`` is created by one rename that fails if anything appeared there meanwhile.
- ``overwrite`` replaces only a previous tsa-patch export (recognised by its provenance, holding nothing else), never
  a folder that is or contains the source model; the swap re-checks it under a lock on the parent folder.
- SIGINT, SIGTERM and SIGHUP remove the staging folder before the process ends. A staging folder survives only a
  SIGKILL or a crash; it stays locked (``flock``) while its export runs, and the next export into the same parent
  folder removes those no longer locked.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from fnmatch import fnmatch
from importlib.metadata import version
from pathlib import Path

from tsa_patch import __version__, kernels
from tsa_patch.card import render_model_card
from tsa_patch.errors import ExportInterrupted, OutputExistsError, PolicyError, TsaError
from tsa_patch.kernels.policy import ATTENTION_KEY, CONFIG_KEY, TsaPolicy
from tsa_patch.models import ModelSource
from tsa_patch.policy_file import check_policy_fits

KERNELS_DIR = Path(kernels.__file__).resolve().parent
REMOTE_ENTRY_FILE = "modeling_tsa.py"
PROVENANCE_FILE = "tsa_provenance.json"
EVAL_FILE = "tsa_eval.json"
CARD_FILE = "README.md"
# Hashed as canonical JSON (sorted keys, no whitespace): reformatting is not tampering, any value change is.
CANONICAL_JSON_FILES = ("config.json",)
# Files besides config.json and weights that a user of the export needs: tokenizer, chat template, generation
# defaults, licence. Anything else in the source (its README, other formats, remote code) is left behind.
_COPIED_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*", "merges.txt",
                    "*.model", "chat_template*", "generation_config.json", "LICENSE*", "NOTICE*")
_STAGING_TAG = ".tsa-staging-"
_RETIRED_TAG = ".tsa-replaced-"  # a previous export being swapped out; never removed as stale
_STAGING_NAME = re.compile(r"^\..*\.tsa-staging-[a-z0-9_]{8}$")  # tempfile.mkdtemp's 8 random characters
_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclass(frozen=True)
class ExportResult:
    """What ``export`` wrote: the folder, the SHA-256 of each weight and remote-code file, and of every file."""

    out_dir: Path
    weights: dict[str, str]
    remote_code: dict[str, str]
    files: dict[str, str]


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
        overwrite: replace a previous tsa-patch export at ``out_dir`` (and nothing else).
        command: the command line that created the export (recorded in the card and provenance).
        evaluation: a ``tsa-patch eval`` report to put in the card (and in ``tsa_eval.json``).

    Raises:
        OutputExistsError: ``out_dir`` is a file, is non-empty without ``overwrite``, is not a previous export,
            is or contains the source model, or changed while the export was written.
        PolicyError: the policy does not fit the model, or the source has no safetensors weights.
        ExportInterrupted: SIGINT, SIGTERM or SIGHUP arrived; the staging folder was removed.
        TsaError: the folder cannot be written (read-only, full disk, ...).
    """
    shown = Path(out_dir)
    out = _out_path(shown)
    check_policy_fits(policy, source.config["num_hidden_layers"], f"model '{source.spec}'")
    weight_files = sorted(source.path.glob("*.safetensors")) + sorted(source.path.glob("*.safetensors.index.json"))
    if not any(p.suffix == ".safetensors" for p in weight_files):
        raise PolicyError(f"model '{source.spec}' has no .safetensors weights; re-save it with save_pretrained() first.")
    copied = [p for pattern in _COPIED_PATTERNS for p in sorted(source.path.glob(pattern)) if p.is_file()]
    _check_not_source(out, shown, source, weight_files + copied)
    with _os_errors(shown), _interruptible(shown):
        previous = _check_target(out, shown, overwrite)
        out.parent.mkdir(parents=True, exist_ok=True)
        with _staging(out) as staging:
            weights = {p.name: _copy_verified(p, staging / p.name) for p in weight_files}
            for p in copied:
                shutil.copyfile(p, staging / p.name)
            code = {p.name: _copy_verified(p, staging / p.name) for p in remote_code_files()}
            files = _write_metadata(staging, source, policy, command, evaluation, weights, code)
            staging.chmod(0o755)
            _install(staging, out, shown, previous)
    return ExportResult(out_dir=shown, weights=weights, remote_code=code, files=files)


def _write_metadata(staging: Path, source: ModelSource, policy: TsaPolicy, command: str | None,
                    evaluation: dict | None, weights: dict[str, str], code: dict[str, str]) -> dict[str, str]:
    """Write config.json, the eval report, the card and the provenance; returns the SHA-256 of every file."""
    _write_json(staging / "config.json", patched_config(source.config, policy, source.remote_class))
    if evaluation is not None:
        _write_json(staging / EVAL_FILE, evaluation)
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
    (staging / CARD_FILE).write_text(render_model_card(source, policy, provenance, evaluation))
    known = {**weights, **code}  # hashed while copied
    files = {p.name: known.get(p.name) or file_sha256(p) for p in sorted(staging.iterdir())}
    _write_json(staging / PROVENANCE_FILE, {**provenance, "files_sha256": files})
    return files


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


def canonical_json_sha256(data) -> str:
    """Hex SHA-256 of ``json.dumps(data, sort_keys=True, separators=(",", ":"))``."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    """The digest the provenance records for ``path``: canonical JSON for ``CANONICAL_JSON_FILES``, else the
    bytes. Raises ``ValueError`` if a canonical-JSON file is not valid JSON."""
    if path.name in CANONICAL_JSON_FILES:
        return canonical_json_sha256(json.loads(path.read_text()))
    return sha256_file(path)


def _members(provenance: dict) -> tuple[set[str], tuple[str, ...]] | None:
    """(names, name patterns) of the files that make up the export ``provenance`` describes, itself included, or
    None when its format is not understood. Provenance written before ``files_sha256`` existed lists weights and
    code only; the other files every export holds are then allowed by name and by the copied patterns."""
    files = provenance.get("files_sha256")
    if isinstance(files, dict):
        return set(files) | {PROVENANCE_FILE}, ()
    weights, code = provenance.get("weights_sha256"), provenance.get("remote_code_sha256")
    if not isinstance(weights, dict) or not isinstance(code, dict):
        return None
    return set(weights) | set(code) | {"config.json", CARD_FILE, EVAL_FILE, PROVENANCE_FILE}, _COPIED_PATTERNS


def _copy_verified(src: Path, dst: Path) -> str:
    shutil.copyfile(src, dst)
    expected, written = sha256_file(src), sha256_file(dst)
    if expected != written:
        raise OSError(f"copy of '{src}' is corrupt (sha256 {written} != {expected}); check the disk and retry.")
    return written


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


# -- where the export may go -----------------------------------------------------------------------------------

def _out_path(shown: Path) -> Path:
    """``shown`` as an absolute path; refuses the current folder, its parents and the root."""
    out = Path(os.path.abspath(shown))
    cwd = Path.cwd()
    if not out.name or out == cwd or out in cwd.parents:
        raise OutputExistsError(f"OUT_DIR '{shown}' is the current folder or contains it; name a new folder "
                                "instead, e.g. `tsa-patch export out/my-model`.")
    if out.is_symlink():
        raise OutputExistsError(f"OUT_DIR '{shown}' is a symbolic link; give the folder it points to, "
                                f"'{os.path.realpath(out)}', or a new path.")
    return out


def _check_not_source(out: Path, shown: Path, source: ModelSource, files: list[Path]) -> None:
    """Refuse an OUT_DIR that is the source folder, contains it, or holds any file the export copies."""
    real_out = Path(os.path.realpath(out))
    for path in [source.path, *files]:
        real = Path(os.path.realpath(path))
        if real == real_out or real_out in real.parents:
            raise OutputExistsError(f"OUT_DIR '{shown}' is or contains the source model '{source.spec}' "
                                    f"('{path}'); choose a folder outside it.")


def _check_target(out: Path, shown: Path, overwrite: bool) -> bytes | None:
    """None when ``out`` is absent or empty; with ``overwrite``, the provenance bytes of the previous export
    there (checked again at the swap). Raises ``OutputExistsError`` otherwise."""
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"OUT_DIR '{shown}' is a file; choose a folder path.")
    if not out.is_dir() or not any(out.iterdir()):
        return None
    if not overwrite:
        raise OutputExistsError(f"OUT_DIR '{shown}' is not empty; choose another folder or pass --overwrite.")
    return _previous_export(out, shown)


def _previous_export(folder: Path, shown: Path) -> bytes:
    """The provenance bytes of the tsa-patch export at ``folder``; ``OutputExistsError`` unless it is exactly one
    (a config with a policy, a provenance, and no file or folder the provenance does not account for)."""
    refuse = (f"OUT_DIR '{shown}' is not a tsa-patch export; --overwrite replaces only a previous export, so "
              "choose a new or empty folder")
    try:
        raw = (folder / PROVENANCE_FILE).read_bytes()
        provenance = json.loads(raw)
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        raise OutputExistsError(f"{refuse} (no readable {PROVENANCE_FILE} and config.json).") from None
    members = _members(provenance) if isinstance(provenance, dict) else None
    if members is None or provenance.get("tool") != "tsa-patch" or not isinstance(config, dict) \
            or CONFIG_KEY not in config:
        raise OutputExistsError(f"{refuse} ({PROVENANCE_FILE} or config.json is not one tsa-patch writes).")
    names, patterns = members
    foreign = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir() if p.is_dir()
                     or not (p.name in names or any(fnmatch(p.name, pattern) for pattern in patterns)))
    if foreign:
        raise OutputExistsError(f"OUT_DIR '{shown}' holds files that are not part of its tsa-patch export "
                                f"({', '.join(foreign[:5])}); move them out, or choose another folder.")
    return raw


# -- staging, locking, the final rename -------------------------------------------------------------------------

@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``folder`` (exports serialise their staging and final renames on the parent
    folder). Where the filesystem cannot lock, runs unlocked: the renames still refuse to destroy anything."""
    fd = None
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def _lock_now(folder: Path) -> int | None:
    """An fd holding an exclusive ``flock`` on ``folder``, or None if another process holds it (or it cannot be
    locked: then it is never treated as stale)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def remove_stale_staging(parent: Path) -> list[Path]:
    """Remove the staging folders of exports into ``parent`` that died (SIGKILL, crash): the folders named
    ``.NAME.tsa-staging-XXXXXXXX`` whose lock no process holds. Returns what was removed."""
    removed = []
    for path in sorted(parent.iterdir()):
        if not _STAGING_NAME.match(path.name) or path.is_symlink() or not path.is_dir():
            continue
        fd = _lock_now(path)
        if fd is None:  # a live export's
            continue
        try:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A locked staging folder next to ``out``, removed on exit unless it was renamed into place; stale ones of
    earlier exports into the same parent are removed first."""
    with _locked(out.parent):
        remove_stale_staging(out.parent)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}{_STAGING_TAG}", dir=out.parent))
        fd = _lock_now(staging)
    try:
        yield staging
    finally:
        _hold_signals()  # a second signal must not cut the cleanup short
        shutil.rmtree(staging, ignore_errors=True)  # nothing there once renamed into place
        if fd is not None:
            os.close(fd)


def _install(staging: Path, out: Path, shown: Path, previous: bytes | None) -> None:
    """Rename the finished ``staging`` folder to ``out``. A new OUT_DIR: one rename, which fails rather than
    replace a folder that filled up meanwhile. A previous export: swapped out under the parent's lock after
    checking, once it is out of the way, that it is still the export checked at the start; then deleted."""
    _hold_signals()  # from here on the export completes (or fails) as a whole; signals wait until export returns
    with _locked(out.parent):
        if previous is None:
            _rename_into_place(staging, out, shown)
            return
        changed = (f"OUT_DIR '{shown}' changed during the export (another export replaced or removed it); "
                   "nothing was replaced. Run the export again.")
        retired = Path(tempfile.mkdtemp(prefix=f".{out.name}{_RETIRED_TAG}", dir=out.parent))
        try:
            os.rename(out, retired)  # onto the empty folder: this rename cannot replace anything else
        except OSError:
            os.rmdir(retired)
            raise OutputExistsError(changed) from None
        try:
            if _previous_export(retired, shown) != previous:
                raise OutputExistsError(changed)
        except OutputExistsError:
            os.rename(retired, out)
            raise
        try:
            _rename_into_place(staging, out, shown)
        except OutputExistsError:
            raise OutputExistsError(f"OUT_DIR '{shown}' was re-created by something else during the swap; it was "
                                    f"left as it is and the previous export is in '{retired}'.") from None
        shutil.rmtree(retired, ignore_errors=True)


def _rename_into_place(staging: Path, out: Path, shown: Path) -> None:
    try:
        os.rename(staging, out)  # replaces nothing but an empty folder
    except OSError as err:
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise
        raise OutputExistsError(f"OUT_DIR '{shown}' was created or filled by something else during the export; "
                                "it was left as it is. Choose another folder.") from None


# -- signals and OS errors ----------------------------------------------------------------------------------------

def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _hold_signals() -> None:
    """Block SIGINT, SIGTERM and SIGHUP until ``_interruptible`` ends (main thread only)."""
    if _in_main_thread():
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)


@contextlib.contextmanager
def _interruptible(shown: Path) -> Iterator[None]:
    """Within the block SIGINT, SIGTERM and SIGHUP raise ``ExportInterrupted``, so that the staging folder is
    removed. Once held (``_hold_signals``) they wait; on exit they regain their previous meaning and are delivered."""
    if not _in_main_thread():  # signal handlers can only be set from the main thread
        yield
        return

    def interrupted(signum, frame):
        raise ExportInterrupted(signum, f"the export to '{shown}' was interrupted by {signal.Signals(signum).name}; "
                                        "nothing was written there and its staging folder was removed.")

    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    handlers = {s: signal.signal(s, interrupted) for s in _SIGNALS}
    try:
        yield
    finally:
        _hold_signals()
        for s, handler in handlers.items():
            signal.signal(s, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


@contextlib.contextmanager
def _os_errors(shown: Path) -> Iterator[None]:
    """Turn an ``OSError`` (read-only folder, full disk, ...) into one ``TsaError`` line."""
    try:
        yield
    except OSError as err:
        where = f" ('{err.filename}')" if err.filename else ""
        fix = {errno.ENOSPC: "free some space or export to another disk",
               errno.EDQUOT: "free some space or export to another disk",
               errno.EROFS: "choose a folder on a writable filesystem",
               errno.EACCES: "choose a folder you can write to",
               errno.EPERM: "choose a folder you can write to"}.get(err.errno, "check the folder and retry")
        raise TsaError(f"the export to '{shown}' failed: {err.strerror or err}{where}; {fix}. Nothing was written "
                       "there.") from None
