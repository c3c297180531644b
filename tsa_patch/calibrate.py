"""``calibrate``: measure a model on calibration text and decide, per layer, whether to sparsify and with which tau.

Lifecycle: load (caller) -> sample the data -> measure inter-layer representation drift -> choose the layers at or
below the ``delta`` quantile (the paper's rule, one tau for all of them) -> a ``TsaPolicy`` with its provenance.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from . import __version__
from .calibration.data import DEFAULT_CALIBRATION_DATA, DataSourceError, load_documents, token_samples
from .errors import DataError, PolicyError
from .kernels.policy import TsaPolicy

if TYPE_CHECKING:
    import torch

# Calibration sequences must be long enough for TSA to engage yet always bounded (untruncated samples are
# the peers' most common out-of-memory cause).
MAX_SEQ_LEN = 131072


@dataclass(frozen=True)
class CalibrationConfig:
    """Knobs of a calibration run.

    Args:
        data: corpus name, local file/folder, or ``datasets`` id (see ``tsa_patch.calibration.data``).
        samples: number of calibration sequences.
        seq_len: tokens per sequence, at most the model's context and ``MAX_SEQ_LEN``.
        seed: data sampling seed; the same seed gives the same policy.
        tau: coverage threshold for the sparse layers, in [0, 1).
        delta: drift quantile in [0, 1]; layers at or below it go sparse (paper: 0.5).
        window, pool_kernel, min_tokens, activation_length, selection, dense_backend: copied into the policy.
    """

    data: str = DEFAULT_CALIBRATION_DATA
    samples: int = 4
    seq_len: int = 2048
    seed: int = 0
    tau: float = 0.005
    delta: float = 0.5
    window: int = 128
    pool_kernel: int = 7
    min_tokens: int = 1024
    activation_length: int = 2048
    selection: str = "query_head"
    dense_backend: str = "auto"


@dataclass(frozen=True)
class CalibrationResult:
    """The chosen policy and what was measured to choose it (``drift`` has one value per layer)."""

    policy: TsaPolicy
    drift: list[float]


def calibrate(
    model: "torch.nn.Module",
    tokenizer,
    config: CalibrationConfig,
    source_model: str | None = None,
    on_sample: Callable[[], None] | None = None,
) -> CalibrationResult:
    """Choose the sparse layers of ``model`` by representation drift on calibration text.

    Args:
        model: the dense model, in eval mode.
        tokenizer: its tokenizer.
        config: see ``CalibrationConfig``.
        source_model: recorded in the policy so ``tsa-patch export`` can find the model again.
        on_sample: progress callback, called once per processed sample.

    Raises:
        PolicyError: a knob is out of range (the policy validation message names it).
        DataError: the data cannot be read or is too short.
    """
    from .calibration.drift import drift_rule_layers, representation_drift  # imports torch

    context = getattr(model.config, "max_position_embeddings", MAX_SEQ_LEN)
    if not 1 <= config.seq_len <= min(context, MAX_SEQ_LEN):
        raise DataError(f"--seq-len must be between 1 and {min(context, MAX_SEQ_LEN)} for this model; got {config.seq_len}.")
    if config.samples < 1:
        raise DataError(f"--samples must be at least 1; got {config.samples}.")
    if not 0.0 <= config.delta <= 1.0:
        raise PolicyError(f"delta must be in [0, 1]; got {config.delta}. The paper uses 0.5.")
    options = dict(window=config.window, pool_kernel=config.pool_kernel, min_tokens=config.min_tokens,
                   activation_length=config.activation_length, selection=config.selection,
                   dense_backend=config.dense_backend)
    num_layers = model.config.num_hidden_layers
    try:  # validate the knobs before spending minutes on forwards
        TsaPolicy.uniform(num_layers, config.tau, **options)
    except ValueError as err:
        raise PolicyError(str(err)) from None

    try:
        samples = token_samples(tokenizer, load_documents(config.data), config.samples, config.seq_len, config.seed)
    except DataSourceError as err:
        raise DataError(str(err)) from None
    drift = representation_drift(model, samples, on_sample=on_sample)
    sparse_layers = drift_rule_layers(drift, config.delta)
    provenance = {"method": "representation-drift", **asdict(config), "drift": [round(d, 6) for d in drift]}
    policy = TsaPolicy.uniform(num_layers, config.tau, sparse_layers, tool_version=__version__,
                               source_model=source_model, calibration=provenance, **options)
    return CalibrationResult(policy=policy, drift=drift)
