"""Exported checkpoints under accelerate's device_map and transformers' tensor parallelism (2 GPUs).

Marked `multigpu` and skipped with fewer than two CUDA GPUs. A tiny random Llama is exported with half its
layers sparse; under each parallelism, a tau = 0 policy must give the dense logits exactly and the sparse
layers must run (on both GPUs for device_map) and stay finite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.multigpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")]

TP_SCRIPT = """
import json, os, torch
from transformers import AutoModelForCausalLM
from tsa_patch.kernels.policy import ATTENTION_KEY, CONFIG_KEY
torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
model = AutoModelForCausalLM.from_pretrained(os.environ["EXPORT"], trust_remote_code=True, dtype=torch.bfloat16,
                                             tp_plan="auto").eval()
ids = torch.randint(0, 1000, (1, 2048), generator=torch.Generator().manual_seed(0)).cuda()
policy = getattr(model.config, CONFIG_KEY)
with torch.no_grad():
    model.set_attn_implementation("sdpa"); dense = model(ids).logits
    model.set_attn_implementation(ATTENTION_KEY)
    setattr(model.config, CONFIG_KEY, {**policy, "layers": [{"enabled": True, "tau": 0.0}] * len(policy["layers"])})
    tau0 = model(ids).logits
    setattr(model.config, CONFIG_KEY, policy)
    sparse = model(ids).logits
stats = model.tsa_statistics()
if int(os.environ["RANK"]) == 0:
    print(json.dumps({"tau0_equal": bool(torch.equal(tau0, dense)), "finite": bool(torch.isfinite(sparse).all()),
                      "sparse": [s["layer"] for s in stats if s["path"] == "sparse"],
                      "heads_per_rank": len(stats[-1]["kept"][0]) if stats[-1]["kept"] else None}))
torch.distributed.destroy_process_group()
"""


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tsa_patch.export import export
    from tsa_patch.kernels.policy import TsaPolicy
    from tsa_patch.models import resolve_model

    root = tmp_path_factory.mktemp("multigpu")
    config = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=32, max_position_embeddings=8192)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "model")
    policy = TsaPolicy.uniform(4, 0.2, [2, 3], window=32, min_tokens=64, activation_length=256)
    export(resolve_model(str(root / "model")), policy, root / "export")
    return root / "export", policy


def test_device_map_across_two_gpus(tiny_export):
    from transformers import AutoModelForCausalLM

    from tsa_patch.kernels.policy import ATTENTION_KEY, CONFIG_KEY

    folder, policy = tiny_export
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.bfloat16,
                                                 device_map={"model.embed_tokens": 0, "model.layers.0": 0,
                                                             "model.layers.1": 0, "model.layers.2": 0,
                                                             "model.layers.3": 1, "model.norm": 1,
                                                             "model.rotary_emb": 1, "lm_head": 1}).eval()
    ids = torch.randint(0, 1000, (1, 2048), generator=torch.Generator().manual_seed(0)).cuda(0)
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        dense = model(ids).logits
        model.set_attn_implementation(ATTENTION_KEY)
        raw = getattr(model.config, CONFIG_KEY)
        setattr(model.config, CONFIG_KEY, {**raw, "layers": [{"enabled": True, "tau": 0.0}] * 4})
        tau0 = model(ids).logits
        setattr(model.config, CONFIG_KEY, raw)
        sparse = model(ids).logits
    assert torch.equal(tau0, dense)
    assert torch.isfinite(sparse).all()
    stats = model.tsa_statistics()
    assert [s["layer"] for s in stats if s["path"] == "sparse"] == [2, 3]  # layer 2 on GPU 0, layer 3 on GPU 1
    assert all(s["kept"][0][0] < 2048 for s in stats if s["path"] == "sparse")


def test_tensor_parallel_two_ranks(tiny_export):
    folder, _ = tiny_export
    env = {**os.environ, "EXPORT": str(folder)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--no-python",
               sys.executable, "-c", TP_SCRIPT]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][-1])
    assert report["tau0_equal"] and report["finite"] and report["sparse"] == [2, 3]
    assert report["heads_per_rank"] == 4  # 8 query heads split over 2 ranks; TSA selects per local head
