"""The patched model in real use (real SmolLM2, small TSA window so a few hundred tokens engage it): batched
generation with left padding, chunked prefill, static cache, torch.compile, dtypes, no Triton, re-saving."""

from __future__ import annotations

import json

import pytest
import torch

from tsa_patch.calibration.continuation import cache_argument
from tsa_patch.data import load_documents
from tsa_patch.kernels.attention import tsa_statistics
from tsa_patch.kernels.policy import ATTENTION_KEY, CONFIG_KEY, TsaPolicy
from tsa_patch.models import apply_policy_
from numerics import layout_atol

POLICY = TsaPolicy.uniform(30, 0.05, list(range(10, 30)), window=16, min_tokens=32, activation_length=96)


@pytest.fixture
def patched(smollm2_fp32):
    model, tokenizer = smollm2_fp32
    apply_policy_(model, POLICY)
    yield model, tokenizer
    model.set_attn_implementation("sdpa")
    delattr(model.config, CONFIG_KEY)


def _prompts(tokenizer, lengths):
    text = "\n\n".join(load_documents("paul-graham")[:6])
    ids = tokenizer(text).input_ids
    return [ids[1000 * i : 1000 * i + n] for i, n in enumerate(lengths)]


def test_batched_left_padded_generation_equals_per_sequence(patched):
    model, tokenizer = patched
    prompts = _prompts(tokenizer, [260, 170, 300])
    width = max(map(len, prompts))
    ids = torch.full((3, width), tokenizer.pad_token_id)
    mask = torch.zeros(3, width, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):], mask[b, width - len(p):] = torch.tensor(p), 1
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)[:, width:]
    for b, p in enumerate(prompts):
        alone = model.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id)[0, len(p):]
        assert torch.equal(batched[b], alone), f"sequence {b}"


def test_chunked_prefill_then_generation(patched):
    model, tokenizer = patched
    [prompt] = _prompts(tokenizer, [400])
    ids = torch.tensor([prompt])
    with torch.no_grad():
        first = model(ids[:, :250], use_cache=True)
        name = cache_argument(model)  # `cache` on newer transformers, `past_key_values` on 5.17
        cache = getattr(first, name)
        second = model(ids[:, 250:], **{name: cache}, use_cache=True)
    stats = tsa_statistics(model)
    chunk = [s for s in stats if s["path"] == "sparse"]
    assert chunk and all(s["query_len"] == 150 and s["kv_len"] == 400 for s in chunk)
    assert all(s["kept"][0][0] < 400 for s in chunk)  # earlier context was sparsified for the chunk
    assert torch.isfinite(second.logits).all()
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape == (1, 404)


def test_static_cache_generation(patched):
    model, tokenizer = patched
    [prompt] = _prompts(tokenizer, [300])
    ids = torch.tensor([prompt])
    static = model.generate(ids, max_new_tokens=6, do_sample=False, cache_implementation="static",
                            pad_token_id=tokenizer.pad_token_id)
    assert [s["layer"] for s in tsa_statistics(model) if s["path"] == "sparse"] == list(range(10, 30))
    dynamic = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert torch.equal(static, dynamic)


def test_torch_compile_fails_with_a_clear_message_or_works(patched):
    model, tokenizer = patched
    [prompt] = _prompts(tokenizer, [200])
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        try:
            out = compiled(torch.tensor([prompt])).logits
        except Exception as err:  # noqa: BLE001 - the contract is "works, or says why"
            assert "torch.compile" in str(err) and "sdpa" in str(err), str(err)
        else:
            eager = model(torch.tensor([prompt])).logits
            # the compiled graph may fuse or reorder fp32 ops through 30 layers: 1024 roundings at the logits' size
            assert torch.allclose(out, eager, atol=layout_atol(eager, 1024))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision(patched, dtype):
    """In bf16/fp16, TSA's predictions stay as close to its fp32 predictions as dense's do to dense fp32."""
    model, tokenizer = patched
    [prompt] = _prompts(tokenizer, [300])
    ids = torch.tensor([prompt])

    def last_predictions(implementation):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            logits = model(ids).logits[0, -50:].float()
        assert torch.isfinite(logits).all()
        return logits.argmax(-1)

    reference = {impl: last_predictions(impl) for impl in ("sdpa", ATTENTION_KEY)}
    model.to(dtype)
    try:
        half = {impl: last_predictions(impl) for impl in ("sdpa", ATTENTION_KEY)}
    finally:
        model.to(torch.float32)
        model.set_attn_implementation(ATTENTION_KEY)
    agreement = {impl: (half[impl] == reference[impl]).float().mean().item() for impl in half}
    assert agreement[ATTENTION_KEY] >= agreement["sdpa"] - 0.1, agreement


