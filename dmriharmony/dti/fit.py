"""Diffusion tensor fitting with DIPY and the scalar maps derived from it.

Tensor model: S(b, g) = S0 exp(-b g^T D g) (Basser, Mattiello & LeBihan, Biophys. J. 1994).
Scalar maps from the eigenvalues l1 >= l2 >= l3 (Basser & Pierpaoli, JMR B 1996):
MD = (l1 + l2 + l3) / 3, AD = l1, RD = (l2 + l3) / 2,
FA = sqrt(3/2) * |l - MD| / |l|.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from dipy.core.gradients import GradientTable
from dipy.reconst.dti import TensorModel

#: accepted ``method`` names -> DIPY ``fit_method``.
FIT_METHODS = {"wls": "WLS", "ols": "OLS", "nlls": "NLLS", "restore": "RESTORE"}


@dataclass
class TensorMaps:
    """Maps of a tensor fit on the voxel grid of the input (zeros outside the mask).

    Attributes
    ----------
    fa, md, ad, rd
        Scalar maps; diffusivities in mm^2/s.
    v1
        Principal eigenvector, shape (..., 3).
    tensor
        Lower-triangular tensor elements (Dxx, Dxy, Dyy, Dxz, Dyz, Dzz), shape (..., 6),
        DIPY's order.
    s0
        Fitted non-diffusion-weighted signal.
    qc
        Quality-control figures (see :func:`tensor_qc`).
    """

    fa: np.ndarray
    md: np.ndarray
    ad: np.ndarray
    rd: np.ndarray
    v1: np.ndarray
    tensor: np.ndarray
    s0: np.ndarray
    qc: dict = field(default_factory=dict)


def estimate_sigma_b0(
    data: np.ndarray, bvals: np.ndarray, mask: np.ndarray, b0_threshold: float = 50.0
) -> float | None:
    """Noise standard deviation from repeated b=0 volumes.

    The pooled within-voxel standard deviation across the b=0 repeats, averaged (as a
    variance) over the mask. Returns ``None`` with fewer than two b=0 volumes.
    """
    idx = np.flatnonzero(np.asarray(bvals) <= b0_threshold)
    if idx.size < 2 or not mask.any():
        return None
    b0 = np.asarray(data[mask][:, idx], np.float64)
    return float(np.sqrt(np.mean(np.var(b0, axis=1, ddof=1))))


def _residual_sigma(signal: np.ndarray, predicted: np.ndarray, n_params: int = 7) -> float:
    """Noise SD from regression residuals: median over voxels of sqrt(RSS / (N - p))."""
    dof = max(signal.shape[-1] - n_params, 1)
    rss = np.sum((signal - predicted) ** 2, axis=-1)
    return float(np.median(np.sqrt(rss / dof)))


def _fit_voxels(gtab: GradientTable, signal: np.ndarray, method: str, sigma: float | None):
    kwargs = {"return_S0_hat": True}
    if method == "RESTORE":
        kwargs["sigma"] = sigma
    model = TensorModel(gtab, fit_method=method, **kwargs)
    return model.fit(signal)


def fit_tensor(
    data: np.ndarray,
    gtab: GradientTable,
    mask: np.ndarray,
    *,
    method: str = "wls",
    outlier_threshold: float = 3.0,
) -> TensorMaps:
    """Fit the diffusion tensor in every mask voxel with DIPY's ``TensorModel``.

    Parameters
    ----------
    data
        4-D DWI series whose volumes match ``gtab`` (select shells first).
    gtab
        DIPY gradient table.
    mask
        Boolean 3-D mask; only these voxels are fitted.
    method
        ``"wls"`` (weighted linear least squares, Veraart et al., NeuroImage 2013; default),
        ``"ols"``, ``"nlls"`` (non-linear least squares) or ``"restore"`` (robust outlier
        rejection, Chang, Jones & Pierpaoli, MRM 2005; needs the noise SD, estimated from the
        b=0 repeats or, with a single b=0, from the residuals of a WLS fit).
    outlier_threshold
        A measurement is counted as an outlier in the QC when its residual exceeds this many
        noise SDs.

    Returns
    -------
    TensorMaps
    """
    key = method.lower()
    if key not in FIT_METHODS:
        raise ValueError(f"unknown tensor fit method {method!r}; choose one of {list(FIT_METHODS)}")
    dipy_method = FIT_METHODS[key]
    data = np.asarray(data)
    mask = np.asarray(mask, bool)
    if data.ndim != 4 or mask.shape != data.shape[:3]:
        raise ValueError(f"data {data.shape} and mask {mask.shape} do not match")
    if data.shape[-1] != len(gtab.bvals):
        raise ValueError(f"{data.shape[-1]} volumes but {len(gtab.bvals)} gradients")
    shape = data.shape[:3]
    signal = np.asarray(data[mask], np.float64)
    signal = np.clip(signal, 1e-6, None)  # log-linear fits need positive signal

    sigma = estimate_sigma_b0(data, gtab.bvals, mask)
    sigma_method = "b0-repeats"
    if sigma is None and signal.shape[0]:
        pilot = _fit_voxels(gtab, signal, "WLS", None)
        sigma = _residual_sigma(signal, pilot.predict(gtab, S0=pilot.S0_hat))
        sigma_method = "wls-residuals"
        if dipy_method == "WLS":
            tfit = pilot
    if dipy_method == "RESTORE" and not sigma:
        sigma = 1e-3 * float(np.median(signal)) if signal.size else 1.0
    if signal.shape[0] == 0:
        raise ValueError("the brain mask is empty: nothing to fit")
    if not (sigma_method == "wls-residuals" and dipy_method == "WLS"):
        tfit = _fit_voxels(gtab, signal, dipy_method, sigma)

    evals = np.nan_to_num(tfit.evals)
    fa = np.clip(np.nan_to_num(tfit.fa), 0.0, 1.0)
    md = evals.mean(axis=-1)
    ad = evals[:, 0]
    rd = evals[:, 1:].mean(axis=-1)
    v1 = np.nan_to_num(tfit.evecs[..., 0])
    tensor = np.nan_to_num(tfit.lower_triangular())
    s0 = np.nan_to_num(np.asarray(tfit.S0_hat, np.float64))

    pred = np.nan_to_num(tfit.predict(gtab, S0=s0))
    qc = tensor_qc(signal, pred, gtab, sigma, outlier_threshold)
    qc.update(
        sigma_method=sigma_method,
        fit_method=key,
        fa_mean=float(np.mean(fa)),
        md_mean=float(np.mean(md)),
        nonpositive_eigen_fraction=float(np.mean(np.any(evals <= 0, axis=-1))),
    )

    def scatter(values: np.ndarray) -> np.ndarray:
        out = np.zeros(shape + values.shape[1:], np.float32)
        out[mask] = values
        return out

    return TensorMaps(
        fa=scatter(fa), md=scatter(md), ad=scatter(ad), rd=scatter(rd), v1=scatter(v1),
        tensor=scatter(tensor), s0=scatter(s0), qc=qc,
    )


def tensor_qc(
    signal: np.ndarray,
    predicted: np.ndarray,
    gtab: GradientTable,
    sigma: float | None,
    outlier_threshold: float = 3.0,
) -> dict:
    """Quality-control figures of a tensor fit over the fitted voxels.

    Returns
    -------
    dict
        ``n_voxels``; ``n_volumes``; ``sigma`` (noise SD); ``snr`` -- median b=0 signal over the
        mask divided by ``sigma`` (the "SNR of the b0" of e.g. DTIPrep/eddy QC);
        ``residual_rmse`` -- median over voxels of the RMS fit residual relative to the fitted
        S0; ``outlier_fraction`` -- fraction of diffusion-weighted measurements whose residual
        exceeds ``outlier_threshold`` noise SDs (the RESTORE criterion, Chang et al. 2005).
    """
    b0 = gtab.b0s_mask
    resid = signal - predicted
    s0 = np.mean(signal[:, b0], axis=1)
    s0_safe = np.where(s0 > 0, s0, np.nan)
    rel_rmse = np.sqrt(np.mean(resid**2, axis=1)) / s0_safe
    snr = float(np.median(s0) / sigma) if sigma else float("nan")
    if sigma:
        outliers = float(np.mean(np.abs(resid[:, ~b0]) > outlier_threshold * sigma))
    else:
        outliers = float("nan")
    return {
        "n_voxels": int(signal.shape[0]),
        "n_volumes": int(signal.shape[1]),
        "sigma": float(sigma) if sigma else float("nan"),
        "snr": snr,
        "residual_rmse": float(np.nanmedian(rel_rmse)),
        "outlier_fraction": outliers,
    }
