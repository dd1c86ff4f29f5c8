"""Metrics a person can read: JSONL lines, TensorBoard scalars, routing per layer and domain (JSON + PNG)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch


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


class RoutingTracker:
    """Accumulates (layers, domains, E) token counts from ``routing_counts_by_sample`` over a run."""

    def __init__(self, num_layers: int, num_experts: int, domains: list[str]) -> None:
        self.domains = list(domains)
        self.counts = torch.zeros(num_layers, max(len(domains), 1), num_experts, dtype=torch.float64)

    def add(self, counts_LBE: torch.Tensor, domain_ids_B: torch.Tensor | None) -> None:
        c = counts_LBE.detach().to("cpu", torch.float64)
        if domain_ids_B is None:
            self.counts[:, 0] += c.sum(1)
            return
        idx = domain_ids_B.to("cpu", torch.long)
        self.counts.index_add_(1, idx, c)

    def reduce(self) -> torch.Tensor:
        """Sum over all ranks (every rank must call it)."""
        import torch.distributed as dist

        c = self.counts.clone()
        if dist.is_initialized():
            dist.all_reduce(c)
        return c

    def summary(self, counts: torch.Tensor) -> dict:
        """JSON-ready fractions and load balance per layer and domain."""
        out = {"domains": self.domains, "layers": []}
        for l in range(counts.shape[0]):
            layer = {}
            for d, name in enumerate(self.domains or ["all"]):
                row = counts[l, d]
                tot = float(row.sum())
                layer[name] = {"tokens": tot, "fraction": [round(float(v) / tot, 4) if tot else 0.0 for v in row]}
            total = counts[l].sum(0)
            mean = float(total.mean())
            p = total / total.sum().clamp_min(1)
            layer["_all"] = {"tokens": float(total.sum()), "max_over_mean": float(total.max()) / mean if mean else 0.0,
                             "entropy": float(-(p[p > 0] * p[p > 0].log()).sum()),
                             "unused_experts": int((total == 0).sum())}
            out["layers"].append(layer)
        return out


def write_routing_report(counts_LDE: torch.Tensor, domains: list[str], out_dir: str | Path, title: str = "") -> Path:
    """``routing.json`` and ``routing.png``: per layer, the share of each domain's tokens going to each expert."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tracker = RoutingTracker(counts_LDE.shape[0], counts_LDE.shape[2], domains)
    (out_dir / "routing.json").write_text(json.dumps(tracker.summary(counts_LDE), indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L, D, E = counts_LDE.shape
    frac = counts_LDE / counts_LDE.sum(-1, keepdim=True).clamp_min(1)
    fig, axes = plt.subplots(1, D, figsize=(2.2 + 0.45 * E * D, 1.2 + 0.35 * L), squeeze=False)
    for d in range(D):
        ax = axes[0, d]
        im = ax.imshow(frac[:, d].numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_title(domains[d] if d < len(domains) else "all", fontsize=9)
        ax.set_xlabel("expert")
        ax.set_xticks(range(E))
        ax.set_yticks(range(L))
        if d == 0:
            ax.set_ylabel("layer")
        for l in range(L):
            for e in range(E):
                if E <= 16:
                    ax.text(e, l, f"{frac[l, d, e]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if frac[l, d, e] < 0.6 else "black")
    fig.colorbar(im, ax=axes[0, :].tolist(), shrink=0.8, label="share of domain's tokens")
    fig.suptitle(title or "MoLE routing per layer and domain", fontsize=10, y=1.04)
    path = out_dir / "routing.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
