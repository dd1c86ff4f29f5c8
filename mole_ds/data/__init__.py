"""Data half of mole_ds: sharding LLaVA-format domains to WebDataset tars, and streaming them into batches.

Training entry point::

    loader = build_loader(DataConfig(urls="s3://bucket/prefix/", batch_size=8), processor)
    for batch in loader: ...                 # keys: see mole_ds.data.collate
    ckpt["data"] = loader.state_dict(); loader.load_state_dict(ckpt["data"])
"""

from mole_ds.data.collate import model_inputs
from mole_ds.data.config import DataConfig
from mole_ds.data.conversation import SYSTEM_PROMPT, encode_conversation, render_prompt
from mole_ds.data.loader import StreamingLoader, build_loader
from mole_ds.data.manifest import expand_urls, load_manifest
from mole_ds.data.sharding import ShardConfig, shard_dataset
from mole_ds.data.sources import DomainSource
from mole_ds.data.storage import RetryPolicy, StorageError, open_url, register_webdataset_schemes
from mole_ds.data.verify import verify

__all__ = [
    "DataConfig", "DomainSource", "RetryPolicy", "ShardConfig", "StorageError", "StreamingLoader", "SYSTEM_PROMPT",
    "build_loader", "encode_conversation", "expand_urls", "load_manifest", "model_inputs", "open_url",
    "register_webdataset_schemes", "render_prompt", "shard_dataset", "verify",
]
