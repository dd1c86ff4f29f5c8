"""Metrics a person can read: JSONL lines, TensorBoard scalars, routing per layer and domain (JSON + PNG)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..routing_table import RoutingTable, plot_heatmaps


class MetricsWriter:
    """Rank-0 writer of ``metrics.jsonl`` and TensorBoard events under ``output_dir``."""

    def __init__(self, output_dir: str | Path, enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.dir = Path(output_dir)
        self._tb = None
        self._f = None
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self._f = open(self.dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.dir / "tensorboard"))
            except Exception as exc:  # tensorboard is a dependency, but keep training if its import breaks
                print(f"[mole_ds] TensorBoard disabled: {type(exc).__name__}: {exc}")

    def log(self, step: int, kind: str, values: dict) -> None:
        if not self.enabled:
            return
        rec = {"step": step, "kind": kind, "time": round(time.time(), 3), **values}
        self._f.write(json.dumps(rec) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)

    def truncate_after(self, step: int) -> int:
        """Drop the records of steps after ``step`` (a resume re-runs them), keeping lines that do not parse
        (a half-written last line of a killed run is dropped too); returns how many records were dropped.
        The rewrite is atomic (a temporary file renamed over the old one)."""
        if not self.enabled:
            return 0
        path = self.dir / "metrics.jsonl"
        self._f.close()
        kept, dropped = [], 0
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] > step:
                dropped += 1
            else:
                kept.append(line)
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
        self._f = open(path, "a", buffering=1)
        if dropped:
            print(f"[mole_ds] metrics.jsonl: dropped {dropped} record(s) after step {step} (re-run after resume)",
                  flush=True)
        return dropped

    def close(self) -> None:
        if self._f:
            self._f.close()
            self._f = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def token_slots(batches: list[dict]) -> tuple[int, int]:
    """(real tokens, token slots) of a step's micro-batches summed over all ranks (collective when
    distributed): real = attention-mask ones (image tokens included), slots = B x T of each padded
    micro-batch; the step's padding fraction is 1 - real / slots."""
    import torch.distributed as dist

    t = torch.tensor([sum(int(b["attention_mask"].sum()) for b in batches),
                      sum(b["attention_mask"].numel() for b in batches)], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(t)
    return int(t[0]), int(t[1])


class RoutingTracker(RoutingTable):
    """The run's routing counts (a :class:`mole_ds.routing_table.RoutingTable`: one row per domain of the data,
    a single "all" row when it names none), filled from ``routing_counts_by_sample`` on every rank."""

    def __init__(self, num_layers: int, num_experts: int, domains: list[str]) -> None:
        super().__init__(list(domains) or ["all"],
                         torch.zeros(num_layers, max(len(domains), 1), num_experts, dtype=torch.float64))

    def reduce(self) -> torch.Tensor:
        """(L, D, E) counts summed over all ranks (every rank must call it)."""
        import torch.distributed as dist

        c = self.counts.clone()
        if dist.is_initialized():
            dist.all_reduce(c)
        return c


def write_routing_report(counts_LDE: torch.Tensor, domains: list[str], out_dir: str | Path, title: str = "") -> Path:
    """``routing.json`` (``RoutingTable.summary``) and ``routing.png`` (``plot_heatmaps``, one panel per domain):
    per layer, the share of each domain's tokens going to each expert."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = RoutingTable(list(domains) or ["all"], counts_LDE)
    (out_dir / "routing.json").write_text(json.dumps(table.summary(), indent=1))
    return plot_heatmaps({"": table}, out_dir / "routing.png", title or "MoLE routing per layer and domain",
                         panels="domain")
