"""The model card (README.md) written into every export."""

from __future__ import annotations

import re

from tsa_patch.kernels.policy import ATTENTION_KEY, CONFIG_KEY, TsaPolicy
from tsa_patch.models import DEFAULT_MODEL_HUB_ID, DEFAULT_MODEL_LICENSE, DEFAULT_MODEL_NAME, ModelSource

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def render_model_card(source: ModelSource, policy: TsaPolicy, provenance: dict, evaluation: dict | None = None) -> str:
    """Markdown model card with YAML front matter: what changed, usage, the policy, calibration and evaluation
    numbers against dense, provenance, limitations."""
    base_model, license_ = _base_model_and_license(source)
    front = ["---", "library_name: transformers", "pipeline_tag: text-generation"]
    if base_model:
        front.append(f"base_model: {base_model}")
    if license_:
        front.append(f"license: {license_}")
    front += ["tags:", "- tsa-patch", "- token-sparse-attention", "- sparse-attention", "- long-context", "---"]
    rows = "\n".join(f"| {i} | {'sparse' if layer.active else 'dense'} | {layer.tau:g} | {layer.kernel} | "
                     f"{policy.activation_of(layer) if layer.active or layer.block_sparse else ''} |"
                     for i, layer in enumerate(policy.layers))
    siblings = ", ".join(f"`{name}`" for name in sorted(provenance["remote_code_sha256"]) if name != "modeling_tsa.py")
    return _CARD.format(
        front="\n".join(front), name=base_model or source.spec, sparse_count=len(policy.sparse_layers),
        sparse=policy.sparse_layers, num_layers=policy.num_layers, format_version=policy.format_version,
        window=policy.window, pool_kernel=policy.pool_kernel, min_tokens=policy.min_tokens,
        activation_length=policy.activation_length, activation_basis=activation_basis(policy),
        selection=policy.selection, dense_backend=policy.dense_backend, rows_line=_rows_sentence(policy),
        block_line=_block_kernel_sentence(policy), rows=rows, siblings=siblings, attention_key=ATTENTION_KEY,
        config_key=CONFIG_KEY, calibration_lines=_calibration_section(policy.calibration or {}),
        evaluation_lines=_evaluation_section(evaluation), command=provenance.get("command") or "(library call)",
        tool_version=provenance["tool_version"], transformers=provenance["versions"]["transformers"],
        torch=provenance["versions"]["torch"], created=provenance["created"], spec=source.spec)


def activation_basis(policy: TsaPolicy) -> str:
    """Where the policy's activation length comes from, in words (the model card and ``inspect`` show it)."""
    calibration = policy.calibration or {}
    speed = calibration.get("speed")
    if calibration.get("method") == "representation-drift":
        return "the paper's: prompts longer than min tokens + window"
    if not speed:
        return "set at calibration (--activation-length)" if calibration else "set by hand"
    served = _served_sentence(calibration.get("served"))
    if speed.get("device") == "cpu":
        return "conservative default: calibrated without a CUDA GPU to time the sparse layers on" + served
    lengths = speed.get("lengths") or []
    timed = ", ".join(f"{n:,}" for n in lengths)
    if "layer_activation" in speed:
        beyond = lengths[-1] + 1 if lengths else None
        groups: dict[int, list[str]] = {}
        for index in speed["layer_activation"]:  # as served: the policy's, after the end-to-end checks
            groups.setdefault(policy.activation_of(policy.layers[int(index)]), []).append(index)
        parts = [f"layer{'s' if len(layers) > 1 else ''} {', '.join(layers)} "
                 + ("slower than dense at every length timed, engaging only beyond it" if length == beyond
                    else f"from {length:,} tokens") for length, layers in sorted(groups.items())]
        if "prefills" not in speed:  # calibrated before the whole-model check: each layer timed alone
            return (f"measured on {speed['device']}, per layer: each sparse layer engages from the shortest length "
                    f"from which it was never slower than dense (timed at {timed}): "
                    f"{'; '.join(parts) or 'no sparse layer'}")
        floor, gain = speed.get("prefill_floor"), speed.get("min_prefill_gain")  # no gain: calibrated before it
        short_of = f"not {gain:.0%} faster than" if gain else "slower than"
        check = (f"; the whole model so engaged was {short_of} dense below {floor:,} tokens, so no layer engages "
                 "below that" if floor
                 else "; the whole model so engaged was never slower than dense at a timed length")
        return (f"measured on {speed['device']}, per layer: each sparse layer engages from the shortest length from "
                f"which its device time was never above dense's (timed at {timed}): "
                f"{'; '.join(parts) or 'no sparse layer'}{check}{served}")
    measured = speed.get("measured_activation_length")  # a policy written before per-layer activation lengths
    if measured is None:
        return (f"measured on {speed['device']}: the sparse layers were slower than dense at every length timed "
                f"({timed}), so TSA does not engage")
    return (f"measured on {speed['device']}: the sparse layers together were never slower than dense from "
            f"{measured:,} tokens on (timed at {timed})")


