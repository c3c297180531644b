"""Speed of Token Sparse Attention against dense SDPA on a CUDA GPU.

Two measurements, both against every dense SDPA backend on the same card in the same run:

- ``bench_layer``: one attention layer at a stated kept fraction, TSA split into its stages (score, select,
  compress, attend, decompress), plus peak memory;
- ``bench_prefill``: a whole model's prefill (random weights: speed does not depend on their values), dense
  versus TSA with a stated kept fraction in the sparse layers.

Random weights give diffuse attention, so Dynamic Token Coverage would keep almost everything; the kept
fraction is therefore forced (``keep_fraction``) to the operating point being measured. The default operating
point is the paper's: about 17 % of tokens dropped at 4K rising to 54 % at 128K inside sparse layers (the paper
gives only those two ends; lengths between are interpolated in log2 of the length), half the layers sparse.
Timers synchronise through CUDA events, discard warm-up runs, and report the median with p20/p80.
"""

from __future__ import annotations

import datetime
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib.metadata import version

import torch

from tsa_patch.calibrate import PAPER_TAU  # not applied (the kept fraction is forced); its coverage count still runs
from tsa_patch.kernels.dense import causal_attention, sdpa_backend
from tsa_patch.kernels.policy import TsaPolicy, knob_defaults
from tsa_patch.kernels.reference import query_rows
from tsa_patch.kernels.tsa import STAGES, token_scores, tsa_attention, tsa_attention_sync_free


# Attention shapes (and whole-model configs) of the models benchmarks refer to.
MODEL_CONFIGS = {
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
                         rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=131072,
                         rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
}
# Benchmark name -> policy dense_backend name (tsa_patch/kernels/dense.py).
DENSE_BACKENDS = {"sdpa-cudnn": "cudnn", "sdpa-flash": "flash", "sdpa-efficient": "efficient"}
# The paper's TSA defaults (window 128, pooling 7, at least 1024 kept tokens): TsaPolicy's own defaults.
_DEFAULTS = knob_defaults()


def paper_kept_fraction(seq_len: int) -> float:
    """Kept fraction of tokens inside sparse layers at the paper's operating point (tau = 0.005).

    The paper reports ~17 % dropped at 4K and ~54 % at 128K; between them this interpolates in log2(length),
    and it clamps outside.
    """
    position = min(1.0, max(0.0, math.log2(seq_len / 4096) / math.log2(131072 / 4096)))
    return 1.0 - (0.17 + position * (0.54 - 0.17))


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call over ``runs`` timed calls (after warm-up)."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    runs: int


# Spin cycles queued ahead of a timed call with ``busy_ahead`` (about 5 ms at an H100's or H200's clock): more than
# the host needs to launch one sparse layer's kernels.
_BUSY_CYCLES = 10_000_000


def time_cuda(fn: Callable[[], object], budget_s: float = 1.0, min_runs: int = 3, max_runs: int = 50,
              device: torch.device | None = None, busy_ahead: bool = False) -> Timing:
    """Time ``fn`` with CUDA events: one untimed warm-up call (compilation, autotuning, allocator), then timed
    runs until ``budget_s`` is spent (between ``min_runs`` and ``max_runs``). Without CUDA, or for work on a
    ``device`` that is not a GPU, the wall clock (on a CPU such times say nothing about a GPU).

    ``busy_ahead``: before each run a spin kernel keeps the GPU busy while the host launches ``fn``'s kernels, so
    the time is ``fn``'s device time with its launches hidden, as inside a long prefill whose earlier layers keep
    the GPU busy (a host sync inside ``fn`` still exposes the launches after it)."""
    cuda = torch.cuda.is_available() if device is None else device.type == "cuda"
    fn()
    if cuda:
        torch.cuda.synchronize()
    times: list[float] = []
    while len(times) < max_runs and (len(times) < min_runs or sum(times) < budget_s * 1000):
        if not cuda:
            begin = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - begin))
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if busy_ahead:
            torch.cuda._sleep(_BUSY_CYCLES)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    runs = len(times)
    quantiles = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
    return Timing(median_ms=statistics.median(times), p20_ms=quantiles[0], p80_ms=quantiles[3], runs=runs)


