"""Checkpoints, in one place: the layout (names, marker, listing, verification, resolution), the consolidated
file format, the reader of DeepSpeed's per-rank files, and consolidation without ranks.

Everything that trusts a checkpoint (resume, elastic re-slicing, consolidation, export, generate, the eval
plugin) resolves it here, with the same verification (see :mod:`mole_ds.checkpoint.layout`)."""
from .consolidate import consolidate, consolidate_tag
from .consolidated import FORMAT, read_config, read_consolidated, write_consolidated
from .deepspeed_files import (MOMENTS, FullState, client_states, has_optimizer_partitions, load_ds_file,
                              rank0_model_file, read_full_state)
from .layout import (CHECKPOINTS_DIR, CONSOLIDATED_NAME, MARKER, complete_checkpoints, file_manifest, find_resume,
                     is_tag, newest_verified, read_marker, require_verified, resolve_consolidated, resolve_tag,
                     rng_file, tag_name, verify_checkpoint, write_marker)

__all__ = [
    "CHECKPOINTS_DIR", "CONSOLIDATED_NAME", "FORMAT", "MARKER", "MOMENTS", "FullState", "client_states",
    "complete_checkpoints", "consolidate", "consolidate_tag", "file_manifest", "find_resume", "has_optimizer_partitions", "is_tag", "load_ds_file",
    "newest_verified", "rank0_model_file", "read_config", "read_consolidated", "read_full_state", "read_marker",
    "require_verified", "resolve_consolidated", "resolve_tag", "rng_file", "tag_name", "verify_checkpoint",
    "write_consolidated", "write_marker",
]
