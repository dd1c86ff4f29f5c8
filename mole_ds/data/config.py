"""The one data schema: what to read and how (:class:`DataOptions`), and what :func:`mole_ds.data.build_loader`
takes (:class:`DataConfig` = those options + sources + batch size).

A run config's ``data`` section (mole_ds.train.config.DataSection) is :class:`DataOptions` plus its train /
eval source lists, so every data field, its default and its rule live here once. Every problem is named with
its field and value (``data.max_length (4) must be >= 8``), all at once, as a :class:`mole_ds.config.ConfigError`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from mole_ds.config import ConfigError
from mole_ds.data.chat import CHAT_FORMATS
from mole_ds.data.grouping import BLOCKS, GROUP_BY

MISMATCH_POLICIES = ("error", "skip")

# Held-out reading: deterministic (no shuffle, no mixing) and on its own seed, so the held-out batches do not
# depend on the training data's shuffle; streams left to the default layout.
EVAL_SEED_OFFSET = 7


@dataclass(kw_only=True)
class DataOptions:
    """How samples are read, mixed, templated and cut: every data field but the sources and the batch size."""

    domain_weights: dict[str, float] = field(default_factory=dict)
    """Sampling weight per domain: {} = exact epochs (every sample once per epoch, the natural domain mix);
    {domain: weight} = weighted mixing with resampling (normalised; domains not listed are unused)."""
    max_length: int = 512
    """Tokens per sample after image-token expansion; longer samples are truncated (a sample whose image tokens
    would be cut, or with no supervised token left, is skipped and counted)."""
    num_workers: int = 0
    """DataLoader worker processes per rank (0 = read in the main process, counted as 1 slot)."""
    shuffle_buffer: int = 256
    """Raw samples held by each stream's shuffle buffer (0 = no sample shuffle)."""
    samples_per_epoch: int = 0
    """Mixing mode (domain_weights set): samples per epoch over all ranks; 0 = all samples of the weighted
    domains, from the shard manifest. Exact mode: must stay 0 (every sample is seen once)."""
    streams: int = 0
    """Streams, the unit of reading and of the resume position (docs/data.md). With a global micro-batch
    g = micro-batch x world size >= streams, each rank owns streams / world size of them and every step takes
    g / streams samples from each; with g < streams, each step reads one group of g streams (streams / g steps per
    round, as with gradient accumulation). A checkpoint resumes exactly (mid-epoch too) on any world size and
    micro-batch that fit the same streams, e.g. 16 streams for 1-16 ranks with micro-batch x accumulation x
    ranks = 16 or a multiple. 0 = world size x num_workers (reduced to divide the micro-batch). Each stream has its
    own shuffle buffer (shuffle_buffer raw samples) and open shard, so buffer memory grows with streams per rank."""
    group_by_length: str = "none"
    """Order each stream's samples so that a step's samples have similar token lengths (less padding):
    'none' (stream order), 'length', or 'modality' (like 'length', and with-image and text-only samples apart,
    as LLaVA does). Each stream sorts windows of the largest power of two <= shuffle_buffer encoded samples
    and hands them out in seeded blocks that every stream orders alike (mole_ds.data.grouping), so resume and
    world-size changes are as exact as with 'none'. Needs shuffle_buffer >= 8 x the samples a stream gives per
    step (global micro-batch / streams); a window of encoded samples (images included) is held per stream."""
    seed: int = 0
    """Base seed of shard order, shuffle buffers and domain mixing."""
    chat_format: str = "vicuna_v1"
    """Prompt format: 'vicuna_v1' (LLaVA-1.5's training format) or 'template' (the tokenizer's chat_template)."""
    mismatch_policy: str = "error"
    """A sample whose labels cannot be derived exactly (only tokenizers without an offset mapping can fail):
    'error' stops the run, 'skip' counts it as 'tokenization_mismatch' and drops it."""
    storage_timeout_s: float = 600.0
    """Transient storage errors (connection, timeout, 5xx, throttling) are retried this long, with capped
    exponential backoff, then the run stops naming the shard; permanent ones (credentials, 403, missing key)
    stop it at once."""
    max_skip_fraction: float = 0.01
    """Skipped samples / samples read above which the run stops; a warning is logged from half of it, and the
    end-of-run summary warns loudly above it. Checked per rank once 1000 samples were read and at the end of
    each pass over a reader's shards."""

    def problems(self) -> list[str]:
        """Every problem with these options, each naming the field (``data.<name>``) and the value."""
        p: list[str] = []

        def integer(name: str, lo: int | None) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                p.append(f"data.{name} ({v!r}) must be an integer")
            elif lo is not None and v < lo:
                p.append(f"data.{name} ({v}) must be >= {lo}")

        def number(name: str) -> float | None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                p.append(f"data.{name} ({v!r}) must be a finite number")
                return None
            return v

        integer("max_length", 8)
        integer("num_workers", 0)
        integer("shuffle_buffer", 0)
        integer("samples_per_epoch", 0)
        integer("streams", 0)
        integer("seed", None)
        if (t := number("storage_timeout_s")) is not None and t <= 0:
            p.append(f"data.storage_timeout_s ({t:g}) must be > 0")
        if (f := number("max_skip_fraction")) is not None and not 0.0 <= f <= 1.0:
            p.append(f"data.max_skip_fraction ({f}) must be in [0, 1]")
        if self.chat_format not in CHAT_FORMATS:
            p.append(f"data.chat_format ({self.chat_format!r}) must be one of {', '.join(CHAT_FORMATS)}")
        if self.group_by_length not in GROUP_BY:
            p.append(f"data.group_by_length ({self.group_by_length!r}) must be one of {', '.join(GROUP_BY)}")
        elif (self.group_by_length != "none" and isinstance(self.shuffle_buffer, int)
              and self.shuffle_buffer < BLOCKS):
            p.append(f"data.shuffle_buffer ({self.shuffle_buffer}) must be >= {BLOCKS} for data.group_by_length "
                     f"({self.group_by_length!r}): grouping sorts each stream's samples in windows of up to "
                     "data.shuffle_buffer (at least 8 x the samples a stream gives per step)")
        if self.mismatch_policy not in MISMATCH_POLICIES:
            p.append(f"data.mismatch_policy ({self.mismatch_policy!r}) must be one of {', '.join(MISMATCH_POLICIES)}")
        w = self.domain_weights
        if not isinstance(w, dict):
            p.append(f"data.domain_weights ({w!r}) must be a mapping {{domain: weight}} ({{}} = exact epochs)")
        else:
            bad = False
            for d, x in w.items():
                if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
                    p.append(f"data.domain_weights.{d} ({x!r}) must be a number >= 0")
                    bad = True
            if w and not bad and sum(w.values()) <= 0:
                p.append(f"data.domain_weights ({w}) must have a positive sum")
            if not w and isinstance(self.samples_per_epoch, int) and self.samples_per_epoch > 0:
                p.append(f"data.samples_per_epoch ({self.samples_per_epoch}) is only for mixing mode "
                         "(data.domain_weights set); exact epochs read every sample once")
        return p

    def options(self) -> dict:
        """The :class:`DataOptions` fields of this object (of a subclass too) as keyword arguments."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(DataOptions)}


@dataclass(kw_only=True)
class DataConfig(DataOptions):
    """Options of :func:`mole_ds.data.build_loader`: :class:`DataOptions` plus the sources and the batch size.
    Validated at construction (every problem at once, as a ConfigError)."""

    urls: str | list[str]
    """Shard sources: manifest URL(s), output folder / s3 prefix ending in "/", brace patterns, shard URLs."""
    batch_size: int = 8
    """Samples per batch on each rank."""
    shuffle_shards: bool = True
    """Shuffle shard order each epoch (seeded)."""
    process_images: bool = True
    """Run the image processor (False: images are only decoded, for benchmarking)."""
    domain_names: list[str] | None = None
    """Fixed order of domain names -> integer ids in batches (default: weights order, else sorted)."""

    def __post_init__(self) -> None:
        p = []
        if not self.urls:
            p.append(f"data.urls ({self.urls!r}) must name at least one shard source")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            p.append(f"data.batch_size ({self.batch_size!r}) must be an integer >= 1")
        p += self.problems()
        if p:
            raise ConfigError(p, "invalid data config")

    @property
    def workers_per_rank(self) -> int:
        return max(1, self.num_workers)

    @property
    def mixing(self) -> bool:
        """Weighted domain mixing (domain_weights set) rather than exact epochs."""
        return bool(self.domain_weights)

    def for_eval(self, urls: str | list[str]) -> "DataConfig":
        """The held-out variant, read the same way by every evaluation: exact epochs over ``urls``, no shard
        or sample shuffle, no length grouping, no domain weights, the default streams, seed + EVAL_SEED_OFFSET."""
        return dataclasses.replace(self, urls=urls, seed=self.seed + EVAL_SEED_OFFSET, shuffle_shards=False,
                                   shuffle_buffer=0, group_by_length="none", domain_weights={}, samples_per_epoch=0,
                                   streams=0)
