"""The chosen policy checked end to end at the prompt lengths it will serve, not only at the calibrated one.

The search and the held-out check measure the policy at ``seq_len``, every sparse layer engaged. Prompts shorter
than that run with only the layers whose activation length they reach (``speed``'s per-layer lengths, or the
conservative default): a combination never measured, on shorter prompts. ``guard_served_lengths`` measures the
policy as served at every length from the shortest activation length up to ``seq_len`` (the speed ladder's lengths
and the activation lengths themselves) and, where it misses the budget, raises every layer engaged there to the
next checked length, so that at every checked length the policy is within the budget or runs densely.
"""

from __future__ import annotations

from collections.abc import Callable

from tsa_patch.calibration.speed import ladder


def served_lengths(activation: dict[int, int], seq_len: int) -> list[int]:
    """The lengths shorter than ``seq_len`` at which the policy is checked: the ladder's lengths and the layers'
    activation lengths, from the shortest activation length on."""
    shortest = min(activation.values(), default=seq_len)
    points = set(ladder(seq_len)) | set(activation.values())
    return sorted(n for n in points if shortest <= n < seq_len)


def guard_served_lengths(activation: dict[int, int], seq_len: int,
                         measure: Callable[[int, dict[int, int]], dict]) -> tuple[dict[int, int], list[dict]]:
    """Raise layers' activation lengths until the policy is within budget at every served length.

    Args:
        activation: every sparse layer's activation length.
        seq_len: the calibrated length (the policy, every layer engaged, was checked there).
        measure: ``measure(length, activation)`` gives the end-to-end metrics, with ``met`` (within the budget),
            of prompts of ``length`` tokens under the policy with those activation lengths.

    Returns:
        The activation lengths (a layer raised past a length where it missed the budget engages from the next
        checked length, ``seq_len`` after the last) and one record per check.
    """
    activation, checks = dict(activation), []
    lengths = served_lengths(activation, seq_len)
    for position, length in enumerate(lengths):
        engaged = sorted(i for i, n in activation.items() if n <= length)
        if not engaged:
            continue
        metrics = measure(length, activation)
        checks.append({"length": length, "layers": engaged, **metrics})
        if not metrics["met"]:
            raised = lengths[position + 1] if position + 1 < len(lengths) else seq_len
            activation.update({i: raised for i in engaged})
    return activation, checks
