"""The training-facing loader: a DataLoader over StreamingDataset with a resumable position.

Why the position is per stream: every step takes the same number of samples from every stream (see
mole_ds.data.pipeline), so recording, per stream, the raw-stream position after the last batch *handed to the
trainer* pins down exactly which samples were consumed, whatever the world size.  Prefetched items that were
never handed out are not counted, so they are produced again after a resume.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections import Counter
from typing import Iterator

import torch
from torch.utils.data import DataLoader

from mole_ds import runtime
from mole_ds.config import ConfigError
from mole_ds.data.collate import collate, image_expansion
from mole_ds.data.config import DataConfig, DataOptions
from mole_ds.data.conversation import IGNORE_INDEX, TokenizationMismatchError, encode_conversation
from mole_ds.data.grouping import grouping_problem
from mole_ds.data.manifest import ShardInfo, expand_urls
from mole_ds.data.pipeline import StreamingDataset, check_layout, default_streams
from mole_ds.data.skips import MIN_SAMPLES_FOR_FRACTION, DataStreamError, check_skip_fraction
from mole_ds.data.storage import RetryPolicy, StorageError

log = logging.getLogger(__name__)

STATE_VERSION = 2


def resolve_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """Explicit values win; then torch.distributed if initialised; then RANK / WORLD_SIZE; else (0, 1)."""
    if rank is not None and world_size is not None:
        r, w = rank, world_size
    else:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            r, w = runtime.rank(), runtime.world_size()
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


def may_hold_images(processor, shards: list[ShardInfo], process_images: bool = True) -> bool:
    """Whether samples of these shards may carry images the processor expands (unknown counts = maybe)."""
    return process_images and hasattr(processor, "image_processor") and any(
        s.images is None or s.images > 0 for s in shards)


def max_length_problems(max_length: int, chat_format: str, processor, images: bool) -> list[str]:
    """The refusal of a data.max_length that cannot hold even the shortest sample (with its image tokens when
    ``images``), naming both numbers; otherwise every sample would be skipped at read time. The image token
    count is the processor's own expansion (:func:`mole_ds.data.collate.image_expansion`)."""
    need, n_img = min_sample_tokens(processor, chat_format, with_image=images)
    if max_length >= need:
        return []
    what = (f"one image sample: the image alone expands to {n_img} tokens, and with the shortest prompt and "
            f"answer in chat_format {chat_format!r} it needs {need}") if images else (
            f"one sample: the shortest prompt and answer in chat_format {chat_format!r} need {need}")
    return [f"data.max_length ({max_length}) cannot hold {what} tokens; set data.max_length to at least {need} "
            "(real samples need more: leave room for the question and the answer)"]


def check_sources(options: DataOptions, sources: list[str], processor, name: str = "data.train") -> list[str]:
    """Before start (the launcher): :func:`max_length_problems` for one source list of a run (``name``) when
    all its sources are local (listing them is cheap); remote ones are left to the loader, which raises the
    same refusal as a ConfigError."""
    if not sources or any("://" in u for u in sources):
        return []
    try:
        shards = expand_urls(list(sources), RetryPolicy(timeout_s=options.storage_timeout_s))
    except (OSError, ValueError) as exc:
        return [f"{name} ({sources!r}) cannot be listed: {' '.join(str(exc).split())}"]
    if not shards:
        return [f"{name} ({sources!r}) holds no shards"]
    return max_length_problems(options.max_length, options.chat_format, processor,
                               may_hold_images(processor, shards))


def check_max_length(cfg: DataConfig, processor, shards: list[ShardInfo]) -> None:
    """Raise :func:`max_length_problems` for a loader's shards as a ConfigError."""
    p = max_length_problems(cfg.max_length, cfg.chat_format, processor,
                            may_hold_images(processor, shards, cfg.process_images))
    if p:
        raise ConfigError(p)