def _peak_mib(fn: Callable[[], object]) -> float:
    """Peak memory allocated while ``fn`` runs, beyond what was allocated before it, in MiB (0 without CUDA)."""
    if not torch.cuda.is_available():
        return 0.0
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    del result
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bench_layer(model: str, seq_len: int, kept_fraction: float, selection: str = "query_head",
                dtype: torch.dtype = torch.bfloat16, device: str = "cuda") -> dict:
    """One attention layer (batch 1, causal prefill): every dense SDPA backend, and TSA on both of its paths (the
    synced one on compact copies with cuDNN, the sync-free one), stage by stage, plus the sync-free path replayed
    from a CUDA graph (what capturing a fixed-length prefill gives).

    ``kept_fraction`` is the fraction of the ``seq_len - window`` candidates each head keeps (the window is always
    kept too). Returns times in ms, peak memory in MiB, and speedups against dense cuDNN.
    """
    config = MODEL_CONFIGS[model]
    heads, kv_heads, head_dim = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    q = torch.randn(heads, seq_len, head_dim, device=device, dtype=dtype)
    k = torch.randn(kv_heads, seq_len, head_dim, device=device, dtype=dtype)
    v = torch.randn(kv_heads, seq_len, head_dim, device=device, dtype=dtype)
    row = {"model": model, "seq_len": seq_len, "kept_fraction": kept_fraction, "selection": selection,
           "dtype": str(dtype).replace("torch.", ""), "dense": _time_dense_backends(q, k, v)}
    dense_ms = row["dense"]["sdpa-cudnn"]["median_ms"]
    options = dict(tau=PAPER_TAU, window=_DEFAULTS["window"], pool_kernel=_DEFAULTS["pool_kernel"],
                   min_tokens=_DEFAULTS["min_tokens"], selection=selection, scaling=head_dim**-0.5,
                   keep_fraction=kept_fraction, backend="triton")
    with sdpa_backend("auto", q.device):  # TSA runs with the product's default dense kernel order
        synced = _time_synced(q, k, v, options)
        sync_free = _time_sync_free(q, k, v, options)
    kept_total = synced.pop("kept_tokens") / seq_len
    # the runtime's path in eager mode is the synced one (the sync-free path runs under CUDA-graph capture)
    row.update(synced=synced, sync_free=sync_free, runtime_path="synced", tsa=synced["total"],
               kept_tokens=round(kept_total * seq_len), ideal_speedup=1.0 / kept_total**2,
               speedup=dense_ms / synced["total"]["median_ms"],
               overhead_ms=synced["overhead_ms"], overhead_pct_of_dense=100.0 * synced["overhead_ms"] / dense_ms,
               best_path=min(("synced", "sync_free"), key=lambda n: row_total(n, synced, sync_free)),
               dense_tflops=_causal_flops(heads, seq_len, head_dim) / dense_ms / 1e9)
    row["fraction_of_ideal"] = row["speedup"] / row["ideal_speedup"]
    row["extra_peak_mib_vs_dense"] = synced["total"]["peak_mib"] - row["dense"]["sdpa-cudnn"]["peak_mib"]
    return row


def row_total(name: str, synced: dict, sync_free: dict) -> float:
    return (synced if name == "synced" else sync_free)["total"]["median_ms"]


