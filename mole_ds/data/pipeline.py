"""Streaming shards into batches, split over ranks and DataLoader workers, resumable on any world size.

Terms: a *stream* is the unit of reading and of the resume position.  A run has a fixed number of streams V
(``data.streams``), independent of the world size W.  With g = W * batch_size samples per step over all ranks
(:class:`Layout`): if g >= V, every step takes c = g / V samples from every stream, rank r owning streams
[r*V/W, (r+1)*V/W); if g < V, the streams form k = V / g groups and step s takes one sample from each stream of
group s mod k (a *round* of k steps, as with gradient accumulation).  Each rank's streams are split in
contiguous blocks over its DataLoader workers.  So the samples of every whole round are the same whatever W and
the batch size are, and a checkpoint, which records one position per stream, resumes exactly (mid-epoch
included) on any layout that check_layout accepts for V.

Algorithm of one stream's epoch (:class:`_Stream`):
  1. Every process computes the same plan from (seed, epoch): shard order shuffled, then shards assigned to
     the V streams greedily by sample count (balanced, disjoint).  With fewer shards than streams, every stream
     reads all shards and keeps raw sample i iff i % V == stream (disjoint again, at the cost of extra reads).
  2. A *raw stream* reads the stream's shards pass after pass (each pass re-shuffled; pass 0 is the epoch's
     data, later passes only pad), through a seeded shuffle buffer flushed at the end of each pass.  A shard
     whose bytes do not parse as a tar is logged by URL, counted (``corrupt_shard``) and the rest of it skipped;
     a storage failure is not corruption: the reader retries/resumes it (mole_ds.data.storage) and, past
     ``storage_timeout_s``, the StorageError ends the stream.
  3. Exact mode: samples come from one raw stream over the stream's shards.  Mixing mode: one raw stream per
     domain, and a seeded chooser picks the domain of each next sample by weight.
  4. Each raw sample is parsed and encoded (image processor, template, masking); a bad one is counted by
     reason and replaced by the next one from the same raw stream.  A full pass over a raw stream's shards that
     gives no usable sample ends it with DataStreamError (counts per reason, likely fix) instead of reading the
     shards forever; at the end of each first pass the skip fraction is checked (max_skip_fraction).
  5. Per step, each DataLoader worker yields one item: c encoded samples from each of its streams (stream
     order), the streams' positions after them ("_pos") and counter increments ("_stats").  The loader takes
     one item per worker (a DataLoader hands them out in strict rotation) and collates them into the rank's
     batch.  Every stream yields exactly ``steps_per_epoch * c`` samples per epoch, so all ranks take the same
     number of steps.  An error ends the worker with one last item {"_error", "_error_kind", "_stats"} that
     the loader re-raises in the main process (so the message and counts of a worker reach the trainer intact).
  6. Resume: a stream given a position fast-forwards its raw streams (reading, not decoding) and chooser to it.
  7. Length grouping (``data.group_by_length``, mole_ds.data.grouping): a stream hands out its encoded samples
     window by window, each window reordered so that every aligned run of c samples has neighbouring lengths
     and every stream puts the same length ranks at the same positions; a position then also names the open
     window, which a resumed stream re-draws (encoding it) and reorders the same way.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from typing import Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from mole_ds.config import ConfigError
from mole_ds.data import storage
from mole_ds.data.collate import SampleEncoder
from mole_ds.data.config import DataConfig
from mole_ds.data.manifest import ShardInfo
from mole_ds.data.mixing import DomainChooser, assign_shards, seeded, shuffle_buffer
from mole_ds.data.conversation import TokenizationMismatchError
from mole_ds.data.grouping import GroupedTake, window_size
from mole_ds.data.samples import SkipSample, parse_sample
from mole_ds.data.skips import DataStreamError, check_skip_fraction, describe
from mole_ds.data.storage import RetryPolicy, StorageError
from mole_ds.data.tario import CorruptShardError, iter_tar_samples

log = logging.getLogger(__name__)


def check_layout(streams: int, world_size: int, batch_size: int) -> str | None:
    """Why (streams, world_size, per-rank batch_size) cannot be a layout, or None when it can (see
    :class:`Layout`)."""
    if streams < 1:
        return f"data.streams ({streams}) must be >= 1"
    g = world_size * batch_size
    if g >= streams:
        if streams % world_size:
            return (f"data.streams ({streams}) must be a multiple of the world size ({world_size}): each rank owns "
                    "streams/world_size streams")
        if batch_size % (streams // world_size):
            return (f"the per-rank batch size ({batch_size}) must be a multiple of the streams per rank "
                    f"({streams // world_size} = data.streams {streams} / world size {world_size}): every step "
                    "takes the same number of samples from every stream")
    elif streams % g:
        return (f"data.streams ({streams}) must be a multiple of the global micro-batch ({g} = batch size "
                f"{batch_size} x world size {world_size}) when it is larger: each step takes one sample from "
                "each stream of one group of that many")
    return None


class Layout:
    """Which streams a rank reads at which step (the same global order for every valid world size).

    g = world_size * batch_size samples per step over all ranks.  g >= V: every step takes c = g / V samples
    from every stream, rank r owning the contiguous block [r V/W, (r+1) V/W).  g < V: the V streams form
    k = V / g groups of g, step s takes one sample from each stream of group s mod k (a *round* is k steps),
    rank r owning the streams j*g + r*B + i (i < B) of every group j.  Either way, after every whole round all
    streams have given the same number of samples, and the samples of a round do not depend on the world size.
    """

    def __init__(self, streams: int, world_size: int, batch_size: int, rank: int):
        why = check_layout(streams, world_size, batch_size)
        if why:
            raise ValueError(why)
        g = world_size * batch_size
        self.k = max(1, streams // g)  # steps per round
        self.c = max(1, g // streams)  # samples per active stream per step
        self.active = min(g, streams)  # streams taking part in one step, over all ranks
        self.per_step = self.active // world_size  # of them on one rank
        self.rank = rank

    def streams_of(self, group: int) -> list[int]:
        """This rank's streams that step s with s % k == group reads, in global order."""
        base = group * self.active + self.rank * self.per_step
        return list(range(base, base + self.per_step))

    @property
    def mine(self) -> list[int]:
        return [v for j in range(self.k) for v in self.streams_of(j)]


