"""Statistics for multi-seed comparisons of allocations: mean and standard
deviation per method, and paired comparisons (the same seed gives both
methods the same data split, pre-trained model and schedule, so the
per-seed differences are what varies)."""
from __future__ import annotations

from typing import Dict, Sequence

import numpy as np
from scipy import stats


def summary(values: Sequence[float]) -> Dict[str, float]:
    """mean, sample standard deviation (ddof=1; 0 for one value) and n."""
    values = np.asarray(values, np.float64)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError(f"values must be a non-empty 1-D sequence, got shape {values.shape}")
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return dict(mean=float(np.mean(values)), std=std, n=int(len(values)))


def paired(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> Dict[str, float]:
    """a - b over matched seeds: mean difference, its Student-t confidence
    interval, the paired t-test's two-sided p-value, the Wilcoxon
    signed-rank test's (exact for small n; with 5 pairs its smallest
    possible two-sided p is 0.0625), and wins/ties/losses of a."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"a and b must be 1-D of one length, got {a.shape} and {b.shape}")
    if len(a) < 2:
        raise ValueError(f"a paired comparison needs at least 2 seeds, got {len(a)}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    d = a - b
    n = len(d)
    mean, sem = float(np.mean(d)), float(np.std(d, ddof=1) / np.sqrt(n))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * sem)
    if sem > 0:
        t_p = float(stats.ttest_rel(a, b).pvalue)
    else:  # every seed gave the same difference
        t_p = 1.0 if mean == 0 else 0.0
    nonzero = d[d != 0]
    w_p = float(stats.wilcoxon(nonzero).pvalue) if len(nonzero) else 1.0
    return dict(mean_difference=mean, ci_low=mean - half, ci_high=mean + half, confidence=confidence,
                t_test_p=t_p, wilcoxon_p=w_p, wins=int(np.sum(d > 0)), ties=int(np.sum(d == 0)),
                losses=int(np.sum(d < 0)), n=n)
