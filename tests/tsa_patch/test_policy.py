"""TsaPolicy schema (tsa_patch/kernels/policy.py) and policy files (tsa_patch/policy_file.py)."""

from __future__ import annotations

import json
import math

import pytest

from tsa_patch.errors import PolicyError
from tsa_patch.kernels.policy import POLICY_FORMAT_VERSION, LayerPolicy, TsaPolicy
from tsa_patch.policy_file import read_policy, write_policy

EXAMPLES = {
    "paper-rule": TsaPolicy.uniform(30, 0.005, list(range(15, 30))),
    "all-dense": TsaPolicy.uniform(4, 0.0),
    "kv-group-cudnn": TsaPolicy.uniform(8, 0.02, [2, 3], selection="kv_group", dense_backend="cudnn", window=64),
    "all-rows": TsaPolicy.uniform(4, 0.02, [1, 3], rows="all"),
    "provenance": TsaPolicy.uniform(2, 0.01, tool_version="0.1.0", source_model="org/name",
                                    calibration={"method": "representation-drift", "samples": 4}),
}


@pytest.mark.parametrize("name", EXAMPLES)
def test_roundtrip(name, tmp_path):
    policy = EXAMPLES[name]
    assert TsaPolicy.from_dict(json.loads(json.dumps(policy.to_dict()))) == policy
    assert read_policy(write_policy(policy, tmp_path / "p.json")) == policy


def test_uniform_marks_only_chosen_layers():
    policy = EXAMPLES["paper-rule"]
    assert policy.sparse_layers == list(range(15, 30))
    assert policy.layers[3] == LayerPolicy(enabled=False, tau=0.0)


BAD = {
    "tau-one": ({"layers": [{"enabled": True, "tau": 1.0}]}, r"layers\[0\]\.tau = 1\.0"),
    "tau-negative": ({"layers": [{"enabled": True, "tau": -0.1}]}, r"layers\[0\]\.tau"),
    "tau-nan": ({"layers": [{"enabled": True, "tau": math.nan}]}, r"layers\[0\]\.tau"),
    "tau-string": ({"layers": [{"enabled": True, "tau": "0.1"}]}, r"layers\[0\]\.tau"),
    "enabled-int": ({"layers": [{"enabled": 1, "tau": 0.1}]}, r"layers\[0\]\.enabled"),
    "layer-extra-key": ({"layers": [{"enabled": True, "tau": 0.1, "k": 2}]}, r"layers\[0\]"),
    "unknown-key": ({"layers": [], "taus": 1}, r"unknown keys"),
    "no-layers": ({"layers": []}, r"layers = '\[\]'"),
    "bad-version": ({"format_version": 99}, r"format_version = 99"),
    "window-zero": ({"window": 0}, r"window = 0"),
    "pool-even": ({"pool_kernel": 4}, r"pool_kernel = 4"),
    "activation-short": ({"activation_length": 16, "window": 32}, r"activation_length = 16"),
    "selection": ({"selection": "per_token"}, r"selection = 'per_token'"),
    "rows": ({"rows": "some"}, r"rows = 'some'; use one of \['kept', 'all'\]"),
    "backend": ({"dense_backend": "xformers"}, r"dense_backend = 'xformers'"),
}


@pytest.mark.parametrize("name", BAD)
def test_invalid_policies_name_the_field(name):
    patch, pattern = BAD[name]
    data = {**EXAMPLES["all-dense"].to_dict(), **patch}
    with pytest.raises(ValueError, match=pattern):
        TsaPolicy.from_dict(data)


def test_missing_format_version_is_rejected():
    data = EXAMPLES["all-dense"].to_dict()
    del data["format_version"]
    with pytest.raises(ValueError, match="format_version = 'missing'"):
        TsaPolicy.from_dict(data)


def test_read_policy_errors(tmp_path):
    with pytest.raises(PolicyError, match="does not exist"):
        read_policy(tmp_path / "absent.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(PolicyError, match="not valid JSON"):
        read_policy(tmp_path / "broken.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(PolicyError, match="a policy is a JSON object"):
        read_policy(tmp_path / "list.json")


def test_a_version_1_policy_is_read_with_the_rule_its_runtime_used():
    """Version 1 had no coverage field; its runtime averaged per-head normalised distributions."""
    old = {**TsaPolicy.uniform(4, 0.01).to_dict(), "format_version": 1}
    del old["coverage"]
    policy = TsaPolicy.from_dict(old)
    assert policy.format_version == POLICY_FORMAT_VERSION and policy.coverage == "normalized"
    assert TsaPolicy.from_dict(policy.to_dict()) == policy
    assert TsaPolicy.uniform(4, 0.01).coverage == "paper"  # new policies: the authors' rule


def test_a_version_2_policy_is_read_unchanged():
    """Version 2 had no per-layer activation length: every layer takes the policy's."""
    old = {**TsaPolicy.uniform(4, 0.01, [1, 2], activation_length=4096).to_dict(), "format_version": 2}
    policy = TsaPolicy.from_dict(old)
    assert policy.format_version == POLICY_FORMAT_VERSION
    assert [policy.activation_of(layer) for layer in policy.layers] == [4096] * 4


def test_a_version_3_policy_computes_the_papers_rows():
    """Version 3 had no ``rows``: its sparse layers computed only the kept tokens' query rows."""
    old = {**TsaPolicy.uniform(4, 0.01).to_dict(), "format_version": 3}
    del old["rows"]
    policy = TsaPolicy.from_dict(old)
    assert policy.format_version == POLICY_FORMAT_VERSION and policy.rows == "kept"
    assert TsaPolicy.from_dict(TsaPolicy.uniform(4, 0.01, rows="all").to_dict()).rows == "all"


def test_a_version_4_policy_has_no_local_keys():
    """Version 4 had no ``local_keys``: its kept-keys layers saw the kept keys only."""
    old = {**TsaPolicy.uniform(4, 0.01, rows="all").to_dict(), "format_version": 4}
    del old["local_keys"]
    policy = TsaPolicy.from_dict(old)
    assert policy.format_version == POLICY_FORMAT_VERSION and policy.rows == "all" and policy.local_keys == 0
    assert TsaPolicy.from_dict(TsaPolicy.uniform(4, 0.01, rows="all", local_keys=64).to_dict()).local_keys == 64


@pytest.mark.parametrize("knobs, named", [(dict(rows="kept", local_keys=128), "rows \"all\""),
                                          (dict(rows="all", local_keys=-1), "non-negative"),
                                          (dict(rows="all", local_keys=1.5), "non-negative")])
def test_local_keys_are_checked(knobs, named):
    with pytest.raises(ValueError, match="local_keys") as error:
        TsaPolicy.uniform(4, 0.01, **knobs)
    assert named in str(error.value)


def test_a_layer_may_have_its_own_activation_length():
    layers = (LayerPolicy(), LayerPolicy(enabled=True, tau=0.01, activation_length=32000),
              LayerPolicy(enabled=True, tau=0.02))
    policy = TsaPolicy(layers=layers, activation_length=16384)
    assert [policy.activation_of(layer) for layer in policy.layers] == [16384, 32000, 16384]
    data = policy.to_dict()
    assert "activation_length" not in data["layers"][0] and data["layers"][1]["activation_length"] == 32000
    assert TsaPolicy.from_dict(data) == policy
    with pytest.raises(ValueError, match=r"layers\[1\].activation_length = 100; use null or an integer larger"):
        TsaPolicy(layers=(LayerPolicy(), LayerPolicy(enabled=True, tau=0.01, activation_length=100)))
