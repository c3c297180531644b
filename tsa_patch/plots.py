"""PNG figures: benchmark speedups and calibration trade-offs. matplotlib is optional; without it every function
returns False and the JSON outputs still hold every number."""

from __future__ import annotations


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_speedup(layers: list[dict], prefill: list[dict], card: str, path: str) -> bool:
    """PNG of TSA speedup over dense cuDNN against length (layer, ideal, whole prefill).

    Returns False when matplotlib is not installed (the JSON holds every number anyway).
    """
    plt = _pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for selection in sorted({r["selection"] for r in layers}):
        rows = [r for r in layers if r["selection"] == selection]
        ax.plot([r["seq_len"] for r in rows], [r["speedup"] for r in rows], "o-", label=f"one sparse layer ({selection})")
    rows = [r for r in layers if r["selection"] == layers[0]["selection"]]
    ax.plot([r["seq_len"] for r in rows], [r["ideal_speedup"] for r in rows], "k--", label="ideal 1/kept²")
    if prefill:
        ax.plot([r["seq_len"] for r in prefill], [r["speedup"] for r in prefill], "s-", label="whole-model prefill")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("speedup vs dense SDPA with cuDNN (×)")
    ax.set_title(f"Token Sparse Attention, {layers[0]['model']} shapes, {card}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_calibration(report: dict, path: str) -> bool:
    """Two panels: the chosen per-layer tau and kept share; measured KL against attention FLOPs removed for
    every policy evaluated end to end, with the chosen policy and the paper's rule on the same axes."""
    plt = _pyplot()
    if plt is None:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    layers = report["layers"]
    index = list(range(len(layers)))
    left.bar(index, [100 * (1 - layer["kept"]) for layer in layers], color="tab:blue", label="tokens dropped (%)")
    left.set_xlabel("layer")
    left.set_ylabel("tokens dropped at calibration length (%)")
    tau_axis = left.twinx()
    tau_axis.plot(index, [layer["tau"] for layer in layers], "o", color="tab:red", label="tau")
    tau_axis.set_yscale("symlog", linthresh=1e-3)
    tau_axis.set_ylabel("tau (0 = dense)")
    left.set_title("chosen policy")
    evaluations = report["evaluations"]
    right.plot([100 * e["attention_removed"] for e in evaluations], [e["kl"] for e in evaluations], "o-",
               color="grey", label="policies on the calibrated front")
    chosen = report["chosen"]
    right.plot([100 * chosen["attention_removed"]], [chosen["calibration"]["kl"]], "*", markersize=16,
               color="tab:green", label="chosen (calibration samples)")
    right.plot([100 * chosen["attention_removed"]], [chosen["held_out"]["kl"]], "^", markersize=10,
               color="tab:green", label="chosen (held-out samples)")
    paper = report["paper_rule"]
    right.plot([100 * paper["attention_removed"]], [paper["calibration"]["kl"]], "s", markersize=10,
               color="tab:orange", label="paper rule (delta 0.5, tau 0.005)")
    if report["budget"]["kind"] == "max_kl":
        right.axhline(report["budget"]["value"], color="tab:red", linestyle="--", linewidth=0.8, label="budget")
    right.set_xlabel("attention FLOPs removed (%)")
    right.set_ylabel("KL(dense || TSA), worst of natural / recall / aggregation (nats)")
    right.set_yscale("log")
    right.legend(fontsize=8)
    right.set_title(f"{report['data']}, {report['samples']} x {report['seq_len']} tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_eval(report: dict, path: str) -> bool:
    """Accuracy against prompt length, dense and TSA: the suite mean (lines) and each task (faint markers)."""
    plt = _pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2))
    lengths = [row["length"] for row in report["summary"]]
    ax.plot(lengths, [100 * row["dense"] for row in report["summary"]], "o-", color="black", label="dense (mean)")
    ax.plot(lengths, [100 * row["tsa"] for row in report["summary"]], "s--", color="tab:blue", label="TSA (mean)")
    for task in sorted({row["task"] for row in report["tasks"]}):
        rows = [row for row in report["tasks"] if row["task"] == task]
        ax.plot([r["length"] for r in rows], [100 * r["tsa"] for r in rows], "x", alpha=0.35, color="tab:blue")
        ax.plot([r["length"] for r in rows], [100 * r["dense"] for r in rows], ".", alpha=0.35, color="black")
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(length) for length in lengths])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-5, 105)
    ax.set_title("Long-context suite: dense vs Token Sparse Attention")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
