"""Run the chosen harmonizers side by side on the group ROI tables and write their outputs.

Two kinds of methods (DESIGN.md, "harmonizers"):

- **data harmonizers** return harmonized values: ComBat (Johnson et al., *Biostatistics* 2007;
  Fortin et al., *NeuroImage* 2017), CovBat (Chen et al., *Hum Brain Mapp* 2022), ComBat-GAM
  (Pomponio et al., *NeuroImage* 2020). Each is fitted on the non-traveling subjects with the
  covariates and the effect protected, then applied to every run (traveling sessions included);
  the model is saved so that a later batch of the same sites is harmonized without refitting
  (:func:`apply_saved_models`). The effect is then estimated on the pooled, harmonized data
  (:func:`dmriharmony.evaluation.effect_estimates` with no site term);
- **effect estimators** never change the data: random-effects meta-analysis of per-site effect
  sizes (ENIGMA's approach; :func:`dmriharmony.harmonizers.meta.meta_analyze`) and the
  mixed-effects mega-analysis with a random site intercept (:func:`dmriharmony.harmonizers.
  mixed.fit`).

``none`` (the raw, pooled data; and the same model with site as a fixed effect) is always
written as the baseline. The evaluation (:func:`dmriharmony.evaluation.compare_harmonizers`)
scores every method on the same folds: site prediction before/after (harmonizer fitted inside
each fold), effect sizes, traveling-subject agreement.

Pure pandas/numpy: no Nipype here (the Nipype interfaces in :mod:`dmriharmony.interfaces.group`
call these functions).
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dmriharmony.errors import HarmonizationError
from dmriharmony.group.table import GroupTable

__all__ = ["DATA_HARMONIZERS", "ESTIMATORS", "KNOWN_HARMONIZERS", "PRECOMPUTED", "Precomputed",
           "align_precomputed", "apply_saved_models",
           "run_methods", "check_harmonizers", "effects_table", "evaluate_methods",
           "harmonize_table", "model_path", "write_tsv"]

LOGGER = logging.getLogger(__name__)


def _combat(ref_site: str | None):
    from dmriharmony.harmonizers import ComBat
    return partial(ComBat, parametric=True, ref_site=ref_site)


def _covbat(ref_site: str | None):
    from dmriharmony.harmonizers import CovBat
    if ref_site is not None:
        raise HarmonizationError("covbat has no reference-site option (neither has the "
                                 "authors' R code); drop --reference-site or covbat")
    return CovBat


def _gam(ref_site: str | None):
    from dmriharmony.harmonizers import ComBatGAM
    return partial(ComBatGAM, smooth=["age"], ref_site=ref_site)


#: data harmonizers: name -> factory(ref_site) -> harmonizer class/partial.
DATA_HARMONIZERS: dict[str, Callable[[str | None], Any]] = {
    "combat": _combat, "covbat": _covbat, "gam": _gam}
#: effect estimators (no harmonized data).
ESTIMATORS = ("meta", "mixed")
#: signal-level harmonizers whose ROI table is made upstream from the DWI (given to
#: :func:`run_methods` as ``precomputed``): RISH (:mod:`dmriharmony.group.rish`) and the
#: site-adversarial VAE (:mod:`dmriharmony.group.vae`).
PRECOMPUTED = ("rish", "vae")
#: methods not available at the group level (none at present).
DWI_LEVEL: dict[str, str] = {}
KNOWN_HARMONIZERS = (*DATA_HARMONIZERS, *ESTIMATORS, *PRECOMPUTED, *DWI_LEVEL)


def check_harmonizers(names: Sequence[str]) -> list[str]:
    """Validate ``--harmonizers`` (order kept, duplicates dropped)."""
    names = [n.strip().lower() for n in names if n.strip()]
    if not names:
        raise HarmonizationError("no harmonizer given (--harmonizers combat,covbat,gam,meta,mixed"
                                 ",rish)")
    usable = (*DATA_HARMONIZERS, *ESTIMATORS, *PRECOMPUTED)
    for n in names:
        if n in DWI_LEVEL:
            raise HarmonizationError(f"harmonizer {n!r}: {DWI_LEVEL[n]}; use "
                                     f"{', '.join(usable)}")
        if n not in usable:
            raise HarmonizationError(f"unknown harmonizer {n!r}; choose from "
                                     f"{', '.join(usable)}")
    return list(dict.fromkeys(names))


def model_path(models_dir: str | Path, harmonizer: str, metric: str) -> Path:
    """Where the model of ``harmonizer`` for ``metric`` is saved."""
    return Path(models_dir) / harmonizer / f"{metric}_model.npz"


def write_tsv(df: pd.DataFrame, path: str | Path, index: bool = False) -> Path:
    """Atomic TSV write with ``n/a`` and a fixed float format (byte-identical reruns)."""
    from dmriharmony.dti.io import atomic_write_bytes

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = df.to_csv(sep="\t", index=index, na_rep="n/a", float_format="%.10g",
                     lineterminator="\n")
    atomic_write_bytes(text.encode(), path)
    return path


def _covariate_frame(df: pd.DataFrame, covariates: Sequence[str]) -> pd.DataFrame:
    return df[list(covariates)].reset_index(drop=True)


def harmonize_table(name: str, table: GroupTable, *, ref_site: str | None = None,
                    models_dir: str | Path | None = None) -> pd.DataFrame:
    """Fit harmonizer ``name`` on ``table.train``; return all rows harmonized (model saved).

    Returns the rows of :meth:`GroupTable.all_rows` with the feature columns replaced.
    """
    if name not in DATA_HARMONIZERS:
        raise HarmonizationError(f"{name!r} is not a data harmonizer")
    if ref_site is not None and ref_site not in table.sites:
        raise HarmonizationError(f"--reference-site {ref_site!r} is not one of the sites "
                                 f"{', '.join(table.sites)}")
    factory = DATA_HARMONIZERS[name](ref_site)
    model = factory()
    tr = table.train
    LOGGER.info("fitting %s on %d %s runs x %d ROIs", name, len(tr), table.metric,
                len(table.features))
    model.fit(tr[table.features].to_numpy(float), tr[table.site].to_numpy(),
              _covariate_frame(tr, table.covariates))
    rows = table.all_rows()
    out = rows.copy()
    out[table.features] = model.transform(rows[table.features].to_numpy(float),
                                          rows[table.site].to_numpy(),
                                          _covariate_frame(rows, table.covariates))
    if models_dir is not None:
        path = model_path(models_dir, name, table.metric)
        path.parent.mkdir(parents=True, exist_ok=True)
        model.save(path)
        meta = {"harmonizer": name, "class": type(model).__name__, "metric": table.metric,
                "features": table.features, "covariates": table.covariates,
                "site": table.site, "sites": table.sites, "reference_site": ref_site}
        from dmriharmony.dti.io import atomic_write_bytes
        atomic_write_bytes((json.dumps(meta, indent=2) + "\n").encode(),
                           path.with_suffix(".json"))
    return out


def apply_saved_models(name: str, table: GroupTable, models_dir: str | Path) -> pd.DataFrame:
    """Harmonize every run of ``table`` with the model saved by an earlier group level."""
    path = model_path(models_dir, name, table.metric)
    meta_path = path.with_suffix(".json")
    if not path.is_file() or not meta_path.is_file():
        raise HarmonizationError(f"{path}: no saved {name} model for {table.metric} "
                                 "(run the group level with this harmonizer first)")
    meta = json.loads(meta_path.read_text())
    from dmriharmony import harmonizers as H

    cls = getattr(H, meta["class"], None)
    if cls is None:
        raise HarmonizationError(f"{meta_path}: unknown model class {meta['class']!r}")
    model = cls.load(path)
    missing = [f for f in meta["features"] if f not in table.all_rows().columns]
    if missing:
        raise HarmonizationError(f"ROI {missing[0]!r} of the saved {name} model is not in the "
                                 "new ROI table")
    rows = table.all_rows()
    for col in meta["covariates"]:
        if col not in rows.columns:
            raise HarmonizationError(f"covariate {col!r} of the saved {name} model is missing")
    unseen = sorted(set(rows[table.site].astype(str)) - set(meta["sites"]))
    if unseen:
        raise HarmonizationError(f"site {unseen[0]!r} was not in the data the saved {name} "
                                 f"model was fitted on ({', '.join(meta['sites'])})")
    out = rows.copy()
    feats = meta["features"]
    out[feats] = model.transform(rows[feats].to_numpy(float), rows[table.site].to_numpy(),
                                 _covariate_frame(rows, meta["covariates"]))
    return out


def _pooled_effects(df: pd.DataFrame, table: GroupTable, site_term: bool) -> pd.DataFrame:
    from dmriharmony.evaluation import effect_estimates

    others = [c for c in table.covariates if c != table.effect]
    est = effect_estimates(df, table.features, effect=table.effect, covariates=others,
                           site=table.site if site_term else None)
    e = table.effect
    cols = {f"{e}_beta": "estimate", f"{e}_se": "se", f"{e}_d": "d"}
    out = est[[c for c in cols if c in est.columns]].rename(columns=cols)
    out["n"] = est["n"] if "n" in est.columns else len(df)
    return out


def effects_table(method: str, table: GroupTable,
                  harmonized: pd.DataFrame | None = None) -> pd.DataFrame:
    """Effect of ``table.effect`` per ROI by ``method`` (one tidy frame, ``feature`` column).

    ``none``: pooled raw data, plus rows ``model = site_fixed`` with site as a fixed effect;
    a data harmonizer: pooled model on its harmonized training rows; ``meta``: REML random-
    effects pooling of per-site Cohen's d; ``mixed``: random site intercept (REML), the effect's
    coefficient, SE, p, Cohen's d, site variance and ICC.
    """
    from dmriharmony.harmonizers import meta, mixed

    others = [c for c in table.covariates if c != table.effect]
    if method == "none":
        a = _pooled_effects(table.train, table, site_term=False).assign(model="pooled")
        b = _pooled_effects(table.train, table, site_term=True).assign(model="site_fixed")
        out = pd.concat([a, b])
    elif method in DATA_HARMONIZERS or method in PRECOMPUTED:
        if harmonized is None:
            raise HarmonizationError(f"{method}: harmonized rows needed")
        train = harmonized.iloc[:len(table.train)]
        out = _pooled_effects(train, table, site_term=False).assign(model="pooled")
    elif method == "meta":
        res = meta.meta_analyze(table.train, table.features, site=table.site,
                                effect=table.effect, covariates=others, measure="d",
                                method="REML")
        out = res.rename(columns={"estimate": "d_pooled", "method": "tau2_method"})
        out["model"] = "random_effects_REML"
    elif method == "mixed":
        fixed = " + ".join([*others, table.effect])
        fit = mixed.fit(table.train, table.features, fixed=fixed, site=table.site, reml=True,
                        progress=False)
        term = next((t for t in fit.terms if t == table.effect or t.startswith(
            f"{table.effect}[")), None)
        if term is None:
            raise HarmonizationError(f"mixed model: no term for {table.effect!r} in {fit.terms}")
        out = pd.DataFrame({"estimate": fit.coef[term], "se": fit.se[term], "p": fit.p[term],
                            "df": fit.df[term], "d": fit.d(term),
                            "sigma2_site": fit.sigma2_site, "sigma2_resid": fit.sigma2_resid,
                            "icc": fit.icc, "n": fit.nobs})
        out["model"] = "random_intercept_REML"
    else:
        raise HarmonizationError(f"unknown method {method!r}")
    out.index.name = "feature"
    out = out.reset_index()
    out.insert(0, "metric", table.metric)
    out.insert(0, "method", method)
    return out


def _spec(name: str, ref_site: str | None):
    from dmriharmony.evaluation import NoHarmonization, meta_analysis, mixed_model

    if name == "none":
        return NoHarmonization
    if name == "meta":
        return meta_analysis("REML")
    if name == "mixed":
        return mixed_model(reml=True)
    if name in PRECOMPUTED:
        raise HarmonizationError(f"{name}: precomputed harmonization needs its table")
    return DATA_HARMONIZERS[name](ref_site)


class Precomputed:
    """A harmonization computed upstream (RISH on the DWI) seen through the harmonizer API.

    ``transform`` returns, for each raw row, the harmonized row of the same run (looked up by
    the raw values); ``fit`` does nothing. In the cross-validated site prediction this is
    *not* refitted inside each fold (the RISH templates were built from every training run),
    so its "after" accuracy is the leaky kind; the report says so.
    """

    def __init__(self, lookup: dict[bytes, np.ndarray]) -> None:
        self.lookup = lookup

    @staticmethod
    def key(row: np.ndarray) -> bytes:
        return np.round(np.asarray(row, float), 12).tobytes()

    def fit(self, X, sites, covariates=None) -> Precomputed:
        return self

    def transform(self, X, sites=None, covariates=None) -> np.ndarray:
        X = np.asarray(X, float)
        try:
            return np.vstack([self.lookup[self.key(r)] for r in X])
        except KeyError:
            raise HarmonizationError("a row to transform was not in the precomputed "
                                     "harmonization (new subjects need the DWI pipeline)") \
                from None


def evaluate_methods(names: Sequence[str], table: GroupTable, *, seed: int = 0,
                     ref_site: str | None = None, n_splits: int | None = None,
                     precomputed: Mapping[str, pd.DataFrame] | None = None,
                     ) -> tuple[pd.DataFrame, list[str]]:
    """:func:`~dmriharmony.evaluation.compare_harmonizers` on one metric, method by method.

    Returns the tidy evaluation (``harmonizer`` and ``param``, the map, columns added) and notes for
    the methods that could not be evaluated (e.g. too few subjects per site for the
    cross-validation folds), each one line naming the method and the reason.
    """
    from dmriharmony.evaluation import compare_harmonizers

    min_site = int(table.train[table.site].value_counts().min())
    folds = n_splits or max(2, min(5, min_site))
    notes: list[str] = []
    frames = []
    trav = None
    if table.traveling is not None and table.traveling[table.site].nunique() > 1:
        trav = table.traveling
    for name in ["none", *[n for n in names if n != "none"]]:
        try:
            if name in PRECOMPUTED:
                if precomputed is None or name not in precomputed:
                    continue
                harm = precomputed[name]
                lookup = {Precomputed.key(r): h for r, h in zip(
                    table.all_rows()[table.features].to_numpy(float),
                    harm[table.features].to_numpy(float), strict=True)}
                spec = partial(Precomputed, lookup)
            else:
                spec = _spec(name, ref_site)
            res = compare_harmonizers(
                {name: spec}, table.train, features=table.features,
                site=table.site, covariates=table.covariates, effect=table.effect,
                traveling=trav, n_splits=folds, seed=seed)
        except (HarmonizationError, ValueError, np.linalg.LinAlgError) as exc:
            msg = " ".join(str(exc).split())
            notes.append(f"{name} ({table.metric}): not evaluated: {msg}")
            LOGGER.warning("evaluation of %s on %s skipped: %s", name, table.metric, msg)
            continue
        frames.append(res)
    if not frames:
        return pd.DataFrame(), notes
    out = pd.concat(frames, ignore_index=True)
    out.insert(1, "param", table.metric)  # "metric" names the evaluation measure there
    return out, notes


def _note(written: dict[str, Any], text: str) -> None:
    """Record (and log) a method that could not be run on one metric."""
    text = " ".join(str(text).split())
    written["notes"].append(text)
    LOGGER.warning("%s", text)


@contextlib.contextmanager
def _warnings_as_notes(written: dict[str, Any], prefix: str | None):
    """Turn the estimators' warnings (e.g. a site dropped from the meta-analysis) into notes;
    ``prefix=None`` swallows them (already noted)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    if prefix is None:
        return
    for text in dict.fromkeys(str(w.message) for w in caught):
        _note(written, f"{prefix}: {text}")


