"""``inspect_export``: what an export contains, and whether its weights and code are what its provenance says."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tsa_patch import __version__
from tsa_patch.export import PROVENANCE_FILE, remote_code_files, sha256_file
from tsa_patch.hub import check_export
from tsa_patch.kernels.policy import CONFIG_KEY, TsaPolicy


@dataclass
class Inspection:
    """The policy, the provenance, and one check per weight and code file.

    ``checks`` maps a file name to "ok", "modified" (hash differs from the provenance), "missing", or
    "unexpected" (Python code the provenance does not list);
    ``code_matches_installed`` says whether the remote code is byte-identical to this tsa-patch's runtime.
    """

    folder: Path
    policy: TsaPolicy
    provenance: dict
    checks: dict[str, str] = field(default_factory=dict)
    code_matches_installed: bool = False

    @property
    def ok(self) -> bool:
        return all(status == "ok" for status in self.checks.values())

    def as_dict(self) -> dict:
        return {"folder": str(self.folder), "ok": self.ok, "checks": self.checks,
                "code_matches_installed_tsa_patch": self.code_matches_installed, "installed_tsa_patch": __version__,
                "policy": self.policy.to_dict(), "provenance": {k: v for k, v in self.provenance.items() if k != "policy"}}


def inspect_export(folder: str | Path) -> Inspection:
    """Read an export's policy and provenance and verify every recorded SHA-256.

    Raises:
        TsaError: the folder is not an export; PolicyError-like ValueError text if its policy is invalid.
    """
    folder = check_export(folder)
    config = json.loads((folder / "config.json").read_text())
    provenance = json.loads((folder / PROVENANCE_FILE).read_text())
    inspection = Inspection(folder=folder, policy=TsaPolicy.from_dict(config[CONFIG_KEY]), provenance=provenance)
    recorded = {**provenance.get("weights_sha256", {}), **provenance.get("remote_code_sha256", {})}
    for name, digest in sorted(recorded.items()):
        path = folder / name
        inspection.checks[name] = "missing" if not path.is_file() else ("ok" if sha256_file(path) == digest else "modified")
    for path in sorted(folder.glob("*.py")):
        inspection.checks.setdefault(path.name, "unexpected")
    installed = {p.name: sha256_file(p) for p in remote_code_files()}
    inspection.code_matches_installed = installed == provenance.get("remote_code_sha256")
    return inspection
