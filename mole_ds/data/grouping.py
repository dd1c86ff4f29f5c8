"""Length grouping (``data.group_by_length``): the order in which one stream hands out its encoded samples, so
that the samples of a step are of similar length (and, for ``modality``, all with or all without an image).

Why per stream and layout-free: a step takes c = g / V samples from each of V streams (mole_ds.data.pipeline).
Exact resume on any world size needs each stream's sequence to depend only on its own samples and the seed,
never on c.  So grouping reorders each stream's sequence within *windows* (W = the largest power of two <=
data.shuffle_buffer encoded samples) such that, for every power of two c <= W / BLOCKS, every aligned run of
c samples is a run of neighbouring lengths; and every stream uses the same, seeded, order of length ranks, so
that the c-runs the streams contribute to one step (the same positions in every stream) hold the same length
ranks of their windows: similar lengths across streams, ranks and steps too.

Algorithm of one window (:func:`window_order`), for the samples at stream positions [start, start + n):
  1. Sort them by key: ``length`` = (tokens, position); ``modality`` = text-only samples by tokens descending,
     then those with an image by tokens ascending (ties: position).  Tokens
     are the encoded length (template + image-token expansion, after truncation), since samples are encoded
     before they are batched.
  2. Cut the sorted ranks into BLOCKS blocks of W / BLOCKS consecutive ranks (a shorter window, the last of an
     epoch, keeps whole blocks and one last, shorter block).
  3. Emit the whole blocks in a seeded random order, the short block last (so blocks stay aligned).
  4. Inside a block, emit a *dyadic* order: split into two parts, the first a power of two h (h = size / 2
     for a power-of-two size, else the largest power of two below it), each part the lower or the upper
     ranks at random, and recurse.  Every aligned run of 2^j positions is then one node of the tree: 2^j
     consecutive ranks.
  The random draws depend on (seed, epoch, window start) only, the same for every stream.

Windows (:class:`GroupedTake`): window j covers stream positions [s, min(s + W, E)) with E the samples per
stream of the epoch (epoch_samples, which does not depend on the layout), then one last window [E, N) for the
samples past E that a step size not dividing E takes (N = ceil(E / c) * c; repeats in exact mode).  So all
positions before E are ordered the same on every layout, and an epoch still holds every sample once.
"""

from __future__ import annotations

import random
from typing import Callable

GROUP_BY = ("none", "length", "modality")

BLOCKS = 8
"""Blocks of neighbouring lengths per window, emitted in random order (step 2).  One stream's samples of one
step must fit in a block, hence data.shuffle_buffer >= BLOCKS x c (:func:`grouping_problem`)."""


def window_size(shuffle_buffer: int) -> int:
    """W: the largest power of two <= shuffle_buffer (0 when it is < 1)."""
    return 1 << (shuffle_buffer.bit_length() - 1) if shuffle_buffer >= 1 else 0


def grouping_problem(group_by: str, shuffle_buffer: int, per_stream_per_step: int, layout: str) -> str | None:
    """Why grouping cannot work with this buffer and layout (``layout`` says where c comes from), or None."""
    if group_by == "none":
        return None
    c = per_stream_per_step
    w = window_size(shuffle_buffer)
    if w >= BLOCKS * c:
        return None
    need = 1 << (BLOCKS * c - 1).bit_length()
    return (f"data.shuffle_buffer ({shuffle_buffer}) is too small for data.group_by_length ({group_by!r}): each "
            f"stream gives {c} sample(s) per step ({layout}), and grouping sorts windows of the largest power of two "
            f"<= data.shuffle_buffer into {BLOCKS} blocks of at least that many; set data.shuffle_buffer to at least "
            f"{need}, or data.group_by_length to 'none'")


