"""Evaluation of harmonizers: is the scanner gone, is the biology kept?

- :func:`~dmriharmony.evaluation.site_prediction.site_prediction`: cross-validated site
  classification, harmonizer fitted inside each training fold (no leakage);
- :func:`~dmriharmony.evaluation.effects.effect_preservation`: effect estimates (Cohen's d, slopes)
  before vs after vs truth;
- :func:`~dmriharmony.evaluation.traveling.traveling_agreement`: traveling-subject between-site
  CV and RMSE;
- :func:`~dmriharmony.evaluation.evaluate.evaluate_harmonizer` and
  :func:`~dmriharmony.evaluation.evaluate.compare_harmonizers`: all of it as one tidy table;
- :mod:`~dmriharmony.evaluation.estimators`: meta-analysis and mixed model as effect estimators.

>>> from dmriharmony.simulate.roi_table import simulate_roi_table
>>> from dmriharmony.evaluation import compare_harmonizers, default_harmonizers, summarize
>>> table, truth = simulate_roi_table(seed=0, dx_prop_range=(0.3, 0.7), n_traveling=10)
>>> res = compare_harmonizers(default_harmonizers(), table, truth=truth,
...                           traveling=truth["traveling"])          # doctest: +SKIP
>>> summarize(res)                       # one row per harmonizer  # doctest: +SKIP
"""

from __future__ import annotations

from dmriharmony.evaluation._harmonizer import CovariateSubset, NoHarmonization
from dmriharmony.evaluation.effects import effect_estimates, effect_preservation
from dmriharmony.evaluation.estimators import EffectEstimator, meta_analysis, mixed_model
from dmriharmony.evaluation.evaluate import (
    compare_harmonizers,
    default_harmonizers,
    evaluate_harmonizer,
    summarize,
    to_markdown,
)
from dmriharmony.evaluation.site_prediction import (
    SitePredictionResult,
    make_classifier,
    site_prediction,
)
from dmriharmony.evaluation.traveling import traveling_agreement, traveling_preservation

__all__ = [
    "CovariateSubset",
    "EffectEstimator",
    "NoHarmonization",
    "SitePredictionResult",
    "compare_harmonizers",
    "default_harmonizers",
    "effect_estimates",
    "effect_preservation",
    "evaluate_harmonizer",
    "make_classifier",
    "meta_analysis",
    "mixed_model",
    "site_prediction",
    "summarize",
    "to_markdown",
    "traveling_agreement",
    "traveling_preservation",
]
