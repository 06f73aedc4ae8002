"""Nipype interfaces over :mod:`dmriharmony.harmonizers` (thin wrappers, no science here).

Every interface reads a subjects x features table (TSV, one row per scan: an ENIGMA ROI table or
skeleton values), optionally joined with a covariates TSV (e.g. ``participants.tsv``), calls the
harmonizer and writes its results as TSV (atomically: temporary file, then ``os.replace``):

- :class:`ComBatHarmonize`, :class:`CovBatHarmonize`, :class:`ComBatGAMHarmonize`: fit the model
  on the table and write the harmonized table (``out_file``), the fitted model (``model_file``,
  reloadable by :class:`ApplyHarmonizer` for scans that arrive later) and the effect estimates of
  the biological terms before and after harmonization (``effects_file``);
- :class:`ApplyHarmonizer`: harmonize a new table with a saved model;
- :class:`MetaAnalysis`: per-site effect sizes and their pooled estimates (``effects_file``,
  ``site_effects_file``);
- :class:`MixedModel`: the mixed-effects mega-analysis, one row per feature (``effects_file``).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("NIPYPE_NO_ET", "1")  # no version check over the network

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from nipype.interfaces.base import (  # noqa: E402
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from dmriharmony._fs import set_default_mode  # noqa: E402
from dmriharmony.errors import HarmonizationError  # noqa: E402

__all__ = [
    "ApplyHarmonizer",
    "ComBatGAMHarmonize",
    "ComBatHarmonize",
    "CovBatHarmonize",
    "MetaAnalysis",
    "MixedModel",
]

#: Columns never taken as features when ``features`` is not given.
ID_COLUMNS = ("subject", "participant_id", "session", "session_id", "run", "scan")

#: Harmonizer families: name -> (module, class) in :mod:`dmriharmony.harmonizers`.
HARMONIZERS = {"combat": "ComBat", "covbat": "CovBat", "combat_gam": "ComBatGAM"}


# --------------------------------------------------------------------------- I/O glue


def _read_tsv(path: str, what: str) -> pd.DataFrame:
    try:
        return pd.read_csv(path, sep="\t")
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise HarmonizationError(f"cannot read {what} {path}: {err}") from err


def load_table(
    in_file: str, covariates_file: str | None = None, join_on: str = "subject"
) -> tuple[pd.DataFrame, list[str]]:
    """Read the table TSV, left-join the covariates TSV on ``join_on`` if given.

    Returns the merged table and the names of the columns that came from the covariates file
    (never features). A scan without covariates is an error naming it.
    """
    table = _read_tsv(in_file, "table")
    if covariates_file is None:
        return table, []
    cov = _read_tsv(covariates_file, "covariates file")
    for df, name in ((table, in_file), (cov, covariates_file)):
        if join_on not in df.columns:
            raise HarmonizationError(f"column {join_on!r} not found in {name}")
    if cov[join_on].duplicated().any():
        dup = cov.loc[cov[join_on].duplicated(), join_on].iloc[0]
        raise HarmonizationError(f"{join_on} {dup!r} appears twice in {covariates_file}")
    extra = [c for c in cov.columns if c != join_on and c not in table.columns]
    merged = table.merge(cov[[join_on, *extra]], on=join_on, how="left", validate="m:1")
    missing = ~table[join_on].isin(cov[join_on])
    if missing.any():
        raise HarmonizationError(f"{join_on} {table.loc[missing, join_on].iloc[0]!r} of {in_file} "
                                 f"has no row in {covariates_file}")
    return merged, extra


def resolve_features(
    table: pd.DataFrame, features: Sequence[str] | None, exclude: Sequence[str]
) -> list[str]:
    """The given features (checked), or every numeric column not in ``exclude`` / ID columns."""
    if features:
        feats = list(features)
        missing = [f for f in feats if f not in table.columns]
        if missing:
            raise HarmonizationError(f"feature column {missing[0]!r} not found in the table")
        return feats
    skip = set(exclude) | set(ID_COLUMNS)
    feats = [c for c in table.columns if c not in skip
             and pd.api.types.is_numeric_dtype(table[c])
             and not pd.api.types.is_bool_dtype(table[c])]
    if not feats:
        raise HarmonizationError("no numeric feature columns found in the table")
    return feats


def write_tsv(df: pd.DataFrame, path: str | os.PathLike, index: bool = False) -> str:
    """Write ``df`` as TSV atomically (temporary file in the same folder, then ``os.replace``)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as fh:
            df.to_csv(fh, sep="\t", index=index, na_rep="n/a")
        set_default_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return str(path)


