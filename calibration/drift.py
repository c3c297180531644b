"""Inter-layer representation drift: the paper's rule for choosing which layers to sparsify.

For decoder layer l with input h_in and output h_out, drift_l is the mean over tokens of
``||h_out - h_in||_2 / ||h_in||_2``. Layers that change the residual stream least are the safest to sparsify:
after normalising the drifts to sum 1, the layers at or below the ``delta`` quantile go sparse (paper: 0.5).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of a ``*ForCausalLM`` (``model.model.layers``)."""
    return model.model.layers


@torch.no_grad()
def representation_drift(model: torch.nn.Module, samples: list[list[int]],
                         on_sample: Callable[[], None] | None = None) -> list[float]:
    """Mean relative update ``||h_out - h_in|| / ||h_in||`` of every decoder layer over the samples.

    Args:
        model: a dense ``*ForCausalLM`` in eval mode.
        samples: token id lists (one forward each, batch 1).
        on_sample: called after each sample (progress reporting).

    Returns:
        One drift per decoder layer. Only one scalar per layer is kept: the hooks reduce as they go, so
        memory stays at one layer's activations.
    """
    layers = decoder_layers(model)
    totals = [0.0] * len(layers)

    def hook(index):
        def record(module, args, kwargs, output):
            h_in = (args[0] if args else kwargs["hidden_states"]).float()
            h_out = (output[0] if isinstance(output, tuple) else output).float()
            totals[index] += ((h_out - h_in).norm(dim=-1) / (h_in.norm(dim=-1) + 1e-8)).mean().item()
        return record

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    device = next(model.parameters()).device
    try:
        for ids in samples:
            model.model(torch.tensor([ids], device=device))  # the decoder stack only: no logits needed
            if on_sample is not None:
                on_sample()
    finally:
        for handle in handles:
            handle.remove()
    return [t / len(samples) for t in totals]


def drift_rule_layers(drift: list[float], delta: float) -> list[int]:
    """Layers whose normalised drift is at or below its ``delta`` quantile (the paper's layer choice)."""
    normalised = torch.tensor(drift, dtype=torch.float64)
    normalised = normalised / normalised.sum()
    threshold = torch.quantile(normalised, delta)
    return [i for i, d in enumerate(normalised.tolist()) if d <= threshold]
