"""Committee selection per IPC index, as named policies instead of the official magic integers (method doc §3.2).

The official ``--model-setting`` integers map onto these policies as follows:

* setting 0 (SRe2L++, one model) → ``single``;
* setting 5 (IPC 10, the 10 pairs of the 5-model pool) → ``pairs`` with size 2 and the pool ordered
  R18, R50, SV2, MBV2, D121; setting 3 (random pairs of all 5, IPC 50) → ``random`` with size 2;
* setting 4 (the per-dataset IPC 1 pair) → ``fixed`` with that pair.

Settings 1/2 are ``random`` on a 4-model pool; settings 6/7 (triples, "bad performance" per the authors) are
not reproduced verbatim: their hand-written triples are not a ``combinations`` order.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Sequence

import torch

from cvdd.device import derive_seed
from cvdd.errors import ConfigError

__all__ = ["COMMITTEE_POLICIES", "select_committee"]

#: ``single``: one expert (SRe2L++); ``pairs``: the k-th combination of the pool; ``random``: a seeded random
#: subset per IPC index; ``fixed``: the same given list for every IPC index.
COMMITTEE_POLICIES = ("single", "pairs", "random", "fixed")


def _check_names(names: Sequence[str], pool: list[str], what: str) -> None:
    """Raise a one-line ConfigError for the first name missing from the pool."""
    for name in names:
        if name not in pool:
            raise ConfigError(f"{what} expert {name!r} is not in the pool: {', '.join(pool)}")


def _as_int(value: object, what: str, minimum: int) -> int:
    """``value`` as a Python int >= ``minimum`` (NumPy integers welcome, bools and floats not)."""
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)  # type: ignore[call-overload]
    except TypeError:
        raise ConfigError(f"{what} must be an integer, got {value!r}") from None
    if number < minimum:
        raise ConfigError(f"{what} must be at least {minimum}, got {number}")
    return number


def select_committee(
    pool: Sequence[str],
    policy: str,
    ipc_index: int,
    size: int = 2,
    *,
    seed: int = 0,
    fixed: Sequence[str] | None = None,
    single: str | None = None,
) -> list[str]:
    """The committee (expert names) that votes on IPC index ``ipc_index``.

    Policies:
        ``single``: ``[single or pool[0]]`` (SRe2L++, N = 1); ``size`` is ignored.
        ``pairs``: combination number k = ``ipc_index mod C(M, size)`` of the M pool members, in
            ``itertools.combinations`` order: lexicographic in pool positions, each committee listed in pool
            order. For the pool R18, R50, SV2, MBV2, D121 and size 2 that is the paper's IPC 10 list
            (R18,R50), (R18,SV2), (R18,MBV2), (R18,D121), (R50,SV2), (R50,MBV2), (R50,D121), (SV2,MBV2),
            (SV2,D121), (MBV2,D121). Index C(M, size) wraps round to the first combination again (the
            official code raised IndexError past IPC index 9), so IPC 50 cycles through the 10 pairs 5 times.
        ``random``: ``size`` distinct members drawn without replacement by a generator seeded with
            ``derive_seed(seed, "committee", ipc_index)``, listed in pool order: the committee of an index
            depends only on (seed, ipc_index, pool), not on which indices ran before (sharding, resume).
        ``fixed``: ``list(fixed)`` for every index, in the given order; ``size`` is ignored.

    Args:
        pool: names of the available experts, in a fixed order (the order defines ``pairs``).
        policy: one of :data:`COMMITTEE_POLICIES`.
        ipc_index: the IPC index k >= 0 being recovered.
        size: committee size N of ``pairs`` and ``random``.
        seed: run seed of ``random``.
        fixed: the committee of ``fixed``.
        single: the expert of ``single`` (default: the first of the pool).

    Returns:
        The committee's expert names; the order is the order of the voter weights.

    Raises:
        ConfigError: empty or duplicated pool, unknown policy, negative IPC index, size < 1 or larger than
            the pool, a ``fixed``/``single`` name not in the pool, or an empty or duplicated ``fixed`` list.
    """
    pool = list(pool)
    if not pool:
        raise ConfigError("the expert pool is empty: a committee needs at least one expert")
    if len(set(pool)) != len(pool):
        dupes = sorted({n for n in pool if pool.count(n) > 1})
        raise ConfigError(f"the expert pool lists {', '.join(dupes)} more than once")
    if policy not in COMMITTEE_POLICIES:
        raise ConfigError(f"unknown committee policy {policy!r}; choose one of {', '.join(COMMITTEE_POLICIES)}")
    ipc_index = _as_int(ipc_index, "IPC index", minimum=0)

    if policy == "single":
        name = single if single is not None else pool[0]
        _check_names([name], pool, "single")
        return [name]
    if policy == "fixed":
        members = list(fixed or [])
        if not members:
            raise ConfigError("the fixed committee policy needs a non-empty list of experts")
        if len(set(members)) != len(members):
            raise ConfigError(f"the fixed committee lists an expert more than once: {', '.join(members)}")
        _check_names(members, pool, "fixed committee")
        return members

    size = _as_int(size, "committee size", minimum=1)
    if size > len(pool):
        raise ConfigError(f"committee size {size} is larger than the pool of {len(pool)} experts: {', '.join(pool)}")
    if policy == "pairs":
        k = ipc_index % math.comb(len(pool), size)
        # C(M, N) is tiny for any realistic pool, so walking the iterator beats an unranking formula for clarity.
        return list(next(itertools.islice(itertools.combinations(pool, size), k, None)))
    # policy == "random": a fresh CPU generator per index keeps the draw independent of the run order.
    gen = torch.Generator().manual_seed(derive_seed(seed, "committee", ipc_index))
    picks = sorted(torch.randperm(len(pool), generator=gen)[:size].tolist())
    return [pool[i] for i in picks]
