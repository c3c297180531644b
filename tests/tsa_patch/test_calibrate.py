"""calibrate(): the accuracy-budget search and the paper's drift rule, on the real SmolLM2 (small settings)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from calibration_settings import SMALL, measured_independently

from tsa_patch.calibrate import DEFAULT_LOCAL_KEYS, CalibrationConfig, calibrate
from tsa_patch.calibration.continuation import (AGGREGATION_QUESTION, aggregation_probe, continuation_metrics,
                                                recall_probe)
from tsa_patch.calibration.drift import decoder_layers, drift_rule_layers
from tsa_patch.calibration.front import Candidate, attention_removed, pareto_policies
from tsa_patch.calibration.speed import TimeModel
from tsa_patch.calibration.measure import TAU_GRID, LayerMeasurement, measure_layers
from tsa_patch.calibration.search import search_kl
from tsa_patch.data import load_documents, token_samples
from tsa_patch.errors import DataError, PolicyError
from tsa_patch.kernels.policy import ATTENTION_KEY, TsaPolicy
from tsa_patch.models import apply_policy_

pytestmark = pytest.mark.heavy  # about 5 minutes of calibrations on 2 cores


def test_drift_rule_picks_layers_at_or_below_the_quantile():
    drift = [5.0, 1.0, 2.0, 3.0, 4.0, 0.5]
    assert drift_rule_layers(drift, 0.5) == [1, 2, 5]
    assert drift_rule_layers(drift, 0.0) == [5]
    assert drift_rule_layers(drift, 1.0) == list(range(6))


def test_drift_method_is_deterministic_and_records_provenance(smollm2_fp32):
    model, tokenizer = smollm2_fp32
    config = dataclasses.replace(SMALL, method="drift", tau=0.01)
    first = calibrate(model, tokenizer, config, source_model="SmolLM2-135M-Instruct")
    assert first.policy == calibrate(model, tokenizer, config, source_model="SmolLM2-135M-Instruct").policy
    policy = first.policy
    assert policy.num_layers == 30 and len(policy.sparse_layers) == 15  # delta = 0.5 of 30 layers
    assert all(policy.layers[i].tau == 0.01 for i in policy.sparse_layers)
    assert policy.source_model == "SmolLM2-135M-Instruct"
    assert policy.calibration["method"] == "representation-drift" and policy.calibration["seed"] == 3
    order = sorted(range(30), key=first.drift.__getitem__)  # the chosen layers have the smallest drift
    assert sorted(order[:15]) == policy.sparse_layers


@pytest.fixture(scope="module")
def budget_run(smollm2_fp32):
    model, tokenizer = smollm2_fp32
    return calibrate(model, tokenizer, SMALL, source_model="SmolLM2-135M-Instruct")


def test_budget_policy_meets_its_budget_and_is_reproducible(budget_run, smollm2_fp32):
    model, tokenizer = smollm2_fp32
    report = budget_run.report
    chosen = report["chosen"]
    assert report["method"] == "accuracy-budget" and report["budget"] == {"kind": "max_kl", "value": 0.05}
    assert chosen["calibration"]["kl"] <= 0.05 and chosen["attention_removed"] > 0.05
    assert chosen["meets_budget_held_out"] and chosen["held_out"]["kl"] <= 0.05
    # every sparse layer engages at the calibration length here (activation length 96 < 320)
    assert chosen["served_at_seq_len"] == {"layers": budget_run.policy.sparse_layers,
                                           "attention_removed": chosen["attention_removed"]}
    assert {layer.tau for layer in budget_run.policy.layers} <= {0.0, *TAU_GRID} and report["taus"] == list(TAU_GRID)
    assert budget_run.policy.calibration == report  # the report travels with the policy (and into exports)
    # the same seed gives the same policy
    assert calibrate(model, tokenizer, SMALL, source_model="SmolLM2-135M-Instruct").policy == budget_run.policy
    # calibrate leaves the model as it found it
    assert model.config._attn_implementation == "sdpa" and not hasattr(model.config, "tsa_policy")
    assert "layer_check" not in report  # SMALL skips the per-layer check


def test_budget_report_matches_an_independent_measurement(budget_run, smollm2_fp32):
    measured = measured_independently(*smollm2_fp32, budget_run.policy)
    reported = budget_run.report["chosen"]["calibration"]
    # the same fp32 forwards recomputed: equal up to rounding (1e-4 of the KL, or 1e-6 nats near 0)
    for kind, metrics in measured.items():
        assert metrics.kl == pytest.approx(reported[kind]["kl"], rel=1e-4, abs=1e-6), kind
    assert reported["kl"] == max(reported[kind]["kl"] for kind in measured)


def test_recall_probe_cues_a_span_from_far_back():
    ids = list(range(1000, 1336))  # distinct tokens: positions can be read back from values
    probe = recall_probe(ids, 320, 16, seed=5)
    assert len(probe) == len(ids) and probe[: 320 - 16] == ids[: 320 - 16]
    start = probe[320 - 16] - 1000
    assert 320 // 8 <= start < 320 // 2 and probe[320 - 16 :] == ids[start : start + 16 + 16]
    assert probe == recall_probe(ids, 320, 16, seed=5) and probe != recall_probe(ids, 320, 16, seed=6)
    with pytest.raises(ValueError, match="at least"):
        recall_probe(ids, 100, 16)


class _WordTokenizer:
    """Whitespace tokens over a growing vocabulary: ids and text map both ways, as a real tokenizer's do."""

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def __call__(self, text, add_special_tokens=False):
        ids = [self.vocab.setdefault(piece, len(self.vocab)) for piece in text.split(" ") if piece]
        return type("Encoding", (), {"input_ids": ids})

    def decode(self, ids):
        words = {i: w for w, i in self.vocab.items()}
        return " ".join(words[i] for i in ids)