def _served_sentence(checks: list[dict] | None) -> str:
    """The end-to-end checks at the shorter lengths served (``calibration.served``), in words; "" without any."""
    if not checks:
        return ""
    checked = ", ".join(f"{c['length']:,}" for c in checks)
    missed = ", ".join(f"{c['length']:,}" for c in checks if not c["met"])
    if not missed:
        return f"; the policy so served was within the accuracy budget end to end at {checked} tokens"
    return (f"; checked end to end at {checked} tokens, it missed the accuracy budget at {missed}, so the layers "
            "engaged there engage from the next length checked")


def _rows_sentence(policy: TsaPolicy) -> str:
    """Which query rows a sparse layer computes, in words."""
    if policy.rows == "all":
        local = (f", and to the {policy.local_keys} keys just before it whether kept or not"
                 if policy.local_keys else "")
        return (" Rows `all` (a variant of the paper's compression): a sparse layer drops keys only, every query row "
                f"attending to its head's kept keys{local}, so a dropped token's row gets attention over them instead "
                "of 0.")
    return " Rows `kept` (the paper's): a sparse layer computes only its kept tokens' query rows."


def _block_kernel_sentence(policy: TsaPolicy) -> str:
    blocks = policy.block_sparse_layers
    if not blocks:
        return ""
    return (f" Block-sparse kernel (FlexPrefill-style: block {policy.block_size}, coverage gamma "
            f"{policy.block_gamma}, min budget {policy.block_min_budget} tokens) in layers {blocks}; it runs "
            "on CUDA with Triton, elsewhere those layers attend densely unless `model.emulate_block_sparse()` "
            "is called.")


# The card; every {field} is filled by render_model_card.
_CARD = """{front}

# {name} with Token Sparse Attention

This checkpoint is **{name}** with its attention patched by
tsa-patch {tool_version} to run **Token Sparse Attention** (TSA; Jo et al.,
arXiv 2602.03216) during prefill. The weights are the original ones, byte for byte (SHA-256 in
`tsa_provenance.json`). In {sparse_count} of {num_layers} layers, each head attends only to the tokens
that carry its attention mass on long prompts: the least-important tail of total mass below tau is dropped,
the attention kernel runs on the compact tensors, and the output is scattered back, so later layers can
re-select any token. Decoding is unchanged.

## Usage

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO", trust_remote_code=True, revision="COMMIT")
tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO", revision="COMMIT")
out = model.generate(**tokenizer(long_prompt, return_tensors="pt"), max_new_tokens=64)
print(model.tsa_statistics())  # per layer: sparse or dense, kept tokens per head in the last forward
```

`trust_remote_code=True` is required: the attention code ships as `modeling_tsa.py` and its flat siblings
({siblings}; they import only torch, transformers and, when present, triton, and do no I/O).
Pin `revision` to a commit you have read. Without `trust_remote_code` the load fails on purpose
(`attn_implementation="{attention_key}"` is not supported), instead of silently giving the dense model.
Pass `attn_implementation="sdpa"` to get the original dense model for comparison.

## Policy

Stored in `config.json` under `{config_key}` (format version {format_version}).
Window {window}, pooling kernel {pool_kernel}, min tokens {min_tokens},
prompts shorter than {activation_length} tokens run dense ({activation_basis}), selection `{selection}`,
dense kernel `{dense_backend}`.{rows_line} Sparse layers: {sparse}.{block_line}

| layer | attention | tau | kernel | from tokens |
| --- | --- | --- | --- | --- |
{rows}

## Calibration

{calibration_lines}

## Evaluation against the dense model

{evaluation_lines}

## How this checkpoint was made

```bash
{command}
```

tsa-patch {tool_version}, transformers {transformers},
torch {torch}, created {created}. Source: `{spec}`.

## Limitations

- Prefill only: decoding (one query token) and prompts shorter than {activation_length} tokens use
  dense SDPA.
- Engines that do not run transformers' modeling code (vLLM, SGLang, TGI, llama.cpp) do not run the sparse
  path; `architectures` names the TSA class so they refuse the checkpoint rather than serve it densely.
- Dropped tokens get zero output from that head in that layer; the residual stream carries them. Accuracy
  was measured only as described under Calibration.
"""


