"""``calibrate``: measure a model on calibration text and decide, per layer, whether to sparsify and with which tau.

Two methods:

- ``budget`` (default): load (caller) -> sample calibration and held-out text -> measure every layer at every
  candidate tau in one dense forward per sample (``calibration.budget``) -> build the predicted Pareto front of
  per-layer policies -> search it with end-to-end measurements (TSA prefill, dense continuation, against dense;
  ``calibration.continuation``; on natural continuations and on long-range recall probes, the worse of the two
  counting) for the sparsest policy within the budget (``max_kl`` or ``min_agreement``), or
  take the least-error policy reaching ``target_speedup`` -> verify on held-out samples, backing off if the
  budget is missed -> a ``TsaPolicy`` with its report. The paper's rule is measured on the same samples for
  comparison. With ``block_sparse``, layers then also get the block-sparse kernel, lowest representation drift
  first, as many as the budget allows end to end (bisection on the count, verified on held-out samples).
- ``drift``: the paper's rule: layers at or below the ``delta`` quantile of inter-layer representation drift go
  sparse, all with one ``tau``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import __version__
from .calibration.data import DEFAULT_CALIBRATION_DATA, DataSourceError, load_documents, token_samples
from .errors import DataError, PolicyError
from .kernels.policy import ATTENTION_KEY, CONFIG_KEY, LayerPolicy, TsaPolicy

if TYPE_CHECKING:
    import torch

# Calibration sequences must be long enough for TSA to engage yet always bounded (untruncated samples are
# the peers' most common out-of-memory cause).
MAX_SEQ_LEN = 131072
METHODS = ("budget", "drift")
# The paper's rule, evaluated next to every budget calibration for comparison.
PAPER_TAU, PAPER_DELTA = 0.005, 0.5
# End-to-end evaluations spent searching the Pareto front, held-out back-off steps, and the savings
# resolution (share of attention FLOPs) below which the search stops refining.
_MAX_SEARCH_EVALUATIONS, _MAX_BACKOFFS, _RESOLUTION = 7, 3, 0.02
# The search extrapolates past the sparsest feasible policy by at most this factor of predicted error: measured
# KL can rise by orders of magnitude over a short stretch of the front (long-range recall breaks abruptly).
_MAX_STEP = 4.0
# Tokens copied from far back to cue a long-range recall probe (``calibration.continuation.recall_probe``).
RECALL_CUE = 16


@dataclass(frozen=True)
class CalibrationConfig:
    """Knobs of a calibration run.

    Args:
        data: corpus name, local file/folder, or ``datasets`` id (see ``tsa_patch.calibration.data``).
        samples: calibration sequences.
        seq_len: prompt tokens per sequence, at most the model's context and ``MAX_SEQ_LEN``.
        seed: data sampling seed; the same seed gives the same policy.
        method: "budget" (accuracy-budget search) or "drift" (the paper's rule).
        max_kl: budget: mean KL(dense || TSA) over the continuation tokens, in nats, on natural continuations
            and on long-range recall probes alike.
        min_agreement: budget: top-1 agreement with dense over the continuation tokens (both kinds), in [0, 1].
        target_speedup: instead of a budget: the estimated whole-model attention speedup to reach with the
            least error.
        match_paper: budget: ``max_kl`` = the KL the paper's rule (delta 0.5, tau 0.005) measures on the same
            calibration samples: the paper's accuracy, with as much sparsity as the measurements allow.
            With none of these four, ``max_kl = DEFAULT_MAX_KL``.
        holdout: held-out sequences that verify the chosen policy.
        continuation: tokens after each prompt, decoded densely over the TSA-prefilled cache and compared.
        tau, delta: the drift method's tau and drift quantile (paper: 0.005, 0.5).
        block_sparse: budget: after choosing the taus, give as many layers as the budget allows the block-sparse
            kernel (lowest drift first). Without CUDA the block selection is emulated in PyTorch while measuring.
        window, pool_kernel, min_tokens, activation_length, selection, dense_backend, block_size, block_gamma,
            block_min_budget: copied into the policy.
    """

    data: str = DEFAULT_CALIBRATION_DATA
    samples: int = 4
    seq_len: int = 2048
    seed: int = 0
    method: str = "budget"
    max_kl: float | None = None
    min_agreement: float | None = None
    target_speedup: float | None = None
    match_paper: bool = False
    holdout: int = 2
    continuation: int = 64
    tau: float = PAPER_TAU
    delta: float = PAPER_DELTA
    window: int = 128
    pool_kernel: int = 7
    min_tokens: int = 1024
    activation_length: int = 2048
    selection: str = "query_head"
    dense_backend: str = "auto"
    block_sparse: bool = False
    block_size: int = 128
    block_gamma: float = 0.95
    block_min_budget: int = 1024

    def policy_options(self) -> dict:
        return dict(window=self.window, pool_kernel=self.pool_kernel, min_tokens=self.min_tokens,
                    activation_length=self.activation_length, selection=self.selection,
                    dense_backend=self.dense_backend, block_size=self.block_size, block_gamma=self.block_gamma,
                    block_min_budget=self.block_min_budget)


DEFAULT_MAX_KL = 0.02


@dataclass(frozen=True)
class CalibrationResult:
    """The chosen policy and what was measured to choose it.

    ``drift`` has one value per layer (both methods measure it). ``report`` (budget method) holds the per-layer
    measurements, every end-to-end evaluation, the paper's rule on the same samples, and the held-out check.
    """

    policy: TsaPolicy
    drift: list[float]
    report: dict = field(default_factory=dict)


def calibrate(
    model: "torch.nn.Module",
    tokenizer,
    config: CalibrationConfig,
    source_model: str | None = None,
    progress: Callable[[str, int], Callable[[], None]] | None = None,
) -> CalibrationResult:
    """Choose per-layer taus for ``model`` from calibration text (see the module docstring for the lifecycle).

    Args:
        model: the dense model, in eval mode (restored to its attention implementation afterwards).
        tokenizer: its tokenizer.
        config: see ``CalibrationConfig``.
        source_model: recorded in the policy so ``tsa-patch export`` can find the model again.
        progress: ``progress(description, total)`` is called at the start of each long step and returns a
            function called once per unit of work (or None).

    Raises:
        PolicyError: a knob is out of range, or ``target_speedup`` is out of reach.
        DataError: the data cannot be read or is too short.
    """
    start = progress or (lambda description, total: None)
    _validate(model, config)
    needed = config.seq_len + (config.continuation if config.method == "budget" else 0)
    count = config.samples + (config.holdout if config.method == "budget" else 0)
    try:
        samples = token_samples(tokenizer, load_documents(config.data), count, needed, config.seed)
    except DataSourceError as err:
        raise DataError(str(err)) from None
    previous = model.config._attn_implementation
    had_policy = hasattr(model.config, CONFIG_KEY)
    try:
        if config.method == "drift":
            return _drift_rule(model, config, samples, source_model, start)
        return _budget(model, config, samples, source_model, start)
    finally:
        model.set_attn_implementation(previous)
        if not had_policy and hasattr(model.config, CONFIG_KEY):
            delattr(model.config, CONFIG_KEY)


def _validate(model, config: CalibrationConfig) -> None:
    context = getattr(model.config, "max_position_embeddings", MAX_SEQ_LEN)
    extra = config.continuation if config.method == "budget" else 0
    limit = min(context, MAX_SEQ_LEN) - extra
    if not 1 <= config.seq_len <= limit:
        raise DataError(f"--seq-len must be between 1 and {limit} for this model; got {config.seq_len}.")
    if config.samples < 1:
        raise DataError(f"--samples must be at least 1; got {config.samples}.")
    if config.method not in METHODS:
        raise PolicyError(f"--method must be one of {list(METHODS)}; got '{config.method}'.")
    if not 0.0 <= config.delta <= 1.0:
        raise PolicyError(f"delta must be in [0, 1]; got {config.delta}. The paper uses 0.5.")
    budgets = [b for b in (config.max_kl, config.min_agreement, config.target_speedup) if b is not None]
    if len(budgets) + config.match_paper > 1:
        raise PolicyError("give at most one of --max-kl, --min-agreement, --target-speedup and --match-paper.")
    if config.max_kl is not None and config.max_kl <= 0:
        raise PolicyError(f"--max-kl must be positive; got {config.max_kl}.")
    if config.min_agreement is not None and not 0.0 < config.min_agreement <= 1.0:
        raise PolicyError(f"--min-agreement must be in (0, 1]; got {config.min_agreement}.")
    if config.target_speedup is not None and config.target_speedup <= 1.0:
        raise PolicyError(f"--target-speedup must be above 1; got {config.target_speedup}.")
    if config.block_sparse and (config.method != "budget" or config.target_speedup is not None):
        raise PolicyError("--block-sparse needs the budget method with --max-kl, --min-agreement or --match-paper.")
    if config.method == "budget" and (config.holdout < 1 or config.continuation < 1):
        raise DataError("--holdout and --continuation must be at least 1 for the budget method.")
    if config.method == "budget" and config.seq_len <= config.window:
        raise DataError(f"--seq-len must exceed the window ({config.window}) for TSA to engage.")
    if config.method == "budget" and config.seq_len < 4 * (RECALL_CUE + config.continuation):
        raise DataError(f"--seq-len must be at least {4 * (RECALL_CUE + config.continuation)} (4 x (cue + "
                        "--continuation)) for the long-range recall probes.")
    try:  # validate the policy knobs before spending minutes on forwards
        TsaPolicy.uniform(model.config.num_hidden_layers, config.tau, **config.policy_options())
    except ValueError as err:
        raise PolicyError(str(err)) from None


def _policy(taus, config: CalibrationConfig, source_model, provenance: dict, block_layers=()) -> TsaPolicy:
    layers = tuple(LayerPolicy(enabled=tau > 0, tau=tau, kernel="block_sparse" if i in block_layers else "dense")
                   for i, tau in enumerate(taus))
    return TsaPolicy(layers=layers, tool_version=__version__, source_model=source_model, calibration=provenance,
                     **config.policy_options())


def _drift_rule(model, config, samples, source_model, start) -> CalibrationResult:
    from .calibration.drift import drift_rule_layers, representation_drift  # imports torch

    drift = representation_drift(model, samples, on_sample=start(f"Measuring representation drift on "
                                                                 f"{len(samples)} x {config.seq_len} tokens", len(samples)))
    chosen = set(drift_rule_layers(drift, config.delta)) - _windowed(model, config)
    taus = [config.tau if i in chosen else 0.0 for i in range(len(drift))]
    provenance = {"method": "representation-drift", **_data_record(config), "tau": config.tau, "delta": config.delta,
                  "drift": [round(d, 6) for d in drift]}
    return CalibrationResult(policy=_policy(taus, config, source_model, provenance), drift=drift)


def _windowed(model, config: CalibrationConfig) -> set[int]:
    from .models import windowed_layers

    return windowed_layers(model.config.to_dict(), config.seq_len)


def _data_record(config: CalibrationConfig) -> dict:
    return {"data": config.data, "samples": config.samples, "seq_len": config.seq_len, "seed": config.seed}


def _budget(model, config, samples, source_model, start) -> CalibrationResult:
    from .calibration.budget import TAU_GRID, measure_layers, pareto_policies
    from .calibration.continuation import compare_with_dense, dense_reference, recall_probe
    from .calibration.drift import drift_rule_layers, recording_drift
    from .policy import apply_policy_

    calibration, held_out = samples[: config.samples], samples[config.samples :]
    template = TsaPolicy.uniform(model.config.num_hidden_layers, 0.0, **config.policy_options())
    step = start(f"Measuring {model.config.num_hidden_layers} layers x {len(TAU_GRID)} taus on {len(calibration)} x "
                 f"{config.seq_len} tokens", len(calibration))
    with recording_drift(model) as drift_recorder:
        measurements = measure_layers(model, [s[: config.seq_len] for s in calibration], template, on_sample=step)
    drift = drift_recorder.mean()
    front = pareto_policies(measurements)
    sequences = {}
    for which, texts in (("calibration", calibration), ("held_out", held_out)):
        sequences[which, "natural"] = texts
        sequences[which, "recall"] = [recall_probe(s, config.seq_len, RECALL_CUE, seed=config.seed * 1000 + i)
                                      for i, s in enumerate(texts)]
    references = {key: dense_reference(model, texts, config.seq_len,
                                       on_sample=start(f"Dense reference continuations ({' '.join(key)})", len(texts)))
                  for key, texts in sequences.items()}

    def evaluate(taus, which: str, block_layers=()) -> dict:
        """End-to-end metrics of a policy on natural and recall continuations; the budget holds on the worse."""
        apply_policy_(model, _policy(taus, config, source_model, {}, block_layers))
        natural, recall = (compare_with_dense(model, sequences[which, kind], config.seq_len, references[which, kind],
                                              ATTENTION_KEY).as_dict() for kind in ("natural", "recall"))
        return {"kl": max(natural["kl"], recall["kl"]),
                "top1_agreement": min(natural["top1_agreement"], recall["top1_agreement"]),
                "attention_cost": round((natural["attention_cost"] + recall["attention_cost"]) / 2, 4),
                "natural": natural, "recall": recall}

    paper_layers = set(drift_rule_layers(drift, PAPER_DELTA)) - _windowed(model, config)
    paper_taus = [PAPER_TAU if i in paper_layers else 0.0 for i in range(len(drift))]
    paper = evaluate(paper_taus, "calibration")
    paper_removed = _removed(measurements, paper_taus)
    budget = _budget_record(config)
    if config.match_paper:
        budget = {"kind": "max_kl", "value": max(paper["kl"], 1e-9), "from": "paper rule on the calibration samples"}
    feasible = _feasibility(budget)
    evaluations: list[dict] = []

    def record(index: int) -> dict:
        for e in evaluations:
            if e["index"] == index:
                return e
        candidate = front[index]
        entry = {"index": index, "taus": list(candidate.taus), "predicted_error": round(candidate.predicted_error, 6),
                 "attention_removed": round(candidate.attention_removed, 4),
                 **evaluate(candidate.taus, "calibration")}
        evaluations.append(entry)
        return entry

    search_step = start("Searching the accuracy/savings front end to end", _MAX_SEARCH_EVALUATIONS)
    if budget["kind"] == "target_speedup":
        reachable = [i for i, c in enumerate(front) if 1.0 / max(1e-9, 1.0 - c.attention_removed) >= budget["value"]]
        if not reachable:
            best = 1.0 / max(1e-9, 1.0 - front[-1].attention_removed)
            raise PolicyError(f"--target-speedup {budget['value']} is out of reach at {config.seq_len} tokens; "
                              f"the sparsest measured policy gives x{best:.2f}. Lower the target or raise --seq-len.")
        chosen = reachable[0]
        record(chosen)
    elif budget["kind"] == "max_kl":
        chosen = _search_kl(front, budget["value"], lambda i: record(i)["kl"], search_step)
    else:
        chosen = _bisect(len(front), lambda i: feasible(record(i)), search_step)

    paper_held = evaluate(paper_taus, "held_out")
    if config.match_paper:  # equal accuracy means equal on the held-out text too, not the calibration text's KL
        budget = {**budget, "held_out_value": max(paper_held["kl"], 1e-9)}
        feasible = _feasibility(budget, held_out=True)
    held = evaluate(front[chosen].taus, "held_out")
    held_evaluations = [{"index": chosen, "attention_removed": round(front[chosen].attention_removed, 4), **held}]
    backoffs = 0
    while budget["kind"] != "target_speedup" and not feasible(held) and chosen > 0 and backoffs < _MAX_BACKOFFS:
        # Held-out text is harder than the calibration text: shrink the predicted error by the miss.
        miss = held["kl"] / budget.get("held_out_value", budget["value"]) if budget["kind"] == "max_kl" else 2.0
        target = front[chosen].predicted_error / max(miss, 1.25)
        chosen, backoffs = max(i for i, c in enumerate(front) if c.predicted_error <= target), backoffs + 1
        held = evaluate(front[chosen].taus, "held_out")
        held_evaluations.append({"index": chosen, "attention_removed": round(front[chosen].attention_removed, 4),
                                 **held})
    chosen_entry = record(chosen) if chosen else {"index": 0, "attention_removed": 0.0, "kl": 0.0,
                                                   "top1_agreement": 1.0, "attention_cost": 1.0,
                                                   "taus": list(front[0].taus)}
    taus = front[chosen].taus
    layer_table = []
    for m, tau in zip(measurements, taus):
        i = m.taus.index(tau) if tau else None
        layer_table.append({"tau": tau, "kept": round(m.mean_kept(i), 4) if i is not None else 1.0,
                            "error": round(m.mean_error(i), 6) if i is not None else 0.0})
    chosen_metrics = {k: chosen_entry.get(k) for k in ("kl", "top1_agreement", "attention_cost", "natural", "recall")}
    block_layers: list[int] = []
    block_report = None
    if config.block_sparse:
        from .kernels.attention import block_sparse_kernel_available
        from .policy import emulated_block_sparse

        with emulated_block_sparse():
            block_layers, block_report = _choose_block_sparse(
                taus, drift, _windowed(model, config), evaluate, _feasibility(budget), budget, start,
                baseline={"calibration": chosen_metrics, "held_out": held})
        block_report["emulated"] = not block_sparse_kernel_available(next(model.parameters()).device)
    report = {
        "method": "accuracy-budget", **_data_record(config), "holdout": config.holdout,
        "continuation": config.continuation, "budget": budget,
        "chosen": {"attention_removed": round(front[chosen].attention_removed, 4),
                   "estimated_attention_speedup": round(1.0 / (1.0 - front[chosen].attention_removed), 3),
                   "predicted_error": round(front[chosen].predicted_error, 6),
                   "calibration": chosen_metrics,
                   "held_out": held, "held_out_backoffs": backoffs, "meets_budget_held_out": feasible(held)},
        "paper_rule": {"tau": PAPER_TAU, "delta": PAPER_DELTA, "layers": sorted(paper_layers),
                       "attention_removed": round(paper_removed, 4), "calibration": paper, "held_out": paper_held},
        "evaluations": [{k: e[k] for k in ("index", "attention_removed", "predicted_error", "kl", "top1_agreement")}
                        for e in sorted(evaluations, key=lambda e: e["index"])],
        "held_out_evaluations": held_evaluations,
        "layers": layer_table,
        "drift": [round(d, 6) for d in drift],
    }
    if block_report is not None:
        report["block_sparse"] = block_report
    return CalibrationResult(policy=_policy(taus, config, source_model, report, block_layers), drift=drift,
                             report=report)


def _choose_block_sparse(taus, drift, windowed, evaluate, feasible, budget, start, baseline: dict
                         ) -> tuple[list[int], dict]:
    """The most layers (lowest drift first) that can also run the block-sparse kernel within the budget.

    Bisection on the count with end-to-end evaluations of the calibration samples, then a held-out check that
    halves the count until it passes (at most ``_MAX_BACKOFFS`` times). ``baseline`` holds the TSA policy's own
    calibration and held-out metrics (no block-sparse layer), which are not measured again. Returns the layers
    and a report.
    """
    order = [i for i in sorted(range(len(drift)), key=lambda i: drift[i]) if i not in windowed]
    evaluations: dict[int, dict] = {}

    def measured(count: int) -> dict:
        if count not in evaluations:
            evaluations[count] = evaluate(taus, "calibration", set(order[:count]))
        return evaluations[count]

    step = start(f"Adding the block-sparse kernel to up to {len(order)} layers", _MAX_SEARCH_EVALUATIONS)
    count = _bisect(len(order) + 1, lambda n: n == 0 or feasible(measured(n)), step)
    held_feasible = _feasibility(budget, held_out=True)

    def held_out(count: int) -> dict:
        return evaluate(taus, "held_out", set(order[:count])) if count else baseline["held_out"]

    held = held_out(count)
    backoffs = 0
    while count and not held_feasible(held) and backoffs < _MAX_BACKOFFS:
        count, backoffs = count // 2, backoffs + 1
        held = held_out(count)
    layers = sorted(order[:count])
    report = {"order": order, "layers": layers, "held_out": held, "held_out_backoffs": backoffs,
              "calibration": measured(count) if count else baseline["calibration"],
              "evaluations": [{"layers": n, **{k: e[k] for k in ("kl", "top1_agreement", "attention_cost")}}
                              for n, e in sorted(evaluations.items())]}
    return layers, report


def _budget_record(config: CalibrationConfig) -> dict:
    if config.target_speedup is not None:
        return {"kind": "target_speedup", "value": config.target_speedup}
    if config.min_agreement is not None:
        return {"kind": "min_agreement", "value": config.min_agreement}
    return {"kind": "max_kl", "value": DEFAULT_MAX_KL if config.max_kl is None else config.max_kl}


def _feasibility(budget: dict, held_out: bool = False) -> Callable[[dict], bool]:
    """Whether measured metrics meet the budget (``held_out_value``, when set, on held-out samples)."""
    value = budget.get("held_out_value", budget["value"]) if held_out else budget["value"]
    if budget["kind"] == "min_agreement":
        return lambda metrics: metrics["top1_agreement"] >= value
    if budget["kind"] == "max_kl":
        return lambda metrics: metrics["kl"] <= value
    return lambda metrics: True


def _search_kl(front, max_kl: float, measured_kl: Callable[[int], float], step: Callable[[], None] | None) -> int:
    """Sparsest policy of the front whose measured KL is within ``max_kl``.

    Safeguarded regula falsi on the predicted error: the measured KL grows roughly as a power of the predicted
    error, so the next candidate interpolates log KL against log predicted error between the sparsest feasible
    and the densest infeasible policies measured so far, clamped to move at least a quarter of the way into the
    bracket; before any policy is infeasible it extrapolates, by at most ``_MAX_STEP`` in predicted error. Stops when the bracket's savings differ by less than ``_RESOLUTION`` or after
    ``_MAX_SEARCH_EVALUATIONS`` evaluations.
    """
    error = [c.predicted_error for c in front]
    last = len(front) - 1
    seen: dict[int, float] = {0: 0.0}  # the dense policy: KL 0

    def index_for(predicted: float) -> int:
        return max((i for i in range(len(front)) if error[i] <= predicted), default=0)

    feasible, infeasible = 0, None
    candidate = min(last, max(1, index_for(max_kl)))  # first guess: predicted error in nats of KL
    for _ in range(_MAX_SEARCH_EVALUATIONS):
        if candidate in seen:  # only when the front has a single policy
            break
        if step is not None:
            step()
        seen[candidate] = measured_kl(candidate)
        if seen[candidate] <= max_kl:
            feasible = candidate
        else:
            infeasible = candidate
        if infeasible is not None and (infeasible - feasible <= 1 or front[infeasible].attention_removed
                                       - front[feasible].attention_removed < _RESOLUTION):
            break
        candidate = _next_candidate(error, seen, feasible, infeasible, max_kl, last, index_for)
    return feasible


def _next_candidate(error, seen, feasible, infeasible, max_kl, last, index_for) -> int:
    """The next front index to measure (see ``_search_kl``)."""
    if infeasible is None:  # everything measured is feasible: extrapolate from the sparsest point, at most 4x
        if feasible == last:
            return last  # the sparsest policy is within budget: nothing left to search
        ratio = max(seen[feasible], 1e-12) / max(error[feasible], 1e-12)
        guess = index_for(min(max_kl / ratio, _MAX_STEP * max(error[feasible], 1e-12)))
        return guess if guess > feasible else feasible + 1
    high = (math.log(max(error[infeasible], 1e-12)), math.log(max(seen[infeasible], 1e-12)))
    if feasible == 0 or seen[feasible] <= 0:
        target = max_kl * error[infeasible] / max(seen[infeasible], 1e-12)  # proportional through the origin
    else:
        low = (math.log(max(error[feasible], 1e-12)), math.log(seen[feasible]))
        slope = (high[1] - low[1]) / max(high[0] - low[0], 1e-12)
        target = math.exp(low[0] + (math.log(max_kl) - low[1]) / max(slope, 1e-3))
    margin = max(1, (infeasible - feasible) // 4)
    return min(max(index_for(target), feasible + margin), infeasible - margin)


def _bisect(size: int, feasible: Callable[[int], bool], step: Callable[[], None] | None) -> int:
    """Largest index of the front (sparsest policy) judged feasible, by bisection from the dense end (index 0,
    always feasible). At most ``_MAX_SEARCH_EVALUATIONS`` end-to-end evaluations."""
    low, high, used = 0, size - 1, 0

    def check(index: int) -> bool:
        nonlocal used
        used += 1
        if step is not None:
            step()
        return feasible(index)

    if check(high):
        return high
    while high - low > 1 and used < _MAX_SEARCH_EVALUATIONS:
        middle = (low + high) // 2
        if check(middle):
            low = middle
        else:
            high = middle
    return low


def _removed(measurements, taus) -> float:
    total = 0.0
    for m, tau in zip(measurements, taus):
        total += 0.0 if tau == 0 else 1.0 - m.mean_kept(m.taus.index(tau)) ** 2
    return total / len(measurements)

