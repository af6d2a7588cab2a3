"""Voter weights of the committee (method doc §3.3 and Appendix A).

The committee votes at loss level: each member's CE + BN loss is multiplied by its weight w_i and the
weighted losses are summed. Weights always sum to 1 over the committee members.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from cvdd.errors import ConfigError

__all__ = ["VOTING_MODES", "voter_weights"]

#: ``prior``: softmax of prior accuracies / T (the CV-DD default); ``equal``: 1/N; ``random``: normalised U(0, 1).
VOTING_MODES = ("prior", "equal", "random")


def voter_weights(
    priors: Sequence[float], mode: str, temperature: float = 5.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Weights of the N committee members, summing to 1.

    * ``prior``: w_i = exp(a_i / T) / Σ_j exp(a_j / T), the softmax over the committee members only (not the
      whole pool), a_i = prior accuracy of member i in percent. With T = 5, CIFAR-10 ResNet-18 (63) and
      ResNet-50 (65.3) get 0.387 / 0.613.
    * ``equal``: w_i = 1 / N (``priors`` only fixes N).
    * ``random``: w_i = u_i / Σ_j u_j with u ~ U(0, 1) drawn from ``generator``; the official code drew them
      unseeded, cvdd requires a generator so a run is reproducible.

    Args:
        priors: (N,) prior accuracy of each member, in percent, in committee order.
        mode: one of :data:`VOTING_MODES`.
        temperature: T of the ``prior`` softmax, > 0 (validated for every mode, since it is a run option).
        generator: source of the ``random`` draw; its device is where the weights are drawn.

    Returns:
        (N,) float64 tensor of weights (on ``generator``'s device for ``random``, else on the CPU).

    Raises:
        ConfigError: unknown mode, empty committee, non-finite prior, or a temperature that is not > 0.
        ValueError: ``random`` without a generator (a caller bug, not a user option).
    """
    if mode not in VOTING_MODES:
        raise ConfigError(f"unknown voting mode {mode!r}; choose one of {', '.join(VOTING_MODES)}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"voting temperature must be a positive number, got {temperature!r}")
    n = len(priors)
    if n == 0:
        raise ConfigError("a committee needs at least one member to vote")
    a = torch.tensor([float(p) for p in priors], dtype=torch.float64)
    if not bool(torch.isfinite(a).all()):
        raise ConfigError(f"prior accuracies must be finite numbers, got {list(priors)!r}")
    if mode == "prior":
        # torch.softmax subtracts the max first, so large priors / small T cannot overflow.
        return torch.softmax(a / temperature, dim=0)
    if mode == "equal":
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    if generator is None:
        raise ValueError("random voting needs an explicit (seeded) torch.Generator")
    u = torch.rand(n, generator=generator, dtype=torch.float64, device=generator.device)
    return u / u.sum()
