"""The accuracy budget a calibrated policy must meet, end to end (``endtoend.py``'s metrics)."""

from __future__ import annotations

from dataclasses import dataclass, replace

# Default budget: mean KL(dense || TSA) over the continuation tokens, in nats.
DEFAULT_MAX_KL = 0.02


@dataclass(frozen=True)
class Budget:
    """What "accurate enough" means for one calibration.

    Args:
        kind: "max_kl" (mean KL over the continuation, nats), "min_agreement" (top-1 agreement with dense) or
            "target_speedup" (no accuracy bound: reach an estimated attention speedup with the least error).
        value: the bound (or the speedup).
        source: where the value came from, when not from the user ("paper rule on the calibration samples").
        held_out_value: a different bound for held-out samples (``--match-paper``: the paper's held-out KL).
    """

    kind: str
    value: float
    source: str | None = None
    held_out_value: float | None = None

    @classmethod
    def from_options(cls, max_kl: float | None, min_agreement: float | None, target_speedup: float | None) -> Budget:
        """The budget the user asked for (at most one option is set); ``DEFAULT_MAX_KL`` without any."""
        if target_speedup is not None:
            return cls("target_speedup", target_speedup)
        if min_agreement is not None:
            return cls("min_agreement", min_agreement)
        return cls("max_kl", DEFAULT_MAX_KL if max_kl is None else max_kl)

    @classmethod
    def matching(cls, calibration_kl: float) -> Budget:
        """``--match-paper``: the KL the paper's rule measures on the calibration samples."""
        return cls("max_kl", max(calibration_kl, 1e-9), source="paper rule on the calibration samples")

    def with_held_out(self, held_out_kl: float) -> Budget:
        """The same budget, judged on held-out samples against the paper's held-out KL."""
        return replace(self, held_out_value=max(held_out_kl, 1e-9))

    def bound(self, held_out: bool = False) -> float:
        """The bound for calibration (or held-out) samples."""
        return self.held_out_value if held_out and self.held_out_value is not None else self.value

    def met(self, metrics: dict, held_out: bool = False) -> bool:
        """Whether end-to-end ``metrics`` (``kl``, ``top1_agreement``) meet the budget."""
        if self.kind == "min_agreement":
            return metrics["top1_agreement"] >= self.bound(held_out)
        if self.kind == "max_kl":
            return metrics["kl"] <= self.bound(held_out)
        return True

    def to_dict(self) -> dict:
        record = {"kind": self.kind, "value": self.value}
        if self.source is not None:
            record["from"] = self.source
        if self.held_out_value is not None:
            record["held_out_value"] = self.held_out_value
        return record
