"""Nipype interfaces: thin wrappers over dmriharmony's science functions, one file per family.

- :mod:`dmriharmony.interfaces.dti` -- brain mask, pre-processing, tensor fit
- :mod:`dmriharmony.interfaces.bids` -- BIDS-derivatives writer
"""
