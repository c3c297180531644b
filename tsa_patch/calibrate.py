"""``calibrate``: measure a model on calibration text and decide, per layer, whether to sparsify and with which tau.

Lifecycle (the model is loaded by the caller; every step is a module of ``tsa_patch.calibration``):

1. validate the knobs and sample calibration and held-out text (``tsa_patch.data``);
2. ``budget`` method (default): measure every layer at every candidate tau in one dense forward per sample
   (``measure``), check each layer alone end to end and rescale its estimates (``layer_check``; with
   ``block_sparse``, each layer alone on the block-sparse kernel too, which becomes one more option of that layer),
   build the predicted Pareto front of per-layer policies (``front``), measure candidates end to end as users
   experience them (TSA prefill, dense continuation, against dense, on natural continuations, on long-range recall
   probes and on word-counting aggregation probes, the worst counting; ``endtoend``), search the front for the
   sparsest policy within the budget (``search``), verify it on held-out samples and back off if it misses. The
   paper's rule is measured on the same samples for comparison (``report``).
3. ``drift`` method: the paper's rule: layers at or below the ``delta`` quantile of inter-layer representation
   drift go sparse, all with one ``tau`` (``drift``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tsa_patch import __version__
from tsa_patch.calibration.budget import DEFAULT_MAX_KL, Budget
from tsa_patch.calibration.endtoend import RECALL_CUE
from tsa_patch.calibration.measure import TAU_GRID
from tsa_patch.data import DEFAULT_CALIBRATION_DATA, DataSourceError, load_documents, token_samples
from tsa_patch.errors import DataError, PolicyError
from tsa_patch.kernels.policy import CONFIG_KEY, POLICY_KNOBS, LayerPolicy, TsaPolicy, knob_defaults

if TYPE_CHECKING:
    import torch

# Calibration sequences must be long enough for TSA to engage yet always bounded (untruncated samples are
# the peers' most common out-of-memory cause).
MAX_SEQ_LEN = 131072
METHODS = ("budget", "drift")
# The paper's rule, evaluated next to every budget calibration for comparison.
PAPER_TAU, PAPER_DELTA = 0.005, 0.5
# Where no timing on a CUDA GPU decides it, TSA engages from this prompt length: the longest per-layer crossover
# measured on an H200 (benchmarks/README.md, 2026-12-02: the real Qwen2.5-Coder-0.5B TSA layers engage from 12,288
# or 16,384, its export with every layer engaged ran x0.89 at 8K, x1.02 at 12K, x1.06 at 16K; one
# Llama-3.1-8B-shaped TSA layer x0.93 at 8K, x1.66 at 16K).
CONSERVATIVE_ACTIVATION_LENGTH = 16384
# Keys just before each query that a kept-keys layer always attends to, calibration's default with rows "all": the
# paper's window (its last queries score the tokens; here each query keeps its own neighbourhood).
DEFAULT_LOCAL_KEYS = 128
_KNOBS = knob_defaults()

__all__ = ["DEFAULT_MAX_KL", "CalibrationConfig", "CalibrationResult", "calibrate"]


@dataclass(frozen=True)
class CalibrationConfig:
    """Knobs of a calibration run.

    Args:
        data: corpus name, local file/folder, or ``datasets`` id (see ``tsa_patch.data``).
        samples: calibration sequences.
        seq_len: prompt tokens per sequence, at most the model's context and ``MAX_SEQ_LEN``.
        seed: data sampling seed; the same seed gives the same policy.
        method: "budget" (accuracy-budget search) or "drift" (the paper's rule).
        max_kl: budget: mean KL(dense || TSA) over the continuation tokens, in nats, on natural continuations,
            long-range recall probes and aggregation probes alike.
        min_agreement: budget: top-1 agreement with dense over the continuation tokens (every kind), in [0, 1].
        target_speedup: instead of a budget: the estimated whole-model attention speedup to reach with the
            least error.
        match_paper: budget: ``max_kl`` = the KL the paper's rule (delta 0.5, tau 0.005) measures on the same
            calibration samples: the paper's accuracy, with as much sparsity as the measurements allow.
            With none of these four, ``max_kl = DEFAULT_MAX_KL``.
        holdout: held-out sequences that verify the chosen policy.
        continuation: tokens after each prompt, decoded densely over the TSA-prefilled cache and compared.
        tau, delta: the drift method's tau and drift quantile (paper: 0.005, 0.5).
        taus: budget: the coverage thresholds measured in every layer, each one an option of the front (dense
            always is one too).
        check_layers: budget: run each layer alone, sparse at the reference taus, end to end, and rescale its
            error estimates by what it measured (``calibration.layer_check``); False keeps the residual estimates.
        block_sparse: budget: the block-sparse kernel alone is one more option of every layer, next to its taus:
            each layer is run alone on it, end to end, and the front chooses per layer between dense, TSA at a tau
            and the block-sparse kernel. Without CUDA the block selection is emulated in PyTorch while measuring.
        activation_length: prompts shorter than this run dense. None (the default): the paper's
            ``min_tokens + window + 1`` for the drift method; for the budget method, per layer, the shortest length
            from which that sparse layer's device time, timed against dense on this machine, is never above
            dense's, raised past any length where the whole model's prefill was not 2 % faster (on CUDA,
            ``calibration.speed``), or ``CONSERVATIVE_ACTIVATION_LENGTH`` without a CUDA GPU (CPU timings say
            nothing about a GPU's); then checked end to end at every length it serves below ``seq_len``, a layer
            raised past a length where the policy so served misses the budget (``calibration.served``).
        window ... block_js_threshold: the policy's other knobs (``kernels.policy.POLICY_KNOBS``, same defaults as
            ``TsaPolicy`` but ``rows``, see ``rows_mode``, and ``local_keys``: unset, ``DEFAULT_LOCAL_KEYS`` where
            every query row is computed, 0 where the paper's compression drops rows), copied into the policy.
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
    taus: tuple[float, ...] = TAU_GRID
    check_layers: bool = True
    block_sparse: bool = False
    window: int = _KNOBS["window"]
    pool_kernel: int = _KNOBS["pool_kernel"]
    min_tokens: int = _KNOBS["min_tokens"]
    activation_length: int | None = None
    selection: str = _KNOBS["selection"]
    coverage: str = _KNOBS["coverage"]
    rows: str | None = None
    local_keys: int | None = None
    dense_backend: str = _KNOBS["dense_backend"]
    block_size: int = _KNOBS["block_size"]
    block_gamma: float = _KNOBS["block_gamma"]
    block_min_budget: int = _KNOBS["block_min_budget"]
    block_js_threshold: float = _KNOBS["block_js_threshold"]

    def policy_options(self, **knobs) -> dict:
        """The policy knobs, as keyword arguments of ``TsaPolicy`` (``knobs`` override them); an activation length
        left to calibration is the paper's while it measures."""
        options = {name: getattr(self, name) for name in POLICY_KNOBS}
        options["activation_length"] = options["activation_length"] or self.paper_activation_length()
        options["rows"] = self.rows_mode()
        options = {**options, **knobs}
        if options["local_keys"] is None:  # unset: by the rows finally computed
            options["local_keys"] = DEFAULT_LOCAL_KEYS if options["rows"] == "all" else 0
        return options

    def rows_mode(self) -> str:
        """``rows``; unset: "all" for the budget method (at the same savings it measured more accurate than the
        paper's compression on both models here, README "Measured results"), the paper's "kept" for its drift
        rule."""
        return self.rows or ("all" if self.method == "budget" else "kept")

    def paper_activation_length(self) -> int:
        """The authors sparsify prompts longer than ``min_tokens + window``."""
        return self.min_tokens + self.window + 1

    def data_record(self) -> dict:
        return {"data": self.data, "samples": self.samples, "seq_len": self.seq_len, "seed": self.seed}


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
        return _accuracy_budget(model, tokenizer, config, samples, source_model, start)
    finally:
        model.set_attn_implementation(previous)
        if not had_policy and hasattr(model.config, CONFIG_KEY):
            delattr(model.config, CONFIG_KEY)


def _validate(model, config: CalibrationConfig) -> None:
    context = getattr(model.config, "max_position_embeddings", MAX_SEQ_LEN)
    budget_method = config.method == "budget"
    limit = min(context, MAX_SEQ_LEN) - (config.continuation if budget_method else 0)
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
    if config.block_sparse and (not budget_method or config.target_speedup is not None):
        raise PolicyError("--block-sparse needs the budget method with --max-kl, --min-agreement or --match-paper.")
    if not config.taus or len(set(config.taus)) < len(config.taus) or not all(0.0 < t < 1.0 for t in config.taus):
        raise PolicyError(f"--taus must be distinct values in (0, 1), e.g. 0.005,0.02,0.2; got "
                          f"{','.join(f'{t:g}' for t in config.taus)}.")
    if not budget_method and tuple(config.taus) != TAU_GRID:
        raise PolicyError("--taus is for the budget method; --method drift sparsifies its layers at one --tau.")
    if PAPER_TAU not in config.taus:  # measured in every layer for the paper's rule, and by the layer check
        raise PolicyError(f"--taus must include the paper's tau {PAPER_TAU}: the paper's rule is measured beside "
                          "every calibration.")
    if budget_method and (config.holdout < 1 or config.continuation < 1):
        raise DataError("--holdout and --continuation must be at least 1 for the budget method.")
    if budget_method and config.seq_len <= config.window:
        raise DataError(f"--seq-len must exceed the window ({config.window}) for TSA to engage.")
    if budget_method and config.seq_len < 4 * (RECALL_CUE + config.continuation):
        raise DataError(f"--seq-len must be at least {4 * (RECALL_CUE + config.continuation)} (4 x (cue + "
                        "--continuation)) for the long-range recall probes.")
    try:  # validate the policy knobs before spending minutes on forwards
        TsaPolicy.uniform(model.config.num_hidden_layers, config.tau, **config.policy_options())
    except ValueError as err:
        raise PolicyError(str(err)) from None


def _policy(taus, config: CalibrationConfig, source_model, provenance: dict, block_layers=(),
            layer_activation: dict[int, int] | None = None, **knobs) -> TsaPolicy:
    """The policy of per-layer ``taus``, the block-sparse kernel in ``block_layers``, and a layer's own activation
    length where ``layer_activation`` gives one."""
    own = layer_activation or {}
    layers = tuple(LayerPolicy(enabled=tau > 0, tau=tau, kernel="block_sparse" if i in block_layers else "dense",
                               activation_length=own.get(i)) for i, tau in enumerate(taus))
    return TsaPolicy(layers=layers, tool_version=__version__, source_model=source_model, calibration=provenance,
                     **config.policy_options(**knobs))


def _windowed(model, config: CalibrationConfig) -> set[int]:
    from tsa_patch.models import windowed_layers

    return windowed_layers(model.config.to_dict(), config.seq_len)


def _drift_rule(model, config, samples, source_model, start) -> CalibrationResult:
    from tsa_patch.calibration.drift import drift_rule_layers, representation_drift  # imports torch

    drift = representation_drift(model, samples, on_sample=start(f"Measuring representation drift on "
                                                                 f"{len(samples)} x {config.seq_len} tokens", len(samples)))
    chosen = set(drift_rule_layers(drift, config.delta)) - _windowed(model, config)
    taus = [config.tau if i in chosen else 0.0 for i in range(len(drift))]
    provenance = {"method": "representation-drift", **config.data_record(), "tau": config.tau,
                  "delta": config.delta, "drift": [round(d, 6) for d in drift]}
    return CalibrationResult(policy=_policy(taus, config, source_model, provenance), drift=drift)  # paper's knobs


def _accuracy_budget(model, tokenizer, config: CalibrationConfig, samples, source_model, start) -> CalibrationResult:
    from tsa_patch.calibration.drift import DriftRecorder, recording_drift
    from tsa_patch.calibration.endtoend import EndToEnd
    from tsa_patch.calibration.front import attention_removed, pareto_policies
    from tsa_patch.calibration.measure import measuring, new_measurements

    calibration, held_out = samples[: config.samples], samples[config.samples :]
    template = TsaPolicy.uniform(model.config.num_hidden_layers, 0.0, **config.policy_options())
    measurements = new_measurements(model.config.num_hidden_layers, tuple(sorted(config.taus)), config.rows_mode())
    drift_recorder = DriftRecorder(model.config.num_hidden_layers)

    @contextlib.contextmanager
    def measured_prefill():  # the per-layer measurement and the drift ride on the dense calibration prefills
        with recording_drift(model, drift_recorder), measuring(model, measurements, template):
            yield

    try:
        judge = EndToEnd(model, {"calibration": calibration, "held_out": held_out}, config.seq_len, tokenizer,
                         config.seed, lambda taus, blocks, **knobs: _policy(taus, config, source_model, {}, blocks,
                                                                            **knobs), start, measure=measured_prefill)
    except ValueError as err:  # the text cannot make a probe (no words to count)
        raise DataError(str(err)) from None
    drift = drift_recorder.mean()
    layer_check = _check_layers(measurements, judge, start) if config.check_layers else None
    block_check = _check_block_sparse(model, measurements, judge, start) if config.block_sparse else None
    pricing = None
    if config.activation_length is None:  # timed on a GPU: the front values what each layer saves in time
        pricing = _time_prices(model, config, measurements, calibration[0],
                               lambda taus, blocks: _policy(taus, config, source_model, {}, blocks), start)
    front = pareto_policies(measurements, pricing and pricing["models"])
    if pricing is not None:
        pricing["applied"] = len(front) > 1
        if not pricing["applied"]:  # nothing saves time at seq_len: FLOPs choose for the longer prompts served
            front = pareto_policies(measurements)
    report = _search(model, config, measurements, front, drift, judge, start)
    report.layer_check = layer_check
    if pricing is not None:
        report.pricing = {**pricing, "models": {kernel: m.to_dict() for kernel, m in pricing["models"].items()}}
    taus, block_layers = report.chosen.candidate.taus, report.chosen.candidate.block_layers
    if block_check is not None:
        report.block_sparse = {**block_check, "layers": list(block_layers)}
    activation, own = config.activation_length, {}
    sparse = [i for i, tau in enumerate(taus) if tau > 0 or i in block_layers]
    if activation is None:
        del judge  # its stored traces make room for the checks below
        report.speed = _speed(model, config, lambda own: _policy(taus, config, source_model, {}, block_layers, own),
                              calibration[0], start)
        activation = report.speed["activation_length"]
        own = {int(i): n for i, n in report.speed.get("layer_activation", {}).items()}
        served = {i: own.get(i, activation) for i in sparse}
        guarded, report.served = _check_served(
            model, tokenizer, config, calibration, report.budget, taus, block_layers, served,
            lambda taus, blocks, own: _policy(taus, config, source_model, {}, blocks, own), start)
        if guarded != served:
            own, activation = guarded, min(guarded.values())
    report = report.to_dict()
    engaged = [i for i in sparse if own.get(i, activation) <= config.seq_len]
    report["chosen"]["served_at_seq_len"] = {  # the layers that engage at seq_len: the others run dense there
        "layers": engaged, "attention_removed": round(
            attention_removed(measurements, taus, block_layers=block_layers, engaged=set(engaged)), 4)}
    policy = _policy(taus, config, source_model, report, block_layers, own, activation_length=activation)
    return CalibrationResult(policy=policy, drift=drift, report=report)


def _check_layers(measurements, judge, start) -> list[dict]:
    """Every measured layer alone, end to end at the reference taus; its estimates rescaled in place."""
    from tsa_patch.calibration.layer_check import REFERENCE_TAUS, check_layers_end_to_end

    num_layers = len(measurements)

    def layer_kl(layer: int, tau: float) -> float:
        return judge.metrics([tau if i == layer else 0.0 for i in range(num_layers)], "calibration")["kl"]

    measured = sum(1 for m in measurements if m.samples)
    step = start(f"Checking each layer alone end to end (tau {', '.join(map(str, REFERENCE_TAUS))})",
                 measured * len(REFERENCE_TAUS))
    return check_layers_end_to_end(measurements, layer_kl, step)


def _check_block_sparse(model, measurements, judge, start) -> dict:
    """Every measured layer alone on the block-sparse kernel, end to end: its option on the front (in place)."""
    from tsa_patch.calibration.layer_check import check_block_sparse_end_to_end
    from tsa_patch.kernels.attention import block_sparse_kernel_available

    num_layers = len(measurements)
    dense = [0.0] * num_layers

    def layer_block(layer: int) -> tuple[float, float]:
        metrics = judge.metrics(dense, "calibration", {layer})
        # the attention cost is the mean over layers, every other layer computing all of its attention
        return metrics["kl"], min(1.0, max(0.0, 1.0 - num_layers * (1.0 - metrics["attention_cost"])))

    step = start("Checking each layer alone on the block-sparse kernel end to end",
                 sum(1 for m in measurements if m.samples))
    checks = check_block_sparse_end_to_end(measurements, layer_block, step)
    return {"checks": checks, "emulated": not block_sparse_kernel_available(next(model.parameters()).device)}


def _time_prices(model, config: CalibrationConfig, measurements, sample: list[int],
                 make_policy: Callable[[list[float], tuple[int, ...]], TsaPolicy], start) -> dict | None:
    """On CUDA, the time models that price the front (``speed.pricing_policies``, ``speed.time_models``) with the
    card's name; None elsewhere (a CPU's timings say nothing about a GPU's) or when no kernel's line could be fitted."""
    import torch

    from tsa_patch.calibration.speed import pricing_policies, time_models

    device = next(model.parameters()).device
    if device.type != "cuda" or not any(m.samples for m in measurements):
        return None
    policies = pricing_policies(measurements, make_policy)
    step = start(f"Timing every layer against dense at {config.seq_len} tokens to price the front", len(policies))
    models, points = time_models(model, sample, policies, config.seq_len, step)
    if not models:
        return None
    return {"device": torch.cuda.get_device_name(device), "length": config.seq_len, "models": models,
            "points": points}


def _speed(model, config: CalibrationConfig, make_policy: Callable[[dict | None], TsaPolicy], sample: list[int],
           start) -> dict:
    """On CUDA, time the sparse layers against dense at a ladder of lengths and take each layer's activation length
    from its own device times, then time the whole model's prefill so engaged against dense and raise every layer
    past any length where it is not ``MIN_PREFILL_GAIN`` faster (the policy's activation length is the shortest of
    the layers'); elsewhere the conservative default (a CPU's timings say nothing about a GPU's).
    ``make_policy(layer_activation)`` gives the chosen policy with those per-layer activation lengths."""
    import torch

    from tsa_patch.calibration.speed import (MIN_PREFILL_GAIN, activation_from, ladder, layer_activations,
                                             measure_speed, prefill_floor, time_prefills)

    device = next(model.parameters()).device
    if device.type != "cuda":
        return {"device": "cpu", "activation_length": CONSERVATIVE_ACTIVATION_LENGTH,
                "rule": "conservative default: no CUDA GPU to time the sparse layers on"}
    lengths = ladder(config.seq_len)
    policy = make_policy(None)
    step = start(f"Timing the sparse layers and the model against dense at {len(lengths)} lengths", 1)
    speed = {"lengths": lengths, "dense_ms": [], "tsa_ms": [], "layers": {}}
    if policy.sparse_layers or policy.block_sparse_layers:
        speed = measure_speed(model, sample, policy, lengths)
    measured = activation_from(speed) if speed["tsa_ms"] else None  # the layers together, for the record
    own = layer_activations(speed, config.seq_len)
    prefills, floor = None, None
    if own:
        prefills = time_prefills(model, sample, make_policy(own), lengths)
        floor = prefill_floor(prefills, config.seq_len)
        if floor is not None:
            own = {i: max(n, floor) for i, n in own.items()}
    if step is not None:
        step()
    return {**speed, "device": torch.cuda.get_device_name(device), "measured_activation_length": measured,
            "prefills": prefills, "prefill_floor": floor, "min_prefill_gain": MIN_PREFILL_GAIN,
            "layer_activation": {str(i): n for i, n in sorted(own.items())},
            "activation_length": min(own.values(), default=config.seq_len + 1),
            "rule": "per layer: the shortest ladder length from which the layer's device time is never above "
                    f"dense; raised past any length where the whole model's prefill so engaged was not "
                    f"{MIN_PREFILL_GAIN:.0%} faster"}


def _check_served(model, tokenizer, config: CalibrationConfig, calibration, budget, taus, block_layers,
                  activation: dict[int, int], make_policy: Callable[..., TsaPolicy], start
                  ) -> tuple[dict[int, int], list[dict]]:
    """The chosen policy (``taus``, ``block_layers``) end to end on the calibration samples cut to every length it
    serves below ``seq_len``, each layer engaged from its ``activation`` length; layers engaged where it misses
    ``budget`` are raised (``calibration.served``). ``make_policy(taus, block_layers, activation)`` gives a policy
    with those per-layer activation lengths."""
    from tsa_patch.calibration.endtoend import EndToEnd
    from tsa_patch.calibration.served import guard_served_lengths, served_lengths

    lengths = served_lengths(activation, config.seq_len)
    step = start(f"Checking the policy end to end at the lengths it serves ({', '.join(map(str, lengths))})",
                 len(lengths)) if lengths else None
    def measure(length: int, current: dict[int, int]) -> dict:
        texts = [ids[: length + config.continuation] for ids in calibration]
        judge = EndToEnd(model, {"calibration": texts}, length, tokenizer, config.seed,
                         lambda t, blocks, **knobs: make_policy(t, blocks, current), lambda description, total: None)
        metrics = judge.metrics(taus, "calibration", block_layers)
        if step is not None:
            step()
        return {**{k: metrics[k] for k in ("kl", "top1_agreement", "attention_cost")}, "met": budget.met(metrics)}

    return guard_served_lengths(activation, config.seq_len, measure)


def _search(model, config: CalibrationConfig, measurements, front, drift, judge, start):
    """Search the front within the budget, check on held-out samples, and measure the paper's rule beside it."""
    from tsa_patch.calibration.drift import drift_rule_layers
    from tsa_patch.calibration.front import attention_removed
    from tsa_patch.calibration.report import CalibrationReport, Chosen, PaperRule
    from tsa_patch.calibration.search import MAX_SEARCH_EVALUATIONS, back_off, search_front

    paper_layers = sorted(set(drift_rule_layers(drift, PAPER_DELTA)) - _windowed(model, config))
    paper_taus = [PAPER_TAU if i in paper_layers else 0.0 for i in range(len(drift))]
    paper_knobs = dict(coverage="paper", rows="kept", local_keys=0,
                       activation_length=config.paper_activation_length())  # the authors' rule
    paper = PaperRule(tau=PAPER_TAU, delta=PAPER_DELTA, layers=paper_layers,
                      attention_removed=attention_removed(measurements, paper_taus, rows="kept"),
                      calibration=judge.metrics(paper_taus, "calibration", **paper_knobs), held_out={})
    budget = (Budget.matching(paper.calibration["kl"]) if config.match_paper
              else Budget.from_options(config.max_kl, config.min_agreement, config.target_speedup))
    evaluations: dict[int, dict] = {}

    def measure(index: int) -> dict:
        """Calibration metrics of front[index], measured once."""
        if index not in evaluations:
            candidate = front[index]
            evaluations[index] = {"index": index, "taus": list(candidate.taus),
                                  "block_layers": list(candidate.block_layers),
                                  "predicted_error": round(candidate.predicted_error, 6),
                                  "attention_removed": round(candidate.attention_removed, 4),
                                  **judge.metrics(candidate.taus, "calibration", candidate.block_layers)}
        return evaluations[index]

    search_step = start("Searching the accuracy/savings front end to end", MAX_SEARCH_EVALUATIONS)
    chosen = search_front(front, budget, measure, config.seq_len, search_step)
    paper.held_out = judge.metrics(paper_taus, "held_out", **paper_knobs)
    if config.match_paper:  # equal accuracy means equal on the held-out text too, not the calibration text's KL
        budget = budget.with_held_out(paper.held_out["kl"])
    chosen, held, held_evaluations = back_off(front, chosen, budget,
                                              lambda i: judge.metrics(front[i].taus, "held_out", front[i].block_layers))
    calibration_metrics = measure(chosen) if chosen else {"kl": 0.0, "top1_agreement": 1.0, "attention_cost": 1.0}
    return CalibrationReport(
        data=config.data_record(), holdout=config.holdout, continuation=config.continuation, budget=budget,
        chosen=Chosen(candidate=front[chosen], calibration=calibration_metrics, held_out=held,
                      held_out_backoffs=len(held_evaluations) - 1, meets_budget_held_out=budget.met(held, True)),
        paper_rule=paper, evaluations=list(evaluations.values()), held_out_evaluations=held_evaluations,
        measurements=measurements, drift=drift)
