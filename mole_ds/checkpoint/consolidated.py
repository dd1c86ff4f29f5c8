"""The consolidated file format: every trainable tensor of a MoLE model in full, in one safetensors file.

Written by training into each checkpoint tag (``mole_ds.export.save_consolidated``), by
:func:`mole_ds.checkpoint.consolidate` from DeepSpeed's per-rank files, and copied by ``tools/export.py``; read
by ``mole_ds.load_mole``, inference, the eval plugin and the PEFT export. The file's metadata carries:

* ``format``: :data:`FORMAT`;
* ``mole_config``: the MoLEConfig as JSON, with ``ep_size`` 1 (the file holds every expert);
* ``extra``: JSON, what the writer knew (step, base model, run config, domains).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import MoLEConfig

FORMAT = "mole_ds.consolidated.v1"


def metadata(mole_config: dict, extra: dict | None = None) -> dict[str, str]:
    """The safetensors metadata of a consolidated file (``mole_config`` as ``MoLEConfig.to_dict()`` gives it)."""
    return {"format": FORMAT, "mole_config": json.dumps({**mole_config, "ep_size": 1}),
            "extra": json.dumps(extra or {})}


def write_consolidated(path: str | Path, tensors: dict[str, torch.Tensor], mole_config: dict,
                       extra: dict | None = None) -> Path:
    """Write ``tensors`` (full values, every expert) with the format's metadata; returns the path."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({n: t.contiguous() for n, t in tensors.items()}, str(path), metadata=metadata(mole_config, extra))
    return path


def read_config(path: str | Path) -> tuple[MoLEConfig, dict]:
    """The MoLE config and the ``extra`` record of a consolidated file, without reading its tensors; ValueError
    naming the file when it is not one."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a mole_ds consolidated export (format {meta.get('format')!r}, "
                         f"expected {FORMAT!r})")
    return MoLEConfig.from_dict(json.loads(meta["mole_config"])), json.loads(meta.get("extra", "{}"))


def read_consolidated(path: str | Path) -> tuple[dict[str, torch.Tensor], MoLEConfig, dict]:
    """(tensors, MoLE config, extra) of a consolidated file; ValueError naming the file when it is not one."""
    from safetensors.torch import load_file

    cfg, extra = read_config(path)
    return load_file(str(path)), cfg, extra
