#!/usr/bin/env python
"""Export a trained MoLE model: the consolidated file (for ``mole_ds.load_mole``) and, optionally, PEFT adapters.

    python tools/export.py RUN_OR_CHECKPOINT --out DIR [--peft]

INPUT is a training ``output_dir`` (the newest checkpoint that passes verification; a damaged newer one is
reported and skipped), a checkpoint tag directory
(``.../checkpoints/stepXXXXXXXX``) or a consolidated ``.safetensors`` file. DIR receives:

* ``mole.safetensors``: every trained tensor, full experts; ``mole_ds.load_mole(DIR/mole.safetensors, base)``
  restores it into a fresh base model;
* ``mole_config.json``: the MoLE config, the base model path and where the file came from (human-readable
  copy of the file's own metadata);
* with ``--peft``: ``peft/expert_{k}/``, each expert as a PEFT LoRA adapter (see ``mole_ds/peft_export.py`` for
  what such an adapter means: every token routed to expert k).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from safetensors import SafetensorError

from mole_ds.checkpoint import CONSOLIDATED_NAME, FORMAT, read_config, read_consolidated, resolve_consolidated
from mole_ds.peft_export import export_peft_adapters


def export(src: str | Path, out: str | Path, peft: bool = False) -> list[Path]:
    """Do the export (see the module docstring); returns every path written."""
    return export_resolved(resolve_consolidated(src), out, peft)


def export_resolved(path: Path, out: str | Path, peft: bool = False) -> list[Path]:
    """:func:`export` of a consolidated file already resolved (and its checkpoint verified) by
    ``mole_ds.checkpoint.resolve_consolidated``: the tag's files are hashed once, not twice."""
    state, cfg, extra = read_consolidated(path)  # validates the format before anything is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    target = out / CONSOLIDATED_NAME
    written = []
    if target.resolve() != path.resolve():
        shutil.copyfile(path, target)  # byte copy: the metadata (config, base model, step) travels with it
    written.append(target)
    info = {
        "format": FORMAT,
        "source": str(path.resolve()),
        "base_model": extra.get("base_model"),
        "step": extra.get("step"),
        "domains": extra.get("domains"),
        "mole_config": cfg.to_dict(),
        "tensors": len(state),
        "parameters": int(sum(t.numel() for t in state.values())),
        "load": "mole_ds.load_mole(<dir>/mole.safetensors, base_model) on a fresh base model",
    }
    (out / "mole_config.json").write_text(json.dumps(info, indent=1) + "\n")
    written.append(out / "mole_config.json")
    if peft:
        written.extend(export_peft_adapters(target, out / "peft"))
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", help="training output_dir, checkpoint tag directory or consolidated .safetensors")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--peft", action="store_true", help="also write each expert as a PEFT LoRA adapter")
    args = ap.parse_args(argv)
    try:
        src = resolve_consolidated(args.input)
        written = export_resolved(src, args.out, peft=args.peft)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SafetensorError as e:  # a truncated or corrupt file
        print(f"error: cannot read {args.input}: {e}", file=sys.stderr)
        return 2
    cfg, extra = read_config(written[0])
    print(f"source: {src} (step {extra.get('step', '?')}, {cfg.num_experts} experts, routing {cfg.routing}, "
          f"top_k {cfg.top_k}, base model {extra.get('base_model')})")
    for p in written:
        print(f"wrote {p}{'/' if p.is_dir() else ''}")
    if args.peft and not (cfg.routing == "sparse" and cfg.top_k == 1):
        print(f"note: routing={cfg.routing}, top_k={cfg.top_k}: each PEFT adapter is one expert with weight 1, "
              "not the trained model's behaviour (see the adapters' README.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
