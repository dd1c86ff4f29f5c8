"""Data half of mole_ds: sharding LLaVA-format domains to WebDataset tars, and streaming them into batches.

Training entry point::

    loader = build_loader(DataConfig(urls="s3://bucket/prefix/", batch_size=8), processor)
                                             # fields and defaults: DataOptions (the one data schema)
    for batch in loader: ...                 # keys: see mole_ds.data.collate
    ckpt["data"] = merge_states(all_ranks(loader.state_dict()))   # the run's position, any world size
    loader.load_state_dict(ckpt["data"])
    loader.stats                             # skip / fault counters of this rank (names: STAT_KEYS)

Prompts (training, generation, evaluation): ``build_prompt`` / ``render_training`` in mole_ds.data.chat.
"""

from mole_ds.data.chat import CHAT_FORMATS, ChatTemplateError, build_prompt, render_training, tokenize_prompt
from mole_ds.data.collate import model_inputs
from mole_ds.data.config import DataConfig, DataOptions
from mole_ds.data.conversation import (
    SYSTEM_PROMPT,
    TokenizationMismatchError,
    encode_conversation,
    render_prompt,
)
from mole_ds.data.loader import (
    StreamingLoader,
    build_loader,
    check_max_length,
    check_sources,
    max_length_problems,
    merge_states,
)
from mole_ds.data.manifest import expand_urls, load_manifest
from mole_ds.data.sharding import ShardConfig, shard_dataset
from mole_ds.data.skips import STAT_KEYS, DataStreamError, check_skip_fraction, format_counts
from mole_ds.data.sources import DomainSource
from mole_ds.data.storage import RetryPolicy, StorageError, open_url, register_webdataset_schemes
from mole_ds.data.verify import verify

__all__ = [
    "CHAT_FORMATS", "ChatTemplateError", "DataConfig", "DataOptions", "DataStreamError", "DomainSource",
    "RetryPolicy", "STAT_KEYS", "ShardConfig", "StorageError", "StreamingLoader", "SYSTEM_PROMPT",
    "TokenizationMismatchError", "build_loader", "build_prompt", "check_max_length", "check_skip_fraction",
    "check_sources", "encode_conversation", "expand_urls", "format_counts", "load_manifest", "max_length_problems",
    "merge_states", "model_inputs", "open_url", "register_webdataset_schemes", "render_prompt", "render_training",
    "shard_dataset", "tokenize_prompt", "verify",
]
