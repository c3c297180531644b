"""Does dropping query rows, or dropping keys, break recall? Each layer alone made sparse, end to end, both ways.

    python benchmarks/query_rows_probe.py --model SmolLM2-135M-Instruct --seq-len 2048 \
        --output benchmarks/results/query-rows-probe-smollm2-2k.json

TSA as the paper runs it compresses Q, K and V to the kept tokens: a dropped token is invisible to every query of
the layer (its key and value are gone) *and* gets no attention output there (its query row is gone, so its hidden
state skips the layer's attention and the keys and values it leaves for later layers and for decoding change).
The policy's ``rows="all"`` (the runtime's kept-keys attention) keeps the first effect only: every query attends
causally to the kept keys (rows before the first kept key get 0, as the paper's dropped rows). A kept key at
position p is seen by the L - p rows from p on, so at kept fraction ``k`` it saves about ``1 - k`` of the attention
instead of ``1 - k**2``.

For every layer alone (``--together``: the chosen layers at once) at each ``--taus`` value (the authors' coverage
rule, every other layer dense), the calibration's end-to-end probes (natural continuations, long-range recall,
aggregation; KL of the continuation against dense) for each of ``--modes``: ``kept`` (``rows="kept"``), ``all``
(``rows="all"``, the kept keys only) and ``local`` (``rows="all"`` with ``--local-keys``: each row also sees its
latest keys), and the share of the layer's attention each computes. If the recall damage comes from the dropped
rows, ``all`` makes the early layers harmless; if it comes from the tokens' own neighbourhoods, ``local`` does.
Small models on a CPU; the real model at 32K runs the same comparison in ``real_model_gpu.py layers``.
(Results before 2026-12-06 came from this script's own plain-PyTorch twin of the kept-keys attention.)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

from tsa_patch.bench import environment
from tsa_patch.calibrate import CalibrationConfig
from tsa_patch.calibration.endtoend import EndToEnd
from tsa_patch.data import load_documents, token_samples
from tsa_patch.kernels import tsa
from tsa_patch.kernels.policy import LayerPolicy, TsaPolicy
from tsa_patch.kernels.reference import score_keys_ref
from tsa_patch.models import load_model, resolve_model


def _sha256(path: str | None) -> str | None:
    """The SHA-256 of a model given as one file (a GGUF), which names the exact weights measured."""
    if path is None or not Path(path).is_file():
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def far_voter_scores(query, key, window, scaling, softcap=None, far_from=128):
    """``score_keys_ref`` with half its voters moved: the last ``window // 2`` queries, and ``window // 2`` queries
    spread evenly over the prompt before the window, each voting with its causal softmax renormalised over the keys
    more than ``far_from`` positions back (what a mid-prompt row needs beyond its local keys). Full prefills only."""
    num_heads, (kv_heads, kv_len, _) = query.shape[0], key.shape
    half, candidates = window // 2, kv_len - window
    last = score_keys_ref(query, key, half, scaling, softcap)[:, :candidates] * half  # summed votes
    positions = torch.linspace(far_from + 1, candidates - 1, half, device=key.device).long()
    q = query[:, positions].float()  # (Hq, half, D): full prefill, so query position = row
    k = key.float().repeat_interleave(num_heads // kv_heads, dim=0)[:, :candidates]  # (Hq, C, D)
    logits = torch.matmul(q, k.transpose(1, 2)) * scaling
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    key_pos = torch.arange(candidates, device=key.device)
    far = key_pos[None, :] < (positions[:, None] - far_from)  # (half, C): far and causal
    probs = torch.softmax(logits.masked_fill(~far[None], float("-inf")), dim=-1)
    return (last + probs.sum(dim=1)) / window


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a model spec (default: the embedded SmolLM2)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--taus", default="0.02,0.1")
    parser.add_argument("--layers", default="", help="comma-separated layers (default: all)")
    parser.add_argument("--together", action="store_true", help="the layers of --layers sparse at once, not alone")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (bfloat16)")
    parser.add_argument("--modes", default="kept,all", help="comma-separated: kept, all, local")
    parser.add_argument("--local-keys", default="128", help="the local keys of the local mode (comma-separated: one "
                        "run of the mode per value)")
    parser.add_argument("--scoring", default="window", choices=("window", "far-voters"),
                        help="window: the paper's last W queries score the tokens; far-voters: a variant (on the CPU "
                        "path): W/2 of them, and W/2 queries spread over the prompt that each vote, renormalised, "
                        "only for keys farther back than --far-from")
    parser.add_argument("--far-from", type=int, default=128, help="far-voters: the band before each spread query "
                        "that it does not vote for (its local keys cover it)")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.scoring == "far-voters":
        tsa.STAGES["torch"] = dataclasses.replace(tsa.STAGES["torch"],
                                                  score=functools.partial(far_voter_scores, far_from=args.far_from))
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
    # one judge: its stored traces are keyed by each layer's policy, rows included
    judge = EndToEnd(model, {"calibration": samples}, args.seq_len, tokenizer, config.seed, make_policy,
                     lambda description, total: None)
    knobs = {"kept": {"rows": "kept"}, "all": {"rows": "all", "local_keys": 0}}
    names = {"kept": "paper", "all": "all rows"}
    local_modes = []  # the local mode once per --local-keys value
    for local in args.local_keys.split(","):
        local_modes.append(f"local-{local}")
        knobs[local_modes[-1]] = {"rows": "all", "local_keys": int(local)}
        names[local_modes[-1]] = f"all rows, {local} local keys"
    for mode in [m for mode in args.modes.split(",") for m in (local_modes if mode == "local" else [mode])]:
        for chosen in [layers] if args.together else [[layer] for layer in layers]:
            for tau in taus:
                metrics = judge.metrics([tau if i in chosen else 0.0 for i in range(num_layers)], "calibration",
                                        **knobs[mode])
                # the model's attention cost is the mean over layers, the others computing all of theirs
                computed = 1.0 - num_layers * (1.0 - metrics["attention_cost"]) / len(chosen)
                row = {"variant": names[mode], "layers": chosen, "tau": tau,
                       "kl": {kind: metrics[kind]["kl"] for kind in ("natural", "recall", "aggregation")},
                       "top1_agreement": metrics["top1_agreement"], "layer_attention_computed": round(computed, 4)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    result = {**environment(), "command": " ".join(["python"] + sys.argv), "seconds": time.perf_counter() - begin,
              "model": source.spec, "sha256": _sha256(args.model), "seq_len": args.seq_len, "samples": args.samples,
              "scoring": args.scoring, "far_from": args.far_from if args.scoring == "far-voters" else None,
              "rows": rows}
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
