"""Mixed-effects mega-analysis: pooled subjects, site as a random effect, every feature at once.

Per feature the model is ``feature ~ fixed + (1 | site)`` or, with ``random_slope="age"``,
``feature ~ fixed + (1 + age | site)`` (correlated site intercept and slope), fitted by REML or ML
exactly as lme4 defines them (Bates, Maechler, Bolker & Walker 2015, J Stat Softw 67(1)): the
deviance is profiled over the fixed effects and the residual variance, leaving one variance ratio
(random intercept) or lme4's three ``theta`` parameters (random slope). The likelihood of every
feature is evaluated from per-site sufficient statistics (:mod:`._mixed_stats`,
:mod:`._mixed_lik`), so a fit costs ``O(sites x q^2)`` per feature and evaluation, and all features
are optimised together (:mod:`._mixed_opt`) - no loop over features, no statsmodels.

This is the model of ENIGMA-DTI mega-analyses (pooled subjects, site as a random intercept; e.g.
Kochunov et al. 2020, Hum Brain Mapp): effects of a term are reported as coefficients, t and p,
and Cohen's d from the t statistic (:meth:`MixedFit.d`).

>>> from dmriharmony.harmonizers import mixed
>>> fit = mixed.fit(table, features, fixed="age + sex + dx", site="site", reml=True)
>>> fit.coef["dx[T.patient]"], fit.sigma2_site, fit.icc, fit.d("dx")
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats
from tqdm.auto import tqdm

from ..errors import HarmonizationError
from ._meta_effects import d_from_t, resolve_features
from ._mixed_design import TermColumns, design_matrix, parse_terms, resolve_term
from ._mixed_lik import lambda_from_theta, profile
from ._mixed_opt import golden_theta, nelder_mead
from ._mixed_stats import SiteStats, chunks, site_stats

__all__ = ["MixedFit", "fit"]

log = logging.getLogger(__name__)

DF_METHODS = ("residual", "normal", "satterthwaite")
D_FORMULAS = ("nakagawa", "t", "beta", "total")


@dataclass
class MixedFit:
    """Result of :func:`fit`, one row per feature in every table.

    Attributes
    ----------
    features : list of feature names.  terms : fixed-effect column names.
    coef, se, t, p, df : DataFrames (features x terms): coefficients, standard errors
        ``sqrt(diag(sigma^2 M^-1))`` (lme4's ``vcov``; statsmodels' MixedLM instead inverts the
        observed Hessian of all parameters, which differs by ~1e-3 relative), Wald t, two-sided p
        and its degrees of freedom (see ``df_method``).
    sigma2_site : Series, site (random-intercept) variance; with a random slope the variance of
        the site intercept at the slope variable's mean.
    sigma2_resid : Series, residual variance.
    icc : Series, ``sigma2_site / (sigma2_site + sigma2_resid)``.
    loglik : Series, log-likelihood (the REML criterion / -2 for REML fits, as lme4's logLik).
    nobs : Series, subjects used per feature (missing values are dropped per feature).
    converged : Series of bool.
    varcomp : DataFrame of the site covariance on the original scale of the slope variable:
        ``var_intercept`` (at slope variable 0, as lme4), ``var_slope``, ``cov``, ``corr``
        (random-slope fits only; empty otherwise).
    ranef : dict of DataFrames (sites x features): conditional modes (BLUPs) of the site effects.
    """

    features: list[str]
    terms: list[str]
    coef: pd.DataFrame
    se: pd.DataFrame
    t: pd.DataFrame
    p: pd.DataFrame
    df: pd.DataFrame
    sigma2_site: pd.Series
    sigma2_resid: pd.Series
    icc: pd.Series
    loglik: pd.Series
    nobs: pd.Series
    converged: pd.Series
    varcomp: pd.DataFrame
    ranef: dict[str, pd.DataFrame]
    reml: bool
    df_method: str
    random_slope: str | None
    sites: list[Any]
    cov_params: np.ndarray = field(repr=False)
    group_sizes: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)
    term_map: list[TermColumns] = field(default_factory=list, repr=False)

    def d(self, term: str, formula: str = "nakagawa") -> pd.Series:
        """Cohen's d of a fixed-effect term per feature.

        ``formula``:

        - ``"nakagawa"`` (default, the ENIGMA mega-analysis scripts): ``d = t (n1 + n2) /
          (sqrt(n1 n2) sqrt(df))`` for a two-level term (Nakagawa & Cuthill 2007, Biol Rev
          82:591, Table 3) and ``d = 2 t / sqrt(df)`` for a continuous one, ``df = N - q``;
        - ``"t"``: ``d = t sqrt(1/n1 + 1/n2)`` (Rosenthal 1994), two-level terms only;
        - ``"beta"``: coefficient / residual SD (``sigma``, the within-site SD);
        - ``"total"``: coefficient / sqrt(site variance + residual variance).

        ``n1``/``n2`` count the subjects with the dummy at 1/0 among those used for the feature.
        """
        if formula not in D_FORMULAS:
            raise HarmonizationError(f"unknown d formula {formula!r}; choose one of {D_FORMULAS}")
        col = resolve_term(term, self.terms, self.term_map)
        tval = self.t[col].to_numpy()
        beta = self.coef[col].to_numpy()
        df_resid = self.nobs.to_numpy(dtype=float) - len(self.terms)
        if formula == "beta":
            out = beta / np.sqrt(self.sigma2_resid.to_numpy())
        elif formula == "total":
            out = beta / np.sqrt(self.sigma2_resid.to_numpy() + self.sigma2_site.to_numpy())
        elif col in self.group_sizes:
            n1, n2 = self.group_sizes[col]
            out = d_from_t(tval, n1, n2, df_resid, "nakagawa" if formula == "nakagawa" else "t")
        elif formula == "nakagawa":
            out = 2.0 * tval / np.sqrt(df_resid)
        else:
            raise HarmonizationError(
                f"d formula 't' needs a two-level term; {col!r} is continuous (use 'nakagawa')"
            )
        return pd.Series(out, index=pd.Index(self.features, name="feature"), name=f"d_{col}")

    cohens_d = d

    def to_frame(self, term: str | None = None) -> pd.DataFrame:
        """One row per feature: variance components, ICC, logLik and (for ``term``) its test."""
        out = pd.DataFrame(
            {
                "sigma2_site": self.sigma2_site, "sigma2_resid": self.sigma2_resid,
                "icc": self.icc, "loglik": self.loglik, "nobs": self.nobs,
                "converged": self.converged,
            }
        )
        if term is not None:
            col = resolve_term(term, self.terms, self.term_map)
            out.insert(0, "estimate", self.coef[col])
            out.insert(1, "se", self.se[col])
            out.insert(2, "t", self.t[col])
            out.insert(3, "df", self.df[col])
            out.insert(4, "p", self.p[col])
            out.insert(5, "d", self.d(col).to_numpy())
            out["term"] = col
        if not self.varcomp.empty:
            out = out.join(self.varcomp)
        out.index.name = "feature"
        return out


def _check_table(table: Any, site: str) -> None:
    if not isinstance(table, pd.DataFrame):
        raise HarmonizationError("table must be a pandas DataFrame (one row per subject)")
    if site not in table.columns:
        raise HarmonizationError(f"site column {site!r} not found in the table")
    if table[site].isna().any():
        row = table.index[table[site].isna().to_numpy()][0]
        raise HarmonizationError(f"column {site!r} has a missing site label (row {row!r})")


def _drop_small_sites(table: pd.DataFrame, site: str, min_per_site: int) -> pd.DataFrame:
    counts = table[site].value_counts(sort=False)
    small = counts[counts < min_per_site]
    if len(small):
        warnings.warn(
            f"sites skipped (fewer than {min_per_site} subjects): "
            + ", ".join(f"{s!r} ({n})" for s, n in small.items()),
            stacklevel=3,
        )
        table = table[~table[site].isin(small.index)]
    if table[site].nunique() < 2:
        raise HarmonizationError(
            f"column {site!r}: at least 2 sites with {min_per_site}+ subjects are needed for a "
            f"site random effect, found {table[site].nunique()}"
        )
    return table


def _fit_block(
    st: SiteStats, reml: bool, r: int, progress: Any = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Optimal ``theta`` (P, r(r+1)/2), deviance and convergence flags for one feature block."""
    p = st.yy.shape[0]

    def f1(th: np.ndarray, idx: np.ndarray) -> np.ndarray:
        return profile(st.take(idx), th.reshape(-1, 1, 1), reml).deviance

    th1, dev1 = golden_theta(f1, p)
    if r == 1:
        return th1[:, None], dev1, np.ones(p, dtype=bool)

    def f3(th: np.ndarray, idx: np.ndarray) -> np.ndarray:
        return profile(st.take(idx), lambda_from_theta(th, 2), reml).deviance

    lower = np.array([0.0, -np.inf, 0.0])
    # Several starts (the likelihood surface has ridges where Lambda is singular, which trap a
    # single Nelder-Mead run); the best end point is refined by a tight restart.
    a_ri = np.maximum(th1, 0.05)
    starts = [(a_ri, 0.0, 0.1), (np.full(p, 0.02), 0.0, 0.3), (a_ri, -0.3, 0.02),
              (a_ri, 0.3, 0.02)]
    # All starts run as one stacked problem set (problem i is feature i % p).
    x0 = np.concatenate(
        [np.column_stack([a0, np.full(p, b0), np.full(p, c0)]) for a0, b0, c0 in starts]
    )

    def f3_stacked(th: np.ndarray, idx: np.ndarray) -> np.ndarray:
        return f3(th, idx % p)

    xs, fs, _ = nelder_mead(f3_stacked, x0, np.array([0.25, 0.25, 0.25]), lower, ftol=1e-5,
                            xtol=1e-3)
    pick = np.argmin(fs.reshape(len(starts), p), axis=0)
    x = xs.reshape(len(starts), p, 3)[pick, np.arange(p)]
    f = fs.reshape(len(starts), p)[pick, np.arange(p)]
    step = 0.02 * (np.abs(x) + 0.05)
    x2, f2, conv = nelder_mead(f3, x, step, lower, ftol=1e-10, xtol=1e-7)
    better = f2 <= f
    x = np.where(better[:, None], x2, x)
    f = np.where(better, f2, f)
    # the intercept-only fit is the boundary theta = (theta1, 0, 0): never return worse.
    ri = dev1 < f
    x[ri] = np.column_stack([th1[ri], np.zeros(ri.sum()), np.zeros(ri.sum())])
    f[ri] = dev1[ri]
    return x, f, conv | ri


def fit(
    table: pd.DataFrame,
    features: Sequence[str] | None = None,
    fixed: str | Sequence[str] | None = "1",
    site: str = "site",
    reml: bool = True,
    random_slope: str | None = None,
    df: str = "residual",
    min_per_site: int | None = None,
    chunk_size: int | None = None,
    progress: bool | None = None,
) -> MixedFit:
    """Fit ``feature ~ fixed + (1 | site)`` (or ``(1 + slope | site)``) to every feature.

    Parameters
    ----------
    table : DataFrame
        One row per subject: features, site label and the fixed-effect columns.
    features : sequence of str, optional
        Feature columns; default every numeric column not used by the model.
    fixed : str or sequence of str
        Right-hand side of the fixed effects, e.g. ``"age + sex + dx"`` (see
        :mod:`._mixed_design`: categorical columns are treatment coded, ``C(x)`` forces it,
        ``a:b`` interactions). An intercept is always included.
    site : str
        Column of the site labels (the grouping factor).
    reml : bool
        Restricted maximum likelihood (default, lme4's default) or maximum likelihood.
    random_slope : str, optional
        A numeric column given a correlated random slope per site, lme4's ``(1 + x | site)``.
    df : {"residual", "normal", "satterthwaite"}
        Reference distribution of the Wald tests: t with ``N - q`` df (default), the standard
        normal (statsmodels' MixedLM), or t with Satterthwaite's (1946) df per feature and term as
        lmerTest computes them (Kuznetsova et al. 2017, J Stat Softw 82(13); random-intercept
        model only).
    min_per_site : int, optional
        Sites with fewer subjects are skipped with a warning naming them (default 2; 3 with a
        random slope).
    chunk_size : int, optional
        Features optimised together (bounds memory); default 20,000 (4,000 with a slope).
    progress : bool, optional
        Show a progress bar over feature blocks (default: when there is more than one block).

    Returns
    -------
    MixedFit

    Raises
    ------
    HarmonizationError
        Missing column or value, non-numeric feature, fewer than two usable sites, or a
        rank-deficient fixed-effects design (the message names the column or site).
    """
    _check_table(table, site)
    if df not in DF_METHODS:
        raise HarmonizationError(f"unknown df method {df!r}; choose one of {DF_METHODS}")
    if df == "satterthwaite" and random_slope is not None:
        raise HarmonizationError("df='satterthwaite' is implemented for the random-intercept model")
    r = 1 if random_slope is None else 2
    min_per_site = (2 if r == 1 else 3) if min_per_site is None else int(min_per_site)
    fixed_vars = sorted({
        v.strip()[2:-1] if v.strip().startswith("C(") else v.strip()
        for t in parse_terms(fixed) for v in t.split(":")
    })
    used = [site, *fixed_vars] + ([random_slope] if random_slope else [])
    feats = resolve_features(table, features, used)
    if random_slope is not None:
        if random_slope not in table.columns:
            raise HarmonizationError(f"random-slope column {random_slope!r} not found in the table")
        if not pd.api.types.is_numeric_dtype(table[random_slope]):
            raise HarmonizationError(f"random-slope column {random_slope!r} must be numeric")
        if table[random_slope].isna().any():
            row = table.index[table[random_slope].isna().to_numpy()][0]
            raise HarmonizationError(f"column {random_slope!r} has a missing value (row {row!r})")
    table = _drop_small_sites(table, site, min_per_site)
    x, names, term_map = design_matrix(table, fixed)
    n_obs, q = x.shape
    site_labels, codes = np.unique(table[site].to_numpy().astype(str), return_inverse=True)
    sites = [table[site].to_numpy()[codes == i][0] for i in range(site_labels.size)]
    n_sites = len(sites)
    if r == 2:
        zraw = table[random_slope].to_numpy(dtype=float)
        z_mu, z_sd = zraw.mean(), zraw.std()
        if z_sd == 0:
            raise HarmonizationError(f"random-slope column {random_slope!r} is constant")
        z = np.column_stack([np.ones(n_obs), (zraw - z_mu) / z_sd])
    else:
        z = np.ones((n_obs, 1))

    y_all = table[feats].to_numpy(dtype=float)
    p_all = y_all.shape[1]
    observed = np.isfinite(y_all)
    nobs = observed.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mu = np.nanmean(np.where(observed, y_all, np.nan), axis=0)
        sd = np.nanstd(np.where(observed, y_all, np.nan), axis=0)
    fittable = (nobs > q + r + 1) & (sd > 0) & np.isfinite(sd)
    if (~fittable).any():
        bad = [feats[j] for j in np.flatnonzero(~fittable)]
        warnings.warn(
            f"{len(bad)} feature(s) not fitted (constant or too few observed values), e.g. "
            f"{bad[0]!r}; their results are NaN",
            stacklevel=2,
        )
    ys = np.where(observed, (y_all - mu) / np.where(sd > 0, sd, 1.0), 0.0)

    n_theta = r * (r + 1) // 2
    theta = np.full((p_all, n_theta), np.nan)
    beta = np.full((p_all, q), np.nan)
    cov = np.full((p_all, q, q), np.nan)
    rss = np.full(p_all, np.nan)
    dev = np.full(p_all, np.nan)
    conv = np.zeros(p_all, dtype=bool)
    blups = np.full((p_all, n_sites, r), np.nan)
    dfs = np.full((p_all, q), np.nan)
    complete = fittable & observed.all(axis=0)
    partial = fittable & ~complete
    size = chunk_size or (20000 if r == 1 else 4000)
    blocks = [np.flatnonzero(complete)[c] for c in chunks(int(complete.sum()), size)]
    blocks += [np.flatnonzero(partial)[c] for c in chunks(int(partial.sum()), max(size // 8, 1))]
    show = progress if progress is not None else len(blocks) > 4
    for blk in tqdm(blocks, desc="mixed model", unit="block", disable=not show):
        mask = None if complete[blk[0]] else observed[:, blk]
        if mask is not None:
            # the observed subjects of a feature may no longer support the design
            xtx = np.einsum("ni,nj,np->pij", x, x, mask.astype(float), optimize=True)
            full_rank = np.linalg.matrix_rank(xtx) == q
            if not full_rank.all():
                bad = [feats[j] for j in blk[~full_rank]]
                warnings.warn(
                    f"{len(bad)} feature(s) not fitted: their observed subjects leave the fixed "
                    f"effects rank-deficient, e.g. {bad[0]!r}; their results are NaN",
                    stacklevel=2,
                )
                fittable[blk[~full_rank]] = False
                blk, mask = blk[full_rank], mask[:, full_rank]
                if blk.size == 0:
                    continue
        st = site_stats(x, z, ys[:, blk], codes, n_sites, mask)
        th, dv, cv = _fit_block(st, reml, r)
        lam = th.reshape(-1, 1, 1) if r == 1 else lambda_from_theta(th, 2)
        prof = profile(st, lam, reml, want_k=True)
        dof = st.nobs - q if reml else st.nobs
        s2 = prof.rss / dof
        with np.errstate(invalid="ignore"):
            minv = np.linalg.inv(prof.m)
        theta[blk], dev[blk], conv[blk] = th, prof.deviance, cv
        beta[blk], cov[blk], rss[blk] = prof.beta, s2[:, None, None] * minv, prof.rss
        resid = st.zy - np.einsum("sai,pi->psa", st.zx[0], prof.beta) if st.shared else (
            st.zy - np.einsum("psai,pi->psa", st.zx, prof.beta)
        )
        blups[blk] = np.einsum("psab,psb->psa", prof.k, resid)
        if df == "satterthwaite":
            dfs[blk] = _satterthwaite(st, th[:, 0], s2, reml)
        log.debug("mixed model: block of %d features, deviance %s", blk.size, dv[:1])

    # Back to the original units of each feature.
    nf = nobs.astype(float)
    dof = nf - q if reml else nf
    sigma2 = rss / dof * sd**2
    beta = beta * sd[:, None]
    beta[:, 0] += mu
    cov = cov * (sd**2)[:, None, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        loglik = -0.5 * (dev + dof * np.log(sd**2))
    lam = lambda_from_theta(np.nan_to_num(theta), r)
    rel = lam @ np.swapaxes(lam, -1, -2)  # Sigma_site / sigma^2 in the scaled z
    sig_site = rel * (rss / dof * sd**2)[:, None, None]
    sig_site[~fittable] = np.nan
    blups = blups * sd[:, None, None]
    ranef: dict[str, pd.DataFrame] = {}
    varcomp = pd.DataFrame(index=pd.Index(feats, name="feature"))
    if r == 2:
        # z_scaled = (z - mu) / sd: b = T b_scaled with T = [[1, -mu/sd], [0, 1/sd]].
        tmat = np.array([[1.0, -z_mu / z_sd], [0.0, 1.0 / z_sd]])
        site_var_mean = sig_site[:, 0, 0]
        sig_orig = tmat @ sig_site @ tmat.T
        blups = np.einsum("ab,psb->psa", tmat, blups)
        with np.errstate(invalid="ignore", divide="ignore"):
            varcomp = pd.DataFrame(
                {
                    "var_intercept": sig_orig[:, 0, 0], "var_slope": sig_orig[:, 1, 1],
                    "cov": sig_orig[:, 0, 1],
                    "corr": sig_orig[:, 0, 1] / np.sqrt(sig_orig[:, 0, 0] * sig_orig[:, 1, 1]),
                },
                index=pd.Index(feats, name="feature"),
            )
        ranef[random_slope] = pd.DataFrame(blups[:, :, 1].T, index=sites, columns=feats)
    else:
        site_var_mean = sig_site[:, 0, 0]
    ranef["Intercept"] = pd.DataFrame(blups[:, :, 0].T, index=sites, columns=feats)

    se = np.sqrt(np.diagonal(cov, axis1=1, axis2=2))
    with np.errstate(invalid="ignore", divide="ignore"):
        tval = beta / se
    if df == "residual":
        dfs = np.repeat((nf - q)[:, None], q, axis=1)
    elif df == "normal":
        dfs = np.full((p_all, q), np.inf)
    pval = 2.0 * stats.t.sf(np.abs(tval), dfs)
    group_sizes = {}
    for j, c in enumerate(names):
        col = x[:, j]
        if j > 0 and np.isin(col, (0.0, 1.0)).all():
            n1 = (observed * col[:, None]).sum(axis=0).astype(float)
            group_sizes[c] = (n1, nf - n1)
    idx = pd.Index(feats, name="feature")

    def frame(a: np.ndarray) -> pd.DataFrame:
        return pd.DataFrame(a, index=idx, columns=names)

    with np.errstate(invalid="ignore", divide="ignore"):
        icc = site_var_mean / (site_var_mean + sigma2)
    return MixedFit(
        features=feats, terms=names, coef=frame(beta), se=frame(se), t=frame(tval),
        p=frame(pval), df=frame(dfs), sigma2_site=pd.Series(site_var_mean, index=idx),
        sigma2_resid=pd.Series(sigma2, index=idx), icc=pd.Series(icc, index=idx),
        loglik=pd.Series(loglik, index=idx), nobs=pd.Series(nobs, index=idx),
        converged=pd.Series(conv, index=idx), varcomp=varcomp, ranef=ranef, reml=reml,
        df_method=df, random_slope=random_slope, sites=sites, cov_params=cov,
        group_sizes=group_sizes, term_map=term_map,
    )


def _satterthwaite(st: SiteStats, theta: np.ndarray, s2: np.ndarray, reml: bool) -> np.ndarray:
    """Satterthwaite df of each coefficient (lmerTest's method) for the random-intercept model.

    The variance parameters are ``phi = (sigma_site^2, sigma^2)``. With ``A = 2 H^-1`` the
    asymptotic covariance of ``phi`` (``H`` the Hessian of the unprofiled deviance -2 l(phi),
    by central differences) and ``g`` the gradient of ``var(beta_j) = [sigma^2 M(gamma)^-1]_jj``
    in ``phi``, ``df_j = 2 var(beta_j)^2 / (g' A g)`` (Kuznetsova et al. 2017, eq. 7-8; Giesbrecht
    & Burns 1985). Features whose site variance is 0 (boundary) get the residual df ``N - q``.
    """
    q = st.xx.shape[-1]

    def terms(phi_b: np.ndarray, phi_e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        gam = np.maximum(phi_b, 0.0) / phi_e
        prof = profile(st, np.sqrt(gam).reshape(-1, 1, 1), reml)
        # unprofiled deviance: log|L|^2 + N log s2 + rss / s2 (+ log|M| - q log s2 for REML)
        n_terms = st.nobs - q if reml else st.nobs
        logdet_l = prof.deviance - _profiled_const(prof.rss, n_terms)
        d = logdet_l + n_terms * np.log(phi_e) + prof.rss / phi_e + n_terms * np.log(2 * np.pi)
        var_b = phi_e[:, None] * np.diagonal(np.linalg.inv(prof.m), axis1=1, axis2=2)
        return d, var_b

    phi = np.column_stack([theta**2 * s2, s2])
    h = 1e-4 * np.maximum(np.abs(phi), 1e-8)
    hess = np.empty((phi.shape[0], 2, 2))
    grad = np.empty((phi.shape[0], 2, q))
    f0, v0 = terms(phi[:, 0], phi[:, 1])
    for i in range(2):
        e = np.zeros_like(phi)
        e[:, i] = h[:, i]
        fp, vp = terms(*(phi + e).T)
        fm, vm = terms(*(phi - e).T)
        hess[:, i, i] = (fp - 2 * f0 + fm) / h[:, i] ** 2
        grad[:, i] = (vp - vm) / (2 * h[:, i, None])
    e0 = np.column_stack([h[:, 0], np.zeros(len(h))])
    e1 = np.column_stack([np.zeros(len(h)), h[:, 1]])
    fpp = terms(*(phi + e0 + e1).T)[0]
    fpm = terms(*(phi + e0 - e1).T)[0]
    fmp = terms(*(phi - e0 + e1).T)[0]
    fmm = terms(*(phi - e0 - e1).T)[0]
    hess[:, 0, 1] = hess[:, 1, 0] = (fpp - fpm - fmp + fmm) / (4 * h[:, 0] * h[:, 1])
    with np.errstate(invalid="ignore", divide="ignore"):
        acov = 2.0 * np.linalg.pinv(hess)
        denom = np.einsum("pij,pik,pjk->pk", acov, grad, grad)
        out = 2.0 * v0**2 / denom
    # A zero site variance (boundary fit) reduces the model to OLS: residual df N - q.
    boundary = theta <= 1e-6
    resid_df = np.broadcast_to((st.nobs - q)[:, None], out.shape)
    out[boundary] = resid_df[boundary]
    return out


def _profiled_const(rss: np.ndarray, n_terms: np.ndarray) -> np.ndarray:
    """The part of the profiled deviance that is not ``log|L|^2 (+ log|M|)``."""
    return n_terms * (1.0 + np.log(2 * np.pi) + np.log(rss / n_terms))