def _calibration_section(calibration: dict) -> str:
    if not calibration:
        return "No calibration record: the policy was written by hand."
    data = (f"Data: `{calibration.get('data')}`, {calibration.get('samples')} samples of {calibration.get('seq_len')} "
            f"tokens, seed {calibration.get('seed')}.")
    if calibration.get("method") == "representation-drift":
        return (f"The paper's rule: layers at or below the {calibration.get('delta')} quantile of inter-layer "
                f"representation drift are sparse, all with tau {calibration.get('tau')}. {data}")
    if calibration.get("method") != "accuracy-budget":
        return f"Method: `{calibration.get('method')}`. {data}"
    chosen, paper, budget = calibration["chosen"], calibration["paper_rule"], calibration["budget"]
    checked = (" and, alone, end to end at two of them (its estimates rescaled by what it measured)"
               if calibration.get("layer_check") else "")
    counted = "aggregation" in chosen["calibration"]  # older reports have two kinds
    aggregation = (", and on an aggregation probe (the prompt ends by asking for the words used most often in the "
                   "text; the continuation is that list, counted)") if counted else ""
    kinds = "natural / recall / aggregation" if counted else "natural / recall"
    return f"""Per-layer tau chosen against an accuracy budget ({budget['kind']} = {budget['value']:.4g}): every
layer was measured at every candidate tau{checked}, and the sparsest policy within the budget was found with end-to-end
measurements (a TSA prefill, then {calibration.get('continuation')} tokens decoded densely over its KV cache,
compared with the dense model), on the text's own continuation, on a long-range recall probe (the prompt ends
with a cue copied from far back; the continuation is what followed it there){aggregation}. The budget holds on the
worst of them. {data} Verified on {calibration.get('holdout')} held-out samples.

| | attention FLOPs removed | KL vs dense (nats), worst of | {kinds} | top-1 agreement |
| --- | --- | --- | --- | --- |
{_metrics_row("this policy, calibration samples", chosen['attention_removed'], chosen['calibration'])}
{_metrics_row("this policy, held-out samples", None, chosen['held_out'])}
{_metrics_row("paper's rule (delta 0.5, tau 0.005), calibration samples", paper['attention_removed'], paper['calibration'])}
{_metrics_row("paper's rule, held-out samples", None, paper['held_out'])}

Estimated whole-model attention speedup at {calibration.get('seq_len')} tokens: x{chosen['estimated_attention_speedup']:.2f}
(from the attention FLOPs each sparse layer computes).{_pricing_lines(calibration)}{_block_sparse_lines(calibration)}"""


def _pricing_lines(calibration: dict) -> str:
    """How the front was priced by time on a GPU (``calibration.pricing``), in words; "" where it was not."""
    pricing = calibration.get("pricing")
    if not pricing:
        return ""
    lines = "; ".join(f"{'the block-sparse kernel' if kernel == 'block_sparse' else 'TSA'} took {m['overhead']:.2f} + "
                      f"{m['per_cost']:.2f} x the computed share of dense attention time, so it is "
                      + (f"faster than dense below {100 * m['break_even_cost']:.0f} % computed"
                         if m["break_even_cost"] > 0 else "never faster than dense")
                      for kernel, m in pricing["models"].items())
    timed = (f"measured on {pricing['device']} at {pricing['length']} tokens (every layer timed at the lowest and "
             f"highest candidate tau): {lines}")
    if not pricing.get("applied", True):
        return f"""

Every layer's attention time was {timed}. No option saved time there, so the front stayed priced in attention
FLOPs and the sparse layers engage only on longer prompts."""
    return f"""

The front valued each option by the attention time it saves, {timed}. The chosen policy is predicted to save
{100 * calibration['chosen']['predicted_time_saved']:.1f} % of the attention time there."""


