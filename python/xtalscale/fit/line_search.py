"""The Moré–Thuente line search (the one scitbx's L-BFGS and MINPACK-2's ``dcsrch`` use).

J. J. Moré and D. J. Thuente, "Line search algorithms with guaranteed sufficient decrease",
ACM TOMS 20 (1994) 286–307. Finds a step ``α`` along a descent direction that satisfies the
strong Wolfe conditions

    φ(α) ≤ φ(0) + ftol·α·φ'(0)    and    |φ'(α)| ≤ gtol·|φ'(0)|,

keeping an interval of uncertainty [stx, sty] and choosing trial steps by safeguarded cubic and
quadratic interpolation (:func:`_step`). While the first condition fails the search works on the
auxiliary function ψ(α) = φ(α) − φ(0) − ftol·α·φ'(0) ("stage 1"), as the paper prescribes.

One addition for scaling: a trial step whose scales or target are not finite (a scale that
overflows far along the direction) is rejected and the step shortened towards the best point,
never passed to the interpolation.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["LineSearchResult", "more_thuente"]

_XTRAPL, _XTRAPU = 1.1, 4.0  # extrapolation bounds of the unbracketed stage (as MINPACK-2)


@dataclass
class LineSearchResult:
    """``alpha`` accepted (or the best found when ``converged`` is False), its φ and φ', the
    number of evaluations and why the search stopped."""

    alpha: float
    f: float
    slope: float
    evaluations: int
    converged: bool
    message: str


def _cubic_min(stx: float, fx: float, dx: float, stp: float, fp: float, dp: float,
               clip_negative: bool = False) -> tuple[float, float, float]:
    """(θ, γ, scale) of the cubic through (stx, fx, dx) and (stp, fp, dp); γ's sign is left to
    the caller. With ``clip_negative`` a negative discriminant counts as 0 (the cubic has no
    minimiser in the direction of the step)."""
    theta = 3.0 * (fx - fp) / (stp - stx) + dx + dp
    s = max(abs(theta), abs(dx), abs(dp))
    disc = (theta / s) ** 2 - (dx / s) * (dp / s)
    gamma = s * math.sqrt(max(0.0, disc) if clip_negative else disc)
    return theta, gamma, s


def _step(stx: float, fx: float, dx: float, sty: float, fy: float, dy: float, stp: float,
          fp: float, dp: float, brackt: bool, stpmin: float, stpmax: float
          ) -> tuple[float, float, float, float, float, float, float, bool]:
    """One safeguarded step of the paper's four cases; returns the updated interval
    (stx, fx, dx, sty, fy, dy), the next trial step and whether a minimiser is bracketed."""
    same_sign = math.copysign(1.0, dp) == math.copysign(1.0, dx)
    if fp > fx:  # case 1: higher value, the minimum is bracketed
        theta, gamma, _ = _cubic_min(stx, fx, dx, stp, fp, dp)
        if stp < stx:
            gamma = -gamma
        r = ((gamma - dx) + theta) / (((gamma - dx) + gamma) + dp)
        stpc = stx + r * (stp - stx)
        stpq = stx + ((dx / ((fx - fp) / (stp - stx) + dx)) / 2.0) * (stp - stx)
        stpf = stpc if abs(stpc - stx) < abs(stpq - stx) else stpc + (stpq - stpc) / 2.0
        brackt = True
    elif not same_sign:  # case 2: lower value, derivatives of opposite sign: bracketed
        theta, gamma, _ = _cubic_min(stx, fx, dx, stp, fp, dp)
        if stp > stx:
            gamma = -gamma
        r = ((gamma - dp) + theta) / (((gamma - dp) + gamma) + dx)
        stpc = stp + r * (stx - stp)
        stpq = stp + (dp / (dp - dx)) * (stx - stp)
        stpf = stpc if abs(stpc - stp) > abs(stpq - stp) else stpq
        brackt = True
    elif abs(dp) < abs(dx):  # case 3: lower value, same sign, the derivative shrinks
        theta, gamma, _ = _cubic_min(stx, fx, dx, stp, fp, dp, clip_negative=True)
        if stp > stx:
            gamma = -gamma
        r = ((gamma - dp) + theta) / ((gamma + (dx - dp)) + gamma)
        if r < 0.0 and gamma != 0.0:
            stpc = stp + r * (stx - stp)
        else:
            stpc = stpmax if stp > stx else stpmin
        stpq = stp + (dp / (dp - dx)) * (stx - stp)
        if brackt:  # the step closer to stp, kept inside the interval
            stpf = stpc if abs(stpc - stp) < abs(stpq - stp) else stpq
            bound = stp + 0.66 * (sty - stp)
            stpf = min(bound, stpf) if stp > stx else max(bound, stpf)
        else:  # the step farther from stp, within the limits
            stpf = stpc if abs(stpc - stp) > abs(stpq - stp) else stpq
            stpf = max(stpmin, min(stpmax, stpf))
    else:  # case 4: lower value, same sign, the derivative does not shrink
        if brackt:
            theta, gamma, _ = _cubic_min(sty, fy, dy, stp, fp, dp)
            if stp > sty:
                gamma = -gamma
            r = ((gamma - dp) + theta) / (((gamma - dp) + gamma) + dy)
            stpf = stp + r * (sty - stp)
        else:
            stpf = stpmax if stp > stx else stpmin
    # the interval of uncertainty
    if fp > fx:
        sty, fy, dy = stp, fp, dp
    else:
        if not same_sign:
            sty, fy, dy = stx, fx, dx
        stx, fx, dx = stp, fp, dp
    return stx, fx, dx, sty, fy, dy, stpf, brackt


def more_thuente(phi: Callable[[float], tuple[float, float] | None], f0: float, slope0: float,
                 alpha0: float = 1.0, ftol: float = 1e-4, gtol: float = 0.9, xtol: float = 1e-16,
                 stpmin: float = 1e-20, stpmax: float = 1e20, max_evaluations: int = 20
                 ) -> LineSearchResult:
    """Search along a direction: ``phi(α)`` returns (φ(α), φ'(α)) or None when the point is
    not finite (then the step is shortened). ``slope0`` = φ'(0) must be negative. The defaults
    are scitbx's L-BFGS settings. Returns the accepted step, or the best one seen (lowest φ,
    ``converged`` False) after ``max_evaluations``, a rounding-level interval or a limit."""
    if not slope0 < 0.0:
        raise ValueError(f"the direction is not a descent direction (slope {slope0:g} >= 0)")
    if not alpha0 > 0.0:
        raise ValueError(f"the initial step must be positive (got {alpha0:g})")
    stp = min(max(alpha0, stpmin), stpmax)
    brackt, stage = False, 1
    gtest = ftol * slope0
    width = stpmax - stpmin
    width1 = 2.0 * width
    stx, fx, gx = 0.0, f0, slope0
    sty, fy, gy = 0.0, f0, slope0
    stmin, stmax = 0.0, stp + _XTRAPU * stp
    best = (0.0, f0, slope0)
    for evaluation in range(1, max_evaluations + 1):
        value = phi(stp)
        if value is None:  # not finite: shorten towards the best point; never interpolate
            stmax = stp
            stp = stx + 0.1 * (stp - stx) if evaluation == 1 else stx + 0.5 * (stp - stx)
            if stp - stx <= xtol * max(stp, stpmin):
                return LineSearchResult(best[0], best[1], best[2], evaluation, False,
                                        "every trial step gave non-finite scales")
            continue
        f, g = value
        if f < best[1]:
            best = (stp, f, g)
        ftest = f0 + stp * gtest
        if stage == 1 and f <= ftest and g >= 0.0:
            stage = 2
        if f <= ftest and abs(g) <= gtol * (-slope0):
            return LineSearchResult(stp, f, g, evaluation, True, "strong Wolfe conditions hold")
        if brackt and (stp <= stmin or stp >= stmax):
            return LineSearchResult(*best, evaluation, False, "rounding errors prevent progress")
        if brackt and stmax - stmin <= xtol * stmax:
            return LineSearchResult(*best, evaluation, False, "the interval is below xtol")
        if stp == stpmax and f <= ftest and g <= gtest:
            return LineSearchResult(stp, f, g, evaluation, False, "the step is at stpmax")
        if stp == stpmin and (f > ftest or g >= gtest):
            return LineSearchResult(*best, evaluation, False, "the step is at stpmin")
        if stage == 1 and fx >= f > ftest:
            # the auxiliary function ψ(α) = φ(α) − α·gtest (φ(0) drops out of the differences)
            stx, fxm, gxm, sty, fym, gym, stp, brackt = _step(
                stx, fx - stx * gtest, gx - gtest, sty, fy - sty * gtest, gy - gtest,
                stp, f - stp * gtest, g - gtest, brackt, stmin, stmax)
            fx, gx = fxm + stx * gtest, gxm + gtest
            fy, gy = fym + sty * gtest, gym + gtest
        else:
            stx, fx, gx, sty, fy, gy, stp, brackt = _step(
                stx, fx, gx, sty, fy, gy, stp, f, g, brackt, stmin, stmax)
        if brackt:  # force a sufficient shrink of the interval
            if abs(sty - stx) >= 0.66 * width1:
                stp = stx + 0.5 * (sty - stx)
            width1, width = width, abs(sty - stx)
            stmin, stmax = min(stx, sty), max(stx, sty)
        else:
            stmin = stp + _XTRAPL * (stp - stx)
            stmax = stp + _XTRAPU * (stp - stx)
        stp = min(max(stp, stpmin), stpmax)
        if (brackt and (stp <= stmin or stp >= stmax)) or (brackt and stmax - stmin <= xtol * stmax):
            stp = stx  # the best point so far: the next evaluation ends the search
    return LineSearchResult(*best, max_evaluations, False, "too many function evaluations")
