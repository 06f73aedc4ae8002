"""Nipype interfaces: thin wrappers over dmriharmony's science functions, one file per family.

- :mod:`dmriharmony.interfaces.dti` -- brain mask, pre-processing, tensor fit
- :mod:`dmriharmony.interfaces.bids` -- BIDS-derivatives writer
- :mod:`dmriharmony.interfaces.tbss` -- registration, skeleton projection, ROI extraction
- :mod:`dmriharmony.interfaces.harmonizers` -- ComBat/CovBat/ComBat-GAM harmonize and apply,
  meta-analysis, mixed model
"""
