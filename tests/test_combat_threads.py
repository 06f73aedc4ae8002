"""The non-parametric EB pair loop gives the same result on any number of threads."""

from __future__ import annotations

import numpy as np
import pytest

from dmriharmony.errors import HarmonizationError
from dmriharmony.harmonizers._combat_eb import nonparametric_eb


def _stats(F: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    n = np.full(F, 40.0)
    mean = rng.normal(0.0, 0.3, F)
    ss = rng.gamma(20.0, 2.0, F)
    return n, mean, ss, mean + rng.normal(0.0, 0.02, F), ss / n


@pytest.mark.parametrize("chunk", [None, 64, 300])
def test_threads_do_not_change_the_result(chunk):
    args = _stats(3000)
    one = nonparametric_eb(*args, n_jobs=1, chunk=chunk)
    two = nonparametric_eb(*args, n_jobs=2, chunk=chunk)
    np.testing.assert_array_equal(one[0], two[0])
    np.testing.assert_array_equal(one[1], two[1])
    # and chunking only regroups rows: agreement with the 128-row single-thread default
    ref = nonparametric_eb(*args, n_jobs=1)
    np.testing.assert_allclose(one[0], ref[0], rtol=1e-12, atol=1e-15)


def test_bad_n_jobs():
    with pytest.raises(HarmonizationError, match="n_jobs"):
        nonparametric_eb(*_stats(10), n_jobs=0)
