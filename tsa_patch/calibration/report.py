"""The accuracy-budget calibration report: what was measured to choose the policy (travels inside the policy).

Metrics dicts (``kl``, ``top1_agreement``, ``attention_cost``, ``natural``, ``recall``, ``aggregation``) come from
``endtoend.EndToEnd.metrics``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tsa_patch.calibration.budget import Budget
from tsa_patch.calibration.endtoend import KINDS
from tsa_patch.calibration.front import Candidate
from tsa_patch.calibration.measure import LayerMeasurement

_SUMMARY = ("kl", "top1_agreement", "attention_cost", *KINDS)


@dataclass
class PaperRule:
    """The paper's rule (drift-chosen layers at one tau) measured on the same samples."""

    tau: float
    delta: float
    layers: list[int]
    attention_removed: float
    calibration: dict
    held_out: dict

    def to_dict(self) -> dict:
        return {"tau": self.tau, "delta": self.delta, "layers": self.layers,
                "attention_removed": round(self.attention_removed, 4), "calibration": self.calibration,
                "held_out": self.held_out}


@dataclass
class Chosen:
    """The chosen policy of the front with its calibration and held-out metrics."""

    candidate: Candidate
    calibration: dict
    held_out: dict
    held_out_backoffs: int
    meets_budget_held_out: bool

    def to_dict(self) -> dict:
        removed = self.candidate.attention_removed
        return {"attention_removed": round(removed, 4),
                "estimated_attention_speedup": round(1.0 / (1.0 - removed), 3),
                "predicted_error": round(self.candidate.predicted_error, 6),
                **({} if self.candidate.time_saved is None
                   else {"predicted_time_saved": round(self.candidate.time_saved, 4)}),
                "block_layers": list(self.candidate.block_layers),
                "calibration": {k: self.calibration.get(k) for k in _SUMMARY},
                "held_out": self.held_out, "held_out_backoffs": self.held_out_backoffs,
                "meets_budget_held_out": self.meets_budget_held_out}


@dataclass
class CalibrationReport:
    """Everything the accuracy-budget calibration measured, as written into the policy's ``calibration``."""

    data: dict  # data, samples, seq_len, seed
    holdout: int
    continuation: int
    budget: Budget
    chosen: Chosen
    paper_rule: PaperRule
    evaluations: list[dict]  # every end-to-end evaluation of the search (front index, metrics)
    held_out_evaluations: list[dict]
    measurements: list[LayerMeasurement]
    drift: list[float]
    block_sparse: dict | None = field(default=None)  # each layer alone block-sparse, the layers chosen
    speed: dict | None = field(default=None)  # the sparse layers timed against dense (``speed.measure_speed``)
    layer_check: list[dict] | None = field(default=None)  # each layer alone, end to end (``layer_check``)
    served: list[dict] | None = field(default=None)  # the policy at the shorter lengths it serves (``served``)
    pricing: dict | None = field(default=None)  # the time models that priced the front (``speed.fit_time_model``)

    def layer_table(self) -> list[dict]:
        """Per layer: the chosen tau, its mean kept fraction, its kernel and its predicted error."""
        table = []
        blocks = set(self.chosen.candidate.block_layers)
        for layer, (m, tau) in enumerate(zip(self.measurements, self.chosen.candidate.taus)):
            i = m.taus.index(tau) if tau else None
            error = m.mean_error(i) if i is not None else (m.block_error if layer in blocks else 0.0)
            table.append({"tau": tau, "kept": round(m.mean_kept(i), 4) if i is not None else 1.0,
                          "kernel": "block_sparse" if layer in blocks else "dense", "error": round(error, 6)})
        return table

    def to_dict(self) -> dict:
        report = {
            "method": "accuracy-budget", **self.data, "holdout": self.holdout, "continuation": self.continuation,
            "taus": list(self.measurements[0].taus),
            "budget": self.budget.to_dict(), "chosen": self.chosen.to_dict(), "paper_rule": self.paper_rule.to_dict(),
            "evaluations": [{k: e[k] for k in ("index", "attention_removed", "predicted_error", "kl", "top1_agreement")}
                            for e in sorted(self.evaluations, key=lambda e: e["index"])],
            "held_out_evaluations": self.held_out_evaluations,
            "layers": self.layer_table(),
            "drift": [round(d, 6) for d in self.drift],
        }
        if self.block_sparse is not None:
            report["block_sparse"] = self.block_sparse
        if self.speed is not None:
            report["speed"] = self.speed
        if self.layer_check is not None:
            report["layer_check"] = self.layer_check
        if self.served is not None:
            report["served"] = self.served
        if self.pricing is not None:
            report["pricing"] = self.pricing
        return report
