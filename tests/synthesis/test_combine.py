"""Golden values of the gradient combination rules and the voters' conflict measurement."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import cvdd
from cvdd.errors import ConfigError
from cvdd.synthesis.recover import _gradient_conflict, combine_gradients


def test_sum_is_the_gradient_of_the_summed_loss() -> None:
    g = [torch.tensor([1.0, 2.0]), torch.tensor([-3.0, 0.5])]
    assert torch.equal(combine_gradients(g, [0.7, 0.3], "sum"), torch.tensor([-2.0, 2.5]))


def test_pcgrad_removes_conflicting_components() -> None:
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])  # dot -1: they conflict
    # g1 - (-1 / 2) g2 = (0.5, 0.5); g2 - (-1 / 1) g1 = (0, 1); sum (0.5, 1.5)
    assert torch.allclose(combine_gradients([g1, g2], [1, 1], "pcgrad"), torch.tensor([0.5, 1.5]))
    # No conflict: plain sum.
    h1, h2 = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])
    assert torch.equal(combine_gradients([h1, h2], [1, 1], "pcgrad"), torch.tensor([2.0, 1.0]))


def test_gradnorm_equalises_experts() -> None:
    g1, g2 = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 1.0])  # norms 3 and 1
    # (0.5 (1, 0) + 0.5 (0, 1)) * (3 + 1) = (2, 2): the small gradient counts as much as the large one.
    assert torch.allclose(combine_gradients([g1, g2], [1.0, 1.0], "gradnorm"), torch.tensor([2.0, 2.0]))
    # Voter weights still decide the mix: (0.75 (1, 0) + 0.25 (0, 1)) * 4 = (3, 1).
    assert torch.allclose(combine_gradients([g1, g2], [3.0, 1.0], "gradnorm"), torch.tensor([3.0, 1.0]))
    with pytest.raises(ConfigError, match="unknown gradient combination"):
        combine_gradients([g1, g2], [1, 1], "median")


def test_conflict_is_the_pairwise_cosine() -> None:
    out = _gradient_conflict([torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])], ["a", "b"])
    assert torch.isclose(out["cos/a|b"], torch.tensor(-(2**-0.5)))
    assert torch.isclose(out["cos/mean"], out["cos/a|b"])


@pytest.mark.parametrize("rule", ["sum", "pcgrad", "gradnorm"])
def test_recover_records_voter_conflict(rule: str, digit_experts: Path, digits, tmp_path: Path) -> None:
    res = cvdd.recover(
        digit_experts,
        tmp_path,
        ipc=2,
        iterations=4,
        init="real",
        dataset=digits,
        overrides={"combine": rule, "log_every": 2},
        progress=False,
    )
    rec = res.meta["units"][0]["records"]
    assert len(rec) == 2 and all(-1.0 <= r["cos/mean"] <= 1.0 for r in rec)
    assert res.meta["config"]["combine"] == rule
