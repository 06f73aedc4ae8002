"""Diffusion tensor fitting with DIPY and the scalar maps derived from it.

Tensor model: S(b, g) = S0 exp(-b g^T D g) (Basser, Mattiello & LeBihan, Biophys. J. 1994).
Scalar maps from the eigenvalues l1 >= l2 >= l3 (Basser & Pierpaoli, JMR B 1996):
MD = (l1 + l2 + l3) / 3, AD = l1, RD = (l2 + l3) / 2,
FA = sqrt(3/2) * |l - MD| / |l|.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from dipy.core.gradients import GradientTable
from dipy.reconst.dti import TensorModel
from tqdm import tqdm

LOGGER = logging.getLogger("dmriharmony.dti")

#: accepted ``method`` names -> DIPY ``fit_method``.
FIT_METHODS = {"wls": "WLS", "ols": "OLS", "nlls": "NLLS", "restore": "RESTORE"}
#: voxels fitted per DIPY call (bounds memory: ~ chunk x volumes x 8 bytes x a few copies).
CHUNK_VOXELS = 50_000


@dataclass
class TensorMaps:
    """Maps of a tensor fit on the voxel grid of the input (zeros outside the mask).

    Attributes
    ----------
    fa, md, ad, rd
        Scalar maps; diffusivities in mm^2/s (b-values in s/mm^2).
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

    The within-voxel variance across the b=0 repeats (ddof=1), averaged over the mask, square
    root: the "difference/repeat" method of SNR estimation (Dietrich et al., JMRI 2007). At the
    SNR of b=0 images the Rician signal is close to Gaussian, so this is the Gaussian sigma.
    Returns ``None`` with fewer than two b=0 volumes.
    """
    idx = np.flatnonzero(np.asarray(bvals) <= b0_threshold)
    if idx.size < 2 or not mask.any():
        return None
    b0 = np.asarray(data[..., idx][mask], np.float64)
    return float(np.sqrt(np.mean(np.var(b0, axis=1, ddof=1))))


def _residual_sigma(signal: np.ndarray, predicted: np.ndarray, n_params: int = 7) -> np.ndarray:
    """Per-voxel noise SD from regression residuals: sqrt(RSS / (N - p)), p = 7 tensor terms."""
    dof = max(signal.shape[-1] - n_params, 1)
    rss = np.sum((signal - predicted) ** 2, axis=-1)
    return np.sqrt(rss / dof)


def _model(gtab: GradientTable, method: str, sigma: float | None) -> TensorModel:
    kwargs: dict = {"return_S0_hat": True}
    if method == "RESTORE":
        kwargs["sigma"] = sigma
    return TensorModel(gtab, fit_method=method, **kwargs)


def _pilot_sigma(gtab: GradientTable, signal: np.ndarray, seed: int = 0,
                 n_max: int = 20_000) -> float:
    """Noise SD from the residuals of a WLS fit of up to ``n_max`` voxels (seeded subsample)."""
    idx = np.arange(signal.shape[0])
    if idx.size > n_max:
        idx = np.sort(np.random.default_rng(seed).choice(idx, n_max, replace=False))
    sub = signal[idx]
    pilot = _model(gtab, "WLS", None).fit(sub)
    pred = pilot.predict(gtab, S0=pilot.S0_hat)
    return float(np.median(_residual_sigma(sub, np.nan_to_num(pred))))


def fit_tensor(
    data: np.ndarray,
    gtab: GradientTable,
    mask: np.ndarray,
    *,
    method: str = "wls",
    outlier_threshold: float = 3.0,
    chunk_voxels: int = CHUNK_VOXELS,
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
        noise SDs (RESTORE's criterion).
    chunk_voxels
        Voxels per DIPY call (memory bound); results do not depend on it.

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
    if not mask.any():
        raise ValueError("the brain mask is empty: nothing to fit")
    shape = data.shape[:3]
    signal = data[mask]  # (n_voxels, n_volumes) in the input dtype; float64 per chunk
    n_vox = signal.shape[0]

    sigma = estimate_sigma_b0(data, gtab.bvals, mask)
    sigma_method = "b0-repeats"
    if sigma is None:
        sigma = _pilot_sigma(gtab, np.clip(np.asarray(signal, np.float64), 1e-6, None))
        sigma_method = "wls-residuals"
    if dipy_method == "RESTORE" and not sigma:
        sigma = 1e-3 * float(np.median(signal))
    model = _model(gtab, dipy_method, sigma)

    fa = np.empty(n_vox)
    evals = np.empty((n_vox, 3))
    v1 = np.empty((n_vox, 3))
    tensor = np.empty((n_vox, 6))
    s0 = np.empty(n_vox)
    qc_acc = _QCAccumulator(n_vox, gtab, sigma, outlier_threshold)
    step = max(int(chunk_voxels), 1)
    starts = range(0, n_vox, step)
    for start in tqdm(starts, desc=f"tensor fit ({key})", unit="chunk",
                      disable=True if len(starts) < 4 else None, leave=False):
        sl = slice(start, start + step)
        # log-linear fits need positive signal
        chunk = np.clip(np.asarray(signal[sl], np.float64), 1e-6, None)
        tfit = model.fit(chunk)
        fa[sl] = np.clip(np.nan_to_num(tfit.fa), 0.0, 1.0)
        evals[sl] = np.nan_to_num(tfit.evals)
        v1[sl] = np.nan_to_num(tfit.evecs[..., :, 0])
        tensor[sl] = np.nan_to_num(tfit.lower_triangular())
        s0[sl] = np.nan_to_num(np.asarray(tfit.S0_hat, np.float64))
        qc_acc.add(sl, chunk, np.nan_to_num(tfit.predict(gtab, S0=s0[sl])))

    md = evals.mean(axis=-1)
    ad = evals[:, 0]
    rd = evals[:, 1:].mean(axis=-1)
    qc = qc_acc.result()
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


class _QCAccumulator:
    """:func:`tensor_qc` computed chunk by chunk (no full copy of the predicted signal)."""

    def __init__(self, n_vox: int, gtab: GradientTable, sigma: float | None,
                 outlier_threshold: float):
        self.b0 = gtab.b0s_mask
        self.sigma = sigma
        self.threshold = outlier_threshold
        self.s0 = np.empty(n_vox)
        self.rel_rmse = np.empty(n_vox)
        self.n_out = 0
        self.n_dw = 0
        self.n_vol = len(gtab.bvals)

    def add(self, sl: slice, signal: np.ndarray, predicted: np.ndarray) -> None:
        resid = signal - predicted
        s0 = np.mean(signal[:, self.b0], axis=1)
        self.s0[sl] = s0
        self.rel_rmse[sl] = np.sqrt(np.mean(resid**2, axis=1)) / np.where(s0 > 0, s0, np.nan)
        if self.sigma:
            dw = np.abs(resid[:, ~self.b0])
            self.n_out += int(np.sum(dw > self.threshold * self.sigma))
            self.n_dw += dw.size

    def result(self) -> dict:
        sigma = self.sigma
        return {
            "n_voxels": int(self.s0.size),
            "n_volumes": int(self.n_vol),
            "sigma": float(sigma) if sigma else float("nan"),
            "snr": float(np.median(self.s0) / sigma) if sigma else float("nan"),
            "residual_rmse": float(np.nanmedian(self.rel_rmse)),
            "outlier_fraction": self.n_out / self.n_dw if sigma and self.n_dw else float("nan"),
        }


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
        mask divided by ``sigma`` (the b0 SNR reported by e.g. DTIPrep / FSL eddy QC);
        ``residual_rmse`` -- median over voxels of the RMS fit residual relative to the mean
        b=0 signal; ``outlier_fraction`` -- fraction of diffusion-weighted measurements whose
        residual exceeds ``outlier_threshold`` noise SDs (the RESTORE criterion, Chang et al.
        2005).
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
