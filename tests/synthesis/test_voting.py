"""Voter weights against the paper's numbers (method doc Appendix A)."""

from __future__ import annotations

import itertools

import pytest
import torch

from cvdd.errors import ConfigError
from cvdd.synthesis import VOTING_MODES, voter_weights

# Prior accuracies (%) in pool order R18, R50, SV2, MBV2, D121 (method doc §3.3).
CIFAR10 = [63, 65.3, 68.5, 67.6, 67.4]
TINY = [46.5, 28.3, 43.6, 44.8, 41.5]
# Appendix A, recover (prior, T = 5): first-member weight of each pair in itertools.combinations order.
CIFAR10_FIRST = [0.387, 0.250, 0.285, 0.293, 0.345, 0.387, 0.397, 0.545, 0.555, 0.510]
TINY_FIRST = [0.974, 0.641, 0.584, 0.731, 0.045, 0.036, 0.067, 0.440, 0.603, 0.659]


def _rounded(w: torch.Tensor) -> list[float]:
    return [round(float(v), 3) for v in w]


def test_headline_values() -> None:
    assert _rounded(voter_weights([63, 65.3], "prior", 5.0)) == [0.387, 0.613]
    assert _rounded(voter_weights([46.5, 28.3], "prior", 5.0)) == [0.974, 0.026]


@pytest.mark.parametrize(("priors", "firsts"), [(CIFAR10, CIFAR10_FIRST), (TINY, TINY_FIRST)])
def test_every_pair_of_appendix_a(priors: list[float], firsts: list[float]) -> None:
    for (i, j), first in zip(itertools.combinations(range(5), 2), firsts):
        w = voter_weights([priors[i], priors[j]], "prior", 5.0)
        assert w.dtype == torch.float64 and w.shape == (2,)
        assert _rounded(w) == [first, round(1 - first, 3)]
        assert float(w.sum()) == pytest.approx(1.0, abs=1e-12)


def test_prior_is_the_softmax_over_members_only() -> None:
    # Relabel committee of CIFAR-10 (T = 10, all five) from Appendix A.
    assert _rounded(voter_weights(CIFAR10, "prior", 10.0)) == [0.140, 0.177, 0.243, 0.222, 0.218]
    # A single member gets all the weight, whatever its prior.
    assert voter_weights([12.0], "prior").tolist() == [1.0]
    # Shifting every prior by a constant changes nothing; huge priors do not overflow.
    a = voter_weights([63, 65.3], "prior")
    assert torch.allclose(a, voter_weights([1063, 1065.3], "prior"))
    assert torch.isfinite(voter_weights([1e6, 0.0], "prior", 0.01)).all()


def test_equal_weights() -> None:
    for n in (1, 2, 5):
        w = voter_weights([50.0] * n, "equal")
        assert w.tolist() == pytest.approx([1 / n] * n) and float(w.sum()) == pytest.approx(1.0)


def test_random_weights_are_seeded_and_normalised() -> None:
    a = voter_weights([1, 2, 3], "random", generator=torch.Generator().manual_seed(4))
    b = voter_weights([1, 2, 3], "random", generator=torch.Generator().manual_seed(4))
    c = voter_weights([1, 2, 3], "random", generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.sum()) == pytest.approx(1.0) and bool((a > 0).all())


def test_errors() -> None:
    assert VOTING_MODES == ("prior", "equal", "random")
    with pytest.raises(ConfigError, match="unknown voting mode 'majority'; choose one of prior, equal, random"):
        voter_weights([1], "majority")
    for bad_t in (0.0, -5.0, float("nan")):
        with pytest.raises(ConfigError, match="temperature"):
            voter_weights([1, 2], "prior", bad_t)
    with pytest.raises(ConfigError, match="at least one member"):
        voter_weights([], "equal")
    with pytest.raises(ConfigError, match="finite"):
        voter_weights([1.0, float("inf")], "prior")
    with pytest.raises(ValueError, match="Generator"):
        voter_weights([1, 2], "random")
