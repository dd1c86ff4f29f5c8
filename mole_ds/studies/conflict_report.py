"""Aggregate the conflict study's run records: per-arm means, paired per-seed deltas against ``mix`` with
95% t-intervals, routing mutual information per layer, costs; and write them as JSON, CSV, markdown, PNG.

Pairing: every arm of a seed shares that seed's task (answer maps, splits), frozen base and data stream, so
the seed-to-seed spread of the task cancels in ``arm - mix`` per seed; the interval is the t-interval of
those differences over seeds.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from ..routing_table import RoutingTable, plot_heatmaps
from .stats import fmt_ci, mean_ci

BASELINE = "mix"
REFERENCES = ("mix_matched", "oracle")
"""Arms every other arm is also paired against (v3): the parameter-matched plain LoRA and the routing bound."""


def domain_names(n: int) -> list[str]:
    return [f"d{i}" for i in range(n)]


def per_seed_scores(records: list[dict], num_domains: int) -> dict[tuple[str, str, int], dict]:
    """{(variant, arm, seed): {"em": {domain: v}, "loss": {domain: v}}} with the per-domain arm's D runs
    merged (each contributes the domain it was trained and evaluated on)."""
    out: dict[tuple[str, str, int], dict] = {}
    for r in records:
        cell = out.setdefault((r["variant"], r["arm"], r["seed"]), {"em": {}, "loss": {}})
        for d, v in r["em"].items():
            cell["em"][f"d{d}"] = v
            cell["loss"][f"d{d}"] = r["loss"][d]
    return {k: v for k, v in out.items() if len(v["em"]) == num_domains}  # incomplete cells are not scored


def aggregate(records: list[dict], variants: list[str], arms: list[str], seeds: list[int],
              num_domains: int) -> dict:
    """Everything the report shows (see module docstring); missing runs only shrink n."""
    scores = per_seed_scores(records, num_domains)
    doms = domain_names(num_domains)
    cells, mi_rows, cost, per_seed = [], [], [], []
    for v in variants:
        for a in arms:
            for d in doms + ["mean"]:
                row = {"variant": v, "arm": a, "domain": d}
                for metric in ("em", "loss"):
                    vals, deltas = [], []
                    for s in seeds:
                        mine, base = scores.get((v, a, s)), scores.get((v, BASELINE, s))
                        if mine is None:
                            continue
                        x = _domain_value(mine[metric], d)
                        vals.append(x)
                        if base is not None:
                            deltas.append(x - _domain_value(base[metric], d))
                    m, h, n = mean_ci(vals)
                    dm, dh, dn = mean_ci(deltas) if a != BASELINE else (math.nan, math.nan, 0)
                    row.update({f"{metric}_mean": m, f"{metric}_ci95": h, f"{metric}_n": n,
                                f"d_{metric}_mean": dm, f"d_{metric}_ci95": dh, f"d_{metric}_n": dn})
                cells.append(row)
            recs = [r for r in records if r["variant"] == v and r["arm"] == a]
            for pos in ("sep", "all"):
                tables = [RoutingTable.from_dict(r[f"routing_{pos}"]) for r in recs if r.get(f"routing_{pos}")]
                for layer in range(max((t.layers for t in tables), default=0)):
                    bits = [t.mutual_information_bits(layer) for t in tables if layer < t.layers]
                    m, h, n = mean_ci(bits)
                    mi_rows.append({"variant": v, "arm": a, "position": pos, "layer": layer, "bits_mean": m,
                                    "bits_ci95": h, "n": n, "max_bits": tables[0].max_bits()})
            if recs:
                n_seeds = len({r["seed"] for r in recs})
                cost.append({"variant": v, "arm": a, "runs": len(recs), "seeds": n_seeds,
                             "trainable_params": max(r["trainable_params"] for r in recs),
                             "steps": max(r["steps"] for r in recs),
                             "wall_s_per_seed": sum(r["wall_s"] for r in recs) / n_seeds})
            for s in seeds:
                mine = scores.get((v, a, s))
                if mine is not None:
                    per_seed.append({"variant": v, "arm": a, "seed": s,
                                     "em_mean": _domain_value(mine["em"], "mean"),
                                     "loss_mean": _domain_value(mine["loss"], "mean")})
    pairs = []
    for v in variants:
        for ref in REFERENCES:
            if ref not in arms:
                continue
            for a in arms:
                if a == ref:
                    continue
                deltas = [_domain_value(scores[(v, a, s)]["em"], "mean") - _domain_value(scores[(v, ref, s)]["em"], "mean")
                          for s in seeds if (v, a, s) in scores and (v, ref, s) in scores]
                if deltas:
                    m, h, n = mean_ci(deltas)
                    pairs.append({"variant": v, "arm": a, "ref": ref, "d_em_mean": m, "d_em_ci95": h, "n": n})
    return {"cells": cells, "mi": mi_rows, "cost": cost, "per_seed": per_seed, "domains": doms, "pairs": pairs}


def _domain_value(by_domain: dict[str, float], d: str) -> float:
    return sum(by_domain.values()) / len(by_domain) if d == "mean" else by_domain[d]


# -- outputs ------------------------------------------------------------------------------------------------
def write_csv(agg: dict, path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(agg["cells"][0]))
        w.writeheader()
        w.writerows(agg["cells"])


def format_table(agg: dict, variants: list[str], arms: list[str]) -> str:
    """Markdown: per variant, one row per arm: mean EM and answer loss over domains (mean ± 95% CI over
    seeds), the paired delta against ``mix``, EM per domain, routing MI per layer at the SEP token, params."""
    cells = {(c["variant"], c["arm"], c["domain"]): c for c in agg["cells"]}
    mi = {(m["variant"], m["arm"], m["position"], m["layer"]): m for m in agg["mi"]}
    cost = {(c["variant"], c["arm"]): c for c in agg["cost"]}
    doms = agg["domains"]
    lines = []
    for v in variants:
        layers = sorted({m["layer"] for m in agg["mi"] if m["variant"] == v})
        max_bits = next((m["max_bits"] for m in agg["mi"] if m["variant"] == v), math.nan)
        lines += [f"### variant `{v}`", "",
                  "| arm | EM (mean of domains) | ΔEM vs mix (paired) | answer loss | Δloss vs mix (paired) | "
                  + " | ".join(f"EM {d}" for d in doms) + " | "
                  + " | ".join(f"MI L{layer} (bit, max {max_bits:.2f})" for layer in layers)
                  + " | trainable params | n |",
                  "|---" * (7 + len(doms) + len(layers)) + "|"]
        for a in arms:
            c = cells.get((v, a, "mean"))
            if c is None or c["em_n"] == 0:
                continue
            dem = "—" if a == BASELINE else _fmt_delta(c["d_em_mean"], c["d_em_ci95"], 3)
            dlo = "—" if a == BASELINE else _fmt_delta(c["d_loss_mean"], c["d_loss_ci95"], 3)
            per_dom = [fmt_ci(cells[(v, a, d)]["em_mean"], cells[(v, a, d)]["em_ci95"], 2) for d in doms]
            mis = []
            for layer in layers:
                m = mi.get((v, a, "sep", layer))
                mis.append("" if m is None else fmt_ci(m["bits_mean"], m["bits_ci95"], 2))
            k = cost.get((v, a), {})
            lines.append(f"| {a} | {fmt_ci(c['em_mean'], c['em_ci95'], 3)} | {dem} | "
                         f"{fmt_ci(c['loss_mean'], c['loss_ci95'], 3)} | {dlo} | " + " | ".join(per_dom) + " | "
                         + " | ".join(mis) + f" | {k.get('trainable_params', 0):,} | {c['em_n']} |")
        lines.append("")
    return "\n".join(lines)


def format_mi_table(agg: dict, variants: list[str], arms: list[str]) -> str:
    """Markdown: per variant, routing mutual information I(domain; expert) per layer (bits, mean ± 95% CI
    over seeds) on held-out inputs of the final model, at the SEP token and over all prompt tokens."""
    mi = {(m["variant"], m["arm"], m["position"], m["layer"]): m for m in agg["mi"]}
    lines = []
    for v in variants:
        layers = sorted({m["layer"] for m in agg["mi"] if m["variant"] == v})
        if not layers:
            continue
        max_bits = next(m["max_bits"] for m in agg["mi"] if m["variant"] == v)
        lines += [f"### routing mutual information, variant `{v}` (bit; max {max_bits:.3f})", "",
                  "| arm | tokens | " + " | ".join(f"layer {layer}" for layer in layers) + " | n |",
                  "|---" * (3 + len(layers)) + "|"]
        for a in arms:
            for pos, what in (("sep", "SEP"), ("all", "all prompt")):
                row = [mi.get((v, a, pos, layer)) for layer in layers]
                if not any(row):
                    continue
                vals = ["" if m is None else fmt_ci(m["bits_mean"], m["bits_ci95"], 3) for m in row]
                n = max(m["n"] for m in row if m)
                lines.append(f"| {a} | {what} | " + " | ".join(vals) + f" | {n} |")
        lines.append("")
    return "\n".join(lines)


def format_pairs_table(agg: dict, variants: list[str], arms: list[str]) -> str:
    """Markdown: per variant, each arm's paired EM difference against ``mix_matched`` and ``oracle`` (mean of
    domains, per-seed differences, 95% t-interval; ``*``: the interval excludes 0) and its routing MI at SEP."""
    pairs = {(p["variant"], p["arm"], p["ref"]): p for p in agg.get("pairs", [])}
    mi = {(m["variant"], m["arm"], m["position"], m["layer"]): m for m in agg["mi"]}
    lines = []
    for v in variants:
        refs = [r for r in REFERENCES if any(k[0] == v and k[2] == r for k in pairs)]
        if not refs:
            continue
        layers = sorted({m["layer"] for m in agg["mi"] if m["variant"] == v})
        lines += [f"### paired EM difference vs {' and '.join(refs)}, variant `{v}`", "",
                  "| arm | " + " | ".join(f"ΔEM vs {r}" for r in refs) + " | "
                  + " | ".join(f"MI SEP L{layer}" for layer in layers) + " | n |",
                  "|---" * (2 + len(refs) + len(layers)) + "|"]
        for a in arms:
            row = [pairs.get((v, a, r)) for r in refs]
            if not any(row):
                continue
            vals = ["—" if p is None else _fmt_delta(p["d_em_mean"], p["d_em_ci95"], 3) for p in row]
            mis = [fmt_ci(mi[(v, a, "sep", layer)]["bits_mean"], mi[(v, a, "sep", layer)]["bits_ci95"], 2)
                   if (v, a, "sep", layer) in mi else "" for layer in layers]
            n = max(p["n"] for p in row if p)
            lines.append(f"| {a} | " + " | ".join(vals) + " | " + " | ".join(mis) + f" | {n} |")
        lines.append("")
    return "\n".join(lines)


def format_seed_table(agg: dict, variants: list[str], arms: list[str], seeds: list[int]) -> str:
    """Markdown: per variant, the mean-of-domains EM of every arm on every seed (shows collapsed seeds that a
    mean ± CI hides)."""
    em = {(p["variant"], p["arm"], p["seed"]): p["em_mean"] for p in agg.get("per_seed", [])}
    lines = []
    for v in variants:
        lines += [f"### EM per seed, variant `{v}`", "",
                  "| arm | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---" * (1 + len(seeds)) + "|"]
        for a in arms:
            vals = [em.get((v, a, s)) for s in seeds]
            if all(x is None for x in vals):
                continue
            lines.append(f"| {a} | " + " | ".join("" if x is None else f"{x:.3f}" for x in vals) + " |")
        lines.append("")
    return "\n".join(lines)


def _fmt_delta(m: float, h: float, digits: int) -> str:
    if not math.isfinite(m):
        return "n/a"
    s = f"{m:+.{digits}f}" + (f" ± {h:.{digits}f}" if math.isfinite(h) else "")
    if math.isfinite(h) and (m - h > 0 or m + h < 0):
        s += " *"  # the interval excludes 0
    return s


def plot_bars(agg: dict, variants: list[str], arms: list[str], path: Path) -> None:
    """Per variant: mean EM per arm (95% CI) and the paired EM delta against mix (95% CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = {(c["variant"], c["arm"], c["domain"]): c for c in agg["cells"]}
    fig, axes = plt.subplots(2, len(variants), figsize=(5.5 * len(variants), 6.5), squeeze=False)
    for j, v in enumerate(variants):
        shown = [a for a in arms if (v, a, "mean") in cells and cells[(v, a, "mean")]["em_n"] > 0]
        for i, (key, title) in enumerate((("em", f"{v}: held-out exact match (mean of domains)"),
                                          ("d_em", f"{v}: paired EM delta vs mix"))):
            ax = axes[i][j]
            ys = [cells[(v, a, "mean")][f"{key}_mean"] for a in shown]
            es = [cells[(v, a, "mean")][f"{key}_ci95"] for a in shown]
            ax.bar(range(len(shown)), [y if math.isfinite(y) else 0.0 for y in ys],
                   yerr=[e if math.isfinite(e) else 0.0 for e in es], capsize=3,
                   color=[f"C{k}" for k in range(len(shown))])
            ax.set_xticks(range(len(shown)))
            ax.set_xticklabels(shown, rotation=35, ha="right", fontsize=8)
            ax.set_title(title, fontsize=9)
            ax.axhline(0.0, color="black", linewidth=0.6)
            if key == "em":
                ax.set_ylim(0.0, 1.05)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_heatmaps(records: list[dict], variant: str, arms: list[str], seed: int, path: Path,
                   position: str = "sep") -> Path | None:
    """Heatmaps of one seed's routing (expert ids are not aligned across seeds, so seeds are not summed)."""
    tables = {}
    for a in arms:
        r = next((r for r in records if r["variant"] == variant and r["arm"] == a and r["seed"] == seed
                  and r.get(f"routing_{position}")), None)
        if r is not None:
            tables[a] = RoutingTable.from_dict(r[f"routing_{position}"])
    if not tables:
        return None
    what = "SEP token (its output is the answer)" if position == "sep" else "all prompt tokens"
    plot_heatmaps(tables, path, f"{variant}, seed {seed}: share of each domain's tokens per expert\n"
                                f"{what}, held-out inputs")
    return path


def _finite_or_null(x):
    """NaN (no interval from one seed, no delta for the baseline) -> null: strict JSON that compares equal."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite_or_null(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite_or_null(v) for v in x]
    return x


def write_outputs(out: Path, config: dict, agg: dict, records: list[dict], variants: list[str],
                  arms: list[str], seeds: list[int], wall_s: float) -> dict[str, Path]:
    """results.json (config, aggregate, every run record), results.csv, table.md, em_bars.png and one routing
    heatmap PNG per variant (first seed)."""
    paths = {"json": out / "results.json", "csv": out / "results.csv", "md": out / "table.md",
             "bars": out / "em_bars.png"}
    doc = {"config": config, "wall_s": round(wall_s, 1), **agg, "runs": records}
    paths["json"].write_text(json.dumps(_finite_or_null(doc), indent=1, allow_nan=False))
    write_csv(agg, paths["csv"])
    paths["md"].write_text("\n".join([format_table(agg, variants, arms), format_pairs_table(agg, variants, arms),
                                       format_mi_table(agg, variants, arms),
                                       format_seed_table(agg, variants, arms, seeds)]))
    plot_bars(agg, variants, arms, paths["bars"])
    for v in variants:
        p = write_heatmaps(records, v, arms, seeds[0], out / f"routing_{v}.png")
        if p is not None:
            paths[f"routing_{v}"] = p
    return paths
