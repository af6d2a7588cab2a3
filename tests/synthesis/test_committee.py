"""Committee policies: the paper's IPC 10 pair list, wrap-around, seeded random subsets, errors."""

from __future__ import annotations

import numpy as np
import pytest

from cvdd.errors import ConfigError
from cvdd.synthesis import COMMITTEE_POLICIES, select_committee

POOL = ["R18", "R50", "SV2", "MBV2", "D121"]
# Method doc §3.2, setting 5, typed from the doc (not generated).
PAPER_IPC10_PAIRS = [
    ["R18", "R50"],
    ["R18", "SV2"],
    ["R18", "MBV2"],
    ["R18", "D121"],
    ["R50", "SV2"],
    ["R50", "MBV2"],
    ["R50", "D121"],
    ["SV2", "MBV2"],
    ["SV2", "D121"],
    ["MBV2", "D121"],
]


def test_policy_names() -> None:
    assert COMMITTEE_POLICIES == ("single", "pairs", "random", "fixed")


def test_pairs_is_the_paper_list() -> None:
    assert [select_committee(POOL, "pairs", k) for k in range(10)] == PAPER_IPC10_PAIRS


def test_pairs_wraps_round_past_the_last_combination() -> None:
    for k in (10, 23, 49):
        assert select_committee(POOL, "pairs", k) == PAPER_IPC10_PAIRS[k % 10]
    # Size 3: C(5, 3) = 10 distinct triples, then the first again.
    triples = [tuple(select_committee(POOL, "pairs", k, 3)) for k in range(11)]
    assert len(set(triples[:10])) == 10 and triples[10] == triples[0] == ("R18", "R50", "SV2")
    assert select_committee(["a", "b"], "pairs", 7) == ["a", "b"]  # C(2, 2) = 1


def test_random_is_deterministic_per_index_and_run_order_free() -> None:
    forward = {k: select_committee(POOL, "random", k, seed=3) for k in range(12)}
    backward = {k: select_committee(POOL, "random", k, seed=3) for k in reversed(range(12))}
    assert forward == backward
    assert len({tuple(c) for c in forward.values()}) > 1  # differs across indices for some index
    for members in forward.values():
        assert len(members) == 2 and len(set(members)) == 2
        assert members == [m for m in POOL if m in members]  # listed in pool order
    other_seed = {k: select_committee(POOL, "random", k, seed=4) for k in range(12)}
    assert other_seed != forward
    assert select_committee(POOL, "random", np.int64(5), seed=3) == forward[5]
    assert sorted(select_committee(POOL, "random", 0, 5)) == sorted(POOL)


def test_single_and_fixed() -> None:
    assert select_committee(POOL, "single", 7) == ["R18"]
    assert select_committee(POOL, "single", 7, single="D121") == ["D121"]
    assert select_committee(POOL, "fixed", 3, fixed=["MBV2", "D121"]) == ["MBV2", "D121"]


@pytest.mark.parametrize(
    ("pool", "policy", "kwargs", "message"),
    [
        (["a", "b"], "random", {"size": 3}, "committee size 3 is larger than the pool of 2 experts: a, b"),
        (["a", "b"], "pairs", {"size": 3}, "committee size 3 is larger than the pool of 2 experts: a, b"),
        (["a", "b"], "pairs", {"size": 0}, "committee size must be at least 1"),
        (["a", "b"], "setting5", {}, "unknown committee policy 'setting5'; choose one of single, pairs, random, fixed"),
        (["a", "b"], "fixed", {"fixed": ["a", "c"]}, "fixed committee expert 'c' is not in the pool: a, b"),
        (["a", "b"], "fixed", {"fixed": []}, "non-empty list"),
        (["a", "b"], "fixed", {"fixed": ["a", "a"]}, "more than once"),
        (["a", "b"], "single", {"single": "z"}, "single expert 'z' is not in the pool: a, b"),
        ([], "single", {}, "the expert pool is empty"),
        (["a", "a"], "pairs", {}, "lists a more than once"),
        (["a", "b"], "pairs", {"ipc_index": -1}, "IPC index must be at least 0"),
    ],
)
def test_errors_are_one_line_config_errors(pool: list[str], policy: str, kwargs: dict, message: str) -> None:
    ipc_index = kwargs.pop("ipc_index", 0)
    with pytest.raises(ConfigError) as info:
        select_committee(pool, policy, ipc_index, **kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)
