"""Per-domain routing statistics of evaluated samples: how many tokens each expert received, per layer.
The counts are kept in the project's one routing counter, ``mole_ds.routing_table.RoutingTable``."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

from ..routing_table import RoutingTable


class DomainRouting:
    """Sum of per-request (layers, E) routing counts, grouped by domain (or task when a doc has none).

    A request is one model input: a generation (prompt and generated tokens) or one scored continuation of a
    loglikelihood request (prompt and continuation), so a multiple-choice doc adds one request per choice."""

    def __init__(self, num_experts: int, top_k: int) -> None:
        self.num_experts = num_experts
        self.top_k = top_k
        self.table = RoutingTable.zeros(0, num_experts, [])
        """Domains in order of first appearance; layers set by the first request."""
        self.requests: Counter[str] = Counter()

    def add(self, domain: str, counts_LE: torch.Tensor) -> None:
        self.table.add_to(domain, counts_LE)
        self.requests[domain] += 1

    def to_dict(self) -> dict:
        """JSON-ready: per domain, counts and fractions per layer and expert, and their mean over layers."""
        t, domains = self.table, {}
        frac_LDE = t.fractions()
        for d in sorted(t.domains):
            i = t.domains.index(d)
            c_LE, frac_LE = t.counts[:, i].contiguous(), frac_LDE[:, i].contiguous()
            domains[d] = {
                "requests": self.requests[d],
                "tokens": int(round(float(c_LE[0].sum()) / self.top_k)),
                "counts": c_LE.round().long().tolist(),
                "fraction": [[round(x, 6) for x in row] for row in frac_LE.tolist()],
                "fraction_mean": [round(x, 6) for x in frac_LE.mean(0).tolist()],
            }
        return {"num_experts": self.num_experts, "top_k": self.top_k,
                "layers": t.layers if t.domains else 0,
                "note": "counts[layer][expert]: tokens routed to the expert (each token counts top_k times); "
                        "tokens: prompt plus generated/scored tokens of the requests, padding excluded",
                "domains": domains}

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path