def _time_dense_backends(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict:
    """Every dense SDPA backend on one causal prefill; a backend without native GQA gets K/V expanded beforehand,
    outside the timing (as the paper times its baseline), and the result says which form ran."""
    group = q.shape[0] // k.shape[0]
    results = {}
    for name, backend in DENSE_BACKENDS.items():
        for expanded in (False, True):
            key, value = (k, v) if not expanded else (k.repeat_interleave(group, 0), v.repeat_interleave(group, 0))

            def dense(backend=backend, key=key, value=value):
                with sdpa_backend(backend, q.device):
                    return causal_attention(q, key, value, q.shape[-1] ** -0.5)
            try:
                results[name] = {**asdict(time_cuda(dense)), "peak_mib": _peak_mib(dense), "expanded_kv": expanded}
                break
            except RuntimeError as err:  # this backend does not run these inputs on this card
                results[name] = {"error": str(err).splitlines()[0][:200], "expanded_kv": expanded}
            finally:
                del key, value
    return results


def _time_synced(q, k, v, options: dict) -> dict:
    """TSA reading the kept count back once: each stage on the previous stage's real outputs, and the whole."""
    stages = STAGES["triton"]
    seq_len = q.shape[1]
    scores = stages.score(q, k, options["window"], options["scaling"])  # (Hq, C)
    pooled = token_scores(q, k, **{n: options[n] for n in ("window", "pool_kernel", "selection", "scaling")},
                          backend="triton")
    keep = round(options["keep_fraction"] * pooled.shape[1])

    def select():  # the selection and the one host sync that sizes the compact copies
        kept, count = stages.select(pooled, seq_len, options["tau"], options["min_tokens"], keep=keep)
        return kept[:, : int(count[0])]
    kept = select()
    rows = query_rows(kept, q.shape[0], seq_len, seq_len)
    q_c, k_c, v_c = stages.compress(q, k, v, kept, rows)
    out_c = causal_attention(q_c, k_c, v_c, options["scaling"])
    timed = {
        "score": lambda: stages.score(q, k, options["window"], options["scaling"]),
        "smooth": lambda: stages.smooth(scores, options["pool_kernel"]),
        "select": select,
        "compress": lambda: stages.compress(q, k, v, kept, rows),
        "attend": lambda: causal_attention(q_c, k_c, v_c, options["scaling"]),
        "decompress": lambda: stages.decompress(out_c, rows, seq_len),
    }
    result = {"stages": {name: asdict(time_cuda(fn)) for name, fn in timed.items()}, "kept_tokens": kept.shape[1]}
    del q_c, k_c, v_c, out_c

    def whole():
        return tsa_attention(q, k, v, **options)
    result["total"] = {**asdict(time_cuda(whole)), "peak_mib": _peak_mib(whole)}
    result["overhead_ms"] = result["total"]["median_ms"] - result["stages"]["attend"]["median_ms"]
    result["attend_tflops"] = _causal_flops(q.shape[0], kept.shape[1], q.shape[2]) / \
        result["stages"]["attend"]["median_ms"] / 1e9
    return result


def _time_sync_free(q, k, v, options: dict) -> dict:
    """TSA without a host sync: its stages, the whole, and the whole replayed from a CUDA graph."""
    stages = STAGES["triton"]
    seq_len = q.shape[1]
    pooled = token_scores(q, k, **{n: options[n] for n in ("window", "pool_kernel", "selection", "scaling")},
                          backend="triton")
    keep = round(options["keep_fraction"] * pooled.shape[1])
    kept, count = stages.select(pooled, seq_len, options["tau"], options["min_tokens"], keep=keep)
    timed = {
        "select": lambda: stages.select(pooled, seq_len, options["tau"], options["min_tokens"], keep=keep),
        "attend_gathered": lambda: stages.gathered(q, k, v, kept, count, options["scaling"], None),
    }
    result = {"stages": {name: asdict(time_cuda(fn)) for name, fn in timed.items()}}

    def whole():
        return tsa_attention_sync_free(q, k, v, **options)
    result["total"] = {**asdict(time_cuda(whole)), "peak_mib": _peak_mib(whole)}
    result["overhead_ms"] = result["total"]["median_ms"] - result["stages"]["attend_gathered"]["median_ms"]
    result["cuda_graph"] = time_cuda_graph(whole)
    return result


def time_cuda_graph(fn: Callable[[], object]) -> dict:
    """``fn`` captured once in a CUDA graph, then its replays timed (launch overhead gone); or why it failed."""
    if not torch.cuda.is_available():
        return {"error": "no CUDA"}
    try:
        fn()  # warm-up outside the capture: compilation and autotuning
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return asdict(time_cuda(graph.replay))
    except Exception as err:  # noqa: BLE001 - the benchmark records why the capture failed
        return {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}


def _causal_flops(heads: int, length: float, head_dim: int) -> float:
    """FLOPs of causal attention: two matmuls of 2 L^2 D each, halved by causality."""
    return 2 * 2 * heads * length * length * head_dim / 2


def bench_prefill(model: str, seq_len: int, kept_fraction: float, sparse_layers: list[int] | None = None,
                  dtype: torch.dtype = torch.bfloat16, device: str = "cuda") -> dict:
    """Whole-model prefill (random weights, batch 1, no KV cache kept) against both baselines: dense as users run
    the original model (SDPA's default backend order), and dense with the kernel TSA's dense parts use (cuDNN
    first: the honest TSA gain); TSA with ``kept_fraction`` in ``sparse_layers`` (default: the second half of the
    layers, the paper's choice for Llama-3.1-8B), run as an export runs it (SDPA's order set once per forward)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tsa_patch.models import apply_policy_

    config = LlamaConfig(**MODEL_CONFIGS[model])
    layers = config.num_hidden_layers
    sparse_layers = list(range(layers // 2, layers)) if sparse_layers is None else sparse_layers
    torch.manual_seed(0)
    with torch.device(device):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            net = LlamaForCausalLM(config).eval()
        finally:
            torch.set_default_dtype(previous)
    ids = torch.randint(0, config.vocab_size, (1, seq_len), device=device)

    def forward(**kwargs):
        with torch.no_grad():
            return net(ids, use_cache=False, logits_to_keep=1, **kwargs).logits

    row = {"model": model, "seq_len": seq_len, "kept_fraction": kept_fraction, "sparse_layers": sparse_layers,
           "dtype": str(dtype).replace("torch.", "")}
    net.set_attn_implementation("sdpa")
    row["dense-default"] = asdict(time_cuda(forward, budget_s=3.0, min_runs=2))
    with sdpa_backend("auto", torch.device(device)):  # cuDNN first
        row["dense-cudnn"] = asdict(time_cuda(forward, budget_s=3.0, min_runs=2))
        policy = TsaPolicy.uniform(layers, PAPER_TAU, sparse_layers, window=_DEFAULTS["window"],
                                   min_tokens=_DEFAULTS["min_tokens"], activation_length=_DEFAULTS["window"] + 1)
        apply_policy_(net, policy)
        row["tsa"] = asdict(time_cuda(lambda: forward(tsa_keep_fraction=kept_fraction), budget_s=3.0, min_runs=2))
        row["tsa-sync-free"] = asdict(time_cuda(lambda: forward(tsa_keep_fraction=kept_fraction, tsa_sync_free=True),
                                                budget_s=3.0, min_runs=2))
    row["speedup_sync_free"] = row["dense-cudnn"]["median_ms"] / row["tsa-sync-free"]["median_ms"]
    row["speedup"] = row["dense-cudnn"]["median_ms"] / row["tsa"]["median_ms"]  # same dense kernel
    row["speedup_vs_default"] = row["dense-default"]["median_ms"] / row["tsa"]["median_ms"]
    del net
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def environment() -> dict:
    """Card, library versions and date, recorded with every result."""
    return {
        "card": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": version("triton"),
        "transformers": version("transformers"),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }

