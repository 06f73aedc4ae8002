"""BIDS-App CLI: exit codes, one clear line naming the file at fault, nothing written.

Each bad-input case of issue 3 builds a small valid dataset, breaks one thing, runs
``dmriharmony bids out participant`` and checks the exit code, that the one-line message on
stderr names the offending file, and that no NIfTI was left in the output folder.
"""

from __future__ import annotations

import gzip
import os

os.environ.setdefault("NIPYPE_NO_ET", "1")

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from dmriharmony import __version__  # noqa: E402
from dmriharmony.cli.run import main  # noqa: E402
from dmriharmony.dti.synthetic import write_bids_dataset  # noqa: E402

SMALL = {"shape": (10, 10, 4), "n_dirs": 12}


def _dwi(root, sub="01"):
    return root / f"sub-{sub}" / "dwi" / f"sub-{sub}_dwi"


def _rewrite_nifti(path, fn):
    img = nib.load(str(path))
    data = fn(np.asarray(img.dataobj, np.float32))
    nib.save(nib.Nifti1Image(data, img.affine), str(path))


def _missing_bval(root):
    os.remove(f"{_dwi(root)}.bval")
    return f"{_dwi(root)}.nii.gz"


def _missing_bvec(root):
    os.remove(f"{_dwi(root)}.bvec")
    return f"{_dwi(root)}.nii.gz"


def _bval_count(root):
    p = f"{_dwi(root)}.bval"
    values = open(p).read().split()
    open(p, "w").write(" ".join(values[:-1]) + "\n")
    return p


def _bvec_count(root):
    p = f"{_dwi(root)}.bvec"
    rows = [r.split()[:-1] for r in open(p).read().strip().split("\n")]
    open(p, "w").write("\n".join(" ".join(r) for r in rows) + "\n")
    return p


def _no_b0(root):
    p = f"{_dwi(root)}.bval"
    values = ["1000" if float(v) == 0 else v for v in open(p).read().split()]
    open(p, "w").write(" ".join(values) + "\n")
    return p


def _bvecs_edit(root, fn):
    p = f"{_dwi(root)}.bvec"
    g = np.loadtxt(p)
    fn(g)
    np.savetxt(p, g, fmt="%.6f")
    return p


def _zero_bvec(root):
    return _bvecs_edit(root, lambda g: g.__setitem__((slice(None), 5), 0.0))


def _nonunit_bvec(root):
    return _bvecs_edit(root, lambda g: g.__setitem__((slice(None), 5), g[:, 5] * 0.5))


def _nan_bvec(root):
    p = f"{_dwi(root)}.bvec"
    rows = open(p).read().strip().split("\n")
    first = rows[0].split()
    first[4] = "nan"
    rows[0] = " ".join(first)
    open(p, "w").write("\n".join(rows) + "\n")
    return p


def _three_d(root):
    p = f"{_dwi(root)}.nii.gz"
    _rewrite_nifti(p, lambda d: d[..., 0])
    return p


def _nan_data(root):
    p = f"{_dwi(root)}.nii.gz"

    def poison(d):
        d[3, 3, 2, 7] = np.nan
        return d

    _rewrite_nifti(p, poison)
    return p


def _inf_data(root):
    p = f"{_dwi(root)}.nii.gz"

    def poison(d):
        d[4, 4, 1, 2] = np.inf
        return d

    _rewrite_nifti(p, poison)
    return p


def _unreadable(root):
    p = f"{_dwi(root)}.nii.gz"
    with gzip.open(p, "wb") as fh:
        fh.write(b"this is not a NIfTI header" * 20)
    return p


def _truncated(root):
    p = f"{_dwi(root)}.nii.gz"
    raw = open(p, "rb").read()
    open(p, "wb").write(raw[: len(raw) // 3])
    return p


def _mismatched_split_runs(root):
    """Two acq- parts of one acquisition on different grids, the second without b=0."""
    other = root.parent / "other"
    write_bids_dataset(other, ("01",), shape=(8, 8, 4), n_dirs=12)
    d = root / "sub-01" / "dwi"
    for ext in ("nii.gz", "bval", "bvec", "json"):
        (d / f"sub-01_dwi.{ext}").rename(d / f"sub-01_acq-a_dwi.{ext}")
        (other / "sub-01" / "dwi" / f"sub-01_dwi.{ext}").rename(d / f"sub-01_acq-b_dwi.{ext}")
    p = d / "sub-01_acq-b_dwi.bval"
    values = ["1000" if float(v) == 0 else v for v in p.read_text().split()]
    p.write_text(" ".join(values) + "\n")
    return str(p)


def _too_few_low_shell(root):
    p = f"{_dwi(root)}.bval"
    values = ["3000" if float(v) > 0 else v for v in open(p).read().split()]
    open(p, "w").write(" ".join(values) + "\n")
    return p


CASES = {
    "missing_bval": (_missing_bval, 16),
    "missing_bvec": (_missing_bvec, 16),
    "bval_count": (_bval_count, 65),
    "bvec_count": (_bvec_count, 65),
    "no_b0": (_no_b0, 65),
    "zero_bvec": (_zero_bvec, 65),
    "nonunit_bvec": (_nonunit_bvec, 65),
    "nan_bvec": (_nan_bvec, 65),
    "three_d": (_three_d, 65),
    "nan_data": (_nan_data, 65),
    "inf_data": (_inf_data, 65),
    "unreadable": (_unreadable, 65),
    "truncated": (_truncated, 65),
    "mismatched_split_runs": (_mismatched_split_runs, 65),
    "no_shell_below_bmax": (_too_few_low_shell, 65),
}


def _no_nifti(out):
    return not [p for p in out.rglob("*.nii*")] if out.exists() else True


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(tmp_path, capsys, case):
    root = tmp_path / "ds"
    write_bids_dataset(root, ("01", "02"), **SMALL)
    breaker, code = CASES[case]
    culprit = breaker(root)
    out = tmp_path / "out"
    rc = main([str(root), str(out), "participant", "-w", str(tmp_path / "work")])
    err = capsys.readouterr().err.strip()
    assert rc == code, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("dmriharmony: error: ")
    assert os.path.basename(str(culprit)) in lines[0], lines[0]
    assert _no_nifti(out)
    assert not (out / "dmriharmony" / "dataset_description.json").exists()


def test_not_a_dataset(tmp_path, capsys):
    (tmp_path / "ds").mkdir()
    assert main([str(tmp_path / "ds"), str(tmp_path / "out"), "participant"]) == 16
    assert "dataset_description.json" in capsys.readouterr().err
    assert main([str(tmp_path / "nope"), str(tmp_path / "out"), "participant"]) == 16
    assert not (tmp_path / "out").exists()


def test_unknown_level_and_filters(tmp_path, capsys):
    root = tmp_path / "ds"
    write_bids_dataset(root, ("01",), sessions=("A",), **SMALL)
    out = tmp_path / "out"
    assert main([str(root), str(out), "session"]) == 17
    assert "session" in capsys.readouterr().err
    # the group level before any participant output: the missing input is named (66)
    assert main([str(root), str(out), "group"]) == 66
    assert "run the participant level" in capsys.readouterr().err
    assert main([str(root), str(out), "participant", "--participant-label", "99"]) == 18
    assert "99" in capsys.readouterr().err
    assert main([str(root), str(out), "participant", "--participant_label", "sub-01",
                 "--session-label", "Z"]) == 18
    assert "Z" in capsys.readouterr().err
    assert _no_nifti(out)


@pytest.mark.parametrize("argv", [
    [], ["only_one"], ["a", "b", "participant", "--nprocs", "x"],
    ["a", "b", "participant", "--fit-method", "magic"], ["a", "b", "participant", "--bogus"],
])
def test_usage_errors_exit_64_not_2(argv, capsys):
    assert main(argv) == 64
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dmriharmony: error: ")


def test_bad_option_values(tmp_path, capsys):
    root = tmp_path / "ds"
    write_bids_dataset(root, ("01",), **SMALL)
    out = tmp_path / "out"
    assert main([str(root), str(out), "participant", "--plugin-args", "{not json"]) == 64
    assert "--plugin-args" in capsys.readouterr().err
    assert main([str(root), str(out), "participant", "--nprocs", "0"]) == 64
    assert main([str(root), str(root), "participant"]) == 64
    assert "inside the BIDS dataset" in capsys.readouterr().err
    assert _no_nifti(out)


def test_version_and_help(capsys):
    assert main(["--version"]) == 0
    assert __version__ in capsys.readouterr().out
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--participant-label", "--session-label", "-w", "--nprocs", "--omp-nthreads",
                 "--plugin", "--plugin-args", "--version"):
        assert flag in text


def test_console_script_exit_code(tmp_path):
    """The installed ``dmriharmony`` entry point returns the BIDS-App code to the shell."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "dmriharmony.cli.run", str(tmp_path / "nope"),
                           str(tmp_path / "out"), "participant"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "NIPYPE_NO_ET": "1"})
    assert proc.returncode == 16
    assert proc.stderr.strip().splitlines()[-1].startswith("dmriharmony: error: ")


def test_failure_inside_a_node_is_one_line(tmp_path, capsys, monkeypatch):
    """NaN data with --no-data-check is caught by the fit node: exit 65, the file named."""
    root = tmp_path / "ds"
    write_bids_dataset(root, ("01", "02"), **SMALL)
    culprit = _nan_data(root)
    out = tmp_path / "out"
    rc = main([str(root), str(out), "participant", "--no-data-check", "--stop-on-first-crash",
               "-w", str(tmp_path / "work")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 65, err
    assert len(err) == 1 and os.path.basename(culprit) in err[0] and "crash file" in err[0]
    assert not list((out / "dmriharmony").rglob("sub-01_*.nii.gz"))


def test_internal_error_exits_70(tmp_path, capsys, monkeypatch):
    import dmriharmony.interfaces.dti as idti

    def boom(*args, **kwargs):
        raise RuntimeError("simulated bug in the fit")

    monkeypatch.setattr(idti, "fit_tensor_file", boom)
    root = tmp_path / "ds"
    write_bids_dataset(root, ("01",), **SMALL)
    out = tmp_path / "out"
    rc = main([str(root), str(out), "participant", "-w", str(tmp_path / "work")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 70
    assert len(err) == 1 and "simulated bug in the fit" in err[0]
    assert not list(out.rglob("*_dwimap.nii.gz"))


def test_site_table_lists_all_runs_whatever_the_filter(tmp_path):
    root = tmp_path / "ds"
    write_bids_dataset(root, ("01", "02"), sites={"01": "X", "02": "Y"}, **SMALL)
    out = tmp_path / "out"
    assert main([str(root), str(out), "participant", "--participant-label", "02"]) == 0
    rows = (out / "dmriharmony" / "site_table.tsv").read_text().strip().splitlines()
    assert len(rows) == 3
    assert not (out / "dmriharmony" / "sub-01").exists()


def test_other_runs_finish_when_one_node_fails(tmp_path, capsys):
    """Without --stop-on-first-crash the good subject is processed, the bad one reported."""
    root = tmp_path / "ds"
    write_bids_dataset(root, ("01", "02"), **SMALL)
    culprit = _nan_data(root)  # sub-01
    out = tmp_path / "out"
    rc = main([str(root), str(out), "participant", "--no-data-check"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 65 and len(err) == 1 and os.path.basename(culprit) in err[0]
    assert list((out / "dmriharmony" / "sub-02").rglob("*_param-fa_dwimap.nii.gz"))
    assert not list((out / "dmriharmony").rglob("sub-01_*.nii.gz"))


def test_unknown_plugin_is_a_usage_error(tmp_path, capsys):
    root = tmp_path / "ds"
    write_bids_dataset(root, ("01",), **SMALL)
    assert main([str(root), str(tmp_path / "out"), "participant", "--plugin", "Nope"]) == 64
    err = capsys.readouterr().err
    assert "Nope" in err and "MultiProc" in err
