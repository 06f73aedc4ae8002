"""ENIGMA-DTI ROI extraction from skeletonised maps.

Implements the two steps of the ENIGMA-DTI ROI protocol (Jahanshad et al., NeuroImage 2013;
protocol repository ENIGMA-git/ENIGMA-DTI-TBSS-Protocol):

1. ``singleSubjROI``: for every label of the look-up table, the mean of the subject's skeletonised
   value over the skeleton voxels carrying that label *where the subject's value is non-zero*,
   with the number of voxels averaged; plus the whole-skeleton mean ``AverageFA`` (this name is
   used for every metric, as ENIGMA does).
2. ``averageSubjectTracts``: bilateral and composite ROIs as voxel-count-weighted means of their
   components (``ACR`` from ``ACR-L``/``ACR-R``, ``CC`` from ``GCC``/``BCC``/``SCC``, ``IC`` from
   the three internal-capsule limbs, ``CR`` from the three corona-radiata parts, ``FXST`` from
   ``FX/ST-L``/``FX/ST-R``...), following the table in ``dmriharmony/data/enigma_rois.tsv``.

The group table (:func:`build_roi_table`) has one row per run and metric, ENIGMA abbreviations as
column names, joined with ``participants.tsv`` covariates and the site table.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from dmriharmony.errors import BIDSInputError, TemplateError
from dmriharmony.tbss.io import ImageLike, atomic_write, has_orientation, load_image

WHOLE_SKELETON = "AverageFA"
ID_COLUMNS = ("subject", "session", "run", "metric")


# --------------------------------------------------------------------------------------------
# Look-up tables
# --------------------------------------------------------------------------------------------
def read_lookup_table(lookup_table: str | os.PathLike | pd.DataFrame) -> pd.DataFrame:
    """Read a label look-up table into columns ``index``, ``abbreviation``, ``name``, ``side``.

    Accepts ENIGMA's ``ENIGMA_look_up_table.txt`` (``value<TAB>abbreviation<TAB><TAB>name`` with
    ``\\r\\r\\n`` line endings, no header), a BIDS-style ``dseg.tsv`` (header with ``index``,
    ``abbreviation``/``name``), or a DataFrame with such columns. Row order is kept: it is the
    order of ENIGMA's per-label output.
    """
    if isinstance(lookup_table, pd.DataFrame):
        df = lookup_table.copy()
        source = "look-up table DataFrame"
    else:
        path = Path(lookup_table)
        source = str(path)
        if not path.is_file():
            raise TemplateError(f"label look-up table not found: {path}")
        text = path.read_bytes().decode("utf-8", errors="replace")
        # Normalise CR / CRLF / CR CR LF line endings; drop empty lines.
        lines = [ln for ln in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
        lines = [ln for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        if not lines:
            raise TemplateError(f"label look-up table is empty: {path}")
        first = lines[0].split("\t")[0].strip()
        if first.lstrip("-").isdigit():
            rows = []
            for ln in lines:
                fields = [f.strip() for f in ln.split("\t") if f.strip() != ""]
                if len(fields) < 2 or not fields[0].lstrip("-").isdigit():
                    raise TemplateError(f"malformed look-up table line in {path}: {ln!r}")
                name = " ".join(fields[2:]) if len(fields) > 2 else fields[1]
                rows.append((int(fields[0]), fields[1], name))
            df = pd.DataFrame(rows, columns=["index", "abbreviation", "name"])
        else:
            df = pd.read_csv(io.StringIO("\n".join(lines)), sep="\t")
    df.columns = [str(c).strip() for c in df.columns]
    rename = {}
    for col in df.columns:
        low = col.lower()
        if low in ("index", "value", "label", "label_value", "id") and (
            "index" not in rename.values()
        ):
            rename[col] = "index"
        elif low in ("abbreviation", "abbrev", "tract", "short_name") and (
            "abbreviation" not in rename.values()
        ):
            rename[col] = "abbreviation"
    df = df.rename(columns=rename)
    if "abbreviation" not in df.columns and "name" in df.columns:
        df["abbreviation"] = df["name"]
    for col in ("index", "abbreviation"):
        if col not in df.columns:
            raise TemplateError(f"look-up table {source} lacks a column '{col}'")
    if "name" not in df.columns:
        df["name"] = df["abbreviation"]
    if "side" not in df.columns:
        df["side"] = [_side_from_abbreviation(a) for a in df["abbreviation"]]
    df["index"] = df["index"].astype(int)
    df["abbreviation"] = df["abbreviation"].astype(str).str.strip()
    if df["index"].duplicated().any():
        dup = df.loc[df["index"].duplicated(), "index"].iloc[0]
        raise TemplateError(f"look-up table {source} lists label {dup} twice")
    return df[["index", "abbreviation", "name", "side"] + [
        c for c in df.columns if c not in ("index", "abbreviation", "name", "side")
    ]].reset_index(drop=True)


def _side_from_abbreviation(abbreviation: str) -> str:
    if abbreviation.endswith("-L"):
        return "left"
    if abbreviation.endswith("-R"):
        return "right"
    return "bilateral"


def read_combination_table(path: str | os.PathLike | None = None) -> dict[str, list[str]]:
    """Read ENIGMA's combined-ROI table (``Tract`` -> list of component tracts).

    Defaults to the bundled ``dmriharmony/data/enigma_rois.tsv``.
    """
    if path is None:
        text = resources.files("dmriharmony").joinpath("data/enigma_rois.tsv").read_text()
    else:
        text = Path(path).read_text()
    df = pd.read_csv(io.StringIO(text), sep="\t", comment="#", dtype=str)
    if not {"Tract", "components"} <= set(df.columns):
        raise TemplateError(f"combination table {path} needs columns Tract and components")
    return {row.Tract: [c.strip() for c in row.components.split(",")] for row in df.itertuples()}


# --------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------
def _as_array(image: ImageLike | np.ndarray, what: str) -> tuple[np.ndarray, object]:
    if isinstance(image, np.ndarray):
        return image, None
    img = load_image(image, what=what)
    return np.asanyarray(img.dataobj), img


def extract_rois(
    values: ImageLike | np.ndarray,
    skeleton: ImageLike | np.ndarray,
    labels: ImageLike | np.ndarray,
    lookup_table: str | os.PathLike | pd.DataFrame,
    combine: bool = True,
    combination_table: str | os.PathLike | Mapping[str, list[str]] | None = None,
) -> pd.DataFrame:
    """ENIGMA ROI means of a skeletonised map.

    Parameters
    ----------
    values : path, nibabel image or array
        The subject's skeletonised map (FA, MD, AD, RD... on the template grid).
    skeleton : path, nibabel image or array
        The skeleton over which ROIs are averaged (non-zero voxels; ENIGMA's
        ``mean_FA_skeleton``, whose FA x 10^4 values are irrelevant here).
    labels : path, nibabel image or array
        Integer ROI label image on the same grid (e.g. JHU-WhiteMatter-labels-1mm).
    lookup_table : path or DataFrame
        Label value -> abbreviation table (see :func:`read_lookup_table`).
    combine : bool
        Apply ENIGMA's second step: return the combined table (bilateral and composite ROIs as
        voxel-count-weighted means, sorted by name as ENIGMA's ``_avg`` output). If False,
        return the per-label table (``AverageFA`` first, then the look-up table order).
    combination_table : path or mapping, optional
        Combined ROI definitions; defaults to ENIGMA's (``data/enigma_rois.tsv``).

    Returns
    -------
    pandas.DataFrame
        Indexed by ``Tract`` with columns ``Average`` (float; NaN where no voxel) and
        ``nVoxels`` (int).

    Notes
    -----
    A voxel counts for a label when it is on the skeleton, carries the label, and the subject's
    value there is non-zero and finite (Jahanshad et al. 2013, ENIGMA ``singleSubjROI``).
    Means are accumulated in float64.
    """
    val, val_img = _as_array(values, "values image")
    skel, skel_img = _as_array(skeleton, "skeleton image")
    lab, lab_img = _as_array(labels, "label image")
    shapes = {"values": val.shape[:3], "skeleton": skel.shape[:3], "labels": lab.shape[:3]}
    if len(set(shapes.values())) != 1:
        raise TemplateError(f"ROI inputs are on different grids: {shapes}")
    oriented = [(n, im) for n, im in (("values", val_img), ("skeleton", skel_img),
                                      ("labels", lab_img))
                if im is not None and has_orientation(im)]
    for name, im in oriented[1:]:
        if not np.allclose(im.affine, oriented[0][1].affine, atol=1e-3):
            raise TemplateError(
                f"ROI {name} image is not on the same grid as the {oriented[0][0]} image "
                "(affines differ)")
    if val.ndim > 3 and val.shape[3] != 1:
        raise TemplateError(f"values image must be 3-D, got shape {val.shape}")
    val = np.asarray(val, dtype=np.float64).reshape(val.shape[:3])
    skel = np.asarray(skel).reshape(skel.shape[:3])
    lab = np.rint(np.asarray(lab, dtype=np.float64).reshape(lab.shape[:3])).astype(np.int64)
    lut = read_lookup_table(lookup_table)

    valid = (skel != 0) & (val != 0) & np.isfinite(val)
    v = val[valid]
    lv = lab[valid]
    rows = [(WHOLE_SKELETON, float(v.mean()) if v.size else np.nan, int(v.size))]
    if lut["index"].min() < 0:
        raise TemplateError("look-up table has negative label values")
    n_bins = max(int(lut["index"].max()), int(lv.max()) if lv.size else 0) + 1
    lv_pos = np.clip(lv, 0, None)
    counts = np.bincount(lv_pos, minlength=n_bins)
    sums = np.bincount(lv_pos, weights=v, minlength=n_bins)
    for index, abbrev in zip(lut["index"], lut["abbreviation"]):
        n = int(counts[index])
        rows.append((abbrev, float(sums[index] / n) if n else np.nan, n))
    per_label = pd.DataFrame(rows, columns=["Tract", "Average", "nVoxels"]).set_index("Tract")
    if not combine:
        return per_label
    return combine_rois(per_label, combination_table)


def combine_rois(
    per_label: pd.DataFrame,
    combination_table: str | os.PathLike | Mapping[str, list[str]] | None = None,
) -> pd.DataFrame:
    """ENIGMA's second step: bilateral/composite ROIs as voxel-count-weighted means.

    Each combined tract is ``sum(n_i * mean_i) / sum(n_i)`` over its components present in
    ``per_label`` (Jahanshad et al. 2013). Tracts none of whose components exist in
    ``per_label`` (e.g. absent from a phantom's label table) are left out; components with no
    voxels contribute nothing. The result is sorted by tract name (byte order), as ENIGMA's
    ``_ROIout_avg.csv``.
    """
    default = combination_table is None
    if combination_table is None or isinstance(combination_table, (str, os.PathLike)):
        table = read_combination_table(combination_table)
    else:
        table = dict(combination_table)
    if default:
        table = _extend_for_other_atlases(table, per_label.index)
    rows = []
    for tract, components in table.items():
        present = [c for c in components if c in per_label.index]
        if not present:
            continue
        n = per_label.loc[present, "nVoxels"].to_numpy(dtype=np.int64)
        m = per_label.loc[present, "Average"].to_numpy(dtype=np.float64)
        total = int(n.sum())
        avg = float(np.sum(np.where(n > 0, m, 0.0) * n) / total) if total else np.nan
        rows.append((tract, avg, total))
    out = pd.DataFrame(rows, columns=["Tract", "Average", "nVoxels"]).set_index("Tract")
    return out.loc[sorted(out.index)]


#: ENIGMA labels deliberately left out of the combined table (brainstem and cerebellum).
ENIGMA_EXCLUDED = frozenset({"ML-L", "ML-R", "ICP-L", "ICP-R", "SCP-L", "SCP-R", "CP-L", "CP-R",
                             "MCP", "PCT"})


def _extend_for_other_atlases(table: dict[str, list[str]],
                              labels: Iterable[str]) -> dict[str, list[str]]:
    """Add rows for labels ENIGMA's table does not know (e.g. phantom bundles).

    A label that is neither a component of ENIGMA's table nor one of ENIGMA's deliberately
    excluded brainstem labels is kept as itself, and ``X-L``/``X-R`` pairs get a bilateral
    ``X``, following ENIGMA's rule. ENIGMA's own labels are unaffected, so its output is
    reproduced exactly.
    """
    known = {c for comps in table.values() for c in comps} | set(table)
    out = dict(table)
    extra = [str(lab) for lab in labels if str(lab) not in known
             and str(lab) not in ENIGMA_EXCLUDED]
    for lab in extra:
        out.setdefault(lab, [lab])
        if lab.endswith(("-L", "-R")):
            base = lab[:-2]
            if base not in table:
                comps = out.setdefault(base, [])
                if lab not in comps:
                    comps.append(lab)
    return out


def write_enigma_csv(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write an ROI table in ENIGMA's CSV layout (``Tract,Average,nVoxels``), atomically."""
    out = df.reset_index()[["Tract", "Average", "nVoxels"]]
    return atomic_write(path, lambda tmp: out.to_csv(tmp, index=False, float_format="%.6g"))


def read_enigma_csv(path: str | os.PathLike) -> pd.DataFrame:
    """Read ENIGMA's ``*_ROIout.csv`` / ``*_ROIout_avg.csv`` (any line endings)."""
    text = Path(path).read_bytes().decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    df = pd.read_csv(io.StringIO(text), skip_blank_lines=True)
    df["Tract"] = df["Tract"].astype(str).str.strip()
    return df.set_index("Tract")


# --------------------------------------------------------------------------------------------
# Per-run rows and the group table
# --------------------------------------------------------------------------------------------
def _strip(value: object, prefix: str) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    text = str(value).strip()
    if text in ("", "n/a", "nan", "None"):
        return None
    return text[len(prefix):] if text.startswith(prefix) else text


def roi_row(
    rois: pd.DataFrame,
    subject: str,
    session: str | None = None,
    run: str | int | None = None,
    metric: str = "FA",
) -> pd.DataFrame:
    """One run's ROI means as a single-row table (ENIGMA abbreviations as columns).

    Parameters
    ----------
    rois : DataFrame
        Output of :func:`extract_rois`.
    subject, session, run : str
        BIDS entities (``sub-``/``ses-`` prefixes are removed).
    metric : str
        Which map the means are of (FA, MD, AD, RD...).
    """
    if not subject:
        raise BIDSInputError("roi_row needs a subject label")
    row = {
        "subject": _strip(subject, "sub-"),
        "session": _strip(session, "ses-"),
        "run": _strip(run, "run-"),
        "metric": str(metric).upper(),
    }
    row.update({str(t): float(a) for t, a in rois["Average"].items()})
    return pd.DataFrame([row], columns=list(row))


def write_roi_row(
    rois: pd.DataFrame | Mapping[str, pd.DataFrame],
    path: str | os.PathLike,
    subject: str,
    session: str | None = None,
    run: str | int | None = None,
    metric: str = "FA",
) -> Path:
    """Write a run's ROI row(s) to a TSV (one row per metric), atomically.

    ``rois`` is either one table from :func:`extract_rois` (then ``metric`` names it) or a
    mapping ``metric -> table``.
    """
    if isinstance(rois, pd.DataFrame):
        rows = [roi_row(rois, subject, session, run, metric)]
    else:
        rows = [roi_row(df, subject, session, run, m) for m, df in rois.items()]
    table = pd.concat(rows, ignore_index=True)
    return atomic_write(
        path, lambda tmp: table.to_csv(tmp, sep="\t", index=False, na_rep="n/a",
                                       float_format="%.8g"))


def read_roi_rows(paths: Iterable[str | os.PathLike]) -> pd.DataFrame:
    """Concatenate per-run ROI TSVs written by :func:`write_roi_row`."""
    frames = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise BIDSInputError(f"ROI row file not found: {p}")
        df = pd.read_csv(p, sep="\t", na_values=["n/a"], dtype={"subject": str, "session": str,
                                                                  "run": str})
        missing = [c for c in ("subject", "metric") if c not in df.columns]
        if missing:
            raise BIDSInputError(f"ROI row file {p} lacks column(s) {missing}")
        frames.append(df)
    if not frames:
        raise BIDSInputError("no ROI row files given")
    return pd.concat(frames, ignore_index=True)


def _normalise_keys(df: pd.DataFrame, source: str) -> pd.DataFrame:
    df = df.copy()
    if "subject" not in df.columns:
        if "participant_id" in df.columns:
            df["subject"] = df["participant_id"]
        elif "sub" in df.columns:
            df["subject"] = df["sub"]
        else:
            raise BIDSInputError(f"{source} has no participant_id/subject column")
    df["subject"] = [_strip(v, "sub-") for v in df["subject"]]
    for col, prefix, alts in (("session", "ses-", ("session_id", "ses")),
                              ("run", "run-", ("run_id",))):
        if col not in df.columns:
            for alt in alts:
                if alt in df.columns:
                    df[col] = df[alt]
                    break
        if col in df.columns:
            df[col] = [_strip(v, prefix) for v in df[col]]
    return df


def build_roi_table(
    rows: pd.DataFrame | Iterable[str | os.PathLike],
    participants_tsv: str | os.PathLike | pd.DataFrame,
    site_table: str | os.PathLike | pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Join per-run ROI rows with participant covariates and the site table.

    Parameters
    ----------
    rows : DataFrame or iterable of paths
        ROI rows (:func:`roi_row` / :func:`write_roi_row` output).
    participants_tsv : path or DataFrame
        BIDS ``participants.tsv`` (``participant_id`` plus covariates such as age, sex, dx, site).
    site_table : path or DataFrame, optional
        One row per run (``subject``, ``session``, ``run``, ``site``, ``vendor``...). Joined on
        the run keys both tables have.

    Returns
    -------
    pandas.DataFrame
        One row per run and metric: identifiers, covariates, site columns, then the ROI columns.

    Raises
    ------
    BIDSInputError
        If a run's subject is missing from ``participants.tsv`` or from the site table.
    """
    roi = rows.copy() if isinstance(rows, pd.DataFrame) else read_roi_rows(rows)
    roi = _normalise_keys(roi, "ROI rows")
    roi_cols = [c for c in roi.columns if c not in ID_COLUMNS]

    if isinstance(participants_tsv, pd.DataFrame):
        parts = participants_tsv.copy()
        psource = "participants table"
    else:
        psource = str(participants_tsv)
        if not Path(participants_tsv).is_file():
            raise BIDSInputError(f"participants.tsv not found: {participants_tsv}")
        parts = pd.read_csv(participants_tsv, sep="\t", na_values=["n/a"],
                            dtype={"participant_id": str})
    parts = _normalise_keys(parts, psource)
    if parts["subject"].duplicated().any():
        dup = parts.loc[parts["subject"].duplicated(), "subject"].iloc[0]
        raise BIDSInputError(f"{psource} lists participant sub-{dup} twice")
    missing = sorted(set(roi["subject"]) - set(parts["subject"]))
    if missing:
        raise BIDSInputError(f"subject sub-{missing[0]} has ROI rows but is not in {psource}")
    cov = parts.drop(columns=[c for c in ("participant_id",) if c in parts.columns])
    cov = cov.drop(columns=[c for c in ("session", "run") if c in cov.columns])
    out = roi.merge(cov, on="subject", how="left", validate="many_to_one")

    if site_table is not None:
        if isinstance(site_table, pd.DataFrame):
            sites = site_table.copy()
            ssource = "site table"
        else:
            ssource = str(site_table)
            if not Path(site_table).is_file():
                raise BIDSInputError(f"site table not found: {site_table}")
            sites = pd.read_csv(site_table, sep="\t", na_values=["n/a"],
                                dtype={"subject": str, "session": str, "run": str,
                                       "participant_id": str})
        sites = _normalise_keys(sites, ssource)
        keys = ["subject"] + [k for k in ("session", "run")
                              if k in sites.columns and k in out.columns
                              and sites[k].notna().any()]
        for k in keys:
            out[k] = out[k].astype(object)
            sites[k] = sites[k].astype(object)
        overlap = [c for c in sites.columns if c in out.columns and c not in keys]
        # Site-table columns (site, vendor...) win over participants.tsv ones of the same name.
        out = out.drop(columns=overlap)
        sites = sites.drop(columns=[c for c in ("participant_id",) if c in sites.columns])
        if sites.duplicated(subset=keys).any():
            raise BIDSInputError(f"{ssource} has several rows for the same run keys {keys}")
        merged = out.merge(sites, on=keys, how="left", indicator=True)
        lost = merged[merged["_merge"] != "both"]
        if len(lost):
            r = lost.iloc[0]
            desc = ", ".join(f"{k}={r[k]}" for k in keys)
            raise BIDSInputError(f"run ({desc}) has ROI rows but no row in {ssource}")
        out = merged.drop(columns="_merge")
    front = [c for c in ID_COLUMNS if c in out.columns]
    covs = [c for c in out.columns if c not in front and c not in roi_cols]
    return out[front + covs + roi_cols]


def write_table(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write a group ROI table as TSV (``n/a`` for missing values), atomically."""
    return atomic_write(path, lambda tmp: table.to_csv(tmp, sep="\t", index=False, na_rep="n/a",
                                                       float_format="%.8g"))
