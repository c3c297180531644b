"""``inspect_export``: what an export contains, and whether every file is what its provenance says.

The provenance (``tsa_provenance.json``) records the SHA-256 of every other file of the export (``config.json`` as
canonical JSON). It cannot record its own hash, and it is not a signature: whoever edits files and the provenance
consistently is not detected. What it catches: edited, missing or added files, remote code pointed elsewhere,
pickle weights, subfolders and invalid policies.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from tsa_patch import __version__
from tsa_patch.errors import TsaError
from tsa_patch.export import PROVENANCE_FILE, file_sha256, remote_code_files, sha256_file
from tsa_patch.kernels.policy import CONFIG_KEY, TsaPolicy

# Loading these runs pickle, i.e. arbitrary code; tsa-patch never writes them.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle")
# Created by the Hub in every repository; never loaded.
_HUB_FILES = (".gitattributes",)
# An auto_map entry that stays in the folder: "module.Class" with module.py next to config.json.
_LOCAL_REFERENCE = re.compile(r"^(\w+)\.\w+$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class Inspection:
    """The policy, the provenance, and one check per file (and per config entry checked).

    ``checks`` maps a file name (``name/`` for a folder, ``file: key`` for an entry of a JSON file) to "ok" or
    what is wrong: "modified" (SHA-256 differs from the provenance), "missing", "unexpected" (not in the
    provenance), "not covered" (an older export's provenance does not record it), "pickle weights", "folder",
    "points outside the folder: ...", "invalid: ...";
    ``policy`` is None when the policy in config.json is invalid;
    ``code_matches_installed`` says whether the remote code is byte-identical to this tsa-patch's runtime.
    """

    folder: Path
    policy: TsaPolicy | None
    provenance: dict
    checks: dict[str, str] = field(default_factory=dict)
    code_matches_installed: bool = False

    @property
    def ok(self) -> bool:
        return all(status == "ok" for status in self.checks.values())

    @property
    def problems(self) -> list[str]:
        """``"name (status)"`` for every failed check."""
        return [f"{name} ({status})" for name, status in self.checks.items() if status != "ok"]

    def as_dict(self) -> dict:
        return {"folder": str(self.folder), "ok": self.ok, "checks": self.checks,
                "code_matches_installed_tsa_patch": self.code_matches_installed, "installed_tsa_patch": __version__,
                "policy": self.policy.to_dict() if self.policy else None,
                "provenance": {k: v for k, v in self.provenance.items() if k != "policy"}}


def check_export(folder: str | Path) -> Path:
    """``folder`` as a Path if it is a tsa-patch export (config with a policy, provenance), else ``TsaError``."""
    folder = Path(folder)
    config = _read_json(folder, "config.json") if (folder / "config.json").is_file() else None
    if not isinstance(config, dict) or CONFIG_KEY not in config:
        raise TsaError(f"'{folder}' is not a tsa-patch export (no config.json with '{CONFIG_KEY}'); "
                       "create one with `tsa-patch export`.")
    if not (folder / PROVENANCE_FILE).is_file():
        raise TsaError(f"'{folder}' has no {PROVENANCE_FILE}; re-create it with `tsa-patch export`.")
    return folder


def inspect_export(folder: str | Path) -> Inspection:
    """Read an export's policy and provenance and verify every file of the folder.

    Raises:
        TsaError: the folder is not an export, or its config.json or provenance is not valid JSON or malformed.
    """
    folder = check_export(folder)
    config = _read_json(folder, "config.json")
    provenance = _read_json(folder, PROVENANCE_FILE)
    recorded = _recorded(folder, provenance)
    inspection = Inspection(folder=folder, policy=None, provenance=provenance)
    inspection.checks.update(_file_checks(folder, recorded, full="files_sha256" in provenance))
    inspection.policy, inspection.checks[f"config.json: {CONFIG_KEY}"] = _policy_check(config, provenance)
    inspection.checks.update(_auto_map_checks(folder))
    installed = {p.name: sha256_file(p) for p in remote_code_files()}
    inspection.code_matches_installed = installed == provenance.get("remote_code_sha256")
    return inspection


def _read_json(folder: Path, name: str):
    try:
        return json.loads((folder / name).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise TsaError(f"{name} of '{folder}' cannot be read as JSON ({err}); the export is damaged: re-create it "
                       "with `tsa-patch export`.") from None


def _recorded(folder: Path, provenance) -> dict[str, str]:
    """File name -> SHA-256 from the provenance: ``files_sha256``, or for exports written before it existed, the
    weights and remote code. Raises ``TsaError`` if the provenance is malformed."""
    recorded = {}
    keys = ("files_sha256",) if isinstance(provenance, dict) and "files_sha256" in provenance \
        else ("weights_sha256", "remote_code_sha256")
    for key in keys:
        table = provenance.get(key) if isinstance(provenance, dict) else None
        if not isinstance(table, dict) or not all(
                isinstance(name, str) and Path(name).name == name and name not in ("", ".", "..")
                and isinstance(digest, str) and _HEX64.match(digest) for name, digest in table.items()):
            raise TsaError(f"{PROVENANCE_FILE} of '{folder}' is malformed ('{key}' must map file names to SHA-256 "
                           "hex digests); re-create the export with `tsa-patch export`.")
        recorded.update(table)
    return recorded


def _file_checks(folder: Path, recorded: dict[str, str], full: bool) -> dict[str, str]:
    """One status per recorded file and per other entry of the folder. ``full``: the provenance lists every
    file, so anything else is unexpected; otherwise (an older export) unlisted files are "not covered"."""
    checks = {}
    for name, digest in sorted(recorded.items()):
        path = folder / name
        checks[name] = "missing" if not path.is_file() else ("ok" if _digest(path) == digest else "modified")
    for path in sorted(folder.iterdir()):
        name = path.name
        if path.is_dir():
            if not _is_download_metadata(path):
                checks[name + "/"] = "folder: an export is flat" + (", and this one holds Python code"
                                                                    if any(path.rglob("*.py")) else "")
        elif path.suffix in PICKLE_SUFFIXES:
            checks[name] = "pickle weights: loading them can run code"
        elif name not in recorded and name != PROVENANCE_FILE and name not in _HUB_FILES:
            checks[name] = "unexpected" if full or path.suffix == ".py" else "not covered: an older export; re-export it"
    return checks


def _digest(path: Path) -> str | None:
    try:
        return file_sha256(path)
    except ValueError:  # a canonical-JSON file that is no longer JSON
        return None


def _is_download_metadata(path: Path) -> bool:
    """``.cache/huggingface``, written by ``hf download --local-dir``: download bookkeeping, never loaded."""
    return path.name == ".cache" and [p.name for p in path.iterdir()] == ["huggingface"] \
        and not any(path.rglob("*.py"))


def _policy_check(config: dict, provenance: dict) -> tuple[TsaPolicy | None, str]:
    try:
        policy = TsaPolicy.from_dict(config[CONFIG_KEY])
    except (TypeError, ValueError) as err:
        return None, f"invalid: {err}"
    recorded = provenance.get("policy")
    if recorded is not None and recorded != config[CONFIG_KEY]:
        return policy, "differs from the policy in the provenance"
    return policy, "ok"


def _auto_map_checks(folder: Path) -> dict[str, str]:
    """One check per JSON file with an ``auto_map``: every class it names must come from a .py file in the
    folder ("module.Class"), never from another repository ("org/repo--module.Class") or a missing file."""
    checks = {}
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError):
            continue  # the hash check reports it
        if not isinstance(data, dict) or "auto_map" not in data:
            continue
        auto_map = data["auto_map"]
        if not isinstance(auto_map, dict):
            checks[f"{path.name}: auto_map"] = "invalid: not a JSON object"
            continue
        references = [ref for value in auto_map.values() for ref in (value if isinstance(value, list) else [value])
                      if ref is not None]
        outside = [ref for ref in references if not _is_local(folder, ref)]
        checks[f"{path.name}: auto_map"] = f"points outside the folder: {', '.join(map(str, outside))}" if outside \
            else "ok"
    return checks


def _is_local(folder: Path, reference) -> bool:
    match = _LOCAL_REFERENCE.match(reference) if isinstance(reference, str) else None
    return match is not None and (folder / f"{match.group(1)}.py").is_file()
