"""Streaming shards into batches, split over ranks and DataLoader workers, resumable.

Terms: a *slot* is one (rank, worker) pair, slot = rank * workers_per_rank + worker; there are
world_size * workers_per_rank slots and each reads disjoint data.

Algorithm of one slot's epoch (:meth:`StreamingDataset.iter_slot`):
  1. Every process computes the same plan from (seed, epoch): shard order shuffled, then shards assigned to
     slots greedily by sample count (balanced, disjoint).  With fewer shards than slots, every slot reads all
     shards and keeps raw sample i iff i % n_slots == slot (disjoint again, at the cost of extra reads).
  2. A *raw stream* reads the slot's shards pass after pass (each pass re-shuffled; pass 0 is the epoch's data,
     later passes only pad), through a seeded shuffle buffer flushed at the end of each pass.  A shard whose
     bytes do not parse as a tar is logged by URL, counted (``corrupt_shard``) and the rest of it skipped; a
     storage failure is not corruption: the reader retries/resumes it (mole_ds.data.storage) and, past
     ``storage_timeout_s``, the StorageError ends the stream.
  3. Exact mode: samples come from one raw stream over all shards.  Mixing mode: one raw stream per domain, and
     a seeded chooser picks the domain of each next sample by weight.
  4. Each raw sample is parsed and encoded (image processor, template, masking); a bad one is counted by
     reason and replaced by the next one from the same stream.  A full pass over a stream's shards that gives
     no usable sample ends the stream with DataStreamError (counts per reason, likely fix) instead of reading
     the shards forever; at the end of each first pass the skip fraction is checked (max_skip_fraction).
  5. Samples are collated into batches; the slot yields exactly `batches_per_slot` batches per epoch, so all
     ranks take the same number of steps.  Each batch carries the slot's stream position after it ("_pos") and
     counter increments ("_stats"); the loader keeps the position of the last batch it handed out per worker.
     An error ends the slot with one last item {"_error", "_error_kind", "_stats"} that the loader re-raises in
     the main process (so the message and the counts of a DataLoader worker reach the trainer intact).
  6. Resume: a slot given a position fast-forwards its raw streams (reading, not decoding) and chooser to it.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from typing import Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from mole_ds.data import storage
from mole_ds.data.collate import SampleEncoder, collate
from mole_ds.data.config import DataConfig
from mole_ds.data.manifest import ShardInfo
from mole_ds.data.mixing import DomainChooser, assign_shards, seeded, shuffle_buffer
from mole_ds.data.conversation import TokenizationMismatchError
from mole_ds.data.samples import SkipSample, parse_sample
from mole_ds.data.skips import DataStreamError, check_skip_fraction, describe
from mole_ds.data.storage import RetryPolicy, StorageError
from mole_ds.data.tario import CorruptShardError, iter_tar_samples

log = logging.getLogger(__name__)


def plan_slot(shards: list[ShardInfo], slot: int, n_slots: int, seed: int, epoch: int, tag: str,
              shuffle: bool) -> tuple[list[ShardInfo], tuple[int, int] | None]:
    """Step 1 for one stream: (shards this slot reads, (slot, n_slots) sample-level split or None)."""
    order = list(shards)
    if shuffle:
        seeded(seed, epoch, tag, "shards").shuffle(order)
    if len(order) >= n_slots:
        mine = assign_shards([s.samples for s in order], n_slots)[slot]
        return [order[i] for i in mine], None
    return order, (slot, n_slots)


class RawStream:
    """Step 2: an endless stream of raw samples of one slot (and one domain in mixing mode)."""

    def __init__(self, shards: list[ShardInfo], split: tuple[int, int] | None, seed, epoch: int, tag: str,
                 slot: int, buffer: int, shuffle: bool, stats: Counter, policy: RetryPolicy | None = None):
        self.shards, self.split, self.buffer, self.shuffle = shards, split, buffer, shuffle
        self.key = (seed, epoch, tag, slot)
        self.tag = tag
        self.stats = stats
        self.policy = policy or RetryPolicy()
        self.drawn = 0  # the resume position
        self._pass = 0
        self._it = self._passes()

    def _read_shard(self, info: ShardInfo) -> Iterator[dict]:
        n = 0
        # Shard faults are counted on the first pass (later passes re-read the same shards), and in sample-split
        # mode (every slot reads every shard) by the split's first slot only.
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
                raise DataStreamError(f"no readable sample in the {len(self.shards)} shard(s) of stream {self.tag!r} "
                                      f"(slot {self.key[3]}{split})\n  " + describe(self.stats))
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


class StreamingDataset(IterableDataset):
    """Yields collated batches for this rank (see the module docstring).  Use via StreamingLoader."""

    def __init__(self, cfg: DataConfig, shards: list[ShardInfo], processor, rank: int, world_size: int,
                 domain_names: list[str]):
        super().__init__()
        self.cfg, self.shards, self.processor = cfg, shards, processor
        self.rank, self.world_size = rank, world_size
        self.domain_names = domain_names
        self.W = cfg.workers_per_rank
        self.n_slots = world_size * self.W
        self.epoch = 0
        self.start_positions: list[dict | None] = [None] * self.W
        self.worker_offset = 0  # DataLoader worker i serves logical worker (i + offset) % W (see __iter__)
        self.mixing = cfg.domain_weights is not None
        if self.mixing:
            missing = [d for d, w in cfg.domain_weights.items() if w > 0 and not self._domain_shards(d)]
            if missing:
                raise ValueError(f"domain_weights names domain(s) {missing} with no shards; "
                                 f"shard domains: {sorted({s.domain for s in shards})}")
        self.batches_per_slot = self._batches_per_slot()

    def _domain_shards(self, d: str) -> list[ShardInfo]:
        return [s for s in self.shards if s.domain == d]

    def _batches_per_slot(self) -> int:
        B = self.cfg.batch_size
        if self.mixing:
            per_rank = self.cfg.samples_per_epoch
            if per_rank is None:
                known = [s.samples for s in self.shards if s.domain in self.cfg.domain_weights]
                if any(k is None for k in known):
                    raise ValueError("samples_per_epoch (None) must be set when shard sample counts are unknown "
                                     "(read from a manifest to know them)")
                per_rank = sum(known) // self.world_size
            return max(1, math.ceil(per_rank / (B * self.W)))
        if any(s.samples is None for s in self.shards):
            raise ValueError("exact epochs need shard sample counts: read the shards through their manifest")
        # Largest slot decides; smaller slots pad by wrapping so every rank takes the same number of steps.
        worst = 0
        for slot in range(self.n_slots):
            mine, split = plan_slot(self.shards, slot, self.n_slots, self.cfg.seed, self.epoch, "all",
                                    self.cfg.shuffle_shards)
            n = sum(s.samples for s in mine)
            worst = max(worst, -(-n // split[1]) if split else n)
        return max(1, math.ceil(worst / B))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.batches_per_slot = self._batches_per_slot()

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch on every rank."""
        return self.batches_per_slot * self.W

    def _stream(self, slot: int, shards: list[ShardInfo], tag: str, stats: Counter) -> RawStream:
        mine, split = plan_slot(shards, slot, self.n_slots, self.cfg.seed, self.epoch, tag, self.cfg.shuffle_shards)
        return RawStream(mine, split, self.cfg.seed, self.epoch, tag, slot, self.cfg.shuffle_buffer,
                         self.cfg.shuffle_shards, stats, RetryPolicy(timeout_s=self.cfg.storage_timeout_s))

    def iter_slot(self, worker: int) -> Iterator[dict]:
        """Steps 2-6 for (self.rank, worker); an error becomes a final {"_error", ...} item (see step 5)."""
        stats: Counter = Counter()
        reported: Counter = Counter()
        try:
            yield from self._slot_batches(worker, stats, reported)
        except (DataStreamError, StorageError, TokenizationMismatchError) as exc:
            kind = ("storage" if isinstance(exc, StorageError) else "stream" if isinstance(exc, DataStreamError)
                    else "mismatch")
            where = f"rank {self.rank}" + (f" worker {worker}" if self.W > 1 else "")
            yield {"_error": f"{where}: {exc}", "_error_kind": kind, "_stats": dict(stats - reported)}

    def _slot_batches(self, worker: int, stats: Counter, reported: Counter) -> Iterator[dict]:
        slot = self.rank * self.W + worker
        enc = SampleEncoder(self.processor, self.domain_names, self.cfg.max_length, self.cfg.mismatch_policy,
                            self.cfg.process_images, self.cfg.chat_format)
        if self.mixing:
            streams = {d: self._stream(slot, self._domain_shards(d), d, stats)
                       for d, w in self.cfg.domain_weights.items() if w > 0}
            chooser = DomainChooser(self.cfg.domain_weights, seeded(self.cfg.seed, self.epoch, slot, "mix"))
        else:
            streams = {"all": self._stream(slot, self.shards, "all", stats)}
            chooser = None
        pos = self.start_positions[worker] or {}
        done = pos.get("batches", 0)
        for name, s in streams.items():  # step 6
            s.skip(pos.get("streams", {}).get(name, 0))
        if chooser is not None:
            chooser.skip(pos.get("chooser", 0))
        watch = {name: _PassWatch(resumed=s.drawn > 0) for name, s in streams.items()}
        examples: dict[str, str] = {}  # one detail per skip reason, for error messages

        pad_id = self.processor.tokenizer.pad_token_id
        while done < self.batches_per_slot:
            batch = []
            while len(batch) < self.cfg.batch_size:
                name = chooser() if chooser else "all"
                stream = streams[name]
                while True:
                    p, raw = stream.next()
                    started, empty = watch[name].new_sample(p)
                    if empty:
                        raise DataStreamError(self._no_usable_message(stream, stats, examples))
                    if started and p == 1:  # the first pass just ended: check the skip fraction
                        warn = check_skip_fraction(stats, self.cfg.max_skip_fraction, f"rank {self.rank} slot {slot}",
                                                   final=True, examples=examples)
                        if warn:
                            log.warning(warn)
                    if p == 0:
                        stats["samples_read"] += 1
                    try:
                        batch.append(enc(parse_sample(raw)))
                    except SkipSample as exc:
                        if p == 0:  # count each bad sample once per epoch, not again when padding re-reads it
                            stats[exc.reason] += 1
                            examples.setdefault(exc.reason, str(exc))
                            if stats[exc.reason] <= 3:
                                log.warning("skipped sample: %s", exc)
                        continue
                    watch[name].usable += 1
                    if p > 0 and not self.mixing:
                        stats["repeated"] += 1  # padding samples from a later pass (exact mode)
                    break
            out = collate(batch, pad_id)
            done += 1
            out["_pos"] = {"worker": worker, "batches": done, "streams": {n: s.drawn for n, s in streams.items()},
                           "chooser": chooser.draws if chooser else 0}
            out["_stats"] = dict(stats - reported)
            reported.clear()
            reported.update(stats)
            yield out

    def _no_usable_message(self, stream: RawStream, stats: Counter, examples: dict) -> str:
        return (f"a full pass over the {len(stream.shards)} shard(s) of stream {stream.tag!r} gave no usable sample "
                f"(max_length {self.cfg.max_length}, chat_format {self.cfg.chat_format!r}); stopping instead of "
                "re-reading them forever\n  " + describe(stats, examples))

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        if info is not None and info.num_workers != self.W:
            raise RuntimeError(f"DataLoader has {info.num_workers} workers, dataset expects {self.W}")
        # A DataLoader always starts its rotation at worker 0; after a resume at step s the next batch is due
        # from logical worker s % W, so physical workers are rotated by that offset.
        worker = ((info.id if info is not None else 0) + self.worker_offset) % self.W
        if info is not None:
            torch.set_num_threads(1)  # worker processes share the cores with the trainer
        return self.iter_slot(worker)
