"""Small calibration settings for the real SmolLM2 on CPU, and an independent measurement of a policy, shared by
the calibration test modules (importable as ``calibration_settings``, like ``numerics``)."""

from __future__ import annotations

import dataclasses

from tsa_patch.calibrate import CalibrationConfig
from tsa_patch.calibration.continuation import continuation_metrics
from tsa_patch.calibration.endtoend import probe_sequences
from tsa_patch.data import load_documents, token_samples
from tsa_patch.kernels.policy import ATTENTION_KEY, TsaPolicy
from tsa_patch.models import apply_policy_

# Small window and floors so that a few hundred tokens engage TSA on CPU in seconds. The per-layer end-to-end check
# (two more evaluations per layer, most of a calibration's time on a CPU) is on only where it is the subject.
SMALL = CalibrationConfig(samples=2, holdout=1, seq_len=320, continuation=16, seed=3, window=16, min_tokens=32,
                          activation_length=96, max_kl=0.05, check_layers=False)
CHECKED = dataclasses.replace(SMALL, check_layers=True, samples=1)


def measured_independently(model, tokenizer, policy: TsaPolicy, config: CalibrationConfig = SMALL) -> dict:
    """Each kind's continuation metrics of ``policy`` on ``config``'s calibration samples ({kind: metrics}),
    recomputed outside the calibration (no trace replay)."""
    samples = token_samples(tokenizer, load_documents(config.data), config.samples + config.holdout,
                            config.seq_len + config.continuation, config.seed)[: config.samples]
    apply_policy_(model, policy)
    try:
        return {kind: continuation_metrics(model, sequences, config.seq_len, ATTENTION_KEY)
                for kind, sequences in probe_sequences(samples, config.seq_len, tokenizer, config.seed).items()}
    finally:
        model.set_attn_implementation("sdpa")
        delattr(model.config, "tsa_policy")
