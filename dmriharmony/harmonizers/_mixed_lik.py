"""Profiled (restricted) log-likelihood of ``y = X beta + Z b + e`` from per-site statistics.

The parametrisation is lme4's (Bates et al. 2015, J Stat Softw 67(1), sections 3.1-3.4): the
random effects of a site are ``b_s ~ N(0, sigma^2 Lambda Lambda')`` with ``Lambda`` lower
triangular (``theta``), so ``V_s = sigma^2 (I + Z_s Lambda Lambda' Z_s')``. By Woodbury,

    sigma^2 V_s^-1 = I - Z_s K_s Z_s',   K_s = Lambda (I + Lambda' Z_s'Z_s Lambda)^-1 Lambda',

so ``M = X'X - sum_s X_s'Z_s K_s Z_s'X_s`` (lme4's ``R_X'R_X``), the generalised least-squares
coefficients are ``beta = M^-1 (X'y - sum_s X_s'Z_s K_s Z_s'y_s)`` and the penalised residual sum
of squares is ``rss = y'y - sum_s y_s'Z_s K_s Z_s'y_s - beta'(X'y - ...)``. With
``log|L|^2 = sum_s log|I + Lambda' Z_s'Z_s Lambda|`` the profiled deviances are (lme4 eqs. 34, 41)

    ML:   -2 l(theta)   = log|L|^2 + N (1 + log(2 pi rss / N))
    REML: -2 l_R(theta) = log|L|^2 + log|M| + (N - q) (1 + log(2 pi rss / (N - q)))

and ``sigma^2 = rss / N`` (ML) or ``rss / (N - q)`` (REML), ``cov(beta) = sigma^2 M^-1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._mixed_stats import SiteStats

_LOG2PI = np.log(2.0 * np.pi)


@dataclass
class Profile:
    """Everything the profiled likelihood yields at ``theta`` (per feature)."""

    deviance: np.ndarray  # (P,)
    beta: np.ndarray  # (P, q)
    m: np.ndarray  # (P, q, q) = X' (sigma^2 V^-1) X
    rss: np.ndarray  # (P,)
    k: np.ndarray | None  # (P, S, r, r) per-site K_s (r = 2: only with want_k)


def lambda_from_theta(theta: np.ndarray, r: int) -> np.ndarray:
    """Lower-triangular ``Lambda`` (P, r, r) from lme4's column-wise ``theta`` (P, r(r+1)/2)."""
    p = theta.shape[0]
    lam = np.zeros((p, r, r))
    rows, cols = np.tril_indices(r)
    order = np.lexsort((rows, cols))  # column-major, as lme4's theta
    lam[:, rows[order], cols[order]] = theta
    return lam


