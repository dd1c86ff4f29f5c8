"""TEMPORARY: write_full_model moves to mole_ds.inference."""
from __future__ import annotations

from pathlib import Path


def write_full_model(consolidated: str | Path, out: str | Path, base: str | Path | None = None) -> Path:
    """The full model for inference: ``out/base/`` (the base model as ``save_pretrained`` writes it, with its
    processor) and ``out/mole.safetensors`` (load both with ``mole_ds.inference.load_for_inference``)."""
    import shutil

    from .checkpoint import CONSOLIDATED_NAME, read_config
    from .inference import load_base

    _, extra = read_config(consolidated)
    base = base or extra.get("base_model")
    if not base:
        raise ValueError(f"{consolidated}: no base model recorded; pass base")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, processor, _ = load_base(base)
    model.save_pretrained(out / "base")
    processor.save_pretrained(out / "base")
    target = out / CONSOLIDATED_NAME
    if Path(consolidated).resolve() != target.resolve():
        shutil.copyfile(consolidated, target)
    return out
