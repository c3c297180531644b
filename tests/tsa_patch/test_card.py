"""The model card's calibration table renders whatever parts a calibration measured."""

from __future__ import annotations

from tsa_patch.card import _metrics_row


def test_metrics_row_skips_a_part_that_was_not_measured():
    """A one-sample calibration measures the natural text only: its recall part is None, not a dict."""
    metrics = {"kl": 0.0123, "top1_agreement": 0.95, "natural": {"kl": 0.0123}, "recall": None}
    row = _metrics_row("this policy", 0.142, metrics)
    assert row == "| this policy | 14.2 % | 0.0123 | 0.0123 | 95.0 % |"
