"""Bit-width allocation from layer scores (CSMPQ, Sec. 3.3).

Maximise sum_l theta_l * x_l subject to sum_l x_l * P_l <= S_target - S_fixed,
where x_l = bits_l / 8 (bytes per weight), P_l = params_l / 2**20 (so x P is
MB) and theta_l = score_l for QAT (4-8 bits, x in [0.5, 1]) or
exp(-beta * score_l) for PTQ (2-4 bits, x in [0.25, 0.5]). Layers given
fixed bits (QAT: the first and the last at 8) count in S_fixed.

`allocate_bits` solves it exactly as an integer program over the allowed
bit-widths (scipy.optimize.milp, HiGHS); `allocate_bits_table` is the same
program for any value per (layer, width), which the Hessian-trace baseline
uses. `allocate_bits_relaxed` is the
paper's route: the continuous LP, then each x rounded down to an allowed
width and leftover budget spent greedily, for comparison.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Sequence

import numpy as np
from scipy import optimize


@dataclasses.dataclass(frozen=True)
class Allocation:
    bits: tuple          # bits per layer
    size_mb: float       # weights' size at these bits
    objective: float     # sum theta * bits / 8
    method: str


def model_size_mb(params: Sequence[int], bits: Sequence[int]) -> float:
    """Size of the weights in MB (2**20 bytes) at the given bits per layer."""
    return float(sum(p * b / 8 for p, b in zip(params, bits)) / 2**20)


def bops(flops: Sequence[float], weight_bits: Sequence[int], activation_bits: Sequence[int]) -> float:
    """Bit operations: sum_l FLOPs_l * b_w * b_a."""
    return float(sum(f * w * a for f, w, a in zip(flops, weight_bits, activation_bits)))


def _check(scores, params, choices, fixed):
    scores = np.asarray(scores, np.float64)
    params = np.asarray(params, np.float64)
    if scores.shape != params.shape or scores.ndim != 1:
        raise ValueError(f"scores and params must be 1-D of one length, got {scores.shape} and {params.shape}")
    if not choices or any(int(b) != b or b < 1 or b > 32 for b in choices):
        raise ValueError(f"bit_choices must be integers in [1, 32], got {choices}")
    for layer in fixed:
        if not 0 <= layer < len(scores):
            raise ValueError(f"fixed_bits names layer {layer}, but there are {len(scores)} layers")
    return scores, params


def _result(bits, params, theta, method):
    bits = tuple(int(b) for b in bits)
    return Allocation(bits, model_size_mb(params, bits), float(np.dot(theta, np.asarray(bits) / 8)), method)


def allocate_bits_table(values, params, size_budget_mb: float, bit_choices=(4, 5, 6, 7, 8),
                        fixed_bits: Optional[Dict[int, int]] = None, method: str = "milp") -> Allocation:
    """Exact integer program with a value per (layer, choice): maximise
    sum_l values[l, c_l] subject to sum_l P_l * bits(c_l) / 8 <= budget
    (HiGHS via milp). A multiple-choice knapsack: one width per layer.

    CSMPQ's objective is values[l, c] = theta_l * bits_c / 8; a Hessian-trace
    criterion (HAWQ-v2/v3) is values[l, c] = -Tr(H_l) / n_l * |Q_c(W_l) - W_l|^2.
    Columns of `values` follow sorted(bit_choices); rows of fixed layers are
    ignored. Raises ValueError if even the smallest widths exceed the budget.
    """
    fixed = dict(fixed_bits or {})
    values = np.asarray(values, np.float64)
    params = np.asarray(params, np.float64)
    choices = np.asarray(sorted(bit_choices), np.float64)
    _check(np.zeros(len(params)), params, bit_choices, fixed)
    if values.shape != (len(params), len(choices)):
        raise ValueError(f"values must be [layers, choices] = {(len(params), len(choices))}, got {values.shape}")
    free = [l for l in range(len(params)) if l not in fixed]
    fixed_mb = sum(params[l] * fixed[l] / 8 for l in fixed) / 2**20
    budget = size_budget_mb - fixed_mb
    p_mb = params / 2**20
    k = len(choices)
    # z[l, c] = 1 if free layer l takes choice c.
    cost = -np.concatenate([values[l] for l in free])
    one_choice = np.zeros((len(free), len(free) * k))
    for i in range(len(free)):
        one_choice[i, i * k:(i + 1) * k] = 1
    size_row = np.concatenate([p_mb[l] * choices / 8 for l in free])[None]
    constraints = [optimize.LinearConstraint(one_choice, 1, 1),
                   optimize.LinearConstraint(size_row, -np.inf, budget)]
    result = optimize.milp(cost, constraints=constraints, integrality=np.ones_like(cost),
                           bounds=optimize.Bounds(0, 1))
    if not result.success:
        smallest = fixed_mb + sum(p_mb[l] * choices[0] / 8 for l in free)
        raise ValueError(f"size_budget_mb={size_budget_mb:.4f} is infeasible: the smallest allocation needs "
                         f"{smallest:.4f} MB ({result.message})")
    picks = np.round(result.x).reshape(len(free), k).argmax(axis=1)
    bits = np.zeros(len(params), int)
    for l, c in zip(free, picks):
        bits[l] = int(choices[c])
    for l, b in fixed.items():
        bits[l] = b
    objective = float(sum(values[l, list(choices).index(bits[l])] for l in free))
    bits = tuple(int(b) for b in bits)
    return Allocation(bits, model_size_mb(params, bits), objective, method)


def allocate_bits(scores, params, size_budget_mb: float, bit_choices=(4, 5, 6, 7, 8),
                  fixed_bits: Optional[Dict[int, int]] = None, theta=None) -> Allocation:
    """CSMPQ's exact integer program over bit_choices per layer: maximise
    sum theta_l * bits_l / 8 under the size budget (`allocate_bits_table`).

    theta defaults to the scores (QAT); pass exp(-beta * scores) for PTQ.
    Raises ValueError if even the smallest widths exceed the budget.
    """
    fixed = dict(fixed_bits or {})
    scores, params = _check(scores, params, bit_choices, fixed)
    theta = scores if theta is None else np.asarray(theta, np.float64)
    choices = np.asarray(sorted(bit_choices), np.float64)
    values = theta[:, None] * choices[None, :] / 8
    table = allocate_bits_table(values, params, size_budget_mb, bit_choices, fixed)
    return _result(table.bits, params, theta, "milp")


def allocate_bits_relaxed(scores, params, size_budget_mb: float, bit_choices=(4, 5, 6, 7, 8),
                          fixed_bits: Optional[Dict[int, int]] = None, theta=None) -> Allocation:
    """The paper's LP relaxation (x continuous in [min, max] / 8), rounded down
    to allowed widths, then upgraded greedily (best theta per MB first) while
    the budget allows."""
    fixed = dict(fixed_bits or {})
    scores, params = _check(scores, params, bit_choices, fixed)
    theta = scores if theta is None else np.asarray(theta, np.float64)
    choices = sorted(int(b) for b in bit_choices)
    free = [l for l in range(len(scores)) if l not in fixed]
    p_mb = params / 2**20
    fixed_mb = sum(p_mb[l] * fixed[l] / 8 for l in fixed)
    budget = size_budget_mb - fixed_mb
    lp = optimize.linprog(-theta[free], A_ub=p_mb[free][None], b_ub=[budget],
                          bounds=[(choices[0] / 8, choices[-1] / 8)] * len(free), method="highs")
    if not lp.success:
        raise ValueError(f"size_budget_mb={size_budget_mb:.4f} is infeasible ({lp.message})")
    bits = np.zeros(len(scores), int)
    for l, x in zip(free, lp.x):
        bits[l] = max(b for b in choices if b <= x * 8 + 1e-9)
    for l, b in fixed.items():
        bits[l] = b
    used = fixed_mb + sum(p_mb[l] * bits[l] / 8 for l in free)
    for l in sorted(free, key=lambda l: -theta[l] / max(p_mb[l], 1e-12)):
        for b in choices:
            extra = p_mb[l] * (b - bits[l]) / 8
            if b > bits[l] and used + extra <= size_budget_mb + 1e-12:
                used += extra
                bits[l] = b
    return _result(bits, params, theta, "lp-relaxation+rounding")