def align_precomputed(source: str | Path | pd.DataFrame, table: GroupTable,
                      name: str) -> pd.DataFrame:
    """The rows of a harmonized ROI table made upstream, in the order of ``table.all_rows()``.

    Matched on (subject, session, run) and metric; a run missing from it raises, naming it.
    """
    from dmriharmony.group.table import read_roi_table

    src = read_roi_table(source) if not isinstance(source, pd.DataFrame) else source.copy()
    src["metric"] = src["metric"].astype(str).str.lower()
    src = src[src["metric"] == table.metric]
    keys = ["subject", "session", "run"]

    def norm(df):
        return [tuple("n/a" if pd.isna(v) else str(v) for v in r) for r in df[keys].to_numpy()]

    index = dict(zip(norm(src), range(len(src)), strict=True))
    rows = table.all_rows()
    out = rows.copy()
    pos = []
    for k in norm(rows):
        if k not in index:
            raise HarmonizationError(f"run sub-{k[0]} (session {k[1]}) has no {name} "
                                     f"{table.metric} row")
        pos.append(index[k])
    missing = [f for f in table.features if f not in src.columns]
    if missing:
        raise HarmonizationError(f"ROI {missing[0]!r} missing from the {name} table")
    out[table.features] = src.iloc[pos][table.features].to_numpy(float)
    return out


