"""`tsa-patch calibrate`: bad input gives one line, exit 1 and no policy file; good input a valid policy."""

from __future__ import annotations

import json

import pytest

from tsa_patch.policy_file import read_policy


# The CLI's behaviour, not the method's (tests/tsa_patch/test_calibrate.py): no per-layer end-to-end check, which
# would cost most of these runs' time on a CPU.
SMALL = ["--samples", "1", "--holdout", "1", "--seq-len", "256", "--continuation", "8", "--window", "16",
         "--min-tokens", "32", "--activation-length", "96", "--no-check-layers"]


def test_budget_calibration_writes_policy_report_plot_and_json(cli, tmp_path, smollm2):
    out, report_file, plot = tmp_path / "policy.json", tmp_path / "report.json", tmp_path / "tradeoff.png"
    result = cli.invoke("calibrate", *SMALL, "--data", "kjv", "--max-kl", "0.1", "--taus", "0.6,0.005,0.3", "-o", out,
                        "--report", report_file, "--plot", plot, "--json")
    assert result.exit_code == 0, result.stderr
    document = cli.json(result.stdout)  # exactly one JSON document on stdout
    policy = read_policy(out)
    assert document["policy_file"] == str(out) and document["sparse_layers"] == policy.sparse_layers
    assert document["source_model"] == "SmolLM2-135M-Instruct" == policy.source_model
    assert policy.calibration["data"] == "kjv" and policy.calibration["budget"] == {"kind": "max_kl", "value": 0.1}
    assert cli.json(report_file.read_text()) == document["report"] == policy.calibration
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert policy.calibration["taus"] == [0.005, 0.3, 0.6]  # the grid given, measured in ascending order
    assert {layer.tau for layer in policy.layers} <= {0.0, 0.005, 0.3, 0.6}


def test_drift_method_prints_table_without_json(cli, tmp_path, smollm2):
    result = cli.invoke("calibrate", *SMALL, "--method", "drift", "-o", tmp_path / "p.json")
    assert result.exit_code == 0 and result.stdout == ""
    assert "TSA policy for SmolLM2-135M-Instruct" in result.stderr and "sparse" in result.stderr
    assert len(read_policy(tmp_path / "p.json").sparse_layers) == 15


def _unsupported_model(tmp_path):
    folder = tmp_path / "gpt2-like"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    return folder


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["/no/such/model/folder"], "model '/no/such/model/folder' does not exist: there is no such folder or file"),
        (["no-such-org/no-such-model"], "is neither a local folder or file nor a hub model available here"),
        (["UNSUPPORTED"], "has model_type 'gpt2'; tsa-patch supports ['gemma2', 'gemma3_text', 'llama',"),
        (["--method", "drift", "--tau", "1.5"], "tau must be in [0, 1)"),
        (["--method", "drift", "--tau", "-0.01"], "tau must be in [0, 1)"),
        (["--max-kl", "0.1", "--min-agreement", "0.9"], "give at most one of"),
        (["--seq-len", "100000"], "--seq-len must be between 1 and 8184"),
        (["--data", "missing.jsonl"], "data file 'missing.jsonl' does not exist"),
        (["--selection", "per_token"], "selection = 'per_token'"),
        (["--rows", "some"], "rows = 'some'; use one of ['kept', 'all']"),
        (["--rows", "kept", "--local-keys", "64"], "local_keys = 64; local keys need rows \"all\""),
        (["--device", "tpu"], "--device must be auto, cpu or cuda"),
        (["--taus", "0.1,abc"], "--taus must be a comma-separated list; got '0.1,abc'"),
        (["--taus", "0,0.5"], "--taus must be distinct values in (0, 1), e.g. 0.005,0.02,0.2; got 0,0.5"),
        (["--taus", "0.1,0.1"], "--taus must be distinct values in (0, 1)"),
        (["--taus", "0.1,0.5"], "--taus must include the paper's tau 0.005"),
        (["--method", "drift", "--taus", "0.1"], "--taus is for the budget method"),
    ],
    ids=["missing-folder", "missing-hub-id", "unsupported-arch", "tau-high", "tau-negative", "two-budgets", "seq-len",
         "missing-data", "selection", "rows", "local-keys", "device", "taus-not-numbers", "taus-zero",
         "taus-repeated", "taus-without-paper-tau", "taus-drift"],
)
def test_bad_input_one_line_error_nothing_written(cli, tmp_path, args, fragment, smollm2):
    args = [str(_unsupported_model(tmp_path)) if a == "UNSUPPORTED" else a for a in args]
    out = tmp_path / "out" / "policy.json"
    result = cli.invoke("calibrate", *SMALL, "-o", out, *args)  # later options win
    cli.assert_one_line_error(result, fragment)
    assert not out.exists() and not out.parent.exists()


