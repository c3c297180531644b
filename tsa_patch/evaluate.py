"""``evaluate``: what the sparsity costs, dense and TSA on the same inputs, offline.

For every task x length x sample of the suite (``calibration/suite.py``) the prompt is generated greedily twice,
once with dense SDPA and once with TSA (decoding is dense in both), and scored. Perplexity uses the protocol of
``calibration/continuation.py``: a long held-out text is prefilled (dense or TSA) and the next tokens are scored
densely over its cache. The report gives per task and length both accuracies, their difference, the
fraction of tokens TSA kept in its sparse layers, and the fraction of dense attention FLOPs the prefill computed.
Block-sparse layers where the Triton kernel cannot run (no CUDA) are measured with their block selection
emulated in PyTorch (what a GPU computes), not with the dense fallback a CPU user gets.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tsa_patch.calibration.continuation import continuation_metrics, dense_implementation
from tsa_patch.data import DEFAULT_EVALUATION_DATA, load_documents, token_samples
from tsa_patch.suite import TASKS, SuiteBuilder
from tsa_patch.errors import DataError, PolicyError
from tsa_patch.kernels.attention import (attention_summary, block_sparse_emulation, block_sparse_kernel_available,
                                         policy_from_config,
                                tsa_statistics)
from tsa_patch.kernels.policy import ATTENTION_KEY, CONFIG_KEY

# Shortest prompt the suite builds: the question, the answer prefix, the needles and some haystack fit in it.
MIN_EVAL_LENGTH = 256


@dataclass(frozen=True)
class EvalConfig:
    """What to run.

    Args:
        tasks: suite tasks (``tsa_patch.suite.TASKS``), at least one.
        lengths: prompt lengths in tokens, at least one, each at least ``MIN_EVAL_LENGTH`` and at most the
            model's context.
        samples: samples per task and length, at least 1.
        seed: suite and perplexity sampling seed.
        perplexity_samples: held-out texts per length for perplexity (0 skips it).
        continuation: tokens scored after each perplexity prefix, at least 1.
        perplexity_data: text for perplexity (default: Paul Graham essays).
        batch_size: prompts generated together (left-padded; each sequence chooses its own tokens, as alone).

    Raises:
        DataError: any of these is out of range (checked here, before a model is loaded).
    """

    tasks: tuple[str, ...] = TASKS
    lengths: tuple[int, ...] = (2048, 4096)
    samples: int = 2
    seed: int = 0
    perplexity_samples: int = 2
    continuation: int = 64
    perplexity_data: str = DEFAULT_EVALUATION_DATA
    batch_size: int = 1

    def __post_init__(self) -> None:
        unknown = sorted(set(self.tasks) - set(TASKS))
        if not self.tasks or unknown:
            raise DataError(f"unknown tasks {unknown}; choose from {list(TASKS)}." if unknown else
                            f"--tasks names no task; choose from {list(TASKS)}.")
        if not self.lengths:
            raise DataError("--lengths names no length; give prompt lengths in tokens, e.g. 2048,4096.")
        short = [n for n in self.lengths if isinstance(n, bool) or not isinstance(n, int) or n < MIN_EVAL_LENGTH]
        if short:
            raise DataError(f"--lengths must be integers of at least {MIN_EVAL_LENGTH} tokens (a prompt holds the "
                            f"question, the answer prefix and a haystack); got {list(self.lengths)}.")
        for name, value, least in (("samples", self.samples, 1), ("perplexity-samples", self.perplexity_samples, 0),
                                   ("continuation", self.continuation, 1), ("batch-size", self.batch_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise DataError(f"--{name} must be at least {least}; got {value}.")


@dataclass
class TaskResult:
    """Accuracy of dense and TSA on one task at one length (means over samples, in [0, 1])."""

    task: str
    length: int
    samples: int
    dense: float
    tsa: float
    kept: float  # mean fraction of tokens kept in TSA's sparse layers (1.0 when none ran sparse)
    attention_cost: float = 0.0  # mean fraction of dense attention FLOPs computed by the prefill (all layers)
    outputs: list[dict] = field(default_factory=list)

    @property
    def delta(self) -> float:
        return self.tsa - self.dense


def _generate(model, prompts: list[list[int]], max_new_tokens: int, implementation: str, pad_token_id
              ) -> tuple[list[list[int]], list[dict]]:
    """Greedy continuations of a batch of prompts (left-padded), and what each sequence's prefill computed
    (``attention_summary`` of the TSA statistics; meaningless for a dense implementation)."""
    device = next(model.parameters()).device
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_token_id, device=device)
    mask = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    for b, prompt in enumerate(prompts):
        ids[b, width - len(prompt):] = torch.tensor(prompt, device=device)
        mask[b, width - len(prompt):] = 1
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad_token_id)
    statistics = tsa_statistics(model) if implementation == ATTENTION_KEY else []
    return [row.tolist() for row in out[:, width:]], [attention_summary(statistics, b) for b in range(len(prompts))]


def evaluate(model, tokenizer, config: EvalConfig, progress: Callable[[str, int], Callable[[], None]] | None = None
             ) -> dict:
    """Run the suite and perplexity, dense and TSA, and return the report (JSON-ready).

    Args:
        model: a model whose config carries a TSA policy (an export loaded with ``trust_remote_code=True``, or
            a native model after ``apply_policy_``); it is left with TSA set.
        tokenizer: its tokenizer.
        config: see ``EvalConfig``.
        progress: ``progress(description, total)`` returns a per-unit callback (or None).

    Raises:
        PolicyError: the model carries no TSA policy.
        DataError: a length exceeds the model's context.
    """
    if not hasattr(model.config, CONFIG_KEY):
        raise PolicyError("the model carries no TSA policy; pass an export folder or MODEL with --policy.")
    return evaluate_policies(model, tokenizer, config, {"tsa": getattr(model.config, CONFIG_KEY)}, progress)["tsa"]


def evaluate_policies(model, tokenizer, config: EvalConfig, policies: dict[str, dict],
                      progress: Callable[[str, int], Callable[[], None]] | None = None) -> dict[str, dict]:
    """``evaluate`` for several policies (name -> policy dict, as stored in ``config.json``) on one model: the dense
    generations are computed once and every policy is compared with them. Returns a report per policy."""
    context = getattr(model.config, "max_position_embeddings", None)
    for length in config.lengths:
        if context is not None and length + max(64, config.continuation) > context:
            raise DataError(f"--lengths: {length} tokens plus the answer exceed the model's context ({context}).")
    start = progress or (lambda description, total: None)
    samples = suite_samples(tokenizer, config)
    dense = _generations(model, tokenizer, config, samples, dense_implementation(model),
                         start("Suite: dense generations", len(samples)))
    reports = {}
    for name, policy in policies.items():
        setattr(model.config, CONFIG_KEY, policy)
        model.set_attn_implementation(ATTENTION_KEY)
        emulate = bool(policy_from_config(model.config).block_sparse_layers) and \
            not block_sparse_kernel_available(next(model.parameters()).device)
        with block_sparse_emulation(model, emulate):  # what the GPU kernel computes, slowly, where it cannot run
            sparse = _generations(model, tokenizer, config, samples, ATTENTION_KEY,
                                  start(f"Suite: TSA generations ({name})", len(samples)))
            perplexity = _perplexity(model, tokenizer, config, start) if config.perplexity_samples else []
        reports[name] = _report(config, _score(config, samples, dense, sparse), perplexity)
        reports[name]["config"]["block_sparse_emulated"] = emulate
    model.set_attn_implementation(ATTENTION_KEY)
    return reports


def suite_samples(tokenizer, config: EvalConfig) -> dict[tuple[str, int], list]:
    """(task, length) -> the suite's samples with their prompt token ids."""
    builder = SuiteBuilder(tokenizer, seed=config.seed)
    samples = {}
    for length in config.lengths:
        for task in config.tasks:
            cell = [builder.sample(task, length, index) for index in range(config.samples)]
            samples[task, length] = [(sample, tokenizer(sample.prompt(tokenizer), add_special_tokens=False).input_ids)
                                     for sample in cell]
    return samples


