"""Routing counts per (layer, domain, expert), written once: the counter behind training's routing report
(``routing.json`` / ``routing.png``), the studies' routing tables and the eval plugin's per-domain statistics,
and the one heatmap of routing shares.

* :class:`RoutingTable` holds token counts ``counts_LDE`` (float64, integer-valued) with the domain names;
  it adds a batch's per-sample counts by domain id (training) or one request's counts by domain name (eval),
  and reads shares, load balance and the mutual information between domain and expert from them. Its JSON
  form (:meth:`RoutingTable.to_dict`) keeps the raw integer counts, so it round-trips without loss.
* :func:`plot_heatmaps` draws tables as share heatmaps (matplotlib is imported only when drawing).

No collectives here: training sums a table over ranks itself (``mole_ds.train.metrics.RoutingTracker``).
Shape suffixes: L layers, D domains, E experts, B samples.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch

PANELS = ("layer", "domain")


class RoutingTable:
    """Token counts ``counts[layer, domain, expert]`` with the domain names (one name per domain row)."""

    def __init__(self, domains: Sequence[str], counts: torch.Tensor | list) -> None:
        """``counts``: a (L, D, E) tensor, or nested lists ``[layer][domain][expert]`` of integers >= 0 (the
        JSON form, validated: ValueError listing every problem)."""
        self.domains = list(domains)
        if not torch.is_tensor(counts):
            _check_count_lists(self.domains, counts)
        counts_LDE = torch.as_tensor(counts, dtype=torch.float64).detach().cpu()
        if counts_LDE.dim() != 3 or counts_LDE.shape[1] != len(self.domains):
            raise ValueError(f"routing counts of shape {tuple(counts_LDE.shape)} must be (layers, domains, experts) "
                             f"with {len(self.domains)} domains ({', '.join(self.domains)})")
        self.counts = counts_LDE

    @classmethod
    def zeros(cls, layers: int, experts: int, domains: Sequence[str]) -> "RoutingTable":
        return cls(domains, torch.zeros(layers, len(domains), experts, dtype=torch.float64))

    @property
    def layers(self) -> int:
        return self.counts.shape[0]

    @property
    def experts(self) -> int:
        return self.counts.shape[2]

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, RoutingTable) and self.domains == other.domains
                and self.counts.shape == other.counts.shape and bool(torch.equal(self.counts, other.counts)))

    def __repr__(self) -> str:
        return f"RoutingTable(domains={self.domains}, counts of shape {tuple(self.counts.shape)})"

    # -- counting ---------------------------------------------------------------------------------------------
    def add(self, counts_LBE: torch.Tensor, domain_ids_B: torch.Tensor | None = None) -> None:
        """Add a batch's per-sample counts, each sample to its domain row (``domain_ids_B``; None: row 0)."""
        c_LBE = counts_LBE.detach().to("cpu", torch.float64)
        if domain_ids_B is None:
            self.counts[:, 0] += c_LBE.sum(1)
            return
        self.counts.index_add_(1, domain_ids_B.to("cpu", torch.long), c_LBE)

    def add_to(self, domain: str, counts_LE: torch.Tensor) -> None:
        """Add one request's (layers, E) counts to ``domain``'s row, appending the row for a new name (a table
        may start with no domain and no layer: ``RoutingTable.zeros(0, E, [])``)."""
        c_LE = counts_LE.detach().to("cpu", torch.float64)
        if self.layers == 0 and not self.domains:
            self.counts = torch.zeros(c_LE.shape[0], 0, self.experts, dtype=torch.float64)
        if domain not in self.domains:
            self.domains.append(domain)
            self.counts = torch.cat([self.counts, torch.zeros(self.layers, 1, self.experts, dtype=torch.float64)], 1)
        self.counts[:, self.domains.index(domain)] += c_LE

    # -- reading ----------------------------------------------------------------------------------------------
    def fractions(self) -> torch.Tensor:
        """(L, D, E) share of each domain's tokens per expert (a domain with no tokens: zeros)."""
        return self.counts / self.counts.sum(-1, keepdim=True).clamp_min(1)

    def shares(self, layer: int) -> list[list[float]]:
        """Share of each domain's tokens sent to each expert in ``layer`` (rows sum to 1, or are zeros)."""
        return self.fractions()[layer].tolist()

    def mutual_information_bits(self, layer: int) -> float:
        """I(domain; expert) in bits over the layer's tokens (NaN when there are none)."""
        return mutual_information_bits(self.counts[layer].tolist())

    def max_bits(self) -> float:
        """The largest possible mutual information: log2(min(D, E))."""
        return math.log2(min(len(self.domains), self.experts))

    def summary(self) -> dict:
        """Training's ``routing.json``: per layer and domain the tokens and the share per expert (4 digits);
        per layer (``_all``) the load balance over all domains: max/mean expert load, entropy, unused experts."""
        out = {"domains": self.domains, "layers": []}
        for l in range(self.layers):
            layer = {}
            for d, name in enumerate(self.domains):
                row = self.counts[l, d]
                tot = float(row.sum())
                layer[name] = {"tokens": tot, "fraction": [round(float(v) / tot, 4) if tot else 0.0 for v in row]}
            total = self.counts[l].sum(0)
            mean = float(total.mean())
            p = total / total.sum().clamp_min(1)
            layer["_all"] = {"tokens": float(total.sum()), "max_over_mean": float(total.max()) / mean if mean else 0.0,
                             "entropy": float(-(p[p > 0] * p[p > 0].log()).sum()),
                             "unused_experts": int((total == 0).sum())}
            out["layers"].append(layer)
        return out

    # -- JSON -------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """``{"domains": [...], "counts": [[[int]]]}``: the raw integer counts."""
        return {"domains": list(self.domains), "counts": self.counts.round().long().tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "RoutingTable":
        unknown = sorted(set(d) - {"domains", "counts"})
        if unknown:
            raise ValueError(f"unknown routing table key(s): {', '.join(unknown)}")
        return cls(list(d["domains"]), [[list(r) for r in layer] for layer in d["counts"]])


def _check_count_lists(domains: list[str], counts: list) -> None:
    problems = []
    if not counts or not counts[0]:
        problems.append("counts must have at least one layer and one domain")
    else:
        E = len(counts[0][0])
        for li, layer in enumerate(counts):
            if len(layer) != len(domains):
                problems.append(f"counts[{li}] has {len(layer)} domains, expected {len(domains)} "
                                f"({', '.join(domains)})")
            for di, row in enumerate(layer):
                if len(row) != E:
                    problems.append(f"counts[{li}][{di}] has {len(row)} experts, expected {E}")
                bad = [v for v in row if isinstance(v, bool) or not isinstance(v, int) or v < 0]
                if bad:
                    problems.append(f"counts[{li}][{di}] has {bad!r}: counts must be integers >= 0")
    if problems:
        raise ValueError("invalid routing table:\n  " + "\n  ".join(problems))


def mutual_information_bits(counts_DE: list[list[float]]) -> float:
    """I(domain; expert) in bits of a joint count table: 0 when routing ignores the domain, log2(min(D, E))
    when the domain decides the expert (and vice versa)."""
    tot = sum(map(sum, counts_DE))
    if tot <= 0:
        return math.nan
    D, E = len(counts_DE), len(counts_DE[0])
    pd = [sum(row) / tot for row in counts_DE]
    pe = [sum(counts_DE[d][e] for d in range(D)) / tot for e in range(E)]
    mi = 0.0
    for d in range(D):
        for e in range(E):
            p = counts_DE[d][e] / tot
            if p > 0:
                mi += p * math.log2(p / (pd[d] * pe[e]))
    return max(0.0, mi)  # rounding can leave -1e-17


def plot_heatmaps(tables: dict[str, RoutingTable], path: str | Path, title: str, panels: str = "layer") -> Path:
    """Heatmaps of routing shares: one row of panels per table (e.g. per arm of a study; one table named ""
    for a training run), each cell the share of a domain's tokens routed to an expert (written with its
    value when there are at most 16 experts).

    panels="layer": one panel per layer, domains (rows) x experts (columns), I(domain; expert) in its title
    (few layers: the studies); panels="domain": one panel per domain, layers (rows) x experts (columns)
    (deep models: training's ``routing.png``)."""
    if panels not in PANELS:
        raise ValueError(f"panels ({panels!r}) must be one of {', '.join(PANELS)}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = []  # per table: [(share matrix (rows, E), row labels, panel title)]
    for name, t in tables.items():
        frac_LDE, prefix = t.fractions(), f"{name} " if name else ""
        if panels == "layer":
            grid.append([(frac_LDE[l], t.domains, f"{prefix}L{l}: I={t.mutual_information_bits(l):.2f}/"
                          f"{t.max_bits():.2f} bit") for l in range(t.layers)])
        else:
            grid.append([(frac_LDE[:, d], [str(l) for l in range(t.layers)], f"{prefix}{dom}")
                         for d, dom in enumerate(t.domains)])
    n_rows, n_cols = len(grid), max(len(row) for row in grid)
    R = max(m.shape[0] for row in grid for m, _, _ in row)
    E = max(t.experts for t in tables.values())
    fig, axes = plt.subplots(n_rows, n_cols, squeeze=False, layout="constrained",
                             figsize=(1.0 + n_cols * (1.0 + 0.45 * E), 0.8 + n_rows * (0.9 + 0.35 * R)))
    im = None
    for i, row in enumerate(grid):
        for j in range(n_cols):
            ax = axes[i][j]
            if j >= len(row):
                ax.axis("off")
                continue
            m, labels, sub = row[j]
            im = ax.imshow(m.numpy(), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
            if m.shape[1] <= 16:
                for r in range(m.shape[0]):
                    for e in range(m.shape[1]):
                        v = float(m[r, e])
                        ax.text(e, r, f"{v:.2f}", ha="center", va="center", fontsize=6,
                                color="black" if v > 0.6 else "white")
            ax.set_xticks(range(m.shape[1]))
            ax.set_xticklabels([f"e{e}" for e in range(m.shape[1])], fontsize=7)
            ax.set_yticks(range(len(labels)))
            ax.set_yticklabels(labels, fontsize=7)
            ax.set_title(sub, fontsize=8)
            if j == 0:
                ax.set_ylabel("domain" if panels == "layer" else "layer", fontsize=8)
            if i == n_rows - 1:
                ax.set_xlabel("expert", fontsize=8)
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label="share of the domain's tokens")
    fig.suptitle(title, fontsize=9)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["RoutingTable", "mutual_information_bits", "plot_heatmaps"]
