"""calibrate() with each layer checked alone end to end, and with the block-sparse kernel on the front, on the real
SmolLM2: the slowest calibrations of the suite, in a module of their own so that the test workers share them out
(``test_calibrate.py`` has the search itself)."""

from __future__ import annotations

import dataclasses

import pytest
from calibration_settings import CHECKED, SMALL, measured_independently

from tsa_patch.calibrate import calibrate
from tsa_patch.calibration.continuation import continuation_metrics
from tsa_patch.data import load_documents, token_samples
from tsa_patch.kernels.attention import block_sparse_emulation
from tsa_patch.kernels.policy import ATTENTION_KEY, LayerPolicy, TsaPolicy
from tsa_patch.models import apply_policy_

pytestmark = pytest.mark.heavy  # about 5 minutes of calibrations on 2 cores


@pytest.fixture(scope="module")
def checked_run(smollm2_fp32):
    model, tokenizer = smollm2_fp32
    return calibrate(model, tokenizer, CHECKED, source_model="SmolLM2-135M-Instruct")


def test_the_checked_calibration_meets_its_budget_on_rescaled_estimates(checked_run):
    report = checked_run.report
    assert report["chosen"]["calibration"]["kl"] <= 0.05 and report["chosen"]["held_out"]["kl"] <= 0.05
    checks = report["layer_check"]
    assert {r["layer"] for r in checks} == set(range(30)) and {r["tau"] for r in checks} == {0.005, 0.02}
    # the front is built on the rescaled estimates: a chosen layer's error at a reference tau is its measured KL
    for layer, chosen in enumerate(report["layers"]):
        measured = {r["tau"]: r["kl"] for r in checks if r["layer"] == layer}
        if chosen["tau"] in measured:
            assert chosen["error"] == pytest.approx(measured[chosen["tau"]], rel=1e-3, abs=2e-6)


def test_a_layer_alone_measures_what_the_report_records(checked_run, smollm2_fp32):
    """The first checked layer at its first reference tau, recomputed as an independent policy: the same KL."""
    record = next(r for r in checked_run.report["layer_check"] if r["ratio"] is not None)
    taus = [record["tau"] if i == record["layer"] else 0.0 for i in range(30)]
    policy = TsaPolicy(layers=tuple(LayerPolicy(enabled=t > 0, tau=t) for t in taus), **CHECKED.policy_options())
    measured = measured_independently(*smollm2_fp32, policy, CHECKED)
    # the same fp32 forwards recomputed: equal up to rounding (1e-4 of the KL, or 1e-6 nats near 0; the record is
    # rounded to 6 decimals)
    assert record["kl"] == pytest.approx(max(metrics.kl for metrics in measured.values()), rel=1e-4, abs=2e-6)
    assert record["kl"] > 0


def test_block_sparse_calibration_puts_the_kernel_where_the_front_chooses_it(smollm2_fp32):
    model, tokenizer = smollm2_fp32
    # one calibration sample: the check runs every layer alone on the kernel, end to end
    config = dataclasses.replace(SMALL, block_sparse=True, block_size=16, block_min_budget=32, block_gamma=0.9,
                                 samples=1)
    result = calibrate(model, tokenizer, config, source_model="SmolLM2-135M-Instruct")
    blocks, chosen = result.report["block_sparse"], result.report["chosen"]
    assert [c["layer"] for c in blocks["checks"]] == list(range(result.policy.num_layers))  # every layer alone
    assert all(0 < c["density"] < 1 and c["kl"] >= 0 for c in blocks["checks"])  # the kernel skipped blocks
    assert result.policy.block_sparse_layers == blocks["layers"] == chosen["block_layers"] and blocks["layers"]
    assert not set(blocks["layers"]) & set(result.policy.sparse_layers)  # a layer is TSA or block-sparse, not both
    assert chosen["calibration"]["kl"] <= 0.05 and chosen["held_out"]["kl"] <= 0.05
    assert chosen["calibration"]["attention_cost"] < 1
    assert blocks["emulated"] is True  # CPU: no Triton kernel, so the measurement emulated it
    rows = result.report["layers"]
    assert [i for i, row in enumerate(rows) if row["kernel"] == "block_sparse"] == blocks["layers"]
    apply_policy_(model, result.policy)  # an independent measurement, emulating as calibration did
    samples = token_samples(tokenizer, load_documents(config.data), config.samples + config.holdout,
                            config.seq_len + config.continuation, config.seed)
    try:
        with block_sparse_emulation(model):
            again = continuation_metrics(model, samples[config.samples:], config.seq_len, ATTENTION_KEY)
    finally:
        model.set_attn_implementation("sdpa")
        del model.config.tsa_policy
    # the same fp32 forwards recomputed: equal up to rounding (1e-3 of the KL, or 1e-6 nats near 0)
    assert again.kl == pytest.approx(chosen["held_out"]["natural"]["kl"], rel=1e-3, abs=1e-6)