def default_streams(world_size: int, batch_size: int, workers_per_rank: int) -> int:
    """world_size * workers_per_rank (one stream per DataLoader worker), reduced so it divides the batch."""
    return world_size * math.gcd(batch_size, workers_per_rank)


def plan_stream(shards: list[ShardInfo], stream: int, n_streams: int, seed: int, epoch: int, tag: str,
                shuffle: bool) -> tuple[list[ShardInfo], tuple[int, int] | None]:
    """Step 1 for one stream: (shards it reads, (stream, n_streams) sample-level split or None)."""
    order = list(shards)
    if shuffle:
        seeded(seed, epoch, tag, "shards").shuffle(order)
    if len(order) >= n_streams:
        mine = assign_shards([s.samples for s in order], n_streams)[stream]
        return [order[i] for i in mine], None
    return order, (stream, n_streams)


class RawStream:
    """Step 2: an endless stream of raw samples of one stream (and one domain in mixing mode)."""

    def __init__(self, shards: list[ShardInfo], split: tuple[int, int] | None, seed, epoch: int, tag: str,
                 stream: int, buffer: int, shuffle: bool, stats: Counter, policy: RetryPolicy | None = None):
        self.shards, self.split, self.buffer, self.shuffle = shards, split, buffer, shuffle
        self.key = (seed, epoch, tag, stream)
        self.tag = tag
        self.stats = stats
        self.policy = policy or RetryPolicy()
        self.drawn = 0  # the resume position
        self._pass = 0
        self._it = self._passes()

    def _read_shard(self, info: ShardInfo) -> Iterator[dict]:
        n = 0
        # Shard faults are counted on the first pass (later passes re-read the same shards), and in sample-split
        # mode (every stream reads every shard) by the split's first stream only.
        count = self._pass == 0 and (self.split is None or self.split[0] == 0)
        try:
            with storage.open_url(info.url, self.policy) as f:
                for raw in iter_tar_samples(f, info.url):
                    n += 1
                    yield raw
        except CorruptShardError as exc:  # the bytes themselves are bad; StorageError is not caught here
            if count:
                log.warning("skipping the rest of shard %s: %s", info.url, exc)
                self.stats["corrupt_shard"] += 1
                self._lost(info, n)
            return
        if info.samples is not None and n != info.samples and count:
            log.warning("shard %s ended after %d of %d samples", info.url, n, info.samples)
            self.stats["short_shard"] += 1
            self._lost(info, n)

    def _lost(self, info: ShardInfo, n: int) -> None:
        if info.samples is not None and info.samples > n:
            self.stats["samples_lost"] += info.samples - n

    def _one_pass(self, p: int) -> Iterator[dict]:
        self._pass = p
        order = list(self.shards)
        if self.shuffle and p > 0:
            seeded(*self.key, "pass", p).shuffle(order)
        i = 0
        for info in order:
            for raw in self._read_shard(info):
                if self.split is None or i % self.split[1] == self.split[0]:
                    yield raw
                i += 1

    def _passes(self) -> Iterator[tuple[int, dict]]:
        p = 0
        while True:
            got = False
            for raw in shuffle_buffer(self._one_pass(p), self.buffer, seeded(*self.key, "buffer", p)):
                got = True
                yield p, raw
            if not got:
                split = f", keeping every {self.split[1]}th sample from {self.split[0]}" if self.split else ""
                raise DataStreamError(f"no readable sample in the {len(self.shards)} shard(s) of {self.tag!r} "
                                      f"(stream {self.key[3]}{split})\n  " + describe(self.stats))
            p += 1

    def next(self) -> tuple[int, dict]:
        """(pass index, raw sample)."""
        self.drawn += 1
        return next(self._it)

    def skip(self, n: int) -> None:
        for _ in range(n):
            self.next()