def _harmonizer_class(kind: str) -> type:
    from dmriharmony import harmonizers

    if kind not in HARMONIZERS:
        raise HarmonizationError(f"unknown harmonizer {kind!r}: use one of {sorted(HARMONIZERS)}")
    return getattr(harmonizers, HARMONIZERS[kind])


def _desc(kind: str) -> str:
    """BIDS ``desc-`` label of a harmonizer family (alphanumeric only: ``combat_gam`` ->
    ``combatgam``)."""
    return "".join(ch for ch in kind if ch.isalnum())


def _opt(value: Any, default: Any = None) -> Any:
    return value if isdefined(value) else default


def _effects_table(
    before: pd.DataFrame, after: pd.DataFrame, features: list[str], effect: str | None,
    covariates: list[str],
) -> pd.DataFrame:
    """Per-feature estimates of the biological terms before/after (pooled OLS, no site term)."""
    from dmriharmony.evaluation import effect_preservation

    terms = ([effect] if effect and effect in before.columns else []) + \
        [c for c in covariates if c != effect]
    if not terms:
        return pd.DataFrame(columns=["metric", "feature", "before", "after"])
    res = effect_preservation(before, after, features, effect=terms[0], covariates=terms[1:])
    return res[["metric", "feature", "before", "after"]]


def _site_effects_table(model: Any, features: list[str]) -> pd.DataFrame | None:
    """Tidy (site, feature) table of a ComBat-family model's ``gamma_hat_``, ``delta_hat_``,
    ``gamma_star_``, ``delta_star_`` (standardised units); ``None`` if the model has none."""
    names = ("gamma_hat_", "delta_hat_", "gamma_star_", "delta_star_")
    if not all(hasattr(model, n) for n in names) or not hasattr(model, "sites_"):
        return None
    sites = [str(s) for s in np.asarray(model.sites_)]
    out = pd.DataFrame({"site": np.repeat(sites, len(features)),
                        "feature": np.tile(features, len(sites))})
    for n in names:
        arr = np.asarray(getattr(model, n), dtype=float)
        if arr.shape != (len(sites), len(features)):
            return None
        out[n.rstrip("_")] = arr.reshape(-1)
    return out


# --------------------------------------------------------------------------- specs


class _TableInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True,
                   desc="subjects x features table (TSV, one row per scan)")
    covariates_file = File(exists=True, desc="covariates TSV (e.g. participants.tsv) joined to "
                                             "the table on join_on")
    join_on = traits.Str("subject", usedefault=True, desc="key column of the join")
    site = traits.Str("site", usedefault=True, desc="site (scanner) column")
    covariates = traits.List(traits.Str, desc="biological covariates (protected / adjusted for)")
    features = traits.List(traits.Str, desc="feature columns (default: every numeric column "
                                            "that is not a site, covariate, ID or exclude column)")
    exclude = traits.List(traits.Str, desc="numeric columns that are not features")


class _HarmonizeInputSpec(_TableInputSpec):
    effect = traits.Str("dx", usedefault=True,
                        desc="term listed first in effects_file (skipped if absent)")
    options = traits.Dict(desc="further keyword arguments of the harmonizer constructor")


class _HarmonizeOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="harmonized table (TSV, same rows and columns)")
    model_file = File(exists=True, desc="fitted model, for ApplyHarmonizer")
    effects_file = File(exists=True, desc="effect estimates per feature before/after (TSV)")
    site_effects_file = File(exists=True, desc="estimated site location/scale per site and "
                                               "feature, before/after empirical Bayes (TSV)")


class _HarmonizeBase(SimpleInterface):
    """Fit a harmonizer on the table and harmonize it (subclasses set ``kind``)."""

    input_spec = _HarmonizeInputSpec
    output_spec = _HarmonizeOutputSpec
    kind = "combat"

    def _options(self) -> dict[str, Any]:
        return dict(_opt(self.inputs.options, {}))

    def _run_interface(self, runtime):
        inp = self.inputs
        table, cov_cols = load_table(inp.in_file, _opt(inp.covariates_file),
                                     inp.join_on)
        covariates = list(_opt(inp.covariates, []))
        for c in [inp.site, *covariates]:
            if c not in table.columns:
                raise HarmonizationError(f"column {c!r} not found in {inp.in_file}")
        features = resolve_features(
            table, _opt(inp.features),
            [inp.site, inp.join_on, inp.effect, *covariates, *cov_cols, *_opt(inp.exclude, [])])
        cls = _harmonizer_class(self.kind)
        model = cls(**self._options())
        X = table[features].astype(float)
        sites = table[inp.site].to_numpy()
        cov = table[covariates] if covariates else None
        model.fit(X, sites, cov)
        Xh = np.asarray(model.transform(X, sites, cov), dtype=float)
        out = _read_tsv(inp.in_file, "table")
        out[features] = Xh
        cwd = Path(runtime.cwd)
        self._results["out_file"] = write_tsv(out, cwd / f"roi_table_desc-{_desc(self.kind)}.tsv")
        model_path = cwd / f"model_desc-{_desc(self.kind)}{getattr(cls, 'file_suffix', '.npz')}"
        model.save(model_path)
        self._results["model_file"] = str(model_path)
        after = table.copy()
        after[features] = Xh
        eff = _effects_table(table, after, features, inp.effect, covariates)
        self._results["effects_file"] = write_tsv(eff, cwd / f"effects_desc-{_desc(self.kind)}.tsv")
        site_eff = _site_effects_table(model, features)
        if site_eff is not None:
            self._results["site_effects_file"] = write_tsv(
                site_eff, cwd / f"site_effects_desc-{_desc(self.kind)}.tsv")
        return runtime


