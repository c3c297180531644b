"""`tsa-patch inspect`: policy, provenance and verified hashes; tampering is reported with exit status 1."""

from __future__ import annotations

import shutil


def test_inspect_reports_and_verifies(cli, small_export):
    folder, policy = small_export
    result = cli.invoke("inspect", folder, "--json")
    assert result.exit_code == 0, result.stderr
    report = cli.json(result.stdout)
    assert report["ok"] and report["code_matches_installed_tsa_patch"]
    assert set(report["checks"]) >= {"model.safetensors", "modeling_tsa.py", "attention.py"}
    assert set(report["checks"].values()) == {"ok"}
    assert report["policy"]["layers"] == policy.to_dict()["layers"]
    assert report["provenance"]["command"] == "tsa-patch export small (test fixture)"


def test_inspect_detects_modified_and_unexpected_code(cli, tmp_path, small_export):
    folder = tmp_path / "tampered"
    shutil.copytree(small_export[0], folder)
    with open(folder / "attention.py", "a") as f:
        f.write("\nimport os  # injected\n")
    (folder / "extra.py").write_text("print('hello')\n")
    result = cli.invoke("inspect", folder)
    assert result.exit_code == 1
    assert "does not match its provenance: attention.py, extra.py" in result.stderr


def test_inspect_of_a_folder_that_is_not_an_export(cli, tmp_path):
    result = cli.invoke("inspect", tmp_path)
    cli.assert_one_line_error(result, "is not a tsa-patch export")