class _PassWatch:
    """Step 4's guard for one raw stream: a pass seen from its start that gives no usable sample is an error."""

    def __init__(self, resumed: bool):
        self.pass_ = None if resumed else 0  # after a resume the current pass was not seen from its start
        self.usable = 0

    def new_sample(self, p: int) -> tuple[bool, bool]:
        """Register a sample of pass p: (it starts a new pass, the previous pass was seen whole and gave nothing)."""
        if p == self.pass_:
            return False, False
        empty = self.pass_ is not None and self.usable == 0
        self.pass_, self.usable = p, 0
        return True, empty


class _Stream:
    """Steps 2-4 and 6 for one stream: ``take(c)`` gives its next c usable encoded samples."""

    def __init__(self, ds: "StreamingDataset", v: int, enc: SampleEncoder, stats: Counter, examples: dict,
                 pos: dict | None):
        cfg = ds.cfg
        self.v, self.ds, self.enc, self.stats, self.examples = v, ds, enc, stats, examples
        if ds.mixing:
            self.raw = {d: ds._raw(v, ds._domain_shards(d), d, stats) for d, w in cfg.domain_weights.items() if w > 0}
            self.chooser = DomainChooser(cfg.domain_weights, seeded(cfg.seed, ds.epoch, v, "mix"))
        else:
            self.raw = {"all": ds._raw(v, ds.shards, "all", stats)}
            self.chooser = None
        pos = pos or {}
        for name, s in self.raw.items():  # step 6
            s.skip(pos.get("streams", {}).get(name, 0))
        if self.chooser is not None:
            self.chooser.skip(pos.get("chooser", 0))
        self.watch = {name: _PassWatch(resumed=s.drawn > 0) for name, s in self.raw.items()}
        self.grouped = None
        if cfg.group_by_length != "none":  # step 7; the same seed for every stream, so their orders agree
            self.grouped = GroupedTake(self._one, self._inner_position, cfg.group_by_length,
                                       window_size(cfg.shuffle_buffer), ds.epoch_samples,
                                       ds.steps_per_epoch // ds.k * ds.c, (cfg.seed, ds.epoch), pos.get("group"))

    def _inner_position(self) -> dict:
        return {"streams": {n: s.drawn for n, s in self.raw.items()},
                "chooser": self.chooser.draws if self.chooser else 0}

    def position(self) -> dict:
        if self.grouped is None:
            return self._inner_position()
        st = self.grouped.state()
        return {**st.pop("inner"), "group": st}

    def take(self, c: int) -> list:
        if self.grouped is not None:
            return self.grouped.take(c)
        return [self._one() for _ in range(c)]

    def _one(self):
        ds, stats = self.ds, self.stats
        name = self.chooser() if self.chooser else "all"
        stream = self.raw[name]
        while True:
            p, raw = stream.next()
            started, empty = self.watch[name].new_sample(p)
            if empty:
                raise DataStreamError(ds._no_usable_message(stream, stats, self.examples))
            if started and p == 1:  # the first pass just ended: check the skip fraction
                warn = check_skip_fraction(stats, ds.cfg.max_skip_fraction, f"rank {ds.rank} stream {self.v}",
                                           final=True, examples=self.examples)
                if warn:
                    log.warning(warn)
            if p == 0:
                stats["samples_read"] += 1
            try:
                sample = self.enc(parse_sample(raw))
            except SkipSample as exc:
                if p == 0:  # count each bad sample once per epoch, not again when padding re-reads it
                    stats[exc.reason] += 1
                    self.examples.setdefault(exc.reason, str(exc))
                    if stats[exc.reason] <= 3:
                        log.warning("skipped sample: %s", exc)
                continue
            self.watch[name].usable += 1
            if p > 0 and not ds.mixing:
                stats["repeated"] += 1  # padding samples from a later pass (exact mode)
            return sample


class StreamingDataset(IterableDataset):
    """Yields, per step, one item per DataLoader worker (see the module docstring).  Use via StreamingLoader."""

    def __init__(self, cfg: DataConfig, shards: list[ShardInfo], processor, rank: int, world_size: int,
                 domain_names: list[str], streams: int):
        super().__init__()
        self.cfg, self.shards, self.processor = cfg, shards, processor
        self.rank, self.world_size = rank, world_size
        self.domain_names = domain_names
        self.layout = Layout(streams, world_size, cfg.batch_size, rank)
        self.V, self.c, self.k = streams, self.layout.c, self.layout.k
        self.mine = self.layout.mine
        self.n_workers = min(cfg.workers_per_rank, self.layout.per_step)
        self.epoch = 0
        self.start_step = 0
        self.start_positions: dict[int, dict] = {}
        self.mixing = cfg.mixing
        if self.mixing:
            missing = [d for d, w in cfg.domain_weights.items() if w > 0 and not self._domain_shards(d)]
            if missing:
                raise ConfigError([f"data.domain_weights ({cfg.domain_weights}) names domain(s) {missing} with "
                                   f"no shards; shard domains: {sorted({s.domain for s in shards})}"])
        self.epoch_samples = self._epoch_samples_per_stream()

    def _domain_shards(self, d: str) -> list[ShardInfo]:
        return [s for s in self.shards if s.domain == d]

    def worker_streams(self, w: int, group: int) -> list[int]:
        """Worker w's streams in a group: a contiguous block of this rank's (so worker order is stream order)."""
        mine = self.layout.streams_of(group)
        q, r = divmod(len(mine), self.n_workers)
        start = w * q + min(w, r)
        return mine[start:start + q + (1 if w < r else 0)]

    def _epoch_samples_per_stream(self) -> int:
        """Samples every stream yields per epoch before padding: the largest stream's (computed over all V
        streams, so every rank agrees)."""
        if self.mixing:
            total = self.cfg.samples_per_epoch
            if not total:  # 0 = all samples of the weighted domains
                known = [s.samples for s in self.shards if s.domain in self.cfg.domain_weights]
                if any(k is None for k in known):
                    raise ConfigError(["data.samples_per_epoch (0) must be set when shard sample counts are "
                                       "unknown (read the shards through their manifest to know them)"])
                total = sum(known)
            return max(1, -(-total // self.V))
        if any(s.samples is None for s in self.shards):
            raise ValueError("exact epochs need shard sample counts: read the shards through their manifest")
        worst = 0
        for v in range(self.V):
            mine, split = plan_stream(self.shards, v, self.V, self.cfg.seed, self.epoch, "all",
                                      self.cfg.shuffle_shards)
            n = sum(s.samples for s in mine)
            worst = max(worst, -(-(n - split[0]) // split[1]) if split else n)
        return max(1, worst)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.epoch_samples = self._epoch_samples_per_stream()

    @property
    def steps_per_epoch(self) -> int:
        """Steps per epoch on every rank: the largest stream's samples, c per step of its group, k steps per
        round (smaller streams pad)."""
        return max(1, -(-self.epoch_samples // self.c)) * self.k

    def _raw(self, v: int, shards: list[ShardInfo], tag: str, stats: Counter) -> RawStream:
        mine, split = plan_stream(shards, v, self.V, self.cfg.seed, self.epoch, tag, self.cfg.shuffle_shards)
        return RawStream(mine, split, self.cfg.seed, self.epoch, tag, v, self.cfg.shuffle_buffer,
                         self.cfg.shuffle_shards, stats, RetryPolicy(timeout_s=self.cfg.storage_timeout_s))

    def iter_worker(self, worker: int) -> Iterator[dict]:
        """Steps 2-6 for this rank's worker; an error becomes a final {"_error", ...} item (see step 5)."""
        stats: Counter = Counter()
        reported: Counter = Counter()
        try:
            yield from self._worker_items(worker, stats, reported)
        except (DataStreamError, StorageError, TokenizationMismatchError) as exc:
            kind = ("storage" if isinstance(exc, StorageError) else "stream" if isinstance(exc, DataStreamError)
                    else "mismatch")
            where = f"rank {self.rank}" + (f" worker {worker}" if self.n_workers > 1 else "")
            yield {"_error": f"{where}: {exc}", "_error_kind": kind, "_stats": dict(stats - reported)}

    def _worker_items(self, worker: int, stats: Counter, reported: Counter) -> Iterator[dict]:
        enc = SampleEncoder(self.processor, self.domain_names, self.cfg.max_length, self.cfg.mismatch_policy,
                            self.cfg.process_images, self.cfg.chat_format)
        examples: dict[str, str] = {}  # one detail per skip reason, for error messages
        groups = [[_Stream(self, v, enc, stats, examples, self.start_positions.get(v))
                   for v in self.worker_streams(worker, j)] for j in range(self.k)]
        for step in range(self.start_step, self.steps_per_epoch):
            streams = groups[step % self.k]
            samples = [x for s in streams for x in s.take(self.c)]
            item = {"samples": samples, "_pos": {s.v: s.position() for s in streams},
                    "_stats": dict(stats - reported)}
            reported.clear()
            reported.update(stats)
            yield item

    def _no_usable_message(self, stream: RawStream, stats: Counter, examples: dict) -> str:
        return (f"a full pass over the {len(stream.shards)} shard(s) of {stream.tag!r} (stream {stream.key[3]}) gave "
                f"no usable sample (max_length {self.cfg.max_length}, chat_format {self.cfg.chat_format!r}); "
                "stopping instead of re-reading them forever\n  " + describe(stats, examples))

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        if info is not None and info.num_workers != self.n_workers:
            raise RuntimeError(f"DataLoader has {info.num_workers} workers, dataset expects {self.n_workers}")
        if info is not None:
            torch.set_num_threads(1)  # worker processes share the cores with the trainer
        return self.iter_worker(info.id if info is not None else 0)
