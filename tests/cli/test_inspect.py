"""`tsa-patch inspect`: policy, provenance and verified hashes; tampering is reported with exit status 1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def test_inspect_reports_and_verifies(cli, small_export):
    folder, policy = small_export
    result = cli.invoke("inspect", folder, "--json")
    assert result.exit_code == 0, result.stderr
    report = cli.json(result.stdout)
    assert report["ok"] and report["code_matches_installed_tsa_patch"]
    names = {p.name for p in folder.iterdir()} - {"tsa_provenance.json"}
    assert set(report["checks"]) == names | {"config.json: tsa_policy", "config.json: auto_map"}  # every file
    assert set(report["checks"].values()) == {"ok"}
    assert report["policy"]["layers"] == policy.to_dict()["layers"]
    assert report["provenance"]["command"] == "tsa-patch export small (test fixture)"


def test_inspect_of_a_folder_that_is_not_an_export(cli, tmp_path):
    result = cli.invoke("inspect", tmp_path)
    cli.assert_one_line_error(result, "is not a tsa-patch export")


def _rewrite(path: Path, text: str) -> None:
    path.unlink()  # never write through a hard link into the fixture
    path.write_text(text)


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    _rewrite(path, json.dumps(data, indent=2))


def _set_taus(config):
    for layer in config["tsa_policy"]["layers"]:
        layer.update(enabled=True, tau=0.2)


POLICY_DIFFERS = "config.json: tsa_policy (differs from the policy in the provenance)"
TAMPERING = {
    "policy-tau-0.2": (lambda f: _edit_json(f / "config.json", _set_taus), ["config.json (modified)", POLICY_DIFFERS]),
    "activation-200": (lambda f: _edit_json(f / "config.json", lambda c: c["tsa_policy"].update(activation_length=200)),
                       ["config.json (modified)", POLICY_DIFFERS]),
    "rope-theta": (lambda f: _edit_json(f / "config.json", lambda c: c.update(rope_theta=1.0)), ["config.json (modified)"]),
    "auto-map-elsewhere": (
        lambda f: _edit_json(f / "config.json", lambda c: c["auto_map"].update(AutoModelForCausalLM="evil/repo--modeling.M")),
        ["config.json (modified)", "config.json: auto_map (points outside the folder: evil/repo--modeling.M)"]),
    "tokenizer-auto-map": (
        lambda f: _edit_json(f / "tokenizer_config.json", lambda c: c.update(auto_map={"AutoTokenizer": ["tok.T", None]})),
        ["tokenizer_config.json (modified)", "tokenizer_config.json: auto_map (points outside the folder: tok.T)"]),
    "chat-template": (lambda f: _rewrite(f / "chat_template.jinja", "{{ messages }}"), ["chat_template.jinja (modified)"]),
    "pickle-weights": (lambda f: (f / "pytorch_model.bin").write_bytes(b"\x80\x04N."),
                       ["pytorch_model.bin (pickle weights: loading them can run code)"]),
    "py-in-subfolder": (lambda f: ((f / "sub").mkdir(), (f / "sub" / "evil.py").write_text("import os\n")),
                        ["sub/ (folder: an export is flat, and this one holds Python code)"]),
    "unlisted-file": (lambda f: (f / "notes.txt").write_text("hello\n"), ["notes.txt (unexpected)"]),
    "modified-and-unexpected-code": (
        lambda f: (_rewrite(f / "attention.py", (f / "attention.py").read_text() + "\nimport os  # injected\n"),
                   (f / "extra.py").write_text("print('hello')\n")),
        ["attention.py (modified)", "extra.py (unexpected)"]),
    "missing-file": (lambda f: (f / "tokenizer.json").unlink(), ["tokenizer.json (missing)"]),
    "invalid-policy": (
        lambda f: _edit_json(f / "config.json", lambda c: c["tsa_policy"]["layers"][0].update(tau=1.5)),
        ["config.json (modified)", "config.json: tsa_policy (invalid: invalid TSA policy: layers[0].tau = 1.5"]),
}


@pytest.mark.parametrize("case", TAMPERING)
def test_inspect_flags_tampering_in_one_line(cli, export_copy, case):
    tamper, problems = TAMPERING[case]
    tamper(export_copy)
    result = cli.run("inspect", export_copy, "--json")
    line = cli.assert_one_line_failure(result.returncode, "", result.stderr, f"{export_copy} fails verification: ")
    for problem in problems:
        assert problem in line, line
    failed = {name: status for name, status in cli.json(result.stdout)["checks"].items() if status != "ok"}
    assert len(failed) == len(problems), failed  # nothing else is reported


def test_reformatted_config_is_not_tampering(cli, export_copy):
    config = json.loads((export_copy / "config.json").read_text())
    _rewrite(export_copy / "config.json", json.dumps(dict(reversed(list(config.items()))), indent=4, sort_keys=False))
    result = cli.run("inspect", export_copy)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name, content, fragment", [
    ("config.json", '{"tsa_policy": ', "config.json of '{}' cannot be read as JSON"),
    ("tsa_provenance.json", "{not json", "tsa_provenance.json of '{}' cannot be read as JSON"),
    ("tsa_provenance.json", '{"files_sha256": ["model.safetensors"]}', "tsa_provenance.json of '{}' is malformed"),
    ("tsa_provenance.json", '{"files_sha256": {"../../etc/passwd": "' + "0" * 64 + '"}}', "is malformed"),
])
def test_malformed_config_or_provenance_is_one_line(cli, export_copy, name, content, fragment):
    _rewrite(export_copy / name, content)
    result = cli.run("inspect", export_copy)
    cli.assert_one_line_failure(result.returncode, result.stdout, result.stderr, fragment.format(export_copy))


def test_an_older_export_is_verified_as_far_as_its_provenance_goes(cli, export_copy):
    """Provenance written before files_sha256: weights and code are checked, the other files are not covered."""
    _edit_json(export_copy / "tsa_provenance.json", lambda p: p.pop("files_sha256"))
    result = cli.run("inspect", export_copy, "--json")
    assert result.returncode == 1
    checks = cli.json(result.stdout)["checks"]
    assert checks["model.safetensors"] == checks["attention.py"] == "ok"
    assert checks["config.json"] == checks["tokenizer.json"] == "not covered: an older export; re-export it"


def test_inspect_of_a_missing_path(cli, tmp_path):
    result = cli.run("inspect", "./no/such/export", cwd=tmp_path)
    cli.assert_one_line_failure(result.returncode, result.stdout, result.stderr,
                                "model './no/such/export' does not exist: there is no such folder or file")