def test_aggregation_probe_lists_the_prompts_most_common_words():
    tokenizer = _WordTokenizer()
    text = "alpha bravo delta alpha gamma alpha bravo delta bravo alpha echo zz " * 30
    ids = tokenizer(text).input_ids[:300] + tokenizer("tail words here").input_ids
    probe = aggregation_probe(ids, 300, tokenizer)
    question = tokenizer(AGGREGATION_QUESTION).input_ids
    assert len(probe) == len(ids) and probe[: 300 - len(question)] == ids[: 300 - len(question)]
    assert probe[300 - len(question) : 300] == question
    # counted in the prompt's text, most frequent first, ties in order of first use; "zz" is too short to count
    assert tokenizer.decode(probe[300:]) == "alpha, bravo, delta,"
    assert aggregation_probe(ids, 300, tokenizer) == probe
    with pytest.raises(ValueError, match="no words"):
        aggregation_probe(tokenizer("a b c " * 100).input_ids, 280, tokenizer)


def test_budget_report_compares_with_the_paper_rule(budget_run):
    report = budget_run.report
    paper = report["paper_rule"]
    assert paper["tau"] == 0.005 and len(paper["layers"]) == 15 and "kl" in paper["calibration"]
    removed = [e["attention_removed"] for e in report["evaluations"]]
    assert removed == sorted(removed) and len(report["layers"]) == 30
    assert all(0.0 <= layer["kept"] <= 1.0 for layer in report["layers"])


def test_target_speedup_reaches_the_target(smollm2_fp32):
    model, tokenizer = smollm2_fp32
    config = dataclasses.replace(SMALL, max_kl=None, target_speedup=1.1)
    report = calibrate(model, tokenizer, config).report
    assert report["chosen"]["estimated_attention_speedup"] >= 1.1
    with pytest.raises(PolicyError, match="out of reach"):
        calibrate(model, tokenizer, dataclasses.replace(config, target_speedup=50.0))


def _measurement(kept, error):
    return LayerMeasurement(taus=(0.01, 0.1), kept=list(kept), error=list(error), samples=1)


