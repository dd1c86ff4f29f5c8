"""Small statistics for study tables: mean and two-sided 95% t-interval over seeds (no scipy needed)."""
from __future__ import annotations

import math

# Two-sided 95% Student-t critical values t_{0.975, df} for df = 1..30; beyond that the normal 1.96.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t_critical(df: int) -> float:
    """t_{0.975, df}; df >= 1."""
    if df < 1:
        raise ValueError(f"df ({df}) must be >= 1")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def mean_ci(values: list[float]) -> tuple[float, float, int]:
    """(mean, half-width of the 95% t-interval, n). One value: half-width NaN (no interval from one seed)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(vals)
    if n == 0:
        return math.nan, math.nan, 0
    m = sum(vals) / n
    if n == 1:
        return m, math.nan, 1
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (n - 1))
    return m, t_critical(n - 1) * sd / math.sqrt(n), n


def fmt_ci(mean: float, half: float, digits: int = 3) -> str:
    if not math.isfinite(mean):
        return "n/a"
    if not math.isfinite(half):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {half:.{digits}f}"