def _site_k(st: SiteStats, lam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``K_s`` (P, S, r, r) and ``sum_s log|I + Lambda' Z_s'Z_s Lambda|`` (P,)."""
    r = lam.shape[-1]
    if r == 1:
        g = lam[:, 0, 0] ** 2  # (P,)
        n = st.zz[..., 0, 0]  # (F, S)
        denom = 1.0 + g[:, None] * n
        k = (g[:, None] / denom)[..., None, None]
        return k, np.log(denom).sum(axis=1)
    if r != 2:
        raise ValueError("only one or two random effects per site are supported")
    k00, k01, k11, logdet = _k2(st, lam)
    k = np.stack([np.stack([k00, k01], -1), np.stack([k01, k11], -1)], -2)
    return k, logdet


def _k2(
    st: SiteStats, lam: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Entries of the symmetric ``K_s`` (each (P, S)) and ``log|L|^2`` for r = 2, elementwise.

    With ``Lambda = [[a, 0], [b, c]]`` and ``Z_s'Z_s = [[n, s], [s, u]]``, ``T = Lambda'
    Z'Z Lambda`` and ``C = I + T`` are written out, which is much faster than batched 2 x 2
    matrix products.
    """
    a, b, c = (lam[:, 0, 0][:, None], lam[:, 1, 0][:, None], lam[:, 1, 1][:, None])
    n, s_, u = st.zz[..., 0, 0], st.zz[..., 0, 1], st.zz[..., 1, 1]
    # Lambda' Z'Z Lambda: columns of Lambda are (a, b) and (0, c).
    t00 = a * a * n + 2.0 * a * b * s_ + b * b * u
    t01 = c * (a * s_ + b * u)
    t11 = c * c * u
    c00, c11 = 1.0 + t00, 1.0 + t11
    det = c00 * c11 - t01 * t01
    i00, i01, i11 = c11 / det, -t01 / det, c00 / det
    # K = Lambda C^-1 Lambda'
    k00 = a * a * i00
    k01 = a * (b * i00 + c * i01)
    k11 = b * b * i00 + 2.0 * b * c * i01 + c * c * i11
    return k00, k01, k11, np.log(det).sum(axis=1)


def profile(st: SiteStats, lam: np.ndarray, reml: bool, want_k: bool = False) -> Profile:
    """Profiled deviance and the generalised least-squares fit at ``Lambda`` (P, r, r)."""
    r = lam.shape[-1]
    q = st.xx.shape[-1]
    k = None
    if r == 1:
        k, logdet_l = _site_k(st, lam)
        ks = k[..., 0, 0]  # (P, S)
        zx = st.zx[..., 0, :]  # (F, S, q)
        zy = st.zy[..., 0]  # (P, S)
        if st.shared:
            outer = (zx[0][:, :, None] * zx[0][:, None, :]).reshape(zx.shape[1], q * q)
            m = st.xx - (ks @ outer).reshape(-1, q, q)
            xpy = st.xy - (ks * zy) @ zx[0]
        else:
            m = st.xx - np.einsum("ps,psi,psj->pij", ks, zx, zx, optimize=True)
            xpy = st.xy - np.einsum("ps,psi->pi", ks * zy, zx)
        ypy = st.yy - (ks * zy**2).sum(axis=1)
    else:
        k00, k01, k11, logdet_l = _k2(st, lam)
        z0, z1 = st.zx[..., 0, :], st.zx[..., 1, :]  # (F, S, q)
        y0, y1 = st.zy[..., 0], st.zy[..., 1]  # (P, S)
        a0 = k00 * y0 + k01 * y1  # (P, S): first row of K_s Z_s'y_s
        a1 = k01 * y0 + k11 * y1
        if st.shared:
            z0s, z1s = z0[0], z1[0]
            o00 = (z0s[:, :, None] * z0s[:, None, :]).reshape(-1, q * q)
            o11 = (z1s[:, :, None] * z1s[:, None, :]).reshape(-1, q * q)
            o01 = (z0s[:, :, None] * z1s[:, None, :]).reshape(-1, q * q)
            o01 = o01 + (z1s[:, :, None] * z0s[:, None, :]).reshape(-1, q * q)
            m = st.xx - (k00 @ o00 + k11 @ o11 + k01 @ o01).reshape(-1, q, q)
            xpy = st.xy - (a0 @ z0s + a1 @ z1s)
        else:
            m = st.xx - (
                np.einsum("ps,psi,psj->pij", k00, z0, z0, optimize=True)
                + np.einsum("ps,psi,psj->pij", k11, z1, z1, optimize=True)
                + np.einsum("ps,psi,psj->pij", k01, z0, z1, optimize=True)
                + np.einsum("ps,psi,psj->pij", k01, z1, z0, optimize=True)
            )
            xpy = st.xy - (np.einsum("ps,psi->pi", a0, z0) + np.einsum("ps,psi->pi", a1, z1))
        ypy = st.yy - (a0 * y0 + a1 * y1).sum(axis=1)
        if want_k:
            k = np.stack([np.stack([k00, k01], -1), np.stack([k01, k11], -1)], -2)
    beta = np.linalg.solve(m, xpy[..., None])[..., 0]
    rss = ypy - (beta * xpy).sum(axis=1)
    rss = np.maximum(rss, np.finfo(float).tiny)
    nobs = st.nobs
    with np.errstate(invalid="ignore", divide="ignore"):
        if reml:
            sign, logdet_m = np.linalg.slogdet(m)
            logdet_m = np.where(sign > 0, logdet_m, np.inf)
            dof = nobs - q
            dev = logdet_l + logdet_m + dof * (1.0 + _LOG2PI + np.log(rss / dof))
        else:
            dev = logdet_l + nobs * (1.0 + _LOG2PI + np.log(rss / nobs))
    return Profile(dev, beta, m, rss, k)


def deviance(st: SiteStats, lam: np.ndarray, reml: bool) -> np.ndarray:
    """Profiled -2 log-likelihood (REML criterion if ``reml``) at ``Lambda``."""
    return profile(st, lam, reml).deviance