def test_pareto_front_is_ordered_and_spans_dense_to_sparsest():
    measurements = [_measurement([0.9, 0.5], [0.01, 0.3]), _measurement([0.8, 0.6], [0.001, 0.02]),
                    _measurement([1.0, 0.95], [0.0, 0.0005])]
    front = pareto_policies(measurements)
    assert front[0].taus == (0.0, 0.0, 0.0) and front[0].predicted_error == 0.0
    assert front[-1].taus == (0.1, 0.1, 0.1)
    errors = [c.predicted_error for c in front]
    removed = [c.attention_removed for c in front]
    assert errors == sorted(errors) and removed == sorted(removed)
    # the best saving per unit of error comes first: layer 1 at tau 0.01 (0.36 / 0.001), then layer 2 at
    # tau 0.1 (0.0975 / 0.0005)
    assert front[1].taus == (0.0, 0.01, 0.0) and front[2].taus == (0.0, 0.01, 0.1)


def test_the_block_sparse_option_competes_with_the_taus_on_the_front():
    # layer 0: TSA is costly, the block-sparse kernel cheap; layer 1: TSA cheap, the kernel dominated by tau 0.1
    tsa_costly, tsa_cheap = _measurement([0.9, 0.5], [0.05, 0.3]), _measurement([0.8, 0.6], [0.001, 0.002])
    tsa_costly.block_saving, tsa_costly.block_error = 0.8, 0.002
    tsa_cheap.block_saving, tsa_cheap.block_error = 0.5, 0.2
    front = pareto_policies([tsa_costly, tsa_cheap])
    # the best saving per unit of error first: layer 0 block-sparse (0.8 / 0.002), then layer 1 at tau 0.01
    # (0.36 / 0.001), then layer 1 at tau 0.1 (0.28 more for 0.001 more)
    assert [(c.taus, c.block_layers) for c in front] == [((0.0, 0.0), ()), ((0.0, 0.0), (0,)),
                                                        ((0.0, 0.01), (0,)), ((0.0, 0.1), (0,))]
    assert front[2].attention_removed == pytest.approx((0.8 + 1 - 0.8**2) / 2)
    assert front[2].predicted_error == pytest.approx(0.002 + 0.001)
    # the same saving recomputed, and with only the engaged layers counted (the others run dense)
    both = [tsa_costly, tsa_cheap]
    assert attention_removed(both, front[2].taus, block_layers=(0,)) == pytest.approx(front[2].attention_removed)
    assert attention_removed(both, front[2].taus, block_layers=(0,), engaged={1}) == pytest.approx((1 - 0.8**2) / 2)
    assert attention_removed(both, front[2].taus, block_layers=(0,), engaged=set()) == 0.0


def test_priced_by_time_a_layer_slower_than_dense_never_spends_the_budget():
    # layer 0 removes the most FLOPs per unit of error, but computes 64-81 % of its attention: above the kernel's
    # break-even (the line below: 0.2 + 2 x cost is slower than dense from cost 0.4), so it saves no time
    slow, fast = _measurement([0.9, 0.8], [0.0001, 0.0002]), _measurement([0.6, 0.3], [0.001, 0.004])
    time_model = TimeModel(overhead=0.2, per_cost=2.0, points=4)
    by_flops = pareto_policies([slow, fast])
    assert by_flops[1].taus == (0.01, 0.0) and by_flops[-1].time_saved is None
    by_time = pareto_policies([slow, fast], {"tsa": time_model})
    # layer 1 at tau 0.01 computes 0.36 of its attention and saves 1 - 0.2 - 0.72 = 0.08 of its time; at tau 0.1 it
    # computes 0.09 and saves 0.62, more per unit of error (155 against 80): the front goes straight there
    assert [c.taus for c in by_time] == [(0.0, 0.0), (0.0, 0.1)]
    assert by_time[-1].time_saved == pytest.approx(0.62 / 2)
    assert by_time[-1].attention_removed == pytest.approx((1 - 0.3**2) / 2)
    assert by_time[0].time_saved == 0.0


