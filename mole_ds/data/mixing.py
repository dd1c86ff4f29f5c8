"""Deterministic building blocks of the streams: shard assignment, shuffle buffer, weighted domain choice.

Everything here is a pure function of its seeds, so every rank and worker computes the same plan, and a
resumed run regenerates exactly the stream it left.
"""

from __future__ import annotations

import random
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def seeded(*parts) -> random.Random:
    """A Random seeded by a readable key (string seeds hash stably across processes, unlike hash())."""
    return random.Random(":".join(str(p) for p in parts))


def assign_shards(sizes: list[int | None], n_slots: int) -> list[list[int]]:
    """Assign shard indices (in the given order) to n_slots disjoint slots, balancing sample counts.

    Greedy: each shard goes to the slot with the fewest samples so far (ties: lowest slot).  Unknown sizes count
    as 1.  Requires len(sizes) >= n_slots (callers fall back to sample-level splitting otherwise).
    """
    load = [0] * n_slots
    out: list[list[int]] = [[] for _ in range(n_slots)]
    for i, s in enumerate(sizes):
        j = min(range(n_slots), key=lambda k: (load[k], k))
        out[j].append(i)
        load[j] += 1 if s is None else s
    return out


def shuffle_buffer(items: Iterable[T], size: int, rng: random.Random) -> Iterator[T]:
    """Classic reservoir-style shuffle: fill `size` items, then emit a random one per new item; drain at end."""
    if size <= 1:
        yield from items
        return
    buf: list[T] = []
    for x in items:
        if len(buf) < size:
            buf.append(x)
            continue
        j = rng.randrange(size)
        buf[j], x = x, buf[j]
        yield x
    rng.shuffle(buf)
    yield from buf


class DomainChooser:
    """Draws domain names with fixed probabilities; `draws` counts calls (the resume position)."""

    def __init__(self, weights: dict[str, float], rng: random.Random):
        total = float(sum(weights.values()))
        self.names = [d for d, w in weights.items() if w > 0]
        self.cum = []
        acc = 0.0
        for d in self.names:
            acc += weights[d] / total
            self.cum.append(acc)
        self.rng = rng
        self.draws = 0

    def __call__(self) -> str:
        self.draws += 1
        u = self.rng.random()
        for d, c in zip(self.names, self.cum):
            if u < c:
                return d
        return self.names[-1]

    def skip(self, n: int) -> None:
        for _ in range(n):
            self()
