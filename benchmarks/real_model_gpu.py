"""Ground truth on a real 32K-context model: Qwen2.5-Coder-0.5B-Instruct (GGUF) on one GPU, in phases that each fit
one device call (benchmarks/real_model_gpu.sh runs them):

    python benchmarks/real_model_gpu.py calibrate --gguf FILE --work DIR --out DIR   # policies and exports
    python benchmarks/real_model_gpu.py export --only NAME --policy FILE ...         # a stored policy as NAME
    python benchmarks/real_model_gpu.py speed --gguf FILE --work DIR --out DIR       # prefill timings, densities
    python benchmarks/real_model_gpu.py eval --gguf FILE --work DIR --out DIR        # accuracy
    python benchmarks/real_model_gpu.py layers --gguf FILE --work DIR --out DIR      # each layer alone

``calibrate``: ``tsa-patch calibrate`` at 32K (TSA with the paper's coverage rule, TSA with ours, TSA with one token
set per KV head, and TSA with the block-sparse kernel, at the default budget and at half of it), each policy
exported. ``speed``: every export timed as a user loads it (trust_remote_code) at 1K-32K against its own dense mode
with the same dense kernel (cuDNN first) and as the original model runs (SDPA default); with ``--bound`` also the
dense model with the policy's engaged layers' attention skipped, and with all attention skipped (Amdahl's bounds on
what sparse attention can gain); and the natural block density (FlexPrefill's rule at gamma 0.95) of every head at
32K. ``eval``: the
offline suite at 8K/16K/32K, the dense generations computed once and compared with every policy (the calibrated ones,
the paper's rule, FlexPrefill alone), with paired 95 % intervals; ``--engaged`` evaluates every calibrated policy
with each layer engaged from the window on instead (the suite's prompts are shorter than the measured activation
lengths, so otherwise they run dense). ``layers``: each layer alone made sparse, end to end at 32K (TSA at the
paper's tau and at 0.02, and the block-sparse kernel alone), against the calibration's per-layer error estimate: what
the budget's error is spent on. Every JSON records the card, versions, date, command and the staged file's SHA-256.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from unittest import mock

import torch

from tsa_patch.bench import environment, time_cuda
from tsa_patch.calibrate import CalibrationConfig, calibrate
from tsa_patch.calibration.speed import ladder
from tsa_patch.data import load_documents, token_samples
from tsa_patch.evaluate import EvalConfig, evaluate_policies
from tsa_patch.export import export
from tsa_patch.kernels.dense import sdpa_backend
from tsa_patch.kernels.policy import ATTENTION_KEY, CONFIG_KEY, LayerPolicy, TsaPolicy
from tsa_patch.models import load_model, resolve_model
from tsa_patch.suite import TASKS

BOUND_KEY = "tsa_bound_probe"  # ``speed --bound``: dense attention with some layers' attention skipped
ROUNDS = 5  # timing rounds per prompt length in ``speed`` (``--rounds``), variants interleaved
SEQ_LEN = 32000  # with the 64-token continuation, within the model's 32,768-token context
CALIBRATIONS = {  # name -> CalibrationConfig changes (calibrate's defaults: rows "all", 128 local keys)
    "tsa-paper-coverage": {"rows": "kept"},  # TSA as the paper computes it; the default before 2026-12-06
    "tsa-normalized-coverage": {"coverage": "normalized"},
    "tsa-kv-group": {"selection": "kv_group"},  # the query heads of a KV head choose one token set together
    "tsa-block-sparse": {"block_sparse": True},
    "tsa-block-sparse-kl-0.01": {"block_sparse": True, "max_kl": 0.01},  # half the default budget
    "tsa-all-rows": {"rows": "all", "local_keys": 0},  # every row over the kept keys only: the default of 2026-12-06
    "tsa-local-keys": {"rows": "all"},  # and each row over its 128 latest keys too (the default)
    "tsa-local-keys-kl-0.01": {"rows": "all", "max_kl": 0.01},  # the same at half the default budget
    "tsa-local-keys-kl-0.04": {"rows": "all", "max_kl": 0.04},  # and at twice the default budget
    "tsa-flop-priced": {"rows": "all"},  # the default with its front priced in FLOPs (FLOP_PRICED), an ablation
    "tsa-local-keys-1024": {"rows": "all", "local_keys": 1024},  # eight times the local keys (6 % of 32K attention)
}
FLOP_PRICED = {"tsa-flop-priced"}  # calibrated with calibrate's time pricing switched off: the previous default
# ``layers --layer-rows``: what each mode computes (rows, local keys)
ROWS_VARIANTS = {"kept": {"rows": "kept"}, "all": {"rows": "all", "local_keys": 0}, "local": {"rows": "all"}}


def _record(args, **fields) -> dict:
    return {**environment(), "command": " ".join(["python"] + sys.argv), "staged_sha256": args.sha256, **fields}


def _write(folder: Path, name: str, data: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(data, indent=1) + "\n")


def phase_calibrate(args) -> None:
    source = resolve_model(args.gguf)
    model, tokenizer = load_model(source, device=args.device)
    summary = {}
    for name, changes in _chosen(args).items():
        config = CalibrationConfig(seq_len=args.seq_len, samples=args.samples, holdout=args.holdout, **changes)
        begin = time.perf_counter()
        with (mock.patch("tsa_patch.calibrate._time_prices", return_value=None) if name in FLOP_PRICED
              else contextlib.nullcontext()):
            result = calibrate(model, tokenizer, config, source_model=source.spec)
        seconds = time.perf_counter() - begin
        for folder in (args.work, args.out):  # the device keeps nothing: the policies come back with the results
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"policy-{name}.json").write_text(json.dumps(result.policy.to_dict(), indent=1))
        export(source, result.policy, args.work / "exports" / name, command=f"real_model_gpu.py {name}")
        chosen = result.report["chosen"]
        summary[name] = {"seconds": round(seconds, 1), "sparse_layers": result.policy.sparse_layers,
                         "block_sparse_layers": result.policy.block_sparse_layers,
                         "activation_length": result.policy.activation_length,
                         "attention_removed": chosen["attention_removed"], "kl": chosen["calibration"]["kl"],
                         "held_out_kl": chosen["held_out"]["kl"], "paper_rule": result.report["paper_rule"],
                         "block_sparse": result.report.get("block_sparse"), "speed": result.report.get("speed")}
        print(name, json.dumps({k: v for k, v in summary[name].items() if k not in ("paper_rule", "speed")}),
              flush=True)
        _write(args.out, f"calibration-{name}.json", _record(args, report=result.report, seconds=seconds))
    _write(args.out, "calibrations.json", _record(args, calibrations=summary))


def phase_export(args) -> None:
    """Export ``--policy`` (a policy JSON, e.g. one under benchmarks/results/) as the calibration ``--only`` names,
    so that ``speed`` times a policy calibrated before with the code now in the tree."""
    [name] = _chosen(args)
    policy = TsaPolicy.from_dict(json.loads(Path(args.policy).read_text()))
    (args.work / f"policy-{name}.json").write_text(json.dumps(policy.to_dict(), indent=1))
    export(resolve_model(args.gguf), policy, args.work / "exports" / name, command=f"real_model_gpu.py export {name}")


def phase_speed(args) -> None:
    speed = {name: _time_export(args.work / "exports" / name, args) for name in _chosen(args)}
    _write(args.out, "export-speed.json", _record(args, export_speed=speed))
    if args.only:
        return  # a partial run: the densities come with a full one
    model, tokenizer = load_model(resolve_model(args.gguf), device=args.device)
    _write(args.out, "block-density.json", _record(args, density=_natural_block_density(model, tokenizer, args)))


def _chosen(args) -> dict:
    """The calibrations this run covers (``--only``), all by default."""
    names = args.only.split(",") if args.only else list(CALIBRATIONS)
    return {name: CALIBRATIONS[name] for name in names}


def _free(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()


def _time_export(folder: Path, args) -> list[dict]:
    """Prefill of Paul Graham essays, the export as users load it: TSA, its dense mode with cuDNN first (the same
    dense kernel), and its dense mode as SDPA picks (the original model as users run it); with ``--engaged`` also
    TSA with every layer engaged from the window on (``tsa_engaged``: what the layers give inside the model where
    the calibrated activation lengths keep them dense)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tsa_patch.kernels.attention import attention_summary, tsa_statistics

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    skipped = _register_bound_probe() if args.bound else set()
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=dtype).to(args.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    [ids] = token_samples(tokenizer, load_documents("paul-graham"), 1, args.seq_len, seed=0)
    calibrated = getattr(model.config, CONFIG_KEY)
    engaged = _engaged(calibrated)
    rows = []
    for length in ladder(args.seq_len):  # calibrate's speed ladder
        prompt = torch.tensor([ids[:length]], device=args.device)

        def prefill():
            with torch.no_grad():
                return model(prompt, use_cache=False, logits_to_keep=1).logits

        variants = {"tsa": (ATTENTION_KEY, None), "dense_default": ("sdpa", None), "dense_cudnn": ("sdpa", "cudnn")}
        if args.engaged:
            variants["tsa_engaged"] = (ATTENTION_KEY, None)
        if args.bound:  # the dense model with some layers' attention skipped (what it costs is the most saved)
            free = {"sparse_layers_free": _engaged_layers(calibrated, length),
                    "attention_free": set(range(model.config.num_hidden_layers))}
            variants.update({name: (BOUND_KEY, "cudnn") for name in free})
        times = {name: [] for name in variants}
        names = list(variants)
        for round_ in range(args.rounds):  # interleaved: drifts of the host (these prefills are launch-bound) hit
            # all; the order rotates each round, so that none always runs first after the switch of implementation
            for name in names[round_ % len(names):] + names[:round_ % len(names)]:
                implementation, backend = variants[name]
                if implementation == BOUND_KEY:
                    skipped.clear()
                    skipped.update(free[name])
                model.set_attn_implementation(implementation)
                setattr(model.config, CONFIG_KEY, engaged if name == "tsa_engaged" else calibrated)
                with sdpa_backend(backend, torch.device(args.device)) if backend else contextlib.nullcontext():
                    times[name].append(time_cuda(prefill, budget_s=0.3).median_ms)
        setattr(model.config, CONFIG_KEY, calibrated)
        row = {"length": length, **{name: statistics.median(values) for name, values in times.items()},
               "rounds": times}
        model.set_attn_implementation(ATTENTION_KEY)
        prefill()
        row["attention"] = attention_summary(tsa_statistics(model))
        row["vs_cudnn"] = row["dense_cudnn"] / row["tsa"]
        row["vs_default"] = row["dense_default"] / row["tsa"]
        # host jitter only ever slows a launch-bound prefill: the fastest rounds are the cleaner comparison there
        row["vs_cudnn_fastest"] = min(times["dense_cudnn"]) / min(times["tsa"])
        if args.bound:  # Amdahl's bounds: the policy's engaged layers' attention free, all attention free
            row["sparse_layers"] = sorted(free["sparse_layers_free"])
            row["bound_sparse_layers"] = row["dense_cudnn"] / row["sparse_layers_free"]
            row["bound_attention"] = row["dense_cudnn"] / row["attention_free"]
        if args.engaged:
            row["engaged_vs_cudnn"] = row["dense_cudnn"] / row["tsa_engaged"]
            setattr(model.config, CONFIG_KEY, engaged)
            prefill()
            row["attention_engaged"] = attention_summary(tsa_statistics(model))
            setattr(model.config, CONFIG_KEY, calibrated)
        print(folder.name, json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                                       if k not in ("attention", "attention_engaged", "rounds")}), flush=True)
        rows.append(row)
    del model
    _free(args.device)
    return rows


