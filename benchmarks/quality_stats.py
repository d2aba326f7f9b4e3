"""Statistics of the quality protocol: mean and 95 % CI over seeds, differences of means,
steps to a target on a curve, the verdicts the protocol prints. Pure functions (no torch).

The CI of a mean is Student's t: mean +- t(0.975, n-1) * s / sqrt(n); the CI of a
difference of two methods' means is Welch's (unequal variances, Welch-Satterthwaite
degrees of freedom). With one seed there is no CI (reported as NaN)."""
from __future__ import annotations

import math
import typing as tp

# Student's t, 97.5 % quantile, by degrees of freedom (scipy.stats.t.ppf(0.975, df)).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000}
NAN = float("nan")


def t975(df: float) -> float:
    """The 97.5 % quantile of Student's t with `df` degrees of freedom (rounded down to
    the table: conservative); 1.96 beyond it."""
    if not df >= 1:
        return NAN
    keys = [k for k in sorted(T975) if k <= df]
    return T975[keys[-1]] if df <= 60 else 1.96


def _finite(values: tp.Iterable[float]) -> tp.List[float]:
    return [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def mean_ci(values: tp.Iterable[float]) -> dict:
    """{mean, ci (half-width of the 95 % CI), n, sd} of the finite `values`."""
    xs = _finite(values)
    n = len(xs)
    if n == 0:
        return {"mean": NAN, "ci": NAN, "n": 0, "sd": NAN}
    mean = sum(xs) / n
    if n == 1:
        return {"mean": mean, "ci": NAN, "n": 1, "sd": NAN}
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return {"mean": mean, "ci": t975(n - 1) * sd / math.sqrt(n), "n": n, "sd": sd}


def difference_ci(a: tp.Iterable[float], b: tp.Iterable[float]) -> dict:
    """{diff = mean(a) - mean(b), ci (Welch, 95 %), low, high}."""
    sa, sb = mean_ci(a), mean_ci(b)
    diff = sa["mean"] - sb["mean"]
    if sa["n"] < 2 or sb["n"] < 2:
        return {"diff": diff, "ci": NAN, "low": NAN, "high": NAN}
    va, vb = sa["sd"] ** 2 / sa["n"], sb["sd"] ** 2 / sb["n"]
    se = math.sqrt(va + vb)
    if se == 0:
        return {"diff": diff, "ci": 0.0, "low": diff, "high": diff}
    df = (va + vb) ** 2 / (va ** 2 / (sa["n"] - 1) + vb ** 2 / (sb["n"] - 1))
    half = t975(df) * se
    return {"diff": diff, "ci": half, "low": diff - half, "high": diff + half}


def mean_curve(curves: tp.Sequence[tp.Sequence[float]]) -> tp.List[float]:
    """Point-wise mean of curves (over seeds), as long as the shortest."""
    if not curves:
        return []
    length = min(len(c) for c in curves)
    return [sum(c[i] for c in curves) / len(curves) for i in range(length)]


def steps_to(curve: tp.Sequence[float], target: float, steps_per_point: int
             ) -> tp.Optional[int]:
    """Optimizer steps at the first point of `curve` (one point per epoch) at or above
    `target`; None when it never gets there."""
    for i, value in enumerate(curve):
        if math.isfinite(value) and value >= target:
            return (i + 1) * steps_per_point
    return None


def verdict(name: str, value: float, target: float, op: str, extra: str = "") -> dict:
    """A target row as benchmarks.common makes them, plus free text."""
    ok = math.isfinite(value) and (value >= target if op == ">=" else value <= target)
    return {"name": name, "value": value, "target": target, "op": op, "pass": bool(ok),
            "note": extra}
