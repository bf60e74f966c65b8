"""Seeded, deterministic subsets: a hash order per key, and an even split across domains.

The order of a key depends only on (seed, key), never on numpy's or Python's generator streams, so a
vendored set rebuilt years later, or a subset taken on another machine, picks the same items.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def seeded_rank_key(seed: int, key: str) -> bytes:
    """Sort key that shuffles `key`s reproducibly for a given seed."""
    return hashlib.sha256(f"{seed}\x00{key}".encode()).digest()


def seeded_pick(keys: Sequence[str], k: int, seed: int) -> list[int]:
    """Indices of `k` of `keys` (distinct strings) chosen in seeded hash order, returned ascending."""
    order = sorted(range(len(keys)), key=lambda i: seeded_rank_key(seed, keys[i]))
    return sorted(order[:k])


def even_quotas(capacities: dict[str, int], k: int, seed: int) -> dict[str, int]:
    """Split `k` picks as evenly as possible over groups, none above its capacity (water-filling).

    When `k` does not divide evenly, the groups that get one extra are chosen in seeded hash order.
    """
    quotas = {g: 0 for g in capacities}
    left = min(k, sum(capacities.values()))
    open_groups = sorted((g for g, c in capacities.items() if c > 0), key=lambda g: seeded_rank_key(seed, g))
    while left > 0:
        share = left // len(open_groups)
        if share == 0:
            for g in open_groups[:left]:
                quotas[g] += 1
            break
        for g in open_groups:
            take = min(share, capacities[g] - quotas[g])
            quotas[g] += take
            left -= take
        open_groups = [g for g in open_groups if quotas[g] < capacities[g]]
    return quotas


def stratified_subset(ids: Sequence[str], domains: Sequence[str | None], k: int, seed: int) -> list[int]:
    """Indices of `k` items spread evenly over domains (None is a domain of its own), ascending.

    ids, domains: [items]. Within a domain the items are taken in seeded hash order of their id, so a
    smaller subset is contained in a larger one for the same seed whenever the quotas allow it.
    """
    groups: dict[str, list[int]] = {}
    for i, d in enumerate(domains):
        groups.setdefault("\x00none" if d is None else d, []).append(i)
    quotas = even_quotas({g: len(members) for g, members in groups.items()}, k, seed)
    chosen: list[int] = []
    for g, members in groups.items():
        picked = seeded_pick([ids[i] for i in members], quotas[g], seed)
        chosen.extend(members[j] for j in picked)
    return sorted(chosen)
