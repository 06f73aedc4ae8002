"""DTI stage: gradients, brain mask, optional denoising/Gibbs removal, DIPY tensor fit, QC.

Plain functions, arrays in and arrays out (:mod:`~dmriharmony.dti.fit`,
:mod:`~dmriharmony.dti.mask`, :mod:`~dmriharmony.dti.denoise`,
:mod:`~dmriharmony.dti.gradients`), plus file-level steps in :mod:`~dmriharmony.dti.pipeline`
that the Nipype interfaces wrap, :mod:`~dmriharmony.dti.synthetic` (small tensor-field BIDS
datasets for tests) and :mod:`~dmriharmony.dti.accuracy` (errors against simulator ground
truth). No Nipype, no CLI here.
"""

from __future__ import annotations

from dmriharmony.dti.denoise import DENOISE_METHODS, denoise, remove_gibbs
from dmriharmony.dti.fit import FIT_METHODS, TensorMaps, fit_tensor, tensor_qc
from dmriharmony.dti.gradients import (
    make_gtab,
    read_bvals,
    read_bvecs,
    round_bvals,
    select_shells,
    shells,
)
from dmriharmony.dti.io import load_dwi, save_nifti, validate_dwi_files
from dmriharmony.dti.mask import brain_mask, mean_b0

__all__ = [
    "DENOISE_METHODS", "FIT_METHODS", "TensorMaps", "brain_mask", "denoise", "fit_tensor",
    "load_dwi", "make_gtab", "mean_b0", "read_bvals", "read_bvecs", "remove_gibbs",
    "round_bvals", "save_nifti", "select_shells", "shells", "tensor_qc", "validate_dwi_files",
]
