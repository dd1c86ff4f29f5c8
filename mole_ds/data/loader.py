"""The training-facing loader: a DataLoader over StreamingDataset with a resumable position.

Why the position is per worker: a DataLoader hands out batches from its workers in strict rotation, and every
worker yields the same number of batches per epoch, so recording, per worker, the stream position after the
last batch *handed to the trainer* pins down exactly which samples were consumed.  Prefetched batches that
were never handed out are not counted, so they are produced again after a resume.
"""

from __future__ import annotations

import functools
import logging
import os
from collections import Counter
from typing import Iterator

import torch
from torch.utils.data import DataLoader

from mole_ds.data.collate import image_expansion
from mole_ds.data.config import DataConfig
from mole_ds.data.conversation import IGNORE_INDEX, TokenizationMismatchError, encode_conversation
from mole_ds.data.manifest import ShardInfo, expand_urls
from mole_ds.data.pipeline import StreamingDataset
from mole_ds.data.skips import MIN_SAMPLES_FOR_FRACTION, DataStreamError, check_skip_fraction
from mole_ds.data.storage import RetryPolicy, StorageError

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


def min_sample_tokens(processor, chat_format: str = "vicuna_v1", with_image: bool = True) -> tuple[int, int]:
    """(tokens the shortest possible sample needs to keep one supervised token, of which image tokens).

    The shortest sample is one human turn ("<image>\n?" or "?") and a one-character answer, in chat_format.
    """
    from PIL import Image

    tok = processor.tokenizer
    expansion, n_img = None, 0
    value = "?"
    if with_image:
        pv = processor.image_processor(images=Image.new("RGB", (64, 64)), return_tensors="np")["pixel_values"][0]
        pv = torch.as_tensor(pv)
        expansion = image_expansion(processor, pv)
        n_img = len(tok(expansion, add_special_tokens=False)["input_ids"])
        value = "<image>\n?"
    enc = encode_conversation([{"from": "human", "value": value}, {"from": "gpt", "value": "a"}], tok, expansion,
                              chat_format)
    first = next(i for i, x in enumerate(enc.labels) if x != IGNORE_INDEX)
    return first + 1, n_img


def check_max_length(cfg: DataConfig, processor, shards: list[ShardInfo]) -> None:
    """Refuse a max_length that cannot hold even the shortest sample (with its image tokens, if the shards
    may hold images), naming both numbers; otherwise every sample would be skipped at read time."""
    images = cfg.process_images and hasattr(processor, "image_processor") and any(
        s.images is None or s.images > 0 for s in shards)
    need, n_img = min_sample_tokens(processor, cfg.chat_format, with_image=images)
    if cfg.max_length < need:
        what = (f"one image sample: the image alone expands to {n_img} tokens, and with the shortest prompt and "
                f"answer in chat_format {cfg.chat_format!r} it needs {need}") if images else (
                f"one sample: the shortest prompt and answer in chat_format {cfg.chat_format!r} need {need}")
        raise ValueError(f"data.max_length ({cfg.max_length}) cannot hold {what} tokens; set data.max_length to at "
                         f"least {need} (real samples need more: leave room for the question and the answer)")


