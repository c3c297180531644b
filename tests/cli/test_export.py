"""`tsa-patch export`: what it writes, and bad input (one line, exit 1, nothing written)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tsa_patch.export import remote_code_files, sha256_file
from tsa_patch.kernels.policy import ATTENTION_KEY, CONFIG_KEY, TsaPolicy
from tsa_patch.policy_file import write_policy


@pytest.fixture
def policy_file(tmp_path):
    policy = TsaPolicy.uniform(30, 0.01, [20, 21], source_model="SmolLM2-135M-Instruct")
    return write_policy(policy, tmp_path / "policy.json")


def test_export_writes_a_complete_checkpoint(cli, tmp_path, policy_file, smollm2):
    out = tmp_path / "export"
    result = cli.invoke("export", out, "--policy", policy_file, "--json")
    assert result.exit_code == 0, result.stderr
    report = cli.json(result.stdout)
    names = {p.name for p in out.iterdir()}
    code = {p.name for p in remote_code_files()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md",
            "tsa_provenance.json", "modeling_tsa.py"} | code <= names
    assert "__init__.py" not in names and not any(p.is_dir() for p in out.iterdir())  # flat remote code
    # weights byte-identical to the source
    assert sha256_file(out / "model.safetensors") == sha256_file(smollm2.path / "model.safetensors")
    assert report["weights_sha256"]["model.safetensors"] == sha256_file(smollm2.path / "model.safetensors")
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == {"AutoModelForCausalLM": "modeling_tsa.TsaLlamaForCausalLM"}
    assert config["attn_implementation"] == ATTENTION_KEY and config["architectures"] == ["TsaLlamaForCausalLM"]
    assert TsaPolicy.from_dict(config[CONFIG_KEY]).sparse_layers == [20, 21]
    provenance = json.loads((out / "tsa_provenance.json").read_text())
    assert provenance["remote_code_sha256"] == {p.name: sha256_file(p) for p in remote_code_files()}
    assert provenance["command"].startswith("tsa-patch export")
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers") and "trust_remote_code=True" in card
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and "| 20 | sparse | 0.01 |" in card
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no staging folder left behind"


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


BAD_POLICIES = {
    "missing": (None, "does not exist"),
    "malformed": ("{\"layers\": [", "is not valid JSON"),
    "tau-out-of-range": (json.dumps({**TsaPolicy.uniform(30, 0.01).to_dict(), "layers": [{"enabled": True, "tau": 1.0}] * 30}),
                         "layers[0].tau = 1.0; tau must be in [0, 1)"),
    "wrong-layer-count": (json.dumps(TsaPolicy.uniform(12, 0.01, source_model="SmolLM2-135M-Instruct").to_dict()),
                          "the policy has 12 layers but model 'SmolLM2-135M-Instruct' has 30"),
    "no-source-model": (json.dumps(TsaPolicy.uniform(30, 0.01).to_dict()), "records no source model; pass --model"),
}


@pytest.mark.parametrize("name", BAD_POLICIES)
def test_bad_policy_one_line_error_nothing_written(cli, tmp_path, name, smollm2):
    text, fragment = BAD_POLICIES[name]
    policy = tmp_path / "policy.json"
    if text is not None:
        policy.write_text(text)
    before = cli.tree(tmp_path)
    result = cli.invoke("export", tmp_path / "export", "--policy", policy)
    cli.assert_one_line_error(result, fragment)
    assert cli.tree(tmp_path) == before and not (tmp_path / "export").exists()


def test_non_empty_out_dir_is_refused(cli, tmp_path, policy_file, smollm2):
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = cli.tree(tmp_path)
    result = cli.invoke("export", out, "--policy", policy_file)
    cli.assert_one_line_error(result, "is not empty; choose another folder or pass --overwrite")
    assert cli.tree(tmp_path) == before and {p.name for p in tmp_path.iterdir()} == {"export", "policy.json"}


@pytest.mark.parametrize("spec, fragment", [
    ("./no/such/model", "model './no/such/model' does not exist: there is no such folder or file; check the path"),
    ("no-org/no-model", "is neither a local folder or file nor a hub model available here (HF_HUB_OFFLINE is set"),
])
def test_missing_model_is_named_plainly(cli, tmp_path, policy_file, spec, fragment):
    """A missing local path was reported as an HFValidationError with advice to `hf download` it."""
    result = cli.run("export", tmp_path / "out", "--policy", policy_file, "--model", spec, cwd=tmp_path)
    line = cli.assert_one_line_failure(result.returncode, result.stdout, result.stderr, fragment)
    assert "HFValidationError" not in line and not (tmp_path / "out").exists()


def test_push_to_hub_failure_says_the_export_was_written(cli, tmp_path, policy_file, smollm2):
    out = tmp_path / "out"
    result = cli.run("export", out, "--policy", policy_file, "--push-to-hub", "org/name")
    cli.assert_one_line_failure(result.returncode, result.stdout, result.stderr,
                                f"the export was written to '{out}', but the upload failed: the Hub is unreachable")
    assert f"Retry it with `tsa-patch push {out} org/name`" in result.stderr
    assert cli.invoke("inspect", out).exit_code == 0  # the export itself is complete


README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_lists_every_file_of_the_remote_code():
    """The README's file list omitted block_sparse.py and triton_block.py."""
    [row] = [line for line in README.read_text().splitlines() if line.startswith("| `modeling_tsa.py` and its flat")]
    assert {p.name for p in remote_code_files()} == set(re.findall(r"`(\w+\.py)`", row)) - {"__init__.py"}


def test_readme_loading_snippet_sets_the_dtype():
    """transformers 5 loads a bf16 checkpoint in bf16 on CPU too (test_loading.py checks it); the README says so."""
    text = README.read_text()
    snippet = text[text.index("## Loading a patched model"):text.index("- `attn_implementation=\"sdpa\"`")]
    assert "dtype=torch.float32" in snippet and "bf16" in snippet
