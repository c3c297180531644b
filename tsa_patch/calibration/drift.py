"""Inter-layer representation drift: the paper's rule for choosing which layers to sparsify.

For decoder layer l with input h_in and output h_out, drift_l is the mean over tokens of
``||h_out - h_in||_2 / ||h_in||_2``. Layers that change the residual stream least are the safest to sparsify:
after normalising the drifts to sum 1, the layers at or below the ``delta`` quantile go sparse (paper: 0.5).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of a ``*ForCausalLM`` (``model.model.layers``)."""
    return model.model.layers


class DriftRecorder:
    """Running sums of every layer's relative update; ``mean()`` gives one drift per layer."""

    def __init__(self, num_layers: int):
        self.totals = [0.0] * num_layers
        self.forwards = 0

    def mean(self) -> list[float]:
        return [t / max(1, self.forwards) for t in self.totals]


@contextlib.contextmanager
def recording_drift(model: torch.nn.Module, recorder: DriftRecorder | None = None) -> Iterator[DriftRecorder]:
    """Record representation drift during every forward run inside the block (adding to ``recorder`` if given).

    Only one scalar per layer is kept: the hooks reduce as they go, so memory stays at one layer's activations.
    """
    layers = decoder_layers(model)
    recorder = recorder or DriftRecorder(len(layers))

    def hook(index):
        def record(module, args, kwargs, output):
            h_in = (args[0] if args else kwargs["hidden_states"]).float()
            h_out = (output[0] if isinstance(output, tuple) else output).float()
            recorder.totals[index] += ((h_out - h_in).norm(dim=-1) / (h_in.norm(dim=-1) + 1e-8)).mean().item()
            if index == len(layers) - 1:
                recorder.forwards += 1
        return record

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        yield recorder
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def representation_drift(model: torch.nn.Module, samples: list[list[int]],
                         on_sample: Callable[[], None] | None = None) -> list[float]:
    """Mean relative update ``||h_out - h_in|| / ||h_in||`` of every decoder layer over the samples.

    Args:
        model: a dense ``*ForCausalLM`` in eval mode.
        samples: token id lists (one forward each, batch 1).
        on_sample: called after each sample (progress reporting).
    """
    device = next(model.parameters()).device
    with recording_drift(model) as recorder:
        for ids in samples:
            model.model(torch.tensor([ids], device=device))  # the decoder stack only: no logits needed
            if on_sample is not None:
                on_sample()
    return recorder.mean()


def drift_rule_layers(drift: list[float], delta: float) -> list[int]:
    """Layers whose normalised drift is at or below its ``delta`` quantile (the paper's layer choice)."""
    normalised = torch.tensor(drift, dtype=torch.float64)
    normalised = normalised / normalised.sum()
    threshold = torch.quantile(normalised, delta)
    return [i for i, d in enumerate(normalised.tolist()) if d <= threshold]
