"""The training-facing loader: a DataLoader over StreamingDataset with a resumable position.

Why the position is per worker: a DataLoader hands out batches from its workers in strict rotation, and every
worker yields the same number of batches per epoch, so recording, per worker, the stream position after the
last batch *handed to the trainer* pins down exactly which samples were consumed.  Prefetched batches that
were never handed out are not counted, so they are produced again after a resume.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from typing import Iterator

import torch
from torch.utils.data import DataLoader

from mole_ds.data.config import DataConfig
from mole_ds.data.manifest import expand_urls
from mole_ds.data.pipeline import StreamingDataset

log = logging.getLogger(__name__)

STATE_VERSION = 1


def resolve_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """Explicit values win; then torch.distributed if initialised; then RANK / WORLD_SIZE; else (0, 1)."""
    if rank is not None and world_size is not None:
        r, w = rank, world_size
    else:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            r, w = dist.get_rank(), dist.get_world_size()
        else:
            r, w = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not (0 <= r < w):
        raise ValueError(f"rank ({r}) must be in [0, world_size ({w}))")
    return r, w


class StreamingLoader:
    """Iterate one epoch per ``iter()``; ``len()`` is the number of steps per epoch (equal on all ranks).

    Batches are dicts (see mole_ds.data.collate): input_ids, attention_mask, labels, pixel_values, has_image,
    domain_ids, domains, ids.  ``stats`` accumulates skip / corruption counters from all workers.
    """

    def __init__(self, cfg: DataConfig, processor, rank: int | None = None, world_size: int | None = None):
        self.cfg = cfg
        self.rank, self.world_size = resolve_rank(rank, world_size)
        self.shards = expand_urls(cfg.urls)
        if not self.shards:
            raise ValueError(f"urls ({cfg.urls!r}) resolved to no shards")
        if cfg.domain_names is not None:
            names = list(cfg.domain_names)
        elif cfg.domain_weights is not None:
            names = list(cfg.domain_weights)
        else:
            names = sorted({s.domain for s in self.shards if s.domain})
        self.domain_names = names
        self.dataset = StreamingDataset(cfg, self.shards, processor, self.rank, self.world_size, names)
        self.epoch = 0
        self.steps = 0  # batches handed out in the current epoch
        self.positions: list[dict | None] = [None] * cfg.workers_per_rank
        self.stats: Counter = Counter()

    def __len__(self) -> int:
        return self.dataset.steps_per_epoch

    def _fingerprint(self) -> list:
        return [len(self.shards), self.shards[0].url, self.shards[-1].url]

    def state_dict(self) -> dict:
        """A small json-able position: store it in the checkpoint."""
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "steps": self.steps,
            "samples_consumed": self.steps * self.cfg.batch_size,
            "seed": self.cfg.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": self.cfg.workers_per_rank,
            "batch_size": self.cfg.batch_size,
            "domain_weights": self.cfg.domain_weights,
            "shards": self._fingerprint(),
            "positions": self.positions,
        }

    def load_state_dict(self, sd: dict) -> None:
        """Continue from a state_dict; the run must use the same layout (errors name the differing field)."""
        mine = self.state_dict()
        bad = [f"{k} (checkpoint {sd.get(k)!r}, now {mine[k]!r})"
               for k in ("version", "seed", "rank", "world_size", "num_workers", "batch_size", "domain_weights",
                         "shards") if sd.get(k) != mine[k]]
        if bad:
            raise ValueError("data state does not match this loader: " + "; ".join(bad))
        self.epoch, self.steps = sd["epoch"], sd["steps"]
        self.positions = list(sd["positions"])
        if self.steps >= len(self):
            self.epoch, self.steps, self.positions = self.epoch + 1, 0, [None] * self.cfg.workers_per_rank

    def __iter__(self) -> Iterator[dict]:
        self.dataset.set_epoch(self.epoch)
        self.dataset.start_positions = list(self.positions)
        self.dataset.worker_offset = self.steps % self.cfg.workers_per_rank
        nw = self.cfg.num_workers
        dl = DataLoader(self.dataset, batch_size=None, num_workers=nw, prefetch_factor=2 if nw else None,
                        multiprocessing_context="fork" if nw else None,
                        worker_init_fn=_ignore_stop_signals if nw else None,
                        # Its own generator: creating an iterator must not consume the global torch RNG
                        # (dropout), or a resumed run would diverge from an uninterrupted one.
                        generator=torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.epoch))
        for batch in dl:
            pos = batch.pop("_pos")
            self.stats.update(batch.pop("_stats"))
            self.positions[pos["worker"]] = pos
            self.steps += 1
            yield batch
        self.epoch, self.steps = self.epoch + 1, 0
        self.positions = [None] * self.cfg.workers_per_rank


def _ignore_stop_signals(worker_id: int) -> None:
    # SIGINT/SIGTERM are the trainer's to handle (it saves a final checkpoint at the next step boundary);
    # a launcher that signals the whole process tree must not kill the workers under it first.
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def build_loader(cfg: DataConfig, processor, rank: int | None = None, world_size: int | None = None) -> StreamingLoader:
    """The launcher's entry point: a resumable loader of this rank's batches."""
    return StreamingLoader(cfg, processor, rank, world_size)
