"""Every supported decoder family, as a tiny random model built from a config (no download): calibrate, export,
load in a fresh process, and check the sparse path against the native dense model.

Each family brings its own twist through the same attention interface: Qwen2 (QKV bias), Qwen3 (q/k norm),
Mistral and Phi-3 (one sliding window for every layer), Gemma 2 (alternating sliding/global layers and
attention logit soft-capping), Gemma 3 (5:1 sliding/global layers, q/k norm).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tsa_patch.calibrate import CalibrationConfig, calibrate
from tsa_patch.errors import UnsupportedModelError
from tsa_patch.export import export
from tsa_patch.kernels.policy import ATTENTION_KEY, TsaPolicy
from tsa_patch.models import load_model, resolve_model, supported_architectures, windowed_layers

TINY = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=4096)
FAMILIES = {
    "llama": {},
    "qwen2": {},
    "qwen3": {},
    "mistral": {"sliding_window": None},
    "mistral-windowed": {"sliding_window": 128},
    "phi3": {},
    "gemma2": {"sliding_window": 64, "query_pre_attn_scalar": 16},
    "gemma3_text": {"sliding_window": 64, "layer_types": ["sliding_attention"] * 3 + ["full_attention"],
                    "query_pre_attn_scalar": 16},
}
SMALL = CalibrationConfig(method="drift", samples=1, seq_len=256, tau=0.05, delta=1.0, window=16, min_tokens=32,
                          activation_length=96)

USER_SCRIPT = """
import json, sys, torch
from transformers import AutoModelForCausalLM

tsa_dir, tau0_dir, native_dir, native_impl = sys.argv[1:5]
ids = torch.randint(0, 49152, (1, 300), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    tsa = AutoModelForCausalLM.from_pretrained(tsa_dir, trust_remote_code=True, dtype=torch.float32)
    tsa_logits = tsa(ids).logits
    sparse = [s["layer"] for s in tsa.tsa_statistics() if s["path"] == "sparse"]
    tau0 = AutoModelForCausalLM.from_pretrained(tau0_dir, trust_remote_code=True, dtype=torch.float32)
    native = AutoModelForCausalLM.from_pretrained(native_dir, dtype=torch.float32, attn_implementation=native_impl)
    native_logits = native(ids).logits
    tau0_logits = tau0(ids).logits
    generated = tsa.generate(ids[:, :200], max_new_tokens=3, do_sample=False).shape[1] - 200
print(json.dumps({"class": type(tsa).__name__, "impl": tsa.config._attn_implementation, "sparse": sparse,
                  "finite": bool(torch.isfinite(tsa_logits).all()), "generated": generated,
                  "differs": not torch.allclose(tsa_logits, native_logits),
                  "tau0_max_diff": (tau0_logits - native_logits).abs().max().item(),
                  "native_max": native_logits.abs().max().item()}))
"""


def _tiny_model(folder, family, tokenizer_dir):
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type = family.split("-")[0]
    config = AutoConfig.for_model(model_type, **TINY, **FAMILIES[family])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, folder / name)
    return folder


@pytest.mark.parametrize("family", FAMILIES)
def test_family_calibrate_export_load(family, tmp_path, smollm2, fresh_python):
    folder = _tiny_model(tmp_path / "native", family, smollm2.path)
    source = resolve_model(str(folder))
    assert source.remote_class == supported_architectures()[source.model_type]
    model, tokenizer = load_model(source)
    policy = calibrate(model, tokenizer, SMALL, source_model=str(folder)).policy
    windowed = windowed_layers(source.config, 300)
    assert not set(policy.sparse_layers) & windowed, "calibration never picks a windowed layer"
    assert policy.sparse_layers == sorted(set(range(4)) - windowed)
    export(source, policy, tmp_path / "tsa")
    dense_policy = TsaPolicy.from_dict({**policy.to_dict(), "layers": [{"enabled": True, "tau": 0.0}] * 4})
    export(source, dense_policy, tmp_path / "tau0")

    native_impl = "eager" if family == "gemma2" else "sdpa"  # SDPA cannot soft-cap Gemma 2's logits
    result = fresh_python(USER_SCRIPT, str(tmp_path / "tsa"), str(tmp_path / "tau0"), str(folder), native_impl)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["class"] == supported_architectures()[source.model_type] and report["impl"] == ATTENTION_KEY
    assert report["sparse"] == policy.sparse_layers and report["finite"] and report["generated"] == 3
    assert report["differs"] == bool(policy.sparse_layers)
    # tau = 0 everywhere: the same function as the native dense model, computed on gathered copies (another
    # accumulation order: 64 fp32 roundings at the logits' magnitude); Gemma 2's soft-cap is our math against
    # eager's, the same formula in other ops (tanh, fp32 softmax): 1024 roundings.
    roundings = 1024 if family == "gemma2" else 64
    assert report["tau0_max_diff"] <= roundings * torch.finfo(torch.float32).eps * report["native_max"]


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    with pytest.raises(UnsupportedModelError, match=r"supports \['gemma2', 'gemma3_text', 'llama', 'mistral', 'phi3'"):
        resolve_model(str(tmp_path))



def test_a_conversion_finished_meanwhile_by_another_process_is_kept(tmp_path):
    """Two processes converting one GGUF into an empty cache (two test workers, two first calibrations): the one
    that finishes second keeps the folder it finds in place instead of failing."""
    from tsa_patch.models import _publish

    target, late = tmp_path / "model", tmp_path / ".convert-late"
    for folder, content in ((target, "theirs"), (late, "ours")):
        folder.mkdir()
        (folder / "config.json").write_text(content)
    _publish(late, target)
    assert (target / "config.json").read_text() == "theirs"
    first = tmp_path / ".convert-first"
    first.mkdir()
    (first / "config.json").write_text("first")
    _publish(first, tmp_path / "fresh")  # nobody else: moved into place
    assert (tmp_path / "fresh" / "config.json").read_text() == "first" and not first.exists()
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "weights").write_text("")  # a non-empty folder without a config is not a conversion
    with pytest.raises(OSError):
        _publish(late, tmp_path / "half")