class _ComBatInputSpec(_HarmonizeInputSpec):
    parametric = traits.Bool(True, usedefault=True, desc="parametric empirical Bayes priors")
    mean_only = traits.Bool(False, usedefault=True, desc="adjust site locations only")
    eb = traits.Bool(True, usedefault=True, desc="empirical Bayes shrinkage (False: per-site "
                                                 "moments)")
    ref_site = traits.Str(desc="reference site left unchanged (others mapped onto it)")


class ComBatHarmonize(_HarmonizeBase):
    """ComBat (Johnson et al. 2007; Fortin et al. 2017): :class:`~dmriharmony.harmonizers.ComBat`.

    >>> from dmriharmony.interfaces.harmonizers import ComBatHarmonize
    >>> node = ComBatHarmonize(in_file="roi_table.tsv", covariates=["age", "sex", "dx"])
    """

    input_spec = _ComBatInputSpec
    kind = "combat"

    def _options(self) -> dict[str, Any]:
        opts = {"parametric": self.inputs.parametric, "mean_only": self.inputs.mean_only,
                "eb": self.inputs.eb, "ref_site": _opt(self.inputs.ref_site)}
        opts.update(_opt(self.inputs.options, {}))
        return opts


class CovBatHarmonize(_HarmonizeBase):
    """CovBat (Chen et al., *Hum Brain Mapp* 2022): ComBat then covariance harmonization,
    :class:`~dmriharmony.harmonizers.CovBat` (its parameters through ``options``)."""

    kind = "covbat"


class _ComBatGAMInputSpec(_HarmonizeInputSpec):
    smooth = traits.List(traits.Str, ["age"], usedefault=True,
                         desc="covariates with a smooth (spline) effect")


class ComBatGAMHarmonize(_HarmonizeBase):
    """ComBat-GAM (Pomponio et al., *NeuroImage* 2020): smooth covariate effects,
    :class:`~dmriharmony.harmonizers.ComBatGAM`."""

    input_spec = _ComBatGAMInputSpec
    kind = "combat_gam"

    def _options(self) -> dict[str, Any]:
        opts = {"smooth": list(self.inputs.smooth)}
        opts.update(_opt(self.inputs.options, {}))
        return opts


class _ApplyInputSpec(_TableInputSpec):
    model_file = File(exists=True, mandatory=True, desc="model written by a *Harmonize node")
    harmonizer = traits.Enum(*HARMONIZERS, usedefault=True, desc="family of the saved model")


class _ApplyOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="harmonized table (TSV)")


class ApplyHarmonizer(SimpleInterface):
    """Harmonize scans that arrive later with a saved model, using their own covariates."""

    input_spec = _ApplyInputSpec
    output_spec = _ApplyOutputSpec

    def _run_interface(self, runtime):
        inp = self.inputs
        table, cov_cols = load_table(inp.in_file, _opt(inp.covariates_file), inp.join_on)
        covariates = list(_opt(inp.covariates, []))
        for c in [inp.site, *covariates]:
            if c not in table.columns:
                raise HarmonizationError(f"column {c!r} not found in {inp.in_file}")
        features = resolve_features(
            table, _opt(inp.features),
            [inp.site, inp.join_on, *covariates, *cov_cols, *_opt(inp.exclude, [])])
        model = _harmonizer_class(inp.harmonizer).load(inp.model_file)
        cov = table[covariates] if covariates else None
        Xh = model.transform(table[features].astype(float), table[inp.site].to_numpy(), cov)
        out = _read_tsv(inp.in_file, "table")
        out[features] = np.asarray(Xh, dtype=float)
        self._results["out_file"] = write_tsv(
            out, Path(runtime.cwd) / f"roi_table_desc-{_desc(inp.harmonizer)}.tsv")
        return runtime