def _generations(model, tokenizer, config: EvalConfig, samples: dict, implementation: str, step) -> dict:
    """(task, length) -> per sample (decoded output, prefill summary), generated in batches of the cell's samples."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outputs = {}
    for cell, items in samples.items():
        outputs[cell] = []
        for first in range(0, len(items), config.batch_size):
            batch = items[first : first + config.batch_size]
            tokens, summaries = _generate(model, [ids for _, ids in batch], max(s.max_new_tokens for s, _ in batch),
                                          implementation, pad)
            for (sample, _), new, summary in zip(batch, tokens, summaries):
                text = tokenizer.decode(new[: sample.max_new_tokens], skip_special_tokens=True)
                outputs[cell].append((text, summary))
            if step is not None:
                for _ in batch:
                    step()
    return outputs


def _score(config: EvalConfig, samples: dict, dense: dict, sparse: dict) -> list[TaskResult]:
    results = []
    for (task, length), items in samples.items():
        result = TaskResult(task=task, length=length, samples=config.samples, dense=0.0, tsa=0.0, kept=0.0)
        for index, ((sample, ids), (dense_text, _), (tsa_text, summary)) in enumerate(
                zip(items, dense[task, length], sparse[task, length])):
            _record(result, index, len(ids), sample, dense_text, tsa_text, summary)
        results.append(result)
    return results


def _record(result: TaskResult, index: int, tokens: int, sample, dense: str, sparse: str, summary: dict) -> None:
    """Add one sample's scores (and what its TSA prefill computed, ``summary``) to ``result``."""
    dense_score, tsa_score = sample.score(dense), sample.score(sparse)
    result.dense += dense_score / result.samples
    result.tsa += tsa_score / result.samples
    result.kept += summary["kept_fraction"] / result.samples
    result.attention_cost += summary["attention_cost"] / result.samples
    result.outputs.append({"index": index, "tokens": tokens, "answers": list(sample.answers), "dense": dense,
                           "tsa": sparse, "dense_score": dense_score, "tsa_score": tsa_score,
                           "kept": round(summary["kept_fraction"], 4),
                           "attention_cost": round(summary["attention_cost"], 4)})


