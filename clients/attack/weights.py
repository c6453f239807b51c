"""Minibatch weights of the adaptive student (Theorem 3.1).

The student's best response under a KL budget rho is the exponential tilt
``pi_eff(y|x) ∝ pi_rel(y|x) exp(eta v(x, y))``. On a minibatch of released
traces that is ``w ∝ exp(eta v)`` normalized over the batch; ``eta = 0`` is the
passive student (uniform weights). This module holds only that math, in float64,
so it can be tested on its own; computing ``v`` lives in ``distill``.
"""

from __future__ import annotations

import math

import torch


def tilt_weights(v: torch.Tensor, eta: float) -> torch.Tensor:
    """w_i = exp(eta v_i) / sum_j exp(eta v_j), in float64."""
    return torch.softmax(eta * v.to(torch.float64), dim=0)


def uniform_weights(batch_size: int) -> torch.Tensor:
    """The passive student's weights; equal to ``tilt_weights(v, 0.0)`` bit for bit."""
    return torch.full((batch_size,), 1.0 / batch_size, dtype=torch.float64)


def kl_to_uniform(w: torch.Tensor) -> float:
    """KL(w || uniform) = sum_i w_i log(B w_i) (0 log 0 = 0)."""
    w = w.to(torch.float64)
    nz = w > 0
    return float((w[nz] * torch.log(w[nz] * w.numel())).sum())


def eta_for_budget(
    v: torch.Tensor, rho: float, tol: float = 1e-12, max_iter: int = 200, eta_max: float = 1e12
) -> float:
    """The eta >= 0 with KL(tilt_weights(v, eta) || uniform) = rho, by bisection.

    KL grows monotonically in eta from 0 (uniform) towards log(B / #argmax v)
    (all mass on the best traces). If rho is at or beyond that limit no finite
    eta meets it and the largest eta tried is returned; if all values are equal
    every eta gives KL 0 and 0 is returned.
    """
    if rho < 0:
        raise ValueError(f"rho must be >= 0, got {rho}")
    v = v.to(torch.float64)
    if rho == 0 or v.numel() < 2 or float(v.max() - v.min()) == 0.0:
        return 0.0
    n_best = int((v == v.max()).sum())
    if rho >= math.log(v.numel() / n_best):
        return eta_max

    def kl(eta: float) -> float:
        return kl_to_uniform(tilt_weights(v, eta))

    lo, hi = 0.0, 1.0 / float(v.std())
    while kl(hi) < rho:
        lo, hi = hi, 2.0 * hi
        if hi > eta_max:
            return eta_max
    for _ in range(max_iter):
        mid = 0.5 * (lo + hi)
        if kl(mid) < rho:
            lo = mid
        else:
            hi = mid
        if hi - lo <= tol * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def released_weights(a: torch.Tensor, beta: float, clip: float) -> torch.Tensor:
    """The released protocol's fixed weights: ``w_i = exp(beta * clip(a_i, -clip, clip))``, mean 1.

    Unlike ``tilt_weights`` these are normalized once over the whole training
    set, not per minibatch: a minibatch's weights need not sum to its size, and
    the loss of a batch is ``sum_i w_i NLL_i / B``.
    """
    clipped = a.to(torch.float64).clamp(-clip, clip)
    if beta == 0.0 or bool((clipped == clipped[0]).all()):
        # Equal weights, exactly: the mean of n equal floats need not be the float itself,
        # and a student trained with 1 +- 1 ulp is not passive's bit for bit.
        return torch.ones_like(clipped)
    w = torch.exp(beta * clipped)
    return w / w.mean()


def effective_sample_size(w: torch.Tensor) -> float:
    """ESS = (sum w)^2 / sum w^2: how many equally weighted examples the weights are worth."""
    w = w.to(torch.float64)
    return float(w.sum() ** 2 / (w * w).sum())
