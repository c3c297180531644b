"""`tsa-patch calibrate`: bad input gives one line, exit 1 and no policy file; good input a valid policy."""

from __future__ import annotations

import json

import pytest

from tsa_patch.policy import read_policy


def test_calibrate_writes_policy_and_json(cli, tmp_path, smollm2):
    out = tmp_path / "policy.json"
    result = cli.invoke("calibrate", "--samples", "1", "--seq-len", "128", "--data", "kjv", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    report = cli.json(result.stdout)  # exactly one JSON document on stdout
    policy = read_policy(out)
    assert report["policy_file"] == str(out) and report["sparse_layers"] == policy.sparse_layers
    assert report["source_model"] == "SmolLM2-135M-Instruct" == policy.source_model
    assert policy.calibration["data"] == "kjv" and len(policy.sparse_layers) == 15


def test_calibrate_prints_table_without_json(cli, tmp_path, smollm2):
    result = cli.invoke("calibrate", "--samples", "1", "--seq-len", "64", "-o", tmp_path / "p.json")
    assert result.exit_code == 0 and result.stdout == ""
    assert "TSA policy for SmolLM2-135M-Instruct" in result.stderr and "sparse" in result.stderr


def _unsupported_model(tmp_path):
    folder = tmp_path / "gpt2-like"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    return folder


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["/no/such/model/folder"], "is not a local folder, a .gguf file, or a hub model"),
        (["no-such-org/no-such-model"], "is not a local folder, a .gguf file, or a hub model"),
        (["UNSUPPORTED"], "has model_type 'gpt2'; tsa-patch supports ['llama']"),
        (["--tau", "1.5"], "tau must be in [0, 1)"),
        (["--tau", "-0.01"], "tau must be in [0, 1)"),
        (["--seq-len", "100000"], "--seq-len must be between 1 and 8192"),
        (["--data", "missing.jsonl"], "data file 'missing.jsonl' does not exist"),
        (["--selection", "per_token"], "selection = 'per_token'"),
        (["--device", "tpu"], "--device must be auto, cpu or cuda"),
    ],
    ids=["missing-folder", "missing-hub-id", "unsupported-arch", "tau-high", "tau-negative", "seq-len",
         "missing-data", "selection", "device"],
)
def test_bad_input_one_line_error_nothing_written(cli, tmp_path, args, fragment, smollm2):
    args = [str(_unsupported_model(tmp_path)) if a == "UNSUPPORTED" else a for a in args]
    out = tmp_path / "out" / "policy.json"
    result = cli.invoke("calibrate", "--samples", "1", "--seq-len", "64", "-o", out, *args)  # later options win
    cli.assert_one_line_error(result, fragment)
    assert not out.exists() and not out.parent.exists()