@pytest.mark.parametrize("priced_by_time", [False, True], ids=["flops", "time"])
def test_kl_search_finds_the_sparsest_feasible_policy(priced_by_time):
    # priced by time, the search refines by the time saved: here the FLOPs removed are flat along the front
    front = [Candidate(taus=(i,), predicted_error=i / 100, attention_removed=0.3 if priced_by_time else i / 50,
                       time_saved=i / 50 if priced_by_time else None) for i in range(50)]
    measured = {}

    def kl(index):  # the true KL is 1.6x the prediction
        measured[index] = 1.6 * front[index].predicted_error
        return measured[index]

    chosen = search_kl(front, 0.2, kl, None)
    assert measured[chosen] <= 0.2
    assert all(measured[i] > 0.2 for i in measured if i > chosen) and len(measured) <= 7
    assert chosen >= 11  # 1.6 * 0.12 = 0.192 is feasible: within the 2-point savings resolution of the best


@pytest.mark.parametrize(
    "change, error, pattern",
    [
        ({"seq_len": 10**6}, DataError, "--seq-len must be between 1 and 8176"),
        ({"samples": 0}, DataError, "--samples must be at least 1"),
        ({"method": "drift", "tau": 1.5}, PolicyError, "tau must be in"),
        ({"delta": 2.0}, PolicyError, "delta must be in"),
        ({"max_kl": -1.0}, PolicyError, "--max-kl must be positive"),
        ({"min_agreement": 0.9}, PolicyError, "at most one of"),
        ({"max_kl": None, "target_speedup": 0.5}, PolicyError, "--target-speedup must be above 1"),
        ({"method": "greedy"}, PolicyError, "--method must be one of"),
        ({"block_sparse": True, "method": "drift"}, PolicyError, "--block-sparse needs the budget method"),
        ({"block_size": 48}, PolicyError, "block_size"),
        ({"data": "/no/such/file.txt"}, DataError, "does not exist"),
        ({"data": "no-such-corpus"}, DataError, "not a corpus"),
        ({"samples": 10**4, "seq_len": 8000, "data": "paul-graham"}, DataError, "lower --samples"),
    ],
)
def test_bad_knobs_fail_before_measuring(smollm2_fp32, change, error, pattern):
    model, tokenizer = smollm2_fp32
    with pytest.raises(error, match=pattern):
        calibrate(model, tokenizer, dataclasses.replace(SMALL, **change))


def test_samples_are_bounded_and_seeded(smollm2_fp32):
    _, tokenizer = smollm2_fp32
    docs = load_documents("kjv")
    a = token_samples(tokenizer, docs, 3, 128, seed=1)
    assert [len(s) for s in a] == [128] * 3
    assert a == token_samples(tokenizer, docs, 3, 128, seed=1)
    assert a != token_samples(tokenizer, docs, 3, 128, seed=2)


def test_measuring_builds_no_autograd_graph(smollm2_fp32):
    # With grad enabled, a forward would keep every layer's activations alive (51 GiB at 32K tokens for 8
    # Llama-8B layers before this was fixed; 4.75 GiB after, benchmarks/results/calibration-gpu-*.json).
    model, tokenizer = smollm2_fp32
    ids = token_samples(tokenizer, load_documents("kjv"), 1, 200, 0)[0]
    outputs = []
    handle = decoder_layers(model)[0].register_forward_hook(
        lambda module, args, out: outputs.append(out[0] if isinstance(out, tuple) else out))
    try:
        with torch.enable_grad():
            measure_layers(model, [ids], TsaPolicy.uniform(30, 0.0, window=16, min_tokens=32, activation_length=96))
    finally:
        handle.remove()
    assert any(p.requires_grad for p in model.parameters())
    assert len(outputs) == 1 and not outputs[0].requires_grad


def test_every_policy_knob_has_one_source():
    """CalibrationConfig and the CLI offer every knob of the policy, with the policy's own defaults."""
    import inspect as python_inspect

    from tsa_patch.cli.calibrate import calibrate_command
    from tsa_patch.kernels.policy import POLICY_KNOBS, knob_defaults

    config = CalibrationConfig()
    defaults = knob_defaults()
    options = python_inspect.signature(calibrate_command).parameters
    for knob in POLICY_KNOBS:
        assert knob in options, f"calibrate has no option for {knob}"
        if knob not in ("activation_length", "rows", "local_keys"):  # these three: resolved unless given
            assert getattr(config, knob) == defaults[knob]
    assert config.policy_options()["activation_length"] == config.min_tokens + config.window + 1