def _perplexity(model, tokenizer, config: EvalConfig, start) -> list[dict]:
    """Perplexity of the continuation after a TSA (and a dense) prefill of held-out text, per length."""
    documents = load_documents(config.perplexity_data)
    step = start("Perplexity: TSA prefill, dense continuation", len(config.lengths))
    perplexity = []
    for length in config.lengths:
        texts = token_samples(tokenizer, documents, config.perplexity_samples, length + config.continuation,
                              config.seed + 1)
        metrics = continuation_metrics(model, texts, length, ATTENTION_KEY)
        perplexity.append({"length": length, "samples": config.perplexity_samples,
                           "dense": round(float(torch.tensor(metrics.dense_nll).exp()), 4),
                           "tsa": round(float(torch.tensor(metrics.tsa_nll).exp()), 4),
                           "kl": metrics.kl, "top1_agreement": metrics.top1_agreement})
        if step is not None:
            step()
    return perplexity


def _report(config: EvalConfig, results: list[TaskResult], perplexity: list[dict]) -> dict:
    summary = []
    for length in config.lengths:
        rows = [r for r in results if r.length == length]
        summary.append({"length": length, "dense": _mean([r.dense for r in rows]), "tsa": _mean([r.tsa for r in rows]),
                        "kept": _mean([r.kept for r in rows]),
                        "attention_cost": _mean([r.attention_cost for r in rows])})
    for row in summary:
        row["delta"] = row["tsa"] - row["dense"]
    return {
        "config": {**asdict(config), "tasks": list(config.tasks), "lengths": list(config.lengths)},
        "protocol": "greedy generation from the same prompt with dense SDPA and with TSA (decoding dense in "
                    "both); score = fraction of expected answers contained in the output",
        "tasks": [{**{k: v for k, v in asdict(r).items() if k != "outputs"}, "delta": r.delta} for r in results],
        "summary": summary,
        "overall": {"dense": _mean([r.dense for r in results]), "tsa": _mean([r.tsa for r in results]),
                    "paired": paired_comparison([(o["dense_score"], o["tsa_score"])
                                                 for r in results for o in r.outputs])},
        "perplexity": perplexity,
        "outputs": {f"{r.task}/{r.length}": r.outputs for r in results},
    }


def paired_comparison(scores: list[tuple[float, float]]) -> dict:
    """Compare dense and TSA on the same prompts: ``scores`` holds one (dense, TSA) score pair per sample.

    Returns the sample count, how many samples TSA scored higher / lower on, the mean score difference
    (TSA - dense) and its 95 % confidence interval (normal approximation; None with fewer than two samples).
    Most pairs tie, so the interval says whether a mean delta is more than sampling noise.
    """
    deltas = [tsa - dense for dense, tsa in scores]
    n = len(deltas)
    mean = _mean(deltas)
    interval = None
    if n > 1:
        spread = 1.96 * (sum((d - mean) ** 2 for d in deltas) / (n - 1) / n) ** 0.5
        interval = [mean - spread, mean + spread]
    return {"samples": n, "tsa_better": sum(d > 0 for d in deltas), "tsa_worse": sum(d < 0 for d in deltas),
            "mean_delta": mean, "ci95": interval}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def write_report(report: dict, path: str | Path) -> Path:
    """Write the evaluation report as indented JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path
