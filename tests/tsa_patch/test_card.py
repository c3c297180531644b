"""The model card's calibration table renders whatever parts a calibration measured."""

from __future__ import annotations

import dataclasses

from tsa_patch.card import _metrics_row


def test_metrics_row_skips_a_part_that_was_not_measured():
    """A one-sample calibration measures the natural text only: its recall part is None, not a dict."""
    metrics = {"kl": 0.0123, "top1_agreement": 0.95, "natural": {"kl": 0.0123}, "recall": None}
    row = _metrics_row("this policy", 0.142, metrics)
    assert row == "| this policy | 14.2 % | 0.0123 | 0.0123 | 95.0 % |"


def _policy(**calibration):
    """Four layers, layer 3 sparse, and each layer the speed timings name sparse from its own length (as
    ``calibrate`` writes them)."""
    from tsa_patch.kernels.policy import LayerPolicy, TsaPolicy

    own = {int(i): n for i, n in calibration.get("speed", {}).get("layer_activation", {}).items()}
    layers = tuple(LayerPolicy(enabled=True, tau=0.01, activation_length=own.get(i)) if i in own or i == 3
                   else LayerPolicy() for i in range(4))
    return TsaPolicy(layers=layers, calibration=calibration)


def test_activation_basis_says_where_the_activation_length_comes_from():
    from tsa_patch.card import activation_basis

    measured = {"device": "NVIDIA H200", "lengths": [1024, 2048, 32000], "measured_activation_length": 32000}
    assert activation_basis(_policy(method="accuracy-budget", speed=measured)) == (
        "measured on NVIDIA H200: the sparse layers together were never slower than dense from 32,000 tokens on "
        "(timed at 1,024, 2,048, 32,000)")
    slower = {**measured, "measured_activation_length": None}
    assert "slower than dense at every length timed" in activation_basis(_policy(method="accuracy-budget",
                                                                                 speed=slower))
    per_layer = {**measured, "layer_activation": {"3": 32001}}
    assert activation_basis(_policy(method="accuracy-budget", speed=per_layer)).endswith(
        "(timed at 1,024, 2,048, 32,000): layer 3 slower than dense at every length timed, engaging only beyond it")
    per_layer["layer_activation"] = {"1": 2048, "2": 32000, "3": 2048}
    assert activation_basis(_policy(method="accuracy-budget", speed=per_layer)) == (
        "measured on NVIDIA H200, per layer: each sparse layer engages from the shortest length from which it was "
        "never slower than dense (timed at 1,024, 2,048, 32,000): layers 1, 3 from 2,048 tokens; layer 2 from "
        "32,000 tokens")
    checked = {**per_layer, "layer_activation": {"1": 32000}, "prefills": {}, "prefill_floor": None}
    assert activation_basis(_policy(method="accuracy-budget", speed=checked)) == (
        "measured on NVIDIA H200, per layer: each sparse layer engages from the shortest length from which its device "
        "time was never above dense's (timed at 1,024, 2,048, 32,000): layer 1 from 32,000 tokens; the whole model "
        "so engaged was never slower than dense at a timed length")
    checked["prefill_floor"] = 32000  # calibrated before the whole-model check's margin
    assert activation_basis(_policy(method="accuracy-budget", speed=checked)).endswith(
        "so engaged was slower than dense below 32,000 tokens, so no layer engages below that")
    checked["min_prefill_gain"] = 0.02  # as ``calibrate`` records it now
    assert activation_basis(_policy(method="accuracy-budget", speed=checked)).endswith(
        "not 2% faster than dense below 32,000 tokens, so no layer engages below that")
    # the checks at the shorter lengths served (``calibration.served``)
    timed = {**checked, "layer_activation": {"1": 2048}, "prefill_floor": None}
    within = [{"length": 2048, "layers": [1], "kl": 0.01, "met": True}]
    assert activation_basis(_policy(method="accuracy-budget", speed=timed, served=within)).endswith(
        "layer 1 from 2,048 tokens; the whole model so engaged was never slower than dense at a timed length; the "
        "policy so served was within the accuracy budget end to end at 2,048 tokens")
    raised = _policy(method="accuracy-budget", speed=timed, served=[{**within[0], "met": False}])
    raised = dataclasses.replace(raised, layers=tuple(dataclasses.replace(layer, activation_length=32000)
                                                      if i == 1 else layer for i, layer in enumerate(raised.layers)))
    assert activation_basis(raised).endswith(
        "layer 1 from 32,000 tokens; the whole model so engaged was never slower than dense at a timed length; "
        "checked end to end at 2,048 tokens, it missed the accuracy budget at 2,048, so the layers engaged there "
        "engage from the next length checked")
    cpu = {"device": "cpu", "activation_length": 8192}
    assert activation_basis(_policy(method="accuracy-budget", speed=cpu)).startswith("conservative default")
    assert activation_basis(_policy(method="accuracy-budget")) == "set at calibration (--activation-length)"
    assert activation_basis(_policy(method="representation-drift")).startswith("the paper's")
    assert activation_basis(_policy()) == "set by hand"


