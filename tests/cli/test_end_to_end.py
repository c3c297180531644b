"""calibrate -> export -> load in a fresh process, as a user would, with tsa_patch NOT importable there."""

from __future__ import annotations

import json

import pytest

from tsa_patch.data import load_documents
from tsa_patch.kernels.policy import ATTENTION_KEY, TsaPolicy
from tsa_patch.policy_file import read_policy, write_policy

# Small window and floors so a 400-token prompt takes the sparse path on CPU in seconds.
SMALL = ["--window", "16", "--min-tokens", "32", "--activation-length", "96"]

USER_SCRIPT = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer

export, dense_export, source, ids_file = sys.argv[1:5]
ids = torch.tensor([json.load(open(ids_file))])
tokenizer = AutoTokenizer.from_pretrained(export)
model = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True, dtype=torch.float32)
report = {"class": type(model).__name__, "module": type(model).__module__,
          "impl": model.config._attn_implementation, "eos": tokenizer.eos_token}
with torch.no_grad():
    tsa_logits = model(ids).logits
    report["stats"] = model.tsa_statistics()
    generated = model.generate(ids, max_new_tokens=5, do_sample=False)
    report["generated"] = generated.shape[1] - ids.shape[1]
    dense = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True, dtype=torch.float32,
                                                 attn_implementation="sdpa")
    report["dense_impl"] = dense.config._attn_implementation
    native = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    native_logits = native(ids).logits
    report["sdpa_equals_native"] = torch.equal(dense(ids).logits, native_logits)
    report["tsa_differs_from_native"] = not torch.equal(tsa_logits, native_logits)
    report["tsa_finite"] = bool(torch.isfinite(tsa_logits).all())
    tau0 = AutoModelForCausalLM.from_pretrained(dense_export, trust_remote_code=True, dtype=torch.float32)
    report["tau0_impl"] = tau0.config._attn_implementation
    report["tau0_equals_native"] = torch.equal(tau0(ids).logits, native_logits)
print(json.dumps(report))
"""

NO_TRUST_SCRIPT = """
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])  # must not prompt (stdin is closed)
print("tokenizer ok", type(tokenizer).__name__)
try:
    AutoModelForCausalLM.from_pretrained(sys.argv[1])
except ValueError as err:
    print("refused:", err)
else:
    print("LOADED WITHOUT trust_remote_code")
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory, smollm2):
    from typer.testing import CliRunner

    from tsa_patch.cli.app import app

    root = tmp_path_factory.mktemp("e2e")
    runner = CliRunner()
    calibrated = runner.invoke(app, ["calibrate", "--method", "drift", "--samples", "1", "--seq-len", "256",
                                     "--tau", "0.02", *SMALL,
                                     "-o", str(root / "policy.json")])
    assert calibrated.exit_code == 0, calibrated.stderr
    exported = runner.invoke(app, ["export", str(root / "tsa"), "--policy", str(root / "policy.json")])
    assert exported.exit_code == 0, exported.stderr
    policy = read_policy(root / "policy.json")
    dense_policy = TsaPolicy.from_dict({**policy.to_dict(), "layers": [{"enabled": True, "tau": 0.0}] * 30})
    write_policy(dense_policy, root / "tau0.json")
    exported = runner.invoke(app, ["export", str(root / "tau0"), "--policy", str(root / "tau0.json")])
    assert exported.exit_code == 0, exported.stderr
    return root, policy


@pytest.fixture(scope="module")
def user_report(exported, smollm2, tokenizer_ids, fresh_python):
    root, _ = exported
    result = fresh_python(USER_SCRIPT, str(root / "tsa"), str(root / "tau0"), str(smollm2.path), str(tokenizer_ids))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tokenizer_ids(tmp_path_factory, smollm2):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2.path)
    ids = tokenizer("\n\n".join(load_documents("paul-graham")[:3])).input_ids[:400]
    path = tmp_path_factory.mktemp("ids") / "ids.json"
    path.write_text(json.dumps(ids))
    return path


