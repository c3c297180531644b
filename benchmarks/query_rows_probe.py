"""Does dropping query rows, or dropping keys, break recall? Each layer alone made sparse, end to end, both ways.

    python benchmarks/query_rows_probe.py --model SmolLM2-135M-Instruct --seq-len 2048 \
        --output benchmarks/results/query-rows-probe-smollm2-2k.json

TSA as the paper runs it compresses Q, K and V to the kept tokens: a dropped token is invisible to every query of
the layer (its key and value are gone) *and* gets no attention output there (its query row is gone, so its hidden
state skips the layer's attention and the keys and values it leaves for later layers and for decoding change).
The variant measured here, ``all rows``, keeps the first effect only: every query attends causally to the kept
keys (rows before the first kept key get 0, as the paper's dropped rows). It computes ``L x K'`` logits instead
of ``K' x K'``, so at kept fraction ``k`` it saves about ``1 - k`` of the attention instead of ``1 - k**2``.

For every layer alone (``--together``: the chosen layers at once) at each ``--taus`` value (the authors' coverage rule, every other layer dense), the
calibration's end-to-end probes (natural continuations, long-range recall, aggregation; KL of the continuation
against dense) with the paper's compression and with every query row kept, and the attention each computes. If
the recall damage comes from the dropped rows, the ``all rows`` variant makes the early layers harmless. A plain
PyTorch experiment (an explicit mask over ``L x K'``, in slices of query rows), not a kernel: small models on a CPU,
or ``--device cuda`` for the real model at 32K.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

import tsa_patch.kernels.attention as runtime
from tsa_patch.bench import environment
from tsa_patch.calibrate import CalibrationConfig
from tsa_patch.calibration.endtoend import EndToEnd
from tsa_patch.data import load_documents, token_samples
from tsa_patch.kernels.policy import LayerPolicy, TsaPolicy
from tsa_patch.kernels.tsa import STAGES, token_scores
from tsa_patch.models import load_model, resolve_model

ROWS_PER_STEP = 2048  # query rows per step of the plain-torch "all rows" attention


def all_rows_attention(query, key, value, *, tau, window, pool_kernel, min_tokens, selection, scaling,
                       coverage="paper", softcap=None, dense_backend="auto", keep_fraction=None, backend="torch",
                       attend=None, record=None):
    """``tsa.tsa_attention``'s selection, then every query row attends causally to its head's kept keys.

    query (Hq, L, D), key and value (Hkv, L, D), a full prefill; returns (out (L, Hq, D), kept (Hs, K'))."""
    num_heads, q_len, _ = query.shape
    kv_len = key.shape[1]
    assert q_len == kv_len and softcap is None and attend is None, "full prefills of plain attention only"
    pooled = token_scores(query, key, window=window, pool_kernel=pool_kernel, selection=selection,
                          scaling=scaling, softcap=softcap, backend=backend)
    kept, count = STAGES[backend].select(pooled, kv_len, tau, min_tokens, coverage, None)
    kept = kept[:, : int(count[0])]
    per_head = kept if kept.shape[0] == num_heads else kept.repeat_interleave(num_heads // kept.shape[0], 0)
    group = num_heads // key.shape[0]
    kv_head = torch.arange(num_heads, device=query.device) // group
    key_c = key[kv_head[:, None], per_head].float()  # (Hq, K', D)
    value_c = value[kv_head[:, None], per_head].float()
    out = torch.empty_like(query)
    for start in range(0, q_len, ROWS_PER_STEP):  # in slices of query rows: (Hq, rows, K') fits at 32K
        rows = torch.arange(start, min(start + ROWS_PER_STEP, q_len), device=query.device)
        logits = torch.einsum("hqd,hkd->hqk", query[:, rows].float(), key_c) * scaling
        visible = per_head[:, None, :] <= rows[None, :, None]  # (Hq, rows, K')
        weights = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
        out[:, rows] = torch.einsum("hqk,hkd->hqd", weights, value_c).to(query.dtype)
    if record is not None:  # computed logits against dense causal attention's
        visible_pairs = (q_len - per_head).sum()  # kept key at position p is seen by the rows p ... L - 1
        record.append(float(visible_pairs) / (num_heads * q_len * (q_len + 1) / 2))
    return out.transpose(0, 1), kept


@contextmanager
def tsa_layers_run(variant: str, record: list):
    """Inside this context the runtime's TSA layers run ``variant`` ("paper": ``tsa.tsa_attention`` itself; "all
    rows": ``all_rows_attention``) and append each call's computed logits, against dense causal attention's, to
    ``record``."""
    original = runtime.tsa_attention

    def paper(query, key, value, **options):
        out, kept = original(query, key, value, **options)
        length, count = query.shape[1], kept.shape[1]
        record.append(count * (count + 1) / (length * (length + 1)))
        return out, kept

    def all_rows(*args, **options):
        return all_rows_attention(*args, record=record, **options)

    runtime.tsa_attention = paper if variant == "paper" else all_rows
    try:
        yield
    finally:
        runtime.tsa_attention = original


def _sha256(path: str | None) -> str | None:
    """The SHA-256 of a model given as one file (a GGUF), which names the exact weights measured."""
    if path is None or not Path(path).is_file():
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a model spec (default: the embedded SmolLM2)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--taus", default="0.02,0.1")
    parser.add_argument("--layers", default="", help="comma-separated layers (default: all)")
    parser.add_argument("--together", action="store_true", help="the layers of --layers sparse at once, not alone")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (bfloat16)")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    source = resolve_model(args.model)
    model, tokenizer = load_model(source, device=args.device)
    num_layers = model.config.num_hidden_layers
    config = CalibrationConfig(seq_len=args.seq_len, samples=args.samples, holdout=0, coverage="paper")
    samples = token_samples(tokenizer, load_documents(config.data), args.samples, args.seq_len + config.continuation,
                            config.seed)

    def make_policy(taus, block_layers, **knobs) -> TsaPolicy:
        layers = tuple(LayerPolicy(enabled=t > 0, tau=t) for t in taus)
        return TsaPolicy(layers=layers, **config.policy_options(**knobs))

    taus = [float(t) for t in args.taus.split(",")]
    layers = [int(x) for x in args.layers.split(",")] if args.layers else list(range(num_layers))
    begin = time.perf_counter()
    rows = []
    for variant in ("paper", "all rows"):
        record: list[float] = []
        with tsa_layers_run(variant, record):
            # a judge per variant: its stored traces are keyed by the policy, which the two variants share
            judge = EndToEnd(model, {"calibration": samples}, args.seq_len, tokenizer, config.seed, make_policy,
                             lambda description, total: None)
            for chosen in [layers] if args.together else [[layer] for layer in layers]:
                for tau in taus:
                    record.clear()
                    metrics = judge.metrics([tau if i in chosen else 0.0 for i in range(num_layers)], "calibration")
                    row = {"variant": variant, "layers": chosen, "tau": tau,
                           "kl": {kind: metrics[kind]["kl"] for kind in ("natural", "recall", "aggregation")},
                           "top1_agreement": metrics["top1_agreement"],
                           "layer_attention_computed": round(sum(record) / len(record), 4) if record else 1.0}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    result = {**environment(), "command": " ".join(["python"] + sys.argv), "seconds": time.perf_counter() - begin,
              "model": source.spec, "sha256": _sha256(args.model), "seq_len": args.seq_len, "samples": args.samples,
              "rows": rows}
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