def test_rows_default_to_all_for_the_budget_and_to_the_papers_for_drift():
    """Unless told, the budget method keeps every query row (measured more accurate at the same savings) and the
    drift method, the paper's rule, computes the kept rows only, as the paper does."""
    assert CalibrationConfig().policy_options()["rows"] == "all"
    assert CalibrationConfig(method="drift").policy_options()["rows"] == "kept"
    assert CalibrationConfig(rows="kept").policy_options()["rows"] == "kept"
    assert CalibrationConfig(method="drift", rows="all").policy_options()["rows"] == "all"


def test_local_keys_default_to_the_window_where_every_row_is_computed():
    """Unless told, a kept-keys policy lets each row see its 128 latest keys; the paper's compression none (it
    drops whole rows), also where a caller overrides the rows (the paper's rule beside a budget calibration)."""
    assert CalibrationConfig().policy_options()["local_keys"] == DEFAULT_LOCAL_KEYS == 128
    assert CalibrationConfig(method="drift").policy_options()["local_keys"] == 0
    assert CalibrationConfig().policy_options(rows="kept")["local_keys"] == 0
    assert CalibrationConfig(local_keys=0).policy_options()["local_keys"] == 0
    assert CalibrationConfig(local_keys=32, rows="all").policy_options()["local_keys"] == 32


def test_the_paper_rule_is_measured_with_the_authors_knobs(budget_run, smollm2_fp32):
    """The paper-rule comparison uses the authors' coverage rule and activation length, whatever is calibrated."""
    model, tokenizer = smollm2_fp32
    paper = budget_run.report["paper_rule"]
    policy = TsaPolicy.uniform(30, 0.005, paper["layers"], window=SMALL.window, min_tokens=SMALL.min_tokens,
                               coverage="paper", activation_length=SMALL.min_tokens + SMALL.window + 1)
    samples = token_samples(tokenizer, load_documents(SMALL.data), SMALL.samples + SMALL.holdout,
                            SMALL.seq_len + SMALL.continuation, SMALL.seed)
    apply_policy_(model, policy)
    try:
        natural = continuation_metrics(model, samples[: SMALL.samples], SMALL.seq_len, ATTENTION_KEY)
    finally:
        model.set_attn_implementation("sdpa")
        delattr(model.config, "tsa_policy")
    # the same fp32 forwards recomputed: equal up to rounding (1e-4 of the KL, or 1e-6 nats near 0)
    assert natural.kl == pytest.approx(paper["calibration"]["natural"]["kl"], rel=1e-4, abs=1e-6)


def test_all_rows_calibration_prices_what_it_computes(budget_run, smollm2_fp32):
    """``--rows all``: the per-layer savings are the measured share of attention that kept-keys attention skips (not
    the paper's ``1 - kept ** 2``), the chosen policy meets the budget as measured independently, and the paper's
    rule beside it is the authors' (rows kept): the same figures as in a ``rows="kept"`` calibration."""
    model, tokenizer = smollm2_fp32
    config = dataclasses.replace(SMALL, rows="all")
    result = calibrate(model, tokenizer, config, source_model="SmolLM2-135M-Instruct")
    assert result.policy.rows == "all"
    chosen = result.report["chosen"]
    assert chosen["calibration"]["kl"] <= config.max_kl
    measured = measured_independently(model, tokenizer, result.policy, config)
    for kind, metrics in measured.items():  # the same fp32 forwards recomputed (bound as above)
        assert metrics.kl == pytest.approx(chosen["calibration"][kind]["kl"], rel=1e-4, abs=1e-6), kind
    assert result.report["paper_rule"] == budget_run.report["paper_rule"]
    assert result.report["drift"] == budget_run.report["drift"]  # the same dense measurement forwards


def test_a_layers_saving_is_priced_by_what_its_rows_mode_computes():
    m = LayerMeasurement(taus=(0.01,), kept=[1.6], error=[0.0], samples=2, computed=[1.2])  # kept 0.8, computed 0.6
    assert m.saving(0, "kept") == pytest.approx(1 - 0.8**2)
    assert m.saving(0, "all") == pytest.approx(1 - 0.6)