class StreamingLoader:
    """Iterate one epoch per ``iter()``; ``len()`` is the number of steps per epoch (equal on all ranks).

    Batches are dicts (see mole_ds.data.collate): input_ids, attention_mask, labels, pixel_values, has_image,
    domain_ids, domains, ids.  ``stats`` (a Counter, i.e. a plain dict of ints) accumulates the skip and
    fault counters of all DataLoader workers of this rank (names: mole_ds.data.skips.STAT_KEYS).
    Raises DataStreamError / StorageError / TokenizationMismatchError when the stream cannot go on.
    """

    def __init__(self, cfg: DataConfig, processor, rank: int | None = None, world_size: int | None = None):
        self.cfg = cfg
        self.rank, self.world_size = resolve_rank(rank, world_size)
        self.policy = RetryPolicy(timeout_s=cfg.storage_timeout_s)
        self.shards = expand_urls(cfg.urls, self.policy)
        if not self.shards:
            raise ValueError(f"urls ({cfg.urls!r}) resolved to no shards")
        check_max_length(cfg, processor, self.shards)
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
        self._warned = False

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
            "epoch_steps": len(self),
        }

    def load_state_dict(self, sd: dict) -> None:
        """Continue from a state_dict; the run must use the same layout (errors name the differing field).

        A state from another world size (elastic resume) is accepted only at an epoch boundary: the stream
        position is recorded per rank and per worker, and the rank-to-sample assignment depends on the world
        size, so mid-epoch there is no exact way to continue without repeating or skipping samples."""
        mine = self.state_dict()
        if sd.get("world_size") != mine["world_size"]:
            at_boundary = sd.get("steps") == 0 or (sd.get("epoch_steps") is not None
                                                   and sd["steps"] >= sd["epoch_steps"])
            if not at_boundary:
                raise ValueError(
                    f"data state was saved at world size {sd.get('world_size')} (now {mine['world_size']}) in the "
                    f"middle of epoch {sd.get('epoch')} (batch {sd.get('steps')} of {sd.get('epoch_steps', '?')} per "
                    "rank): the stream position is per rank, so a resize resumes exactly only at an epoch boundary. "
                    "Resume with the original world size, or from a checkpoint taken at the end of an epoch")
            bad = [f"{k} (checkpoint {sd.get(k)!r}, now {mine[k]!r})" for k in ("version", "seed", "domain_weights",
                                                                               "shards") if sd.get(k) != mine[k]]
            if bad:
                raise ValueError("data state does not match this loader: " + "; ".join(bad))
            done = sd.get("steps") != 0
            self.epoch = sd["epoch"] + (1 if done else 0)
            self.steps, self.positions = 0, [None] * self.cfg.workers_per_rank
            return
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
                        worker_init_fn=functools.partial(_ignore_stop_signals, parent_pid=os.getpid()) if nw else None,
                        # Its own generator: creating an iterator must not consume the global torch RNG
                        # (dropout), or a resumed run would diverge from an uninterrupted one.
                        generator=torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.epoch))
        it = iter(dl)
        try:
            for batch in it:
                self.stats.update(batch.pop("_stats"))
                if "_error" in batch:
                    raise _ERRORS[batch["_error_kind"]](batch["_error"])
                pos = batch.pop("_pos")
                self.positions[pos["worker"]] = pos
                self.steps += 1
                if self.stats["samples_read"] >= MIN_SAMPLES_FOR_FRACTION:
                    self._check_skips(final=False)
                yield batch
        finally:
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()  # workers end now, not whenever the iterator is collected
        self._check_skips(final=True)
        self.epoch, self.steps = self.epoch + 1, 0
        self.positions = [None] * self.cfg.workers_per_rank

    def _check_skips(self, final: bool) -> None:
        warn = check_skip_fraction(self.stats, self.cfg.max_skip_fraction, f"rank {self.rank}", final=final)
        if warn and not self._warned:
            self._warned = True
            log.warning(warn)


_ERRORS = {"stream": DataStreamError, "storage": StorageError, "mismatch": TokenizationMismatchError}


def _ignore_stop_signals(worker_id: int, parent_pid: int | None = None) -> None:
    # SIGINT/SIGTERM are the trainer's to handle (it saves a final checkpoint at the next step boundary);
    # a launcher that signals the whole process tree must not kill the workers under it first.  Since they
    # ignore those signals, they must die with their parent instead (a killed trainer leaves no worker behind).
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent(parent_pid)


def _die_with_parent(parent_pid: int | None) -> None:
    """Linux: SIGKILL this process when its parent exits (prctl PR_SET_PDEATHSIG); elsewhere a no-op."""
    import ctypes
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    parent = parent_pid if parent_pid is not None else os.getppid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
    except OSError:
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def build_loader(cfg: DataConfig, processor, rank: int | None = None, world_size: int | None = None) -> StreamingLoader:
    """The launcher's entry point: a resumable loader of this rank's batches."""
    return StreamingLoader(cfg, processor, rank, world_size)