def run_methods(names: Sequence[str], tables: Mapping[str, GroupTable], out_dir: str | Path, *,
                ref_site: str | None = None, seed: int = 0, evaluate: bool = True,
                apply_models_from: str | Path | None = None,
                precomputed: Mapping[str, str | Path | pd.DataFrame] | None = None,
                ) -> dict[str, Any]:
    """Everything the group level writes into ``out_dir`` (normally a temporary folder).

    Files: ``roi_table_desc-<h>.tsv`` per data harmonizer (all metrics, training and traveling
    rows), ``effects_desc-<method>.tsv`` (``none`` always), ``site_effects_desc-meta.tsv``,
    ``models/<h>/<metric>_model.npz`` (+ JSON), ``evaluation.tsv`` and
    ``evaluation_summary.tsv``. With ``apply_models_from`` the data harmonizers are not
    refitted: the saved models are applied and no effects/evaluation are computed for them.

    A harmonizer or estimator that cannot be fitted on one metric (a rank-deficient design on
    a small study, too few subjects per site...) is left out for that metric with a note naming
    it and the reason; the others still run. A wrong ``ref_site`` or a saved model that does
    not fit the new table raises.

    Returns a dict of what was written and the notes.
    """
    from dmriharmony.evaluation import summarize
    from dmriharmony.harmonizers import meta as meta_mod

    out_dir = Path(out_dir)
    names = check_harmonizers(names)
    written: dict[str, Any] = {"tables": {}, "effects": {}, "models": [], "notes": []}
    models_dir = out_dir / "models"
    if ref_site is not None:
        for table in tables.values():
            if ref_site not in table.sites:
                raise HarmonizationError(f"--reference-site {ref_site!r} is not one of the "
                                         f"sites {', '.join(table.sites)}")
    harmonized: dict[tuple[str, str], pd.DataFrame] = {}
    for name in [n for n in names if n in DATA_HARMONIZERS]:
        frames = []
        for metric, table in tables.items():
            if apply_models_from is not None:
                frames.append(apply_saved_models(name, table, apply_models_from))
                continue
            try:
                harm = harmonize_table(name, table, ref_site=ref_site, models_dir=models_dir)
            except (HarmonizationError, np.linalg.LinAlgError) as exc:
                _note(written, f"{name} ({metric}): not fitted: {exc}")
                continue
            harmonized[name, metric] = harm
            frames.append(harm)
            written["models"].append(str(model_path(models_dir, name, metric)))
        if frames:
            written["tables"][name] = write_tsv(pd.concat(frames, ignore_index=True),
                                                out_dir / f"roi_table_desc-{name}.tsv")
    for name in [n for n in names if n in PRECOMPUTED]:
        if precomputed is None or name not in precomputed:
            raise HarmonizationError(f"{name} harmonizes the DWI: give its ROI table "
                                     "(the group workflow's RISH step makes it)")
        frames = []
        for metric, table in tables.items():
            try:
                harm = align_precomputed(precomputed[name], table, name)
            except HarmonizationError as exc:
                _note(written, f"{name} ({metric}): {exc}")
                continue
            harmonized[name, metric] = harm
            frames.append(harm)
        if frames:
            written["tables"][name] = write_tsv(pd.concat(frames, ignore_index=True),
                                                out_dir / f"roi_table_desc-{name}.tsv")
    if apply_models_from is not None:
        return written
    effects: dict[str, list[pd.DataFrame]] = {}
    site_effects = []
    for metric, table in tables.items():
        effects.setdefault("none", []).append(effects_table("none", table))
        for name in names:
            if name in (*DATA_HARMONIZERS, *PRECOMPUTED) and (name, metric) not in harmonized:
                continue
            try:
                with _warnings_as_notes(written, f"{name} ({metric})"):
                    eff = effects_table(name, table, harmonized.get((name, metric)))
                effects.setdefault(name, []).append(eff)
            except (HarmonizationError, np.linalg.LinAlgError, ValueError) as exc:
                _note(written, f"{name} ({metric}): no effect estimates: {exc}")
        if "meta" in names:
            others = [c for c in table.covariates if c != table.effect]
            try:
                with _warnings_as_notes(written, None):  # same warnings as effects_table's
                    se = meta_mod.site_effects(table.train, site=table.site, effect=table.effect,
                                               covariates=others, measure="d",
                                               features=table.features)
            except (HarmonizationError, np.linalg.LinAlgError, ValueError) as exc:
                _note(written, f"meta ({metric}): no per-site effects: {exc}")
            else:
                site_effects.append(se.assign(metric=metric))
    for name, frames in effects.items():
        if not frames:
            continue
        written["effects"][name] = write_tsv(pd.concat(frames, ignore_index=True),
                                             out_dir / f"effects_desc-{name}.tsv")
    if site_effects:
        written["site_effects"] = write_tsv(pd.concat(site_effects, ignore_index=True),
                                            out_dir / "site_effects_desc-meta.tsv")
    if evaluate:
        evals, summaries = [], []
        for metric, table in tables.items():
            usable = [n for n in names if n not in (*DATA_HARMONIZERS, *PRECOMPUTED)
                      or (n, metric) in harmonized]
            pre = {n: harmonized[n, metric] for n in PRECOMPUTED if (n, metric) in harmonized}
            ev, notes = evaluate_methods(usable, table, seed=seed, ref_site=ref_site,
                                         precomputed=pre)
            written["notes"].extend(notes)
            if ev.empty:
                continue
            evals.append(ev)
            summ = summarize(ev.drop(columns="param"), effect=table.effect).reset_index()
            summ.insert(1, "param", metric)
            summaries.append(summ)
        if evals:
            written["evaluation"] = write_tsv(pd.concat(evals, ignore_index=True),
                                              out_dir / "evaluation.tsv")
            written["evaluation_summary"] = write_tsv(pd.concat(summaries, ignore_index=True),
                                                      out_dir / "evaluation_summary.tsv")
    return written