NO_TRITON_SCRIPT = """
import builtins, json, sys, torch
real_import = builtins.__import__
def no_triton(name, *args, **kwargs):
    if name == "triton" or name.startswith("triton."):
        raise ImportError("triton is not installed")
    return real_import(name, *args, **kwargs)
builtins.__import__ = no_triton
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32)
ids = torch.randint(0, 49152, (1, 300), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    logits = model(ids).logits
print(json.dumps({"triton_loaded": "triton" in sys.modules, "finite": bool(torch.isfinite(logits).all()),
                  "sparse": [s["layer"] for s in model.tsa_statistics() if s["path"] == "sparse"]}))
"""


def test_export_runs_without_triton(small_export, fresh_python):
    folder, policy = small_export
    result = fresh_python(NO_TRITON_SCRIPT, str(folder))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert not report["triton_loaded"] and report["finite"] and report["sparse"] == policy.sparse_layers


RESAVE_SCRIPT = """
import json, os, sys, torch
from transformers import AutoModelForCausalLM
source, target = sys.argv[1:3]
AutoModelForCausalLM.from_pretrained(source, trust_remote_code=True).save_pretrained(target)
config = json.load(open(os.path.join(target, "config.json")))
print(json.dumps({"py": sorted(f for f in os.listdir(target) if f.endswith(".py")), "config": config}))
"""


def test_resaving_keeps_code_policy_architecture_and_guard(small_export, fresh_python, tmp_path):
    from tsa_patch.export import remote_code_files

    folder, policy = small_export
    result = fresh_python(RESAVE_SCRIPT, str(folder), str(tmp_path / "resaved"))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["py"] == sorted(p.name for p in remote_code_files())
    config = report["config"]
    assert config["architectures"] == ["TsaLlamaForCausalLM"]
    assert config["auto_map"] == {"AutoModelForCausalLM": "modeling_tsa.TsaLlamaForCausalLM"}
    assert config["attn_implementation"] == ATTENTION_KEY  # loading without trust_remote_code still fails loudly
    assert TsaPolicy.from_dict(config[CONFIG_KEY]) == policy


NATIVE_PATH_SCRIPT = """
import json, sys, torch
from transformers import AutoModelForCausalLM
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32)
key = model.config._attn_implementation
calls = []
tsa_forward = ALL_ATTENTION_FUNCTIONS[key]
def counting(*args, **kwargs):
    calls.append(args[0].layer_idx)
    return tsa_forward(*args, **kwargs)
ALL_ATTENTION_FUNCTIONS[key] = counting
ids = torch.randint(0, 49152, (1, 300), generator=torch.Generator().manual_seed(0))
report = {}
with torch.no_grad():
    short = model(ids[:, :80]).logits
    report["short_calls"], report["short_paths"] = len(calls), sorted({s["path"] for s in model.tsa_statistics()})
    report["short_lengths"] = sorted({(s["query_len"], s["kv_len"]) for s in model.tsa_statistics()})
    report["layers"] = len(model.tsa_statistics())
    del calls[:]
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    report["prompt_calls"] = len(calls)  # the prefill runs the TSA function in every layer, the decode steps not
    report["sparse"] = [s["layer"] for s in model.tsa_statistics() if s["path"] == "sparse"]
    model.set_attn_implementation("sdpa")
    dense = model(ids[:, :80]).logits
report["short_equals_sdpa"] = bool(torch.equal(short, dense))
report["key_after"] = key
print(json.dumps(report))
"""


def test_inputs_no_layer_can_reduce_run_transformers_own_sdpa_path(small_export, fresh_python):
    """Below the activation length (and in decode steps) an export costs what the native model costs: its forward
    runs transformers' SDPA path in every layer, never the TSA attention function; the output is the sdpa model's,
    bit for bit, and the statistics still say that every layer ran dense."""
    folder, policy = small_export
    assert 80 < policy.activation_length <= 300
    result = fresh_python(NATIVE_PATH_SCRIPT, str(folder))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["short_calls"] == 0 and report["short_equals_sdpa"]
    assert report["short_paths"] == ["dense"] and report["short_lengths"] == [[80, 80]]
    assert report["layers"] == policy.num_layers
    assert report["prompt_calls"] == policy.num_layers and report["sparse"] == policy.sparse_layers
