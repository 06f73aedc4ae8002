"""Synthetic ENIGMA-like ROI table with known biology and known site effects.

The generative model is the one ComBat assumes (Johnson et al., *Biostatistics* 2007, eq. 2.1;
Fortin et al., *NeuroImage* 2017, eq. 1), with biology whose true size is known::

    y_ijf = alpha_f + beta_age,f (age_ij - age0) + q (age_ij - age0)^2 + beta_sex,f sex_ij
            + beta_dx,f dx_ij + gamma_if + delta_if * sigma_f * e_ijf

for subject ``j`` scanned at site ``i`` and ROI feature ``f``. ``e_ijf`` has unit variance, is
correlated across features through a shared subject factor, and is split into a stable
"biological" part (the same in every scan of a subject) and a scan-noise part (redrawn at every
scan), which is what traveling subjects measure.

Identifiability (the same constraint ComBat's estimator imposes): site locations are centred,
``sum_i n_i gamma_if = 0``, and site scales are normalised so that ``sum_i n_i delta_if^2 / n = 1``.
The scanner-free population therefore has residual SD ``sigma_f``, so the true Cohen's d of the
diagnosis is ``d_f = beta_dx,f / sigma_f`` and harmonizing back to the pooled scale recovers it.

Unbalanced designs (the realistic confounding that makes a naive harmonizer remove biology):
``age_site_shift`` moves each site's mean age, ``dx_prop_range`` gives each site a different
proportion of patients. ``age_quadratic`` (``q``, default 0) bends the age trajectory (FA peaks
in early adulthood and declines faster later, e.g. Kochunov et al., *Neurobiol Aging* 2012), the
case a linear-age ComBat mis-models and ComBat-GAM (Pomponio et al., *NeuroImage* 2020) is for.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from dmriharmony.errors import SimulationError

__all__ = ["ENIGMA_ROIS", "simulate_roi_table"]

#: ENIGMA-DTI bilateral ROIs (not the CC/IC/CR unions) with an approximate typical adult
#: skeleton FA for each.
ENIGMA_ROIS: dict[str, float] = {
    "GCC": 0.58, "BCC": 0.58, "SCC": 0.73, "FX": 0.34, "CST": 0.58,
    "ALIC": 0.46, "PLIC": 0.64, "RLIC": 0.50, "ACR": 0.41, "SCR": 0.45,
    "PCR": 0.45, "PTR": 0.52, "SS": 0.50, "EC": 0.38, "CGC": 0.50,
    "CGH": 0.39, "FXST": 0.44, "SLF": 0.45, "SFO": 0.42, "UNC": 0.51,
}  # fmt: skip


def _as_per_feature(value: float | Sequence[float] | np.ndarray, p: int, name: str) -> np.ndarray:
    arr = np.asarray(value, dtype=float)
    if arr.ndim == 0:
        return np.full(p, float(arr))
    if arr.shape != (p,):
        raise SimulationError(f"{name} must be a scalar or have one value per feature ({p}), "
                              f"got shape {arr.shape}")
    return arr.copy()


def _feature_names(n_features: int) -> list[str]:
    names = list(ENIGMA_ROIS)
    if n_features <= len(names):
        return names[:n_features]
    return names + [f"ROI{k + 1:03d}" for k in range(len(names), n_features)]


def simulate_roi_table(
    n_sites: int = 5,
    n_per_site: int | Sequence[int] = 200,
    n_features: int = 16,
    seed: int = 0,
    *,
    dx_d: float | Sequence[float] | None = None,
    age_slope: float | Sequence[float] | None = None,
    sex_effect: float = 0.005,
    age_quadratic: float = 0.0,
    noise_sd: float | Sequence[float] | None = None,
    feature_correlation: float = 0.3,
    scan_noise_fraction: float = 0.2,
    site_location: float = 1.0,
    site_location_spread: float = 0.3,
    site_scale: float = 0.25,
    site_scale_spread: float = 0.1,
    age_range: tuple[float, float] = (20.0, 70.0),
    age_site_shift: float = 0.0,
    dx_prop_range: tuple[float, float] = (0.5, 0.5),
    n_traveling: int = 0,
    measure: str = "FA",
) -> tuple[pd.DataFrame, dict]:
    """Simulate a multi-site ROI table with known age/sex/dx effects and ComBat-type site effects.

    Parameters
    ----------
    n_sites : int
        Number of sites (scanners).
    n_per_site : int or sequence of int
        Subjects per site (one number, or one per site for unequal sites).
    n_features : int
        Number of ROI columns; the first 20 take ENIGMA's (bilateral) ROI names (GCC, BCC,
        SCC, ...), further ones are named ``ROI021``...
    seed : int
        Seed of the random generator: the same arguments give the same table.
    dx_d : float or sequence, optional
        True Cohen's d of the diagnosis (patients minus controls, in units of the scanner-free
        residual SD) per feature. Default: drawn uniformly in [-0.8, -0.4] per feature (FA is lower
        in patients, as in ENIGMA-schizophrenia).
    age_slope : float or sequence, optional
        True FA change per year per feature. Default: drawn uniformly in [-0.0025, -0.001].
    sex_effect : float
        FA difference male minus female (same for every feature).
    age_quadratic : float
        Curvature ``q`` of the age effect, FA per year squared (same for every feature; e.g.
        ``-2e-5``). ``truth["age_slope"]`` stays the slope at ``age0``, which a linear fit
        recovers when the pooled ages are symmetric about ``age0``.
    noise_sd : float or sequence, optional
        Scanner-free residual SD ``sigma_f`` per feature. Default: uniform in [0.02, 0.035].
    feature_correlation : float
        Correlation between any two features of the stable (biological) residuals, through a
        shared subject factor, in [0, 1). Scan noise is independent across features.
    scan_noise_fraction : float
        Fraction of the residual variance that is scan-to-scan noise (redrawn for each scan of a
        traveling subject); the rest is stable biology.
    site_location : float
        SD, in units of ``sigma_f``, of each site's overall additive shift (``gamma``).
    site_location_spread : float
        SD, in units of ``sigma_f``, of the feature-to-feature variation of that shift.
    site_scale : float
        SD of each site's log multiplicative scale (``log delta``).
    site_scale_spread : float
        SD of the feature-to-feature variation of ``log delta``.
    age_range : (float, float)
        Uniform age range of a site with no shift.
    age_site_shift : float
        Years by which the age range moves from one site to the next (0: same age distribution
        everywhere; 10: site 1 is 10 years older than site 0, ...). Confounds age with site.
    dx_prop_range : (float, float)
        Proportion of patients at the first and the last site (linear in between). Unequal values
        confound diagnosis with site.
    n_traveling : int
        Number of traveling subjects scanned once at every site, returned in ``truth["traveling"]``
        (not in the main table), with their scanner-free values in ``truth["traveling_clean"]``.
    measure : str
        Name of the DTI measure, stored in ``truth`` (the simulator's values are FA-like).

    Returns
    -------
    table : pandas.DataFrame
        One row per subject: ``subject, site, age, sex (0 female, 1 male), dx (0 control,
        1 patient)`` and one column per feature.
    truth : dict
        ``features``; ``dx_d``, ``dx_beta``, ``age_slope`` (alias ``age_beta``), ``sex_effect``
        (alias ``sex_beta``), ``intercept``, ``noise_sd`` (``pandas.Series`` indexed by
        feature); ``gamma`` and ``delta`` (``DataFrame`` sites x features, ``gamma`` in FA
        units); ``clean`` (the table without site effects); ``age0`` (centring age);
        ``site_dx_prop`` and ``site_age_mean``; ``traveling`` and ``traveling_clean``
        (``DataFrame`` or ``None``); ``seed`` and all parameters (``params``).

    Raises
    ------
    SimulationError
        For an impossible configuration (fewer than 2 sites, a site with fewer than 4 subjects,
        correlations outside [0, 1), negative SDs).
    """
    if n_sites < 2:
        raise SimulationError(f"n_sites must be >= 2, got {n_sites}")
    if n_features < 1:
        raise SimulationError(f"n_features must be >= 1, got {n_features}")
    sizes = np.asarray(n_per_site, dtype=int)
    sizes = np.full(n_sites, int(sizes)) if sizes.ndim == 0 else sizes
    if sizes.shape != (n_sites,):
        raise SimulationError(f"n_per_site must be one number or {n_sites} numbers, "
                              f"got {len(sizes)}")
    if (sizes < 4).any():
        bad = int(np.argmin(sizes))
        raise SimulationError(f"site{bad} has {sizes[bad]} subjects; at least 4 are needed")
    if not 0.0 <= feature_correlation < 1.0:
        raise SimulationError(f"feature_correlation must be in [0, 1), got {feature_correlation}")
    if not 0.0 <= scan_noise_fraction <= 1.0:
        raise SimulationError(f"scan_noise_fraction must be in [0, 1], got {scan_noise_fraction}")
    for name, val in (("site_location", site_location), ("site_scale", site_scale),
                      ("site_location_spread", site_location_spread),
                      ("site_scale_spread", site_scale_spread)):
        if val < 0:
            raise SimulationError(f"{name} must be >= 0, got {val}")
    lo, hi = (float(v) for v in dx_prop_range)
    if not (0.0 < lo < 1.0 and 0.0 < hi < 1.0):
        raise SimulationError(f"dx_prop_range must lie strictly inside (0, 1), got {dx_prop_range}")
    if age_range[1] <= age_range[0]:
        raise SimulationError(f"age_range must be (low, high) with low < high, got {age_range}")
    if n_traveling < 0:
        raise SimulationError(f"n_traveling must be >= 0, got {n_traveling}")

    rng = np.random.default_rng(seed)
    p = n_features
    features = _feature_names(p)
    sites = [f"site{i}" for i in range(n_sites)]

    # Feature-level biology.
    base = np.array([ENIGMA_ROIS.get(f, np.nan) for f in features])
    missing = np.isnan(base)
    base[missing] = rng.uniform(0.38, 0.70, missing.sum())
    sigma = (rng.uniform(0.02, 0.035, p) if noise_sd is None
             else _as_per_feature(noise_sd, p, "noise_sd"))
    if (sigma <= 0).any():
        raise SimulationError("noise_sd must be > 0 for every feature")
    d_true = rng.uniform(-0.8, -0.4, p) if dx_d is None else _as_per_feature(dx_d, p, "dx_d")
    slope = (rng.uniform(-0.0025, -0.001, p) if age_slope is None
             else _as_per_feature(age_slope, p, "age_slope"))
    beta_dx = d_true * sigma
    age0 = float(np.mean(age_range))

    # Site effects (ComBat's hierarchical model), made identifiable below.
    loc_site = rng.normal(0.0, site_location, n_sites)
    gamma_std = loc_site[:, None] + rng.normal(0.0, site_location_spread, (n_sites, p))
    log_scale = rng.normal(0.0, site_scale, n_sites)
    log_delta = log_scale[:, None] + rng.normal(0.0, site_scale_spread, (n_sites, p))
    w = sizes / sizes.sum()
    gamma_std -= w @ gamma_std
    delta = np.exp(log_delta)
    delta /= np.sqrt(w @ delta**2)
    gamma = gamma_std * sigma

    # Subjects.
    dx_props = np.linspace(lo, hi, n_sites)
    shifts = (np.arange(n_sites) - (n_sites - 1) / 2.0) * age_site_shift
    site_idx = np.repeat(np.arange(n_sites), sizes)
    n = int(sizes.sum())
    age = np.empty(n)
    dx = np.empty(n, dtype=int)
    for i in range(n_sites):
        rows = site_idx == i
        age[rows] = rng.uniform(age_range[0], age_range[1], sizes[i]) + shifts[i]
        n_pat = int(round(dx_props[i] * sizes[i]))
        n_pat = min(max(n_pat, 1), sizes[i] - 1)
        dx[rows] = rng.permutation(np.r_[np.ones(n_pat, int), np.zeros(sizes[i] - n_pat, int)])
    sex = rng.integers(0, 2, n)

    scan_scale = np.sqrt(scan_noise_fraction)

    def biological(m: int) -> np.ndarray:
        """Stable subject residuals: unit variance x (1 - scan fraction), shared factor."""
        shared = rng.standard_normal((m, 1))
        unique = rng.standard_normal((m, p))
        e = np.sqrt(feature_correlation) * shared + np.sqrt(1.0 - feature_correlation) * unique
        return np.sqrt(1.0 - scan_noise_fraction) * e

    bio = biological(n)
    scan = scan_scale * rng.standard_normal((n, p))
    def age_curve(a: np.ndarray) -> np.ndarray:
        return np.outer(a - age0, slope) + age_quadratic * ((a - age0) ** 2)[:, None]

    mean = base + age_curve(age) + np.outer(sex, np.full(p, sex_effect)) + np.outer(dx, beta_dx)
    clean = mean + (bio + scan) * sigma
    observed = mean + gamma[site_idx] + delta[site_idx] * (bio + scan) * sigma

    subjects = [f"sub-{k + 1:05d}" for k in range(n)]
    meta = pd.DataFrame({"subject": subjects, "site": [sites[i] for i in site_idx],
                         "age": np.round(age, 2), "sex": sex, "dx": dx})
    # Ages are rounded for display; recompute the mean with the stored ages so truth is exact.
    shift = age_curve(meta["age"].to_numpy()) - age_curve(age)
    observed += shift
    clean += shift
    table = pd.concat([meta, pd.DataFrame(observed, columns=features)], axis=1)
    clean_table = pd.concat([meta, pd.DataFrame(clean, columns=features)], axis=1)

    traveling = traveling_clean = None
    if n_traveling:
        t_age = np.round(rng.uniform(age_range[0], age_range[1], n_traveling), 2)
        t_sex = rng.integers(0, 2, n_traveling)
        t_dx = np.zeros(n_traveling, dtype=int)
        t_bio = biological(n_traveling)
        t_mean = base + age_curve(t_age) + np.outer(t_sex, np.full(p, sex_effect))
        rows, rows_clean = [], []
        for i, s in enumerate(sites):
            t_scan = scan_scale * rng.standard_normal((n_traveling, p))
            resid = (t_bio + t_scan) * sigma
            info = pd.DataFrame({"subject": [f"sub-T{k + 1:03d}" for k in range(n_traveling)],
                                 "site": s, "age": t_age, "sex": t_sex, "dx": t_dx})
            rows.append(pd.concat([info, pd.DataFrame(t_mean + gamma[i] + delta[i] * resid,
                                                      columns=features)], axis=1))
            rows_clean.append(pd.concat([info, pd.DataFrame(t_mean + resid, columns=features)],
                                        axis=1))
        traveling = pd.concat(rows, ignore_index=True)
        traveling_clean = pd.concat(rows_clean, ignore_index=True)

    truth = {
        "features": features,
        "measure": measure,
        "dx_d": pd.Series(d_true, index=features, name="dx_d"),
        "dx_beta": pd.Series(beta_dx, index=features, name="dx_beta"),
        "age_slope": pd.Series(slope, index=features, name="age_slope"),
        "age_beta": pd.Series(slope, index=features, name="age_beta"),
        "sex_effect": pd.Series(np.full(p, sex_effect), index=features, name="sex_effect"),
        "sex_beta": pd.Series(np.full(p, sex_effect), index=features, name="sex_beta"),
        "intercept": pd.Series(base, index=features, name="intercept"),
        "noise_sd": pd.Series(sigma, index=features, name="noise_sd"),
        "gamma": pd.DataFrame(gamma, index=sites, columns=features),
        "delta": pd.DataFrame(delta, index=sites, columns=features),
        "age0": age0,
        "age_quadratic": float(age_quadratic),
        "site_dx_prop": pd.Series(dx_props, index=sites, name="dx_prop"),
        "site_age_mean": pd.Series(age0 + shifts, index=sites, name="age_mean"),
        "clean": clean_table,
        "traveling": traveling,
        "traveling_clean": traveling_clean,
        "seed": seed,
        "params": {
            "n_sites": n_sites, "n_per_site": sizes.tolist(), "n_features": n_features,
            "feature_correlation": feature_correlation,
            "scan_noise_fraction": scan_noise_fraction, "site_location": site_location,
            "site_location_spread": site_location_spread, "site_scale": site_scale,
            "site_scale_spread": site_scale_spread, "age_range": tuple(age_range),
            "age_site_shift": age_site_shift, "dx_prop_range": (lo, hi),
            "n_traveling": n_traveling, "age_quadratic": float(age_quadratic),
            "sex_effect": float(sex_effect), "measure": measure,
        },
    }
    return table, truth
