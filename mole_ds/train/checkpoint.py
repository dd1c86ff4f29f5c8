"""Training checkpoints: save through DeepSpeed plus the files mole_ds adds, and load them back (as written,
or re-sliced to another layout by :mod:`mole_ds.train.elastic`).

The layout, the marker, verification and resolution live in :mod:`mole_ds.checkpoint` (one home for every
reader); this module writes tags and loads them into a live engine.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from ..checkpoint import (CONSOLIDATED_NAME, complete_checkpoints, has_optimizer_partitions, read_marker, rng_file,
                          tag_name, write_marker)
from ..runtime import barrier, rank


def _rng_state() -> dict:
    import random

    import torch

    st = {"torch": torch.get_rng_state().tolist(), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return st


def _set_rng_state(st: dict) -> None:
    import random

    import torch

    torch.set_rng_state(torch.tensor(st["torch"], dtype=torch.uint8))
    v, internal, gauss = st["python"]
    random.setstate((v, tuple(internal), gauss))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in st["cuda"]])


def save_checkpoint(engine, root: str | Path, step: int, client_state: dict, meta: dict, keep: int = 0,
                    before_marker=None) -> Path:
    """Save through DeepSpeed (model, optimizer, scheduler, client state) and every rank's RNG state (dropout
    must continue exactly); run ``before_marker(tag)`` on every rank (more files, e.g. the consolidated
    weights); then mark the tag complete with its file manifest, and prune old tags (``keep``)."""
    root = Path(root)
    tag = tag_name(step)
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state)
    rng = rng_file(root / tag, rank())
    rng.parent.mkdir(exist_ok=True)
    rng.write_text(json.dumps(_rng_state()))
    if before_marker is not None:
        before_marker(root / tag)
    barrier()
    if rank() == 0:
        write_marker(root / tag, {**meta, "step": step, "tag": tag})
        if keep > 0:
            for old in complete_checkpoints(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return root / tag


def check_topology(meta: dict, ep_size: int, world_size: int, num_experts: int, where: Path,
                   zero_stage: int | None = None) -> bool:
    """Whether a checkpoint resumes as written (True) or must be re-sliced to this run's layout (False, see
    mole_ds.train.elastic); refuse, saying why and what to do instead, what cannot be resumed at all.

    Re-slicing covers any world size and ep_size (each must divide the other as the run requires anyway) of a
    ZeRO-1/2/3 checkpoint with the same experts; the number of experts cannot change (the trained experts are
    the model), and a checkpoint without ZeRO partitions (stage 0) is re-sliced only when it has no experts
    to move (ep_size 1 on both sides)."""
    if meta.get("num_experts") != num_experts:
        raise ValueError(
            f"checkpoint {where} was written with num_experts {meta.get('num_experts')} (this run: {num_experts}): "
            "the number of experts cannot change on resume. The trained weights are in "
            f"{where / CONSOLIDATED_NAME} (tools/consolidate.py rebuilds them from any checkpoint).")
    same = meta.get("ep_size") == ep_size and meta.get("world_size") == world_size
    if same:
        return True
    if num_experts % ep_size:
        raise ValueError(f"checkpoint {where}: this run's ep_size {ep_size} does not divide num_experts {num_experts}")
    has_partitions = has_optimizer_partitions(where)
    if not has_partitions and (meta.get("ep_size", 1) != 1 or ep_size != 1):
        raise ValueError(f"checkpoint {where} was written with ep_size {meta.get('ep_size')} (this run: {ep_size}), "
                         f"world size {meta.get('world_size')} (this run: {world_size}) and holds no ZeRO optimizer "
                         "partitions to re-slice (stage 0): resume it with the original layout; the trained weights "
                         f"are in {where / CONSOLIDATED_NAME} (tools/export.py turns them into an export or a PEFT adapter)")
    print(f"[mole_ds] checkpoint {where} was written at world size {meta.get('world_size')}, ep_size "
          f"{meta.get('ep_size')}; re-slicing weights and Adam state to world size {world_size}, ep_size {ep_size}",
          file=sys.stderr, flush=True)
    return False


def save_training_checkpoint(engine, root: str | Path, step: int, client_state: dict, meta: dict, mole_config,
                             ep_group=None, keep: int = 0, extra: dict | None = None) -> Path:
    """DeepSpeed checkpoint + the consolidated ``mole.safetensors`` (all experts) inside the same tag, both
    covered by the tag's marker and manifest."""
    from ..export import save_consolidated

    def consolidated(tag: Path) -> None:
        save_consolidated(engine.module, tag / CONSOLIDATED_NAME, mole_config, ep_group,
                          extra={"step": step, **(extra or {})})

    return save_checkpoint(engine, root, step, client_state, meta, keep=keep, before_marker=consolidated)


def load_checkpoint(engine, tag_dir: Path, ep_size: int, world_size: int, num_experts: int) -> dict:
    """Load model, optimizer and scheduler state; returns the client state saved with it. A checkpoint of another
    world size or ep_size is re-sliced to this run (mole_ds.train.elastic); the client state then carries
    ``resharded_from``."""
    meta = read_marker(tag_dir)
    if not check_topology(meta, ep_size, world_size, num_experts, tag_dir):
        from ..parallel.deepspeed_compat import expert_groups
        from .elastic import load_resharded

        ep_rank = expert_groups(ep_size)[3] if ep_size > 1 else 0
        client = load_resharded(engine, tag_dir, ep_size, ep_rank)
        # RNG: the streams of the old ranks do not map onto the new ones (another world size draws dropout
        # masks for other micro-batches); the run keeps its seeded generators.
        return {**client, "resharded_from": {"world_size": meta.get("world_size"), "ep_size": meta.get("ep_size")}}
    path, client = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {tag_dir}")
    if ep_size > 1 and engine.zero_optimization_stage() < 3:
        _restore_local_experts(engine.module, tag_dir / CONSOLIDATED_NAME)
    rng = rng_file(tag_dir, rank())
    if rng.is_file():
        _set_rng_state(json.loads(rng.read_text()))
    return client or {}


def _restore_local_experts(model, consolidated: Path) -> None:
    # ZeRO-1/2 write the module's weights from rank 0 only, so after load_checkpoint every rank's live expert
    # tensors hold rank 0's experts (the fp32 optimizer partitions are right). Copy each rank's own slice
    # back from the consolidated file saved with the checkpoint.
    import torch
    from safetensors import safe_open

    from ..patching import mole_layers

    if not consolidated.is_file():
        raise RuntimeError(f"{consolidated} is missing: a ZeRO-1/2 expert-parallel checkpoint needs it to restore "
                           "each rank's experts")
    names = {id(p): n for n, p in model.named_parameters()}
    with safe_open(str(consolidated), framework="pt") as f, torch.no_grad():
        for mlp in mole_layers(model):
            lo, n = mlp.experts.expert_offset, mlp.experts.num_experts
            for p in mlp.experts.parameters():
                p.copy_(f.get_slice(names[id(p)])[lo:lo + n].to(p.dtype))
