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
    k: np.ndarray  # (P, S, r, r) per-site K_s


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
    lt = np.swapaxes(lam, -1, -2)[:, None]  # (P, 1, 2, 2)
    t = lt @ st.zz @ lam[:, None]  # (P, S, 2, 2)
    a = 1.0 + t[..., 0, 0]
    b = t[..., 0, 1]
    d = 1.0 + t[..., 1, 1]
    det = a * d - b * b
    inv = np.empty_like(t)
    inv[..., 0, 0] = d / det
    inv[..., 1, 1] = a / det
    inv[..., 0, 1] = inv[..., 1, 0] = -b / det
    k = lam[:, None] @ inv @ lt
    return k, np.log(det).sum(axis=1)


def profile(st: SiteStats, lam: np.ndarray, reml: bool) -> Profile:
    """Profiled deviance and the generalised least-squares fit at ``Lambda`` (P, r, r)."""
    k, logdet_l = _site_k(st, lam)
    r = lam.shape[-1]
    q = st.xx.shape[-1]
    if r == 1:
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
        kzx = k @ st.zx  # (P, S, r, q)
        if st.shared:
            m = st.xx - np.einsum("sai,psaj->pij", st.zx[0], kzx, optimize=True)
        else:
            m = st.xx - np.einsum("psai,psaj->pij", st.zx, kzx, optimize=True)
        xpy = st.xy - np.einsum("psai,psa->pi", kzx, st.zy, optimize=True)
        kzy = np.einsum("psab,psb->psa", k, st.zy)
        ypy = st.yy - np.einsum("psa,psa->p", st.zy, kzy)
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