def test_the_card_says_each_layer_was_checked_end_to_end():
    """The calibration section of the card of the measured Qwen2.5-Coder policy (calibrated with the layer check)
    says so, and a report without the check does not."""
    import json
    from pathlib import Path

    from tsa_patch.card import _calibration_section

    results = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
    calibration = json.loads((results / "real-qwen-policy-layer-check-H200-20261201.json").read_text())["calibration"]
    assert "alone, end to end at two of them" in _calibration_section(calibration)
    unchecked = {k: v for k, v in calibration.items() if k != "layer_check"}
    assert "alone, end to end" not in _calibration_section(unchecked)


def test_the_card_says_how_the_front_was_priced_by_time():
    """The card of the time-priced Qwen2.5-Coder policy gives the fitted line and the predicted time saved."""
    import json
    from pathlib import Path

    from tsa_patch.card import _calibration_section

    results = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
    calibration = json.loads((results / "real-qwen-policy-time-priced-H100-20261206.json").read_text())["calibration"]
    text = " ".join(_calibration_section(calibration).split())  # the card wraps its lines
    assert "attention time it saves, measured on NVIDIA H100 80GB HBM3 at 32000 tokens" in text
    assert "TSA took 0.21 + 1.28 x the computed share of dense attention time" in text
    assert "faster than dense below 62 % computed" in text and "save 29.0 % of the attention time" in text
    unpriced = {k: v for k, v in calibration.items() if k != "pricing"}
    assert "attention time" not in _calibration_section(unpriced)
    # timed where no option saves time (a short --seq-len): the front stayed in FLOPs, and the card says so
    slow = {**calibration, "pricing": {**calibration["pricing"], "applied": False}}
    text = " ".join(_calibration_section(slow).split())
    assert "No option saved time there, so the front stayed priced in attention FLOPs" in text
    assert "predicted to save" not in text


def test_the_card_lists_every_layer_checked_on_the_block_sparse_kernel():
    from tsa_patch.card import _block_sparse_lines

    checks = [{"layer": 0, "kl": 0.0012, "density": 0.21}, {"layer": 1, "kl": 0.03, "density": 0.4}]
    text = _block_sparse_lines({"block_sparse": {"checks": checks, "layers": [0], "emulated": False}})
    assert "0: 21 % at KL 0.0012, 1: 40 % at KL 0.0300" in text and "chose it for layers [0]" in text
    assert "emulated" not in text
    older = {"order": [3, 1], "layers": [3], "calibration": {"kl": 0.01, "attention_cost": 0.6},
             "held_out": {"kl": 0.02}}
    assert ("lowest drift first: layers\n[3]. With it, the calibration prefills computed 60.0 %\nof the dense attention "
            "FLOPs (TSA alone: 80.0 %), at KL\n0.0100 (held-out 0.0200).") in _block_sparse_lines(
        {"block_sparse": older, "chosen": {"calibration": {"attention_cost": 0.8}}})
    assert _block_sparse_lines({}) == ""


def test_the_card_says_which_rows_and_keys_a_sparse_layer_computes():
    from tsa_patch.card import _rows_sentence
    from tsa_patch.kernels.policy import TsaPolicy

    local = _rows_sentence(TsaPolicy.uniform(4, 0.01, rows="all", local_keys=128))
    assert "Rows `all`" in local and "the 128 keys just before it" in local
    assert "keys just before" not in _rows_sentence(TsaPolicy.uniform(4, 0.01, rows="all"))
    assert "Rows `kept`" in _rows_sentence(TsaPolicy.uniform(4, 0.01))