def dyadic_order(n: int, rng: random.Random) -> list[int]:
    """Step 4: a permutation of ranks [0, n) in which every aligned run of 2^j positions lying inside a part of
    size >= 2^j is 2^j consecutive ranks."""
    out: list[int] = []
    todo = [(0, n)]  # (lowest rank, size) of the parts still to emit, next on top
    while todo:
        lo, size = todo.pop()
        if size == 1:
            out.append(lo)
            continue
        h = 1 << ((size - 1).bit_length() - 1)  # largest power of two < size
        if rng.random() < 0.5:
            first, second = (lo, h), (lo + h, size - h)
        else:
            first, second = (lo + size - h, h), (lo, size - h)
        todo += [second, first]
    return out


def window_order(lengths: list[int], has_image: list[bool], mode: str, window: int, rng: random.Random) -> list[int]:
    """Steps 1-4: indices into the window's samples in emission order."""
    n = len(lengths)
    if mode == "modality":
        # text-only longest first, then with an image shortest first: the two kinds meet at their short ends,
        # so where streams' kinds disagree at the same rank (their counts differ) the lengths still agree best
        ranks = sorted(range(n), key=lambda i: (has_image[i], lengths[i] if has_image[i] else -lengths[i], i))
    else:
        ranks = sorted(range(n), key=lambda i: (lengths[i], i))
    block = max(1, window // BLOCKS)
    whole = n // block
    blocks = list(range(whole))
    rng.shuffle(blocks)
    if n % block:
        blocks.append(whole)
    order = []
    for b in blocks:
        lo = b * block
        order += [ranks[lo + r] for r in dyadic_order(min(block, n - lo), rng)]
    return order


class GroupedTake:
    """One stream's samples in grouped order: ``take(c)``, and ``state()`` to resume from.

    ``draw()`` gives the stream's next encoded sample (in stream order), ``inner_position()`` its resume
    position.  ``epoch_samples`` is E, ``epoch_total`` N (see the module docstring).  The state is the inner
    position at the start of the open window plus the window (start, length, size W, samples already taken): a
    resumed stream re-draws (and re-encodes) that window, orders it the same way and skips what was taken.
    """

    def __init__(self, draw: Callable[[], object], inner_position: Callable[[], dict], mode: str, window: int,
                 epoch_samples: int, epoch_total: int, seed_key: tuple, state: dict | None = None):
        self.draw, self.inner_position = draw, inner_position
        self.mode, self.window, self.E, self.N, self.key = mode, window, epoch_samples, epoch_total, seed_key
        self.rest: list = []  # what is left of the open window, last to emit first
        self.start, self.len, self.taken, self.w = 0, 0, 0, window  # the open window (len 0: none)
        self.at_start = inner_position()  # the inner position at the open window's start
        if state:
            self.start = int(state["start"])
            if state["len"]:  # resume inside a window: rebuild it as it was, drop what was taken
                self._fill(int(state["len"]), int(state["window"]))
                for _ in range(int(state["taken"])):
                    self._next()

    def _fill(self, n: int, w: int) -> None:
        self.at_start = self.inner_position()
        samples = [self.draw() for _ in range(n)]
        lengths = [len(s.input_ids) for s in samples]
        images = [s.pixel_values is not None for s in samples]
        rng = random.Random(":".join(str(p) for p in (*self.key, "group", self.start)))
        self.rest = [samples[i] for i in reversed(window_order(lengths, images, self.mode, w, rng))]
        self.len, self.taken, self.w = n, 0, w

    def _next(self):
        if not self.rest:
            self.start += self.len
            end = min(self.start + self.window, self.E) if self.start < self.E else self.N
            self._fill(max(end - self.start, 1), self.window)
        self.taken += 1
        return self.rest.pop()

    def take(self, c: int) -> list:
        return [self._next() for _ in range(c)]

    def state(self) -> dict:
        """{"start", "len", "window", "taken"} of the open window and the inner position at its start ("inner");
        len 0 when no window is open (the next one starts at "start")."""
        if not self.rest:
            return {"start": self.start + self.len, "len": 0, "window": self.window, "taken": 0,
                    "inner": self.inner_position()}
        return {"start": self.start, "len": self.len, "window": self.w, "taken": self.taken, "inner": self.at_start}
