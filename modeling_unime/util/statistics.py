"""Small statistics the judge audits share: ranks with ties."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["tied_ranks"]


def tied_ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks of ``values`` in increasing order, tied values sharing their mean rank (O(n log n)).

    >>> tied_ranks([0.3, 0.1, 0.3, 0.2])
    [3.5, 1.0, 3.5, 2.0]
    """
    order = sorted(range(len(values)), key=lambda index: values[index])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return ranks
