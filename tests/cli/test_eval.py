"""`tsa-patch eval`: dense and TSA side by side on the offline suite (tiny settings), and its errors."""

from __future__ import annotations

import os

import pytest

from tsa_patch.suite import answer_score


def test_eval_on_an_export_writes_report_and_plot(cli, small_export, tmp_path):
    folder, _ = small_export
    report_file, plot = tmp_path / "eval.json", tmp_path / "eval.png"
    result = cli.invoke("eval", folder, "--tasks", "niah_single,vt", "--lengths", "400", "--samples", "1",
                        "--perplexity-samples", "1", "--output", report_file, "--plot", plot, "--json")
    assert result.exit_code == 0, result.stderr
    report = cli.json(result.stdout)
    assert cli.json(report_file.read_text())["tasks"] == report["tasks"]
    assert [(r["task"], r["length"]) for r in report["tasks"]] == [("niah_single", 400), ("vt", 400)]
    for row in report["tasks"]:
        assert 0.0 <= row["dense"] <= 1.0 and 0.0 <= row["tsa"] <= 1.0 and row["delta"] == row["tsa"] - row["dense"]
        assert 0.0 < row["kept"] < 1.0  # TSA engaged (the export's window is 16 tokens)
    [outputs] = report["outputs"]["niah_single/400"]
    assert outputs["tokens"] <= 400 and outputs["answers"] and isinstance(outputs["tsa"], str)
    assert outputs["tsa_score"] == answer_score(outputs["tsa"], outputs["answers"])
    assert outputs["dense_score"] == report["tasks"][0]["dense"]  # one sample per cell
    paired = report["overall"]["paired"]
    samples = [o for cell in report["outputs"].values() for o in cell]
    assert paired["samples"] == 2 and paired["mean_delta"] == pytest.approx(
        sum(o["tsa_score"] - o["dense_score"] for o in samples) / 2)
    [ppl] = report["perplexity"]
    assert ppl["length"] == 400 and ppl["dense"] > 1.0 and ppl["tsa"] > 1.0
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_eval_with_model_and_policy_file(cli, small_export, tmp_path, smollm2):
    from tsa_patch.policy_file import write_policy

    _, policy = small_export
    policy_file = write_policy(policy, tmp_path / "p.json")
    report_file = tmp_path / "eval.json"
    result = cli.invoke("eval", str(smollm2.path), "--policy", policy_file, "--tasks", "niah_single",
                        "--lengths", "300", "--samples", "2", "--perplexity-samples", "0", "--output", report_file)
    assert result.exit_code == 0, result.stderr
    report = cli.json(report_file.read_text())
    assert report["perplexity"] == []
    paired = report["overall"]["paired"]
    assert "Paired over 2 samples" in " ".join(result.stderr.split())  # the paired line under the table
    assert paired["samples"] == 2 and len(paired["ci95"]) == 2


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--tasks", "summarise"], "unknown tasks ['summarise']"),
        (["--lengths", "9000"], "exceed the model's context (8192)"),
        (["--lengths", "2k"], "--lengths must be a comma-separated list"),
        (["--samples", "0"], "--samples must be at least 1"),
    ],
)
def test_eval_bad_input(cli, small_export, args, fragment):
    result = cli.invoke("eval", small_export[0], *args)
    cli.assert_one_line_error(result, fragment)


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--lengths", "0"], "--lengths must be integers of at least 256 tokens"),
        (["--lengths=-5"], "--lengths must be integers of at least 256 tokens"),
        (["--lengths", "4096,100"], "got [4096, 100]"),
        (["--lengths", ""], "--lengths names no length"),
        (["--tasks", ","], "--tasks names no task"),
        (["--tasks", "niah_single,summarise"], "unknown tasks ['summarise']"),
        (["--perplexity-samples", "-1"], "--perplexity-samples must be at least 0; got -1"),
    ],
    ids=["zero", "negative", "short", "empty", "no-task", "unknown-task", "negative-perplexity-samples"],
)
def test_eval_rejects_impossible_settings_before_loading(cli, tmp_path, args, fragment):
    """Reported (once printed as rows at 100 %, an empty report, or a ZeroDivisionError after the whole suite)
    before the model is even resolved: MODEL here does not exist."""
    result = cli.run("eval", tmp_path / "not-loaded", *args)
    cli.assert_one_line_failure(result.returncode, result.stdout, result.stderr, fragment)


def test_eval_unwritable_plot_is_refused_before_loading(cli, tmp_path, small_tmpfs):
    read_only = small_tmpfs("ro,size=64k")
    result = cli.run("eval", tmp_path / "not-loaded", "--plot", read_only / "eval.png")
    cli.assert_one_line_failure(result.returncode, result.stdout, result.stderr,
                                f"--plot '{read_only / 'eval.png'}' cannot be written (Read-only file system)")


def test_eval_writes_the_results_before_a_plot_that_fails(cli, small_export, tmp_path, small_tmpfs):
    """A plot that fails after the run (here: the disk fills up) loses neither the table nor the report."""
    full = small_tmpfs("size=64k")
    fd = os.open(full / "filler", os.O_WRONLY | os.O_CREAT)  # fill it: an empty file still fits, a PNG does not
    try:
        while os.write(fd, b"x" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    report = tmp_path / "report.json"
    result = cli.run("eval", small_export[0], "--tasks", "niah_single", "--lengths", "256", "--samples", "1",
                     "--perplexity-samples", "0", "--output", report, "--plot", full / "eval.png")
    cli.assert_one_line_failure(result.returncode, result.stdout, result.stderr,
                                f"--plot '{full / 'eval.png'}' could not be written (No space left on device); the "
                                f"results were printed above and written to '{report}'.")
    assert "dense vs TSA" in result.stderr and cli.json(report.read_text())["tasks"][0]["task"] == "niah_single"


def test_eval_of_a_model_without_policy(cli, smollm2):
    result = cli.invoke("eval", str(smollm2.path))
    cli.assert_one_line_error(result, "is not a tsa-patch export; pass --policy")
