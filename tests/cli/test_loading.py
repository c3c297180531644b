"""Loading an export as its users do, in fresh processes where tsa_patch cannot be imported."""

from __future__ import annotations

import json

SECOND_COPY_SCRIPT = """
import json, sys, torch
from transformers import AutoModelForCausalLM

first, second = sys.argv[1:3]
ids = torch.arange(1000, 1200)[None]
report = {}
trusted = AutoModelForCausalLM.from_pretrained(first, trust_remote_code=True, dtype=torch.float32)
with torch.no_grad():
    trusted(ids)
    report["trusted_sparse"] = [s["layer"] for s in trusted.tsa_statistics() if s["path"] == "sparse"]
    # the TSA key is now registered in this process: a second copy loads without trust_remote_code, as the native class
    native = AutoModelForCausalLM.from_pretrained(second, dtype=torch.float32)
    report["native_class"] = type(native).__name__
    try:
        native(ids)
        report["native"] = "ran"
    except ValueError as err:
        report["native"] = str(err)
    dense = AutoModelForCausalLM.from_pretrained(second, dtype=torch.float32, attn_implementation="sdpa")
    report["dense_finite"] = bool(torch.isfinite(dense(ids).logits).all())
    report["trusted_still_runs"] = bool(torch.isfinite(trusted(ids).logits).all())
    report["default_dtype"] = str(AutoModelForCausalLM.from_pretrained(second, trust_remote_code=True).dtype)
print(json.dumps(report))
"""


def test_a_second_copy_without_trust_remote_code_fails_loudly(small_export, export_copy, fresh_python):
    """In a process that already loaded an export, a copy loaded without trust_remote_code got the native class
    running TSA silently (no statistics); now its first forward raises one clear error."""
    folder, policy = small_export
    result = fresh_python(SECOND_COPY_SCRIPT, str(folder), str(export_copy))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["trusted_sparse"] == policy.sparse_layers and report["native_class"] == "LlamaForCausalLM"
    assert report["native"].startswith("this model was loaded from a tsa-patch export without trust_remote_code=True")
    assert "load it with trust_remote_code=True" in report["native"]
    assert report["dense_finite"] and report["trusted_still_runs"]
    assert report["default_dtype"] == "torch.bfloat16"  # transformers 5 takes the checkpoint's dtype: the README says so