class _MetaInputSpec(_TableInputSpec):
    effect = traits.Str("dx", usedefault=True, desc="term whose per-site effect is pooled")
    measure = traits.Enum("d", "z", "beta", usedefault=True,
                          desc="Hedges' g, Fisher z of the partial r, or standardised beta")
    method = traits.Enum("REML", "FE", "DL", "HE", "SJ", "PM", "ML", usedefault=True,
                         desc="tau^2 estimator (FE: fixed effect)")
    knha = traits.Bool(False, usedefault=True, desc="Knapp-Hartung adjustment")
    weighting = traits.Enum("inverse_variance", "sample_size", usedefault=True)


class _MetaOutputSpec(TraitedSpec):
    effects_file = File(exists=True, desc="pooled effect per feature (estimate, CI, tau2, I2, "
                                          "Q, p, FDR)")
    site_effects_file = File(exists=True, desc="per-site, per-feature effect sizes (tidy)")


class MetaAnalysis(SimpleInterface):
    """Meta-analysis of per-site effects (:func:`dmriharmony.harmonizers.meta.meta_analyze`)."""

    input_spec = _MetaInputSpec
    output_spec = _MetaOutputSpec

    def _run_interface(self, runtime):
        from dmriharmony.harmonizers import meta

        inp = self.inputs
        table, cov_cols = load_table(inp.in_file, _opt(inp.covariates_file), inp.join_on)
        covariates = [c for c in _opt(inp.covariates, []) if c != inp.effect]
        features = resolve_features(
            table, _opt(inp.features),
            [inp.site, inp.join_on, inp.effect, *covariates, *cov_cols, *_opt(inp.exclude, [])])
        pooled, per_site = meta.meta_analyze(
            table, features=features, site=inp.site, effect=inp.effect, covariates=covariates,
            measure=inp.measure, method=inp.method, knha=inp.knha, weighting=inp.weighting,
            return_effects=True)
        cwd = Path(runtime.cwd)
        self._results["effects_file"] = write_tsv(pooled, cwd / "effects_desc-meta.tsv",
                                                  index=True)
        self._results["site_effects_file"] = write_tsv(per_site, cwd / "site_effects.tsv")
        return runtime


class _MixedInputSpec(_TableInputSpec):
    fixed = traits.Str(desc="fixed effects, e.g. 'age + sex + dx' (default: the covariates)")
    effect = traits.Str("dx", usedefault=True, desc="term reported (estimate, t, p, d)")
    reml = traits.Bool(True, usedefault=True, desc="REML (else ML)")
    random_slope = traits.Str(desc="numeric column with a random slope per site")
    d_formula = traits.Enum("nakagawa", "t", "beta", "total", usedefault=True,
                            desc="Cohen's d of the effect term (see MixedFit.d)")


class _MixedOutputSpec(TraitedSpec):
    effects_file = File(exists=True, desc="per feature: effect estimate, SE, t, df, p, d, site "
                                          "and residual variance, ICC")
    coef_file = File(exists=True, desc="all fixed-effect coefficients (features x terms)")


class MixedModel(SimpleInterface):
    """Mixed-effects mega-analysis, site as a random effect
    (:func:`dmriharmony.harmonizers.mixed.fit`)."""

    input_spec = _MixedInputSpec
    output_spec = _MixedOutputSpec

    def _run_interface(self, runtime):
        from dmriharmony.harmonizers import mixed

        inp = self.inputs
        table, cov_cols = load_table(inp.in_file, _opt(inp.covariates_file), inp.join_on)
        covariates = list(_opt(inp.covariates, []))
        fixed = _opt(inp.fixed) or " + ".join(dict.fromkeys([inp.effect, *covariates]))
        terms = [t.strip() for t in fixed.replace(":", "+").replace("*", "+").split("+")]
        model_cols = [t[2:-1] if t.startswith("C(") else t for t in terms if t and t != "1"]
        features = resolve_features(
            table, _opt(inp.features),
            [inp.site, inp.join_on, inp.effect, *covariates, *model_cols, *cov_cols,
             *_opt(inp.exclude, [])])
        fit = mixed.fit(table, features, fixed=fixed, site=inp.site, reml=inp.reml,
                        random_slope=_opt(inp.random_slope))
        res = fit.to_frame()
        if inp.effect in table.columns:
            res = fit.to_frame(inp.effect)
            res["d"] = fit.d(inp.effect, formula=inp.d_formula).to_numpy()
        cwd = Path(runtime.cwd)
        self._results["effects_file"] = write_tsv(res, cwd / "effects_desc-mixed.tsv", index=True)
        coef = fit.coef.copy()
        coef.index.name = "feature"
        self._results["coef_file"] = write_tsv(coef, cwd / "coef_desc-mixed.tsv", index=True)
        return runtime
