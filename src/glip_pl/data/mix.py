"""Pipeline stage ``mix``: a weighted mix of sources that holds its ratios.

Smooth weighted round-robin (nginx's weighted upstreams): after any n draws, source i has been drawn n·w_i/Σw
times up to less than one draw, so the ratios hold at every prefix, also at the end of a finite epoch (which ends
when a drawn source is exhausted). The order is deterministic; the sources' shuffle buffers randomise the content.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence


class WeightedSchedule:

    def __init__(self, weights: Sequence[float]):
        if not weights or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"mixing weights must be non-negative with a positive sum, got {list(weights)}")
        self.weights = [float(w) for w in weights]
        self.total = sum(self.weights)
        self.credit = [0.0] * len(self.weights)

    def next(self) -> int:
        for i, w in enumerate(self.weights):
            self.credit[i] += w
        i = max(range(len(self.credit)), key=lambda k: (self.credit[k], -k))
        self.credit[i] -= self.total
        return i


def mix(streams: Sequence[Iterable], weights: Sequence[float]) -> Iterator[tuple]:
    """(source index, item) pairs."""
    its = [iter(s) for s in streams]
    sched = WeightedSchedule(weights)
    while True:
        i = sched.next()
        try:
            item = next(its[i])
        except StopIteration:
            return
        yield i, item
