"""Routing counts per (layer, domain, expert): stored raw, so they round-trip through JSON without loss, and
the numbers read from them (shares, mutual information between domain and expert) and their heatmap."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path


@dataclass
class RoutingTable:
    """Token counts ``counts[layer][domain][expert]`` (non-negative integers) with the domain names."""

    domains: list[str]
    counts: list[list[list[int]]]

    def __post_init__(self) -> None:
        problems = []
        if not self.counts or not self.counts[0]:
            problems.append("counts must have at least one layer and one domain")
        else:
            E = len(self.counts[0][0])
            for li, layer in enumerate(self.counts):
                if len(layer) != len(self.domains):
                    problems.append(f"counts[{li}] has {len(layer)} domains, expected {len(self.domains)} "
                                    f"({', '.join(self.domains)})")
                for di, row in enumerate(layer):
                    if len(row) != E:
                        problems.append(f"counts[{li}][{di}] has {len(row)} experts, expected {E}")
                    bad = [v for v in row if isinstance(v, bool) or not isinstance(v, int) or v < 0]
                    if bad:
                        problems.append(f"counts[{li}][{di}] has {bad!r}: counts must be integers >= 0")
        if problems:
            raise ValueError("invalid routing table:\n  " + "\n  ".join(problems))

    @property
    def layers(self) -> int:
        return len(self.counts)

    @property
    def experts(self) -> int:
        return len(self.counts[0][0])

    def to_dict(self) -> dict:
        return {"domains": list(self.domains), "counts": [[list(r) for r in layer] for layer in self.counts]}

    @classmethod
    def from_dict(cls, d: dict) -> "RoutingTable":
        unknown = sorted(set(d) - {"domains", "counts"})
        if unknown:
            raise ValueError(f"unknown routing table key(s): {', '.join(unknown)}")
        return cls(list(d["domains"]), [[list(r) for r in layer] for layer in d["counts"]])

    def shares(self, layer: int) -> list[list[float]]:
        """Share of each domain's tokens sent to each expert (rows sum to 1; a domain with no tokens: zeros)."""
        return [[v / sum(row) if sum(row) else 0.0 for v in row] for row in self.counts[layer]]

    def mutual_information_bits(self, layer: int) -> float:
        """I(domain; expert) in bits over the layer's tokens (NaN when there are none)."""
        return mutual_information_bits(self.counts[layer])

    def max_bits(self) -> float:
        """The largest possible mutual information: log2(min(D, E))."""
        return math.log2(min(len(self.domains), self.experts))


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


def plot_heatmaps(tables: dict[str, RoutingTable], path: Path, title: str) -> None:
    """One row of panels per table (e.g. per arm), one panel per layer: share of each domain's tokens
    (rows) per expert (columns), with I(domain; expert) in each panel's title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(tables)
    L = max(t.layers for t in tables.values())
    fig, axes = plt.subplots(len(names), L, figsize=(2.6 * L + 0.8, 2.2 * len(names) + 0.6), squeeze=False)
    for i, name in enumerate(names):
        t = tables[name]
        for layer in range(L):
            ax = axes[i][layer]
            if layer >= t.layers:
                ax.axis("off")
                continue
            sh = t.shares(layer)
            ax.imshow(sh, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
            for d, row in enumerate(sh):
                for e, v in enumerate(row):
                    ax.text(e, d, f"{v:.2f}", ha="center", va="center", fontsize=7,
                            color="black" if v > 0.6 else "white")
            ax.set_xticks(range(t.experts))
            ax.set_xticklabels([f"e{e}" for e in range(t.experts)], fontsize=7)
            ax.set_yticks(range(len(t.domains)))
            ax.set_yticklabels(t.domains, fontsize=7)
            mi = t.mutual_information_bits(layer)
            ax.set_title(f"{name} L{layer}: I={mi:.2f}/{t.max_bits():.2f} bit", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