@pytest.mark.parametrize("engaged, says", [([0, 2], "31.0% as served there (every sparse layer engages)"),
                                          ([2], "10.0% as served there (1 of the 2 sparse layers engage only from")])
def test_budget_summary_gives_the_savings_as_served(engaged, says):
    from tsa_patch.calibrate import CalibrationConfig
    from tsa_patch.cli.calibrate import _budget_line

    metrics = {"kl": 0.01}
    report = {"chosen": {"attention_removed": 0.31, "estimated_attention_speedup": 1.45, "calibration": metrics,
                         "held_out": metrics, "served_at_seq_len": {"layers": engaged,
                                                                    "attention_removed": 0.31 if len(engaged) == 2
                                                                    else 0.1}},
              "layers": [{"tau": 0.05, "kernel": "dense"}, {"tau": 0.0, "kernel": "dense"},
                         {"tau": 0.0, "kernel": "block_sparse"}],
              "budget": {"kind": "max_kl", "value": 0.02}, "paper_rule": {"attention_removed": 0.2,
                                                                           "calibration": metrics}}
    line = _budget_line(report, CalibrationConfig(seq_len=4096))
    assert line.startswith("Attention FLOPs removed at 4096 tokens: 31.0% with every sparse layer engaged")
    assert says in line


def test_pricing_summary_gives_each_kernels_line_and_the_time_saved():
    from tsa_patch.cli.calibrate import _pricing_line

    report = {"chosen": {"predicted_time_saved": 0.4123},
              "pricing": {"device": "NVIDIA H100 80GB HBM3", "length": 32000,
                          "models": {"tsa": {"overhead": 0.21, "per_cost": 1.93, "points": 30,
                                             "break_even_cost": 0.4093}}}}
    line = _pricing_line(report)
    assert line.startswith("Front priced by time on NVIDIA H100 80GB HBM3 at 32000 tokens (TSA: time 0.21 + 1.93 x")
    assert "faster than dense below 41% computed" in line and line.endswith("save 41.2% of the attention time there.")
    report["pricing"]["applied"] = False  # no option saved time at the calibrated length
    report["pricing"]["models"]["tsa"].update(overhead=1.2, break_even_cost=0.0)
    line = _pricing_line(report)
    assert "(TSA: time 1.20 + 1.93 x computed share of dense, never faster than dense)" in line
    assert line.endswith("no option saves time there, so the front stays priced in FLOPs and the sparse layers "
                         "engage only on longer prompts.")


def test_block_sparse_summary_names_the_chosen_layers_and_the_checked_densities():
    from tsa_patch.cli.calibrate import _block_sparse_line

    report = {"chosen": {"calibration": {"attention_cost": 0.4567}},
              "block_sparse": {"checks": [{"layer": 0, "kl": 0.02, "density": 0.14}, {"layer": 1, "kl": 0.002,
                                                                                      "density": 0.61}],
                               "layers": [1], "emulated": True}}
    line = _block_sparse_line(report)
    assert line.startswith("Block-sparse kernel alone in 1 layer [1], chosen per layer on the same front as the taus")
    assert "computed 14-61% of its attention" in line and "45.7% of dense attention" in line
    assert line.endswith("(block-sparse layers emulated in PyTorch: no CUDA with Triton).")
