"""The exported checkpoint on the oldest supported transformers (5.17, as on the GPU machine), in its own venv.

`make test` builds `.venv-tf517` (torch 2.13, transformers 5.17.0) and points TSA_OLDEST_TRANSFORMERS_PYTHON at
its interpreter; without it this module is skipped (the tests above cover the newest 5.x).
"""

from __future__ import annotations

import json
import os

import pytest

PYTHON = os.environ.get("TSA_OLDEST_TRANSFORMERS_PYTHON")
pytestmark = pytest.mark.skipif(not PYTHON, reason="TSA_OLDEST_TRANSFORMERS_PYTHON is not set (make test sets it)")

SCRIPT = """
import json, os, sys, torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, resaved = sys.argv[1:3]
report = {"transformers": transformers.__version__}
try:
    AutoModelForCausalLM.from_pretrained(folder)
    report["refused"] = False
except ValueError as err:
    report["refused"] = "tsa_v" in str(err)  # the versioned TSA key
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
ids = torch.randint(0, 49152, (1, 300), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    report["finite"] = bool(torch.isfinite(model(ids).logits).all())
report["sparse"] = [s["layer"] for s in model.tsa_statistics() if s["path"] == "sparse"]
report["generated"] = model.generate(ids[:, :200], max_new_tokens=3, do_sample=False).shape[1] - 200
report["dense_impl"] = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True,
                                                            attn_implementation="sdpa").config._attn_implementation
model.save_pretrained(resaved)
config = json.load(open(os.path.join(resaved, "config.json")))
report["resaved"] = {"py": len([f for f in os.listdir(resaved) if f.endswith(".py")]),
                     "guard": config.get("attn_implementation"), "architectures": config.get("architectures")}
print(json.dumps(report))
"""


def test_export_loads_generates_and_resaves_on_transformers_5_17(small_export, fresh_python, tmp_path):
    from tsa_patch.export import remote_code_files
    from tsa_patch.kernels.policy import ATTENTION_KEY

    folder, policy = small_export
    result = fresh_python(SCRIPT, str(folder), str(tmp_path / "resaved"), python=PYTHON)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["transformers"] == "5.17.0"
    assert report["refused"] and report["finite"] and report["generated"] == 3
    assert report["sparse"] == policy.sparse_layers and report["dense_impl"] == "sdpa"
    assert report["resaved"] == {"py": len(remote_code_files()), "guard": ATTENTION_KEY,
                                 "architectures": ["TsaLlamaForCausalLM"]}
