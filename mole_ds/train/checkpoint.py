"""DeepSpeed checkpoints with a completeness marker, resume discovery and a topology check.

A checkpoint directory is ``<root>/<tag>/`` as DeepSpeed writes it, plus ``mole_meta.json`` written by rank 0
after every rank has finished saving: a tag without it (a crash mid-save) is never resumed from.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch.distributed as dist

META = "mole_meta.json"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


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


def save_checkpoint(engine, root: str | Path, step: int, client_state: dict, meta: dict, keep: int = 0) -> Path:
    """Save through DeepSpeed (model, optimizer, scheduler, client state) and every rank's RNG state (dropout
    must continue exactly), then mark the tag complete."""
    root = Path(root)
    tag = f"step{step:08d}"
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state)
    (root / tag / "rng").mkdir(exist_ok=True)
    (root / tag / "rng" / f"rank{_rank()}.json").write_text(json.dumps(_rng_state()))
    _barrier()
    if _rank() == 0:
        (root / tag / META).write_text(json.dumps({**meta, "step": step, "tag": tag, "complete": True}, indent=1))
        if keep > 0:
            for old in complete_checkpoints(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return root / tag


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoint tags under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    tags = [p for p in root.iterdir() if p.is_dir() and (p / META).is_file()]
    return sorted(tags, key=lambda p: json.loads((p / META).read_text()).get("step", -1))


def find_resume(resume: str, root: str | Path) -> Path | None:
    """'none' -> None; 'auto' -> newest complete tag under root (or None); else the given tag directory."""
    if resume == "none":
        return None
    if resume == "auto":
        tags = complete_checkpoints(root)
        return tags[-1] if tags else None
    path = Path(resume)
    if not (path / META).is_file():
        raise ValueError(f"checkpoint.resume ({resume!r}) is not a complete mole_ds checkpoint (no {META})")
    return path


def check_topology(meta: dict, ep_size: int, world_size: int, num_experts: int, where: Path) -> None:
    """Refuse a checkpoint whose expert layout this run cannot read, saying what to do instead."""
    problems = []
    if meta.get("num_experts") != num_experts:
        problems.append(f"num_experts {meta.get('num_experts')} (this run: {num_experts})")
    if meta.get("ep_size") != ep_size:
        problems.append(f"ep_size {meta.get('ep_size')} (this run: {ep_size})")
    if meta.get("world_size") != world_size:
        problems.append(f"world size {meta.get('world_size')} (this run: {world_size})")
    if problems:
        raise ValueError(
            f"checkpoint {where} was written with " + ", ".join(problems) + ": DeepSpeed's partitioned optimizer "
            "state cannot be re-sharded. Resume with the original layout, or export it with tools/export.py and "
            "start a new run from the consolidated weights (model.init_from=<file>.safetensors).")


CONSOLIDATED = "mole.safetensors"


def save_training_checkpoint(engine, root: str | Path, step: int, client_state: dict, meta: dict, mole_config,
                             ep_group=None, keep: int = 0, extra: dict | None = None) -> Path:
    """DeepSpeed checkpoint + the consolidated ``mole.safetensors`` (all experts) inside the same tag."""
    from ..export import save_consolidated

    tag = save_checkpoint(engine, root, step, client_state, meta, keep=keep)
    save_consolidated(engine.module, tag / CONSOLIDATED, mole_config, ep_group, extra={"step": step, **(extra or {})})
    return tag


def load_checkpoint(engine, tag_dir: Path, ep_size: int, world_size: int, num_experts: int) -> dict:
    """Load model, optimizer and scheduler state; returns the client state saved with it."""
    meta = json.loads((tag_dir / META).read_text())
    check_topology(meta, ep_size, world_size, num_experts, tag_dir)
    path, client = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {tag_dir}")
    if ep_size > 1 and engine.zero_optimization_stage() < 3:
        _restore_local_experts(engine.module, tag_dir / CONSOLIDATED)
    rng = tag_dir / "rng" / f"rank{_rank()}.json"
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
