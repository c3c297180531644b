"""The calibrated policy checked end to end at the shorter lengths it serves (``calibration.served``): the raising
rule on given measurements, and a real calibration of SmolLM2 whose check is recomputed independently."""

from __future__ import annotations

import dataclasses

import pytest
from calibration_settings import SMALL

import tsa_patch.calibrate as calibrate_module
from tsa_patch.calibrate import calibrate
from tsa_patch.calibration.continuation import continuation_metrics
from tsa_patch.calibration.endtoend import probe_sequences
from tsa_patch.calibration.served import guard_served_lengths, served_lengths
from tsa_patch.card import activation_basis
from tsa_patch.data import load_documents, token_samples
from tsa_patch.kernels.policy import ATTENTION_KEY
from tsa_patch.models import apply_policy_


def test_served_lengths_are_the_ladder_and_the_activation_lengths_below_the_calibrated_one():
    assert served_lengths({3: 12288, 5: 16384, 7: 32001}, 32000) == [12288, 16384, 24576]
    assert served_lengths({1: 160, 2: 160}, 320) == [160]  # a length off the ladder (the conservative default)
    assert served_lengths({1: 320}, 320) == []  # engaged only at the calibrated length: checked by the search


def test_layers_engaged_where_the_budget_is_missed_engage_from_the_next_length():
    measured = []

    def measure(length, activation):
        measured.append((length, dict(activation)))
        engaged = {i for i, n in activation.items() if n <= length}
        return {"kl": 0.03 if length == 12288 else 0.01, "met": not (length == 12288 and engaged)}

    activation, checks = guard_served_lengths({3: 12288, 5: 16384, 7: 32001}, 32000, measure)
    assert activation == {3: 16384, 5: 16384, 7: 32001}
    assert [(c["length"], c["layers"], c["met"]) for c in checks] == [(12288, [3], False), (16384, [3, 5], True),
                                                                      (24576, [3, 5], True)]
    assert measured[1] == (16384, {3: 16384, 5: 16384, 7: 32001})  # measured as raised


def test_a_miss_at_the_last_served_length_leaves_those_layers_to_the_calibrated_length():
    activation, checks = guard_served_lengths({0: 16384, 1: 24576}, 32000,
                                              lambda length, activation: {"met": length < 24576})
    assert activation == {0: 32000, 1: 32000}
    assert [c["met"] for c in checks] == [True, False]


def test_no_check_where_no_layer_engages_below_the_calibrated_length():
    def measure(length, activation):
        raise AssertionError("nothing to check")

    assert guard_served_lengths({0: 32001}, 32000, measure) == ({0: 32001}, [])


@pytest.mark.heavy  # one calibration of SmolLM2 on 2 cores, about a minute
def test_a_calibration_checks_its_policy_at_the_shorter_length_it_serves(smollm2_fp32, monkeypatch):
    model, tokenizer = smollm2_fp32
    served = 160  # the conservative default a CPU calibration gets, set below the calibrated 320 tokens
    monkeypatch.setattr(calibrate_module, "CONSERVATIVE_ACTIVATION_LENGTH", served)
    config = dataclasses.replace(SMALL, activation_length=None)
    result = calibrate(model, tokenizer, config, source_model="SmolLM2-135M-Instruct")
    policy, report = result.policy, result.report
    assert policy.sparse_layers, "the budget must leave a sparse layer to check"
    (check,) = report["served"]
    assert check["length"] == served and check["layers"] == policy.sparse_layers
    assert check["met"] == (check["kl"] <= config.max_kl)
    engaged_from = served if check["met"] else config.seq_len
    assert {policy.activation_of(policy.layers[i]) for i in policy.sparse_layers} == {engaged_from}
    assert f"{served:,} tokens" in activation_basis(policy)

    # the check recomputed outside the calibration: the calibration samples cut to the served length, the policy
    # engaged there (as checked, before any raise)
    samples = token_samples(tokenizer, load_documents(config.data), config.samples + config.holdout,
                            config.seq_len + config.continuation, config.seed)[: config.samples]
    cut = [ids[: served + config.continuation] for ids in samples]
    as_checked = dataclasses.replace(policy, activation_length=served,
                                     layers=tuple(dataclasses.replace(layer, activation_length=None)
                                                  for layer in policy.layers))
    apply_policy_(model, as_checked)
    try:
        kls = [continuation_metrics(model, sequences, served, ATTENTION_KEY).kl
               for sequences in probe_sequences(cut, served, tokenizer, config.seed).values()]
    finally:
        model.set_attn_implementation("sdpa")
        delattr(model.config, "tsa_policy")
    # the same fp32 forwards recomputed without trace replay: equal up to rounding (1e-4 of the KL, 1e-6 nats near 0)
    assert check["kl"] == pytest.approx(max(kls), rel=1e-4, abs=1e-6)