def test_trust_remote_code_builds_the_patched_class(user_report):
    assert user_report["class"] == "TsaLlamaForCausalLM"
    assert user_report["module"].startswith("transformers_modules.")
    assert user_report["impl"] == ATTENTION_KEY and user_report["eos"] == "<|im_end|>"


def test_sparse_path_runs_in_exactly_the_chosen_layers(user_report, exported):
    _, policy = exported
    stats = user_report["stats"]
    assert [s["layer"] for s in stats if s["path"] == "sparse"] == policy.sparse_layers
    for s in stats:
        if s["path"] == "sparse":
            assert 48 <= s["kept"][0][0] < 400  # min_tokens + window <= kept < prompt length
    assert user_report["tsa_finite"] and user_report["tsa_differs_from_native"]


def test_generate_works(user_report):
    assert user_report["generated"] == 5


def test_sdpa_override_gives_the_dense_model(user_report):
    assert user_report["dense_impl"] == "sdpa" and user_report["sdpa_equals_native"]


def test_tau_zero_export_equals_dense_logits(user_report):
    assert user_report["tau0_impl"] == ATTENTION_KEY and user_report["tau0_equals_native"]


def test_without_trust_remote_code_load_fails_loudly_and_tokenizer_loads(exported, fresh_python):
    root, _ = exported
    result = fresh_python(NO_TRUST_SCRIPT, str(root / "tsa"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tokenizer ok" in result.stdout
    assert f'refused: Specified `attn_implementation="{ATTENTION_KEY}"` is not supported' in result.stdout


BLOCK_SPARSE_SCRIPT = """
import json, sys, torch
from transformers import AutoModelForCausalLM

export, source, ids_file = sys.argv[1:4]
ids = torch.tensor([json.load(open(ids_file))])
model = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True, dtype=torch.float32)
native = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
with torch.no_grad():
    native_logits = native(ids).logits[0, -1].log_softmax(-1)
    model(ids)
    plain = model.tsa_statistics()  # on CPU, block-sparse layers run dense unless emulated
    model.emulate_block_sparse()
    logits = model(ids).logits[0, -1].log_softmax(-1)
    emulated = model.tsa_statistics()
    generated = model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] - ids.shape[1]
kl = float((native_logits.exp() * (native_logits - logits)).sum())
print(json.dumps({"plain": plain, "emulated": emulated, "kl": kl, "generated": generated}))
"""


def test_block_sparse_export_runs_its_kernel_in_a_fresh_process(exported, smollm2, tokenizer_ids, fresh_python):
    from typer.testing import CliRunner

    from tsa_patch.cli.app import app

    root, policy = exported
    alone, combined = [0, 1, 2], policy.sparse_layers[:2]
    layers = [{**layer, "kernel": "block_sparse" if i in alone + combined else "dense"}
              for i, layer in enumerate(policy.to_dict()["layers"])]
    block_policy = TsaPolicy.from_dict({**policy.to_dict(), "layers": layers, "block_size": 16,
                                        "block_min_budget": 32, "block_gamma": 0.9})
    write_policy(block_policy, root / "blocks.json")
    result = CliRunner().invoke(app, ["export", str(root / "blocks"), "--policy", str(root / "blocks.json")])
    assert result.exit_code == 0, result.stderr
    run = fresh_python(BLOCK_SPARSE_SCRIPT, str(root / "blocks"), str(smollm2.path), str(tokenizer_ids))
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    plain, emulated = report["plain"], report["emulated"]
    assert all(plain[i]["path"] == "dense" for i in alone)
    assert all(emulated[i]["path"] == "block_sparse" and 0 < emulated[i]["block_density"][0] < 1 for i in alone)
    for i in policy.sparse_layers:
        density = emulated[i]["block_density"][0]
        assert emulated[i]["path"] == "sparse" and ((0 < density < 1) if i in combined else density is None)
    # an accuracy statement, not rounding: block-sparse layers drop attention mass, so the KL is positive but small
    assert 0 < report["kl"] < 0.5 and report["generated"] == 3