def _block_sparse_lines(calibration: dict) -> str:
    blocks = calibration.get("block_sparse")
    if not blocks:
        return ""
    if "checks" not in blocks:  # an older calibration: the kernel was added after the taus, lowest drift first
        return f"""

Then the block-sparse kernel was added to as many layers as the budget allowed, lowest drift first: layers
{blocks['layers']}. With it, the calibration prefills computed {100 * blocks['calibration']['attention_cost']:.1f} %
of the dense attention FLOPs (TSA alone: {100 * calibration['chosen']['calibration'].get('attention_cost', 1.0):.1f} %), at KL
{blocks['calibration']['kl']:.4f} (held-out {blocks['held_out']['kl']:.4f})."""
    checked = ", ".join(f"{c['layer']}: {100 * c['density']:.0f} % at KL {c['kl']:.4f}" for c in blocks["checks"])
    return f"""

The block-sparse kernel alone was one more option of every layer: each layer was run alone on it, end to end
(layer: attention computed, KL: {checked}){' with the block selection emulated in PyTorch' if blocks['emulated'] else ''}.
The front chose it for layers {blocks['layers']}."""


def _metrics_row(label: str, removed: float | None, metrics: dict) -> str:
    removed_cell = "" if removed is None else f"{100 * removed:.1f} %"
    kinds = ("natural", "recall", "aggregation")  # endtoend.KINDS (that module imports torch)
    parts = " / ".join(f"{metrics[kind]['kl']:.4f}" for kind in kinds if metrics.get(kind))
    return (f"| {label} | {removed_cell} | {metrics['kl']:.4f} | {parts} | "
            f"{100 * metrics['top1_agreement']:.1f} % |")


def _evaluation_section(evaluation: dict | None) -> str:
    if not evaluation:
        return "Not evaluated at export time; run `tsa-patch eval` on this folder."
    rows = "\n".join(f"| {r['task']} | {r['length']} | {100 * r['dense']:.1f} | {100 * r['tsa']:.1f} | "
                     f"{100 * r['delta']:+.1f} | {100 * r['kept']:.1f} |" for r in evaluation["tasks"])
    means = "\n".join(f"| **mean** | {r['length']} | {100 * r['dense']:.1f} | {100 * r['tsa']:.1f} | "
                      f"{100 * r['delta']:+.1f} | {100 * r['kept']:.1f} |" for r in evaluation["summary"])
    ppl = "\n".join(f"| {r['length']} | {r['dense']:.2f} | {r['tsa']:.2f} |" for r in evaluation.get("perplexity", []))
    config = evaluation["config"]
    text = f"""`tsa-patch eval` ({config['samples']} samples per task and length, seed {config['seed']}; greedy
generation from the same prompts, decoding dense in both; the full report is `tsa_eval.json`):

| task | length | dense % | TSA % | delta | kept tokens % |
| --- | --- | --- | --- | --- | --- |
{rows}
{means}"""
    if ppl:
        text += f"""

Perplexity of the next {config['continuation']} tokens after a long prefix of `{config['perplexity_data']}`:

| length | dense | TSA |
| --- | --- | --- |
{ppl}"""
    return text


def _base_model_and_license(source: ModelSource) -> tuple[str | None, str | None]:
    if source.spec == DEFAULT_MODEL_NAME:
        return DEFAULT_MODEL_HUB_ID, DEFAULT_MODEL_LICENSE
    base = source.spec if _HUB_ID.match(source.spec) else None
    license_ = None
    readme = source.path / "README.md"
    if readme.is_file():
        match = re.search(r"^license:\s*(\S+)\s*$", readme.read_text(errors="replace").split("\n---", 1)[0], re.M)
        license_ = match.group(1) if match else None
    return base, license_
