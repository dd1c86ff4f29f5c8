#!/usr/bin/env python
"""Consolidate a mole_ds DeepSpeed checkpoint in one process, with no ranks and no process group.

    python tools/consolidate.py CHECKPOINT --out DIR [--full] [--base BASE_DIR]

CHECKPOINT is a checkpoint tag directory (``.../checkpoints/stepXXXXXXXX``) or a training ``output_dir`` (the
newest tag that passes verification is used). The per-rank ZeRO files DeepSpeed wrote are read directly
(ZeRO-1/2/3, any world size and ep_size; every file with ``torch.load(weights_only=True)``) and DIR receives:

* ``mole.safetensors``: every trainable tensor in full, all experts, tensor for tensor what training writes into
  the tag (``mole_ds.load_mole`` / ``tools/export.py`` read it);
* with ``--full``: also ``base/``, the base model and its processor as ``save_pretrained`` writes them, so DIR
  alone is what inference needs (``mole_ds.inference.load_for_inference(DIR/mole.safetensors, DIR/base)``).

This is the supported route for expert-parallel checkpoints: DeepSpeed's ``zero_to_fp32.py`` assumes every
partition spans the whole world and fails on them ("consumed N numels out of M").
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mole_ds.checkpoint import consolidate_tag, resolve_tag
from mole_ds.inference import write_full_model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="checkpoint tag directory or training output_dir")
    ap.add_argument("--out", required=True, help="output directory (or a .safetensors file name)")
    ap.add_argument("--full", action="store_true", help="also write the base model (save_pretrained) beside it")
    ap.add_argument("--base", default=None, help="base model directory (default: the one recorded in the run)")
    args = ap.parse_args(argv)
    try:
        tag = resolve_tag(args.checkpoint)
        path = consolidate_tag(tag, args.out)
        print(f"source: {tag}")
        print(f"wrote {path}")
        if args.full:
            out = path.parent
            write_full_model(path, out, args.base)
            print(f"wrote {out / 'base'}/")
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