class StreamingLoader:
    """Iterate one epoch per ``iter()``; ``len()`` is the number of steps per epoch (equal on all ranks).

    Batches are dicts (see mole_ds.data.collate): input_ids, attention_mask, labels, pixel_values, has_image,
    domain_ids, domains, ids.  ``stats`` (a Counter, i.e. a plain dict of ints) accumulates the skip and
    fault counters of all DataLoader workers of this rank (names: mole_ds.data.skips.STAT_KEYS).
    Raises DataStreamError / StorageError / TokenizationMismatchError when the stream cannot go on.

    Position: ``state_dict()`` holds this rank's streams; :func:`merge_states` joins the states of all ranks
    into the run's position, which ``load_state_dict`` resumes on any world size dividing ``data.streams``.
    """

    def __init__(self, cfg: DataConfig, processor, rank: int | None = None, world_size: int | None = None):
        self.cfg = cfg
        self.processor = processor
        self.rank, self.world_size = resolve_rank(rank, world_size)
        self.policy = RetryPolicy(timeout_s=cfg.storage_timeout_s)
        self.shards = expand_urls(cfg.urls, self.policy)
        if not self.shards:
            raise ValueError(f"urls ({cfg.urls!r}) resolved to no shards")
        check_max_length(cfg, processor, self.shards)
        if cfg.domain_names is not None:
            names = list(cfg.domain_names)
        elif cfg.domain_weights:
            names = list(cfg.domain_weights)
        else:
            names = sorted({s.domain for s in self.shards if s.domain})
        self.domain_names = names
        streams = cfg.streams or default_streams(self.world_size, cfg.batch_size, cfg.workers_per_rank)
        self.dataset = self._dataset(streams)
        self.epoch = 0
        self.steps = 0  # batches handed out in the current epoch
        self.positions: dict[int, dict] = {}
        self.stats: Counter = Counter()
        self._warned = False

    def _dataset(self, streams: int) -> StreamingDataset:
        why = check_layout(streams, self.world_size, self.cfg.batch_size)
        if why:
            raise ValueError(why + " (set data.streams to a multiple of every world size the run may use)")
        ds = StreamingDataset(self.cfg, self.shards, self.processor, self.rank, self.world_size,
                              self.domain_names, streams)
        c = ds.layout.c
        g = self.cfg.batch_size * self.world_size
        why = grouping_problem(self.cfg.group_by_length, self.cfg.shuffle_buffer, c,
                               f"global micro-batch {g} = batch size {self.cfg.batch_size} x world size "
                               f"{self.world_size}, over data.streams {streams}")
        if why:
            raise ConfigError([why])
        if self.cfg.group_by_length != "none" and c & (c - 1) and self.rank == 0:
            log.warning("data.group_by_length %r: each stream gives %d samples per step, not a power of two, so a "
                        "step's samples of a stream may span two length blocks (more padding); a global micro-batch "
                        "/ data.streams that is a power of two groups best", self.cfg.group_by_length, c)
        if self.cfg.num_workers > ds.n_workers and self.rank == 0:
            log.warning("data.num_workers is %d but each rank reads %d stream(s) per step (data.streams %d, world "
                        "size %d): %d worker(s) per rank would be idle and are not started. Each worker reads its "
                        "own streams; more streams per rank (a multiple of the world size that divides the global "
                        "micro-batch %d) keep more workers busy", self.cfg.num_workers, ds.layout.per_step, streams,
                        self.world_size, self.cfg.num_workers - ds.n_workers, self.cfg.batch_size * self.world_size)
        return ds

    @property
    def streams(self) -> int:
        return self.dataset.V

    def __len__(self) -> int:
        return self.dataset.steps_per_epoch

    def _fingerprint(self) -> list:
        return [len(self.shards), self.shards[0].url, self.shards[-1].url]

    def state_dict(self) -> dict:
        """A small json-able position of this rank's streams (merge the ranks' with :func:`merge_states`)."""
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "steps": self.steps,
            "streams": self.streams,
            "per_stream_per_step": self.dataset.c,
            "steps_per_round": self.dataset.k,
            "samples_consumed": self.steps * self.cfg.batch_size * self.world_size,  # over all ranks
            "seed": self.cfg.seed,
            "group_by_length": self.cfg.group_by_length,
            # None when unset, as checkpoints have recorded them since STATE_VERSION 2
            "domain_weights": self.cfg.domain_weights or None,
            "samples_per_epoch": self.cfg.samples_per_epoch or None,
            "shards": self._fingerprint(),
            "world_size": self.world_size,
            "batch_size": self.cfg.batch_size,
            "positions": {str(v): p for v, p in sorted(self.positions.items())},
            "epoch_steps": len(self),
        }

    def load_state_dict(self, sd: dict) -> None:
        """Continue from a (merged) state: on the same layout, or on any world size and batch size that divide
        into its streams (errors name the differing field and value)."""
        if sd.get("version") != STATE_VERSION:
            raise ValueError(f"data state version {sd.get('version')!r} is not {STATE_VERSION} (a checkpoint of an "
                             "older mole_ds): resume it with that version, or start the data from a new epoch")
        mine = self.state_dict()
        bad = [f"{k} (checkpoint {sd.get(k)!r}, now {mine[k]!r})"
               for k in ("seed", "domain_weights", "samples_per_epoch", "shards") if sd.get(k) != mine[k]]
        if bad:
            raise ValueError("data state does not match this loader: " + "; ".join(bad))
        V = int(sd["streams"])
        done = sd["steps"] >= sd["epoch_steps"]
        if sd["steps"] == 0 or done:  # an epoch boundary: any layout continues exactly with the next epoch
            if V != self.streams and not self.cfg.streams and check_layout(V, self.world_size, self.cfg.batch_size) is None:
                self.dataset = self._dataset(V)  # keep the run's streams where the new layout allows them
            self.epoch = sd["epoch"] + (1 if done else 0)
            self.steps, self.positions = 0, {}
            self.dataset.set_epoch(self.epoch)  # len() is this epoch's
            return
        where = f"in the middle of epoch {sd['epoch']} (step {sd['steps']} of {sd['epoch_steps']})"
        grouped = sd.get("group_by_length", "none")  # checkpoints before length grouping did not group
        if grouped != self.cfg.group_by_length:
            raise ValueError(f"data.group_by_length ({self.cfg.group_by_length!r}) differs from the checkpoint's "
                             f"({grouped!r}) {where}: the position names samples in that order, so keep the "
                             "checkpoint's value until the epoch ends")
        if self.cfg.streams and self.cfg.streams != V:
            raise ValueError(f"data.streams ({self.cfg.streams}) differs from the checkpoint's ({V}) {where}: the "
                             "position is per stream, so keep the checkpoint's value until the epoch ends")
        why = check_layout(V, self.world_size, self.cfg.batch_size)
        if why:
            raise ValueError(f"the checkpoint was taken {where} with data.streams {V}, which this layout cannot "
                             f"continue: {why}")
        if V != self.streams:
            self.dataset = self._dataset(V)
        steps, k_old, c_old = int(sd["steps"]), int(sd.get("steps_per_round", 1)), int(sd["per_stream_per_step"])
        lay = self.dataset.layout
        pos = {int(v): p for v, p in sd.get("positions", {}).items()}
        if steps % k_old:
            # Inside a round (only when a step's global batch is smaller than data.streams): the streams of the
            # round's later groups are one sample behind, so only the same layout continues it.
            if (k_old, c_old, sd.get("world_size")) != (lay.k, lay.c, self.world_size):
                raise ValueError(f"the checkpoint was taken {where}, inside a round of {k_old} steps (data.streams "
                                 f"{V} > global micro-batch): only the same world size and batch size continue it; "
                                 "checkpoint at a whole round (a global batch that data.streams divides)")
            new_steps = steps
            first_round_unread = {v for j in range(steps, lay.k) for v in lay.streams_of(j)}
        else:
            consumed = steps // k_old * c_old  # samples taken from every stream
            if consumed % lay.c:
                raise ValueError(f"the checkpoint was taken {where} after {consumed} samples per stream; this layout "
                                 f"takes {lay.c} per stream per step (batch_size {self.cfg.batch_size}, world size "
                                 f"{self.world_size}, data.streams {V}), which does not divide it: resume with a "
                                 "global batch that does, or from an epoch boundary")
            new_steps = consumed // lay.c * lay.k
            first_round_unread = set()
        missing = [v for v in self.dataset.mine if v not in pos and v not in first_round_unread]
        if missing:
            raise ValueError(f"data state has no position for stream(s) {missing[:8]} of this rank (it holds "
                             f"{sorted(pos)[:8]}...): a state of one rank of a larger run must be merged over all "
                             "ranks (mole_ds.data.merge_states) before it is saved")
        self.epoch, self.steps = sd["epoch"], new_steps
        self.positions = {v: pos[v] for v in self.dataset.mine if v in pos}
        self.dataset.set_epoch(self.epoch)

    def __iter__(self) -> Iterator[dict]:
        self.dataset.set_epoch(self.epoch)
        self.dataset.start_positions = dict(self.positions)
        self.dataset.start_step = self.steps
        nw = self.dataset.n_workers if self.cfg.num_workers else 0
        dl = DataLoader(self.dataset, batch_size=None, num_workers=nw, prefetch_factor=2 if nw else None,
                        multiprocessing_context="fork" if nw else None,
                        worker_init_fn=functools.partial(_ignore_stop_signals, parent_pid=os.getpid()) if nw else None,
                        # Its own generator: creating an iterator must not consume the global torch RNG
                        # (dropout), or a resumed run would diverge from an uninterrupted one.
                        generator=torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.epoch))
        it = iter(dl)
        pad_id = self.processor.tokenizer.pad_token_id
        try:
            while self.steps < len(self):
                samples, pos = [], {}
                for _ in range(max(nw, 1)):  # one item per worker, in worker (= stream) order
                    item = next(it)
                    self.stats.update(item.pop("_stats"))
                    if "_error" in item:
                        raise _ERRORS[item["_error_kind"]](item["_error"])
                    samples += item["samples"]
                    pos.update(item["_pos"])
                self.positions.update(pos)
                self.steps += 1
                if self.stats["samples_read"] >= MIN_SAMPLES_FOR_FRACTION:
                    self._check_skips(final=False)
                yield collate(samples, pad_id)
        finally:
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()  # workers end now, not whenever the iterator is collected
        self._check_skips(final=True)
        self.epoch, self.steps = self.epoch + 1, 0
        self.positions = {}

    def _check_skips(self, final: bool) -> None:
        warn = check_skip_fraction(self.stats, self.cfg.max_skip_fraction, f"rank {self.rank}", final=final)
        if warn and not self._warned:
            self._warned = True
            log.warning(warn)


def merge_states(states: list[dict]) -> dict:
    """The run's data position from every rank's ``StreamingLoader.state_dict()`` (any order)."""
    first = states[0]
    for k in ("version", "epoch", "steps", "streams", "per_stream_per_step", "steps_per_round", "seed", "shards"):
        vals = {json.dumps(s.get(k)) for s in states}
        if len(vals) > 1:
            raise ValueError(f"the ranks' data states disagree on {k}: {sorted(vals)}")
    pos: dict[str, dict] = {}
    for s in states:
        pos.update(s.get("positions", {}))
    return {**first, "positions": dict(sorted(pos.items(), key=lambda kv: int(kv[0])))}


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
