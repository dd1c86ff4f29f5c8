"""Configuration of the streaming data pipeline."""

from __future__ import annotations

from dataclasses import dataclass, field

from mole_ds.data.chat import CHAT_FORMATS

MISMATCH_POLICIES = ("error", "skip")


@dataclass
class DataConfig:
    """Options of :func:`mole_ds.data.build_loader`.

    urls: shard sources: manifest URL(s), output folder / s3 prefix ending in "/", brace patterns, shard URLs.
    batch_size: samples per batch on each rank.
    max_length: token budget per sample; longer samples are truncated (a sample whose image tokens would be
        cut, or with no supervised token left, is skipped and counted).
    num_workers: DataLoader worker processes per rank (0 = read in the main process, counted as 1 slot).
    seed: base seed of shard order, shuffle buffers and domain mixing.
    shuffle_shards: shuffle shard order each epoch (seeded).
    shuffle_buffer: samples held by each stream's shuffle buffer (0 = no sample shuffle).
    domain_weights: None = "exact" epochs (every sample once per epoch, natural domain mix); a mapping
        {domain: weight} = weighted mixing with resampling (weights are normalised; domains not listed are unused).
    samples_per_epoch: samples per epoch over all ranks.  Mixing mode: default = all samples of the weighted
        domains.  Exact mode: must stay None (derived from the shards so that every sample is seen).
    streams: number of streams, the unit of reading and of the resume position (see mole_ds.data.pipeline):
        with g = batch_size * world_size >= streams, each rank owns streams / world_size of them and every step
        takes g / streams samples from each; with g < streams, each step takes one sample from each stream of one
        group of g (streams / g steps per round).  A checkpoint resumes exactly, mid-epoch included, on any
        world size and batch size that fit the same number of streams.  None = world_size * num_workers
        (reduced to divide the batch); set a number with the divisors the run may need.
    process_images: run the image processor (False: images are only decoded, for benchmarking).
    domain_names: fixed order of domain names -> integer ids in batches (default: weights order, else sorted).
    chat_format: prompt format of training (and of generation, see mole_ds.data.chat): 'vicuna_v1' (LLaVA-1.5)
        or 'template' (the tokenizer's own chat_template).
    mismatch_policy: what to do when a tokenizer cannot give exact labels (only tokenizers without an offset
        mapping can fail, see mole_ds.data.conversation): 'error' stops the run, 'skip' counts the sample as
        'tokenization_mismatch' and skips it.
    storage_timeout_s: how long transient storage errors (connection refused/reset, timeouts, 5xx, throttling)
        are retried, with capped exponential backoff, before the run stops with a StorageError naming the
        object.  Permanent errors (credentials, 403, missing bucket/key/file) fail at once.
    max_skip_fraction: skipped samples / samples read above which the run stops (DataStreamError naming the
        counts); a warning is logged from half of it.  Checked per rank once 1000 samples were read and at the
        end of each pass over a reader's shards.
    """

    urls: str | list[str]
    batch_size: int = 8
    max_length: int = 2048
    num_workers: int = 2
    seed: int = 0
    shuffle_shards: bool = True
    shuffle_buffer: int = 1000
    domain_weights: dict[str, float] | None = None
    samples_per_epoch: int | None = None
    streams: int | None = None
    process_images: bool = True
    domain_names: list[str] | None = field(default=None)
    chat_format: str = "vicuna_v1"
    mismatch_policy: str = "error"
    storage_timeout_s: float = 600.0
    max_skip_fraction: float = 0.01

    def __post_init__(self) -> None:
        p = []
        if not self.urls:
            p.append(f"urls ({self.urls!r}) must name at least one shard source")
        if self.batch_size < 1:
            p.append(f"batch_size ({self.batch_size}) must be >= 1")
        if self.max_length < 8:
            p.append(f"max_length ({self.max_length}) must be >= 8")
        if self.num_workers < 0:
            p.append(f"num_workers ({self.num_workers}) must be >= 0")
        if self.shuffle_buffer < 0:
            p.append(f"shuffle_buffer ({self.shuffle_buffer}) must be >= 0")
        if self.mismatch_policy not in MISMATCH_POLICIES:
            p.append(f"mismatch_policy ({self.mismatch_policy!r}) must be one of {MISMATCH_POLICIES}")
        if self.chat_format not in CHAT_FORMATS:
            p.append(f"chat_format ({self.chat_format!r}) must be one of {CHAT_FORMATS}")
        if not (isinstance(self.storage_timeout_s, (int, float)) and self.storage_timeout_s > 0):
            p.append(f"storage_timeout_s ({self.storage_timeout_s!r}) must be a number > 0")
        if not (isinstance(self.max_skip_fraction, (int, float)) and 0 <= self.max_skip_fraction <= 1):
            p.append(f"max_skip_fraction ({self.max_skip_fraction!r}) must be a number in [0, 1]")
        if self.domain_weights is not None:
            if not self.domain_weights:
                p.append("domain_weights ({}) must name at least one domain, or be None")
            for d, w in self.domain_weights.items():
                if not (isinstance(w, (int, float)) and w >= 0):
                    p.append(f"domain_weights[{d!r}] ({w!r}) must be a number >= 0")
            if self.domain_weights and sum(self.domain_weights.values()) <= 0:
                p.append(f"domain_weights ({self.domain_weights}) must have a positive sum")
        elif self.samples_per_epoch is not None:
            p.append(f"samples_per_epoch ({self.samples_per_epoch}) is only for mixing mode (domain_weights set)")
        if self.streams is not None and self.streams < 1:
            p.append(f"streams ({self.streams}) must be >= 1, or None")
        if self.samples_per_epoch is not None and self.samples_per_epoch < 1:
            p.append(f"samples_per_epoch ({self.samples_per_epoch}) must be >= 1")
        if p:
            raise ValueError("DataConfig: " + "; ".join(p))

    @property
    def workers_per_rank(self) -> int:
        return max(1, self.num_workers)