def _register_bound_probe() -> set[int]:
    """Register ``BOUND_KEY``: transformers' SDPA attention in every layer but those in the returned set (filled by
    the caller), whose attention is skipped: an uninitialised output, no kernel. A prefill so run costs what the
    model costs without those layers' attention: dense time over it bounds what any sparse attention in those
    layers can gain (Amdahl's law)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from tsa_patch.kernels.attention import register_attention

    skipped: set[int] = set()

    def attention(module, query, key, value, attention_mask, **kwargs):
        if module.layer_idx in skipped:
            batch, heads, length, head_dim = query.shape
            return query.new_empty(batch, length, heads, head_dim), None
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    register_attention(BOUND_KEY, attention)
    return skipped


def _engaged_layers(policy: dict, length: int) -> set[int]:
    """The layers of ``policy`` that reduce attention on a ``length``-token prefill (the runtime's ``layer_path``)."""
    from tsa_patch.kernels.attention import DENSE, layer_path

    parsed = TsaPolicy.from_dict(policy)
    return {i for i, layer in enumerate(parsed.layers) if layer_path(parsed, layer, length, length, "triton") != DENSE}


def _engaged(policy: dict) -> dict:
    """The policy with every layer engaged from the window on (no activation length of its own)."""
    engaged = TsaPolicy.from_dict(policy)
    layers = tuple(replace(layer, activation_length=None) for layer in engaged.layers)
    return replace(engaged, layers=layers, activation_length=engaged.window + 1).to_dict()


def _comparison_policies(args, num_layers: int) -> dict[str, dict]:
    """The calibrated policies (``--only``), the paper's rule (its drift-chosen layers at tau 0.005, the authors'
    coverage and activation) and FlexPrefill alone (gamma 0.95 in every layer, no TSA); with ``--engaged`` each
    calibrated policy instead as NAME@engaged, every layer engaged from the window on."""
    policies = {name: json.loads((args.work / f"policy-{name}.json").read_text()) for name in _chosen(args)}
    if args.engaged:  # instead of as calibrated
        for name in list(policies):
            policies[f"{name}@engaged"] = _engaged(policies.pop(name))
    if args.skip_baselines:
        return policies
    base = TsaPolicy.from_dict(json.loads((args.work / "policy-tsa-paper-coverage.json").read_text()))
    paper_layers = base.calibration["paper_rule"]["layers"]
    paper = TsaPolicy.uniform(num_layers, 0.005, paper_layers, coverage="paper",
                              activation_length=base.min_tokens + base.window + 1)
    flex = TsaPolicy(layers=tuple(LayerPolicy(kernel="block_sparse") for _ in range(num_layers)),
                     activation_length=base.window + 1, block_gamma=0.95)
    return {**policies, "paper-rule": paper.to_dict(), "flexprefill-alone": flex.to_dict()}


def phase_eval(args) -> None:
    from tsa_patch.models import apply_policy_

    source = resolve_model(args.gguf)
    model, tokenizer = load_model(source, device=args.device)
    policies = _comparison_policies(args, model.config.num_hidden_layers)
    apply_policy_(model, TsaPolicy.from_dict(next(iter(policies.values()))))
    lengths = (tuple(int(n) for n in args.eval_lengths.split(",")) if args.eval_lengths
               else (args.seq_len // 4, args.seq_len // 2, args.seq_len))  # 8K, 16K, 32K
    config = EvalConfig(tasks=tuple(args.tasks.split(",")), lengths=lengths, samples=args.eval_samples,
                        batch_size=args.batch_size, perplexity_samples=2)
    begin = time.perf_counter()
    reports = evaluate_policies(model, tokenizer, config, policies)
    seconds = time.perf_counter() - begin
    summary = {name: {"summary": r["summary"], "paired": r["overall"]["paired"], "perplexity": r["perplexity"]}
               for name, r in reports.items()}
    for name, s in summary.items():
        print(name, json.dumps(s["paired"]), json.dumps([(r["length"], round(r["dense"], 3), round(r["tsa"], 3),
                                                          round(r["attention_cost"], 3)) for r in s["summary"]]),
              flush=True)
    _write(args.out, "eval.json", _record(args, seconds=seconds, policies=policies, summary=summary, reports=reports))


def phase_layers(args) -> None:
    """Each layer alone made sparse, end to end on the calibration samples at ``--seq-len`` (the authors' coverage):
    TSA at each of ``--layer-taus`` computing each of ``--layer-rows`` (the paper's kept rows, or all rows) and,
    unless ``--no-layer-block``, the block-sparse kernel alone, with the natural, recall and aggregation KL, the
    share of the model's attention computed, and the calibration's per-layer estimate for the same TSA choice
    (kept fraction, residual error; rows as the paper)."""
    from tsa_patch.calibration.endtoend import EndToEnd
    from tsa_patch.calibration.measure import TAU_GRID, measuring, new_measurements

    model, tokenizer = load_model(resolve_model(args.gguf), device=args.device)
    num_layers = model.config.num_hidden_layers
    config = CalibrationConfig(seq_len=args.seq_len, samples=args.samples, holdout=0)
    samples = token_samples(tokenizer, load_documents(config.data), args.samples, args.seq_len + config.continuation,
                            config.seed)

    def make_policy(taus, block_layers, **knobs) -> TsaPolicy:
        layers = tuple(LayerPolicy(enabled=t > 0, tau=t, kernel="block_sparse" if i in block_layers else "dense")
                       for i, t in enumerate(taus))
        return TsaPolicy(layers=layers, **config.policy_options(**knobs))

    measurements = new_measurements(num_layers)
    template = make_policy((0.0,) * num_layers, set())
    begin = time.perf_counter()
    judge = EndToEnd(model, {"calibration": samples, "held_out": []}, args.seq_len, tokenizer, config.seed, make_policy,
                     lambda description, total: None, measure=lambda: measuring(model, measurements, template))
    layer_taus = [float(t) for t in args.layer_taus.split(",")]
    rows = []
    for layer in range(num_layers):
        alone = [0.0] * num_layers
        variants = [(f"tsa rows {mode} tau {tau}", [tau if i == layer else 0.0 for i in range(num_layers)], set(),
                     mode) for mode in args.layer_rows.split(",") for tau in layer_taus]
        if args.layer_block:
            variants.append(("block-sparse", alone, {layer}, "kept"))
        for name, taus, blocks, mode in variants:
            metrics = judge.metrics(taus, "calibration", blocks, **ROWS_VARIANTS[mode])
            row = {"layer": layer, "variant": name, "kl_natural": metrics["natural"]["kl"],
                   "kl_recall": metrics["recall"]["kl"], "kl_aggregation": metrics["aggregation"]["kl"],
                   "top1_agreement": metrics["top1_agreement"],
                   "attention_cost": metrics["attention_cost"]}
            if not blocks:
                index = TAU_GRID.index(taus[layer])
                row.update(estimated_kept=round(measurements[layer].mean_kept(index), 4),
                           estimated_error=round(measurements[layer].mean_error(index), 6))
            print(json.dumps(row), flush=True)
            rows.append(row)
    _write(args.out, "layers-alone.json", _record(args, seconds=time.perf_counter() - begin, taus=layer_taus,
                                                  seq_len=args.seq_len, samples=args.samples, rows=rows))


def _natural_block_density(model, tokenizer, args) -> dict:
    """Per layer and head, the share of causal key blocks FlexPrefill's rule keeps (gamma 0.95, block 128, minimum
    1024 tokens) on a 32K prompt of Paul Graham essays, measured, not forced."""
    from tsa_patch.kernels.attention import dense_forward, register_attention
    from tsa_patch.kernels.block_sparse import block_pattern

    densities = {}

    def measure(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        pattern = block_pattern(query[0], key[0], gamma=0.95, block=128, min_budget=1024, js_threshold=0.1,
                                scaling=scaling)
        blocks = pattern.count.shape[1]
        per_head = pattern.count.sum(-1).float() / (blocks * (blocks + 1) / 2)
        densities[module.layer_idx] = [round(x, 4) for x in per_head.tolist()]
        kwargs.pop("softcap", None)
        return dense_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs), None

    register_attention("tsa_density_probe", measure)
    model.set_attn_implementation("tsa_density_probe")
    [ids] = token_samples(tokenizer, load_documents("paul-graham"), 1, args.seq_len, seed=0)
    with torch.no_grad():
        model.model(torch.tensor([ids], device=args.device))
    model.set_attn_implementation("sdpa")
    flat = [d for layer in densities.values() for d in layer]
    return {"per_layer": {str(k): v for k, v in sorted(densities.items())}, "mean": sum(flat) / len(flat),
            "min": min(flat), "max": max(flat)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=("calibrate", "export", "speed", "eval", "layers"))
    parser.add_argument("--only", default="", help="comma-separated calibrations of " + ", ".join(CALIBRATIONS))
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--work", type=Path, required=True, help="kept between phases (exports, policies)")
    parser.add_argument("--out", type=Path, required=True, help="results JSON")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--holdout", type=int, default=2)
    parser.add_argument("--eval-samples", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=SEQ_LEN, help="smaller for a dry run on a CPU")
    parser.add_argument("--tasks", default=",".join(TASKS), help="fewer for a dry run on a CPU")
    parser.add_argument("--eval-lengths", default="", help="eval: comma-separated prompt lengths (default: a quarter, "
                        "half and all of --seq-len; 8,000 and 16,000 sit just below the 8,192 and 16,384 rungs that "
                        "layers engage from, so lengths such as 12500,16500,24600 reach those layers)")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run of the script")
    parser.add_argument("--engaged", action="store_true", help="eval: every calibrated policy engaged from the window "
                        "on (NAME@engaged), instead of as calibrated; speed: also time each export so engaged")
    parser.add_argument("--bound", action="store_true", help="speed: also time the dense model with the policy's "
                        "engaged layers' attention skipped, and with all attention skipped: the most any sparse "
                        "attention there could gain")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="speed: interleaved timing rounds per length "
                        "(more settle the launch-bound short prompts, whose rounds the host's jitter spreads)")
    parser.add_argument("--layer-taus", default="0.005,0.02", help="layers: the taus of each layer alone")
    parser.add_argument("--layer-rows", default="kept", help="layers: comma-separated rows modes: kept, all (every "
                        "row over the kept keys), local (and over its 128 latest keys)")
    parser.add_argument("--no-layer-block", dest="layer_block", action="store_false",
                        help="layers: leave out the block-sparse kernel alone")
    parser.add_argument("--policy", help="export: the policy JSON to export under the one --only name")
    parser.add_argument("--skip-baselines", action="store_true", help="eval: leave out the paper's rule and "
                        "FlexPrefill alone (measured before on the same prompts)")
    args = parser.parse_args()
    args.sha256 = hashlib.sha256(Path(args.gguf).read_bytes()).hexdigest()
    args.work.mkdir(parents=True, exist_ok=True)
    phases = {"calibrate": phase_calibrate, "export": phase_export, "speed": phase_speed, "eval": phase_eval,
              "layers": phase_layers}
    phases[args.phase](args)


if __name__ == "__main__":
    main()
