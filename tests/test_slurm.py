"""The participant level on a real SLURM cluster, both ways, equals a local MultiProc run.

1. Nipype's SLURM plugin (``--plugin SLURM``): every workflow node is an sbatch job;
2. the job array ``scripts/slurm/participant_array.sbatch``: one participant per array task
   (each task runs the app locally on its node, with its own work folder);
3. ``scripts/slurm/submit_study.sh`` chains the group level after the array
   (``--dependency=afterok``), checked with a stub command in place of the app;
4. the group level with ``--plugin SLURM`` (each group node an sbatch job) equals
   ``--plugin MultiProc`` on the same simulated participant outputs (tests/_group_data.py):
   byte-identical tables and report, the same saved models (~30 s).

The derivatives of (1) and (2) must be byte-identical to a local ``--plugin MultiProc`` run,
except the run times in ``*_desc-tbss_qc.tsv`` (``registration_s``, ``total_s``).

Skipped unless a working SLURM is reachable (``sinfo`` on PATH and ``srun -N1 -n1 true``
succeeds within a few seconds); ``scripts/slurm/start_local_slurm.sh`` starts a single-node
cluster on this machine (root, Debian). The end-to-end test is slow (~2.5 min on 2 cores):

    bash scripts/slurm/start_local_slurm.sh && .venv/bin/python -m pytest -m slow \
        tests/test_slurm.py

(``-k group`` runs the group-level comparison only.)

On a multi-node cluster, set ``DMRIHARMONY_SLURM_TMPDIR`` to a folder on a filesystem the
compute nodes share (the default is pytest's temporary folder); ``DMRIHARMONY_SLURM_SBATCH``
replaces the sbatch options (default ``-p debug``).
"""

from __future__ import annotations

import filecmp
import functools
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = REPO_ROOT / "scripts" / "slurm"
SBATCH_OPTIONS = os.environ.get("DMRIHARMONY_SLURM_SBATCH", "-p debug")
# small jobs side by side on a 2-core node
JOB_OPTIONS = f"{SBATCH_OPTIONS} --cpus-per-task=1 --mem=2G"
TIMING_COLUMNS = ("registration_s", "total_s")


@functools.lru_cache(maxsize=1)
def _slurm_missing() -> str | None:
    """Why SLURM cannot be used here (None when a job step runs)."""
    for tool in ("sinfo", "srun", "sbatch", "squeue", "scontrol"):
        if shutil.which(tool) is None:
            return f"no SLURM: {tool} not on PATH (scripts/slurm/start_local_slurm.sh starts one)"
    try:
        info = subprocess.run(["sinfo", "-h", "-o", "%P %t"], capture_output=True, text=True,
                              timeout=10)
        if info.returncode != 0:
            last = (info.stderr.strip().splitlines() or ["(no message)"])[-1]
            return f"no SLURM: sinfo failed ({last})"
        job = subprocess.run(["srun", "-N1", "-n1", "--immediate=10", *shlex.split(
            SBATCH_OPTIONS), "true"], capture_output=True, text=True, timeout=20,
            cwd=tempfile.gettempdir())
    except subprocess.TimeoutExpired as exc:
        return f"no SLURM: {exc.cmd[0]} did not answer within {exc.timeout:.0f} s"
    if job.returncode != 0:
        last = (job.stderr.strip().splitlines() or ["(no message)"])[-1]
        return f"no SLURM: srun -N1 -n1 true failed ({last})"
    return None


@pytest.fixture(scope="module")
def slurm():
    reason = _slurm_missing()
    if reason:
        pytest.skip(reason)


def _env() -> dict:
    env = dict(os.environ, NIPYPE_NO_ET="1")
    # Nipype's SLURM plugin names jobs after $LOGNAME and fails with KeyError 'LOGNAME'
    # without it (containers and CI often have none)
    env.setdefault("LOGNAME", env.get("USER") or "root")
    return env


def _app_command() -> list[str]:
    script = Path(sys.executable).parent / "dmriharmony"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "dmriharmony.cli.run"]


def _base_dir(tmp_path_factory, name: str) -> Path:
    shared = os.environ.get("DMRIHARMONY_SLURM_TMPDIR")
    if shared:
        return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=shared))
    return tmp_path_factory.mktemp(name)


def _run(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(),
                          **kw)
    assert proc.returncode == 0, (
        f"{shlex.join(cmd)} -> {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _job_state(job_id: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True,
                         timeout=10).stdout
    states = [w.split("=", 1)[1] for w in out.split() if w.startswith("JobState=")]
    return ",".join(states) or "gone"


def _wait_gone(job_ids: list[str], timeout: float) -> None:
    """Wait until none of ``job_ids`` is pending or running (squeue lists none)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        out = subprocess.run(["squeue", "-h", "-o", "%i %t", "-j", ",".join(job_ids)],
                             capture_output=True, text=True, timeout=10).stdout
        if not any(s in out.split() for s in ("PD", "R", "CG", "CF")):
            return
        time.sleep(1)
    raise AssertionError(f"jobs {job_ids} still queued after {timeout:.0f} s")


def _tree(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*") if p.is_file()}


def _compare_derivatives(ref: Path, other: Path, *, roi_table_subset: bool = False) -> list:
    """Differences between two derivative folders (empty list: the same outputs)."""
    problems: list = []
    a, b = _tree(ref), _tree(other)
    if a != b:
        problems.append(("file lists differ", sorted(map(str, a - b)), sorted(map(str, b - a))))
    for rel in sorted(a & b):
        if filecmp.cmp(ref / rel, other / rel, shallow=False):
            continue
        name = rel.name
        if name.endswith("_desc-tbss_qc.tsv"):  # run times differ from run to run
            x, y = (pd.read_csv(d / rel, sep="\t").drop(columns=list(TIMING_COLUMNS),
                                                         errors="ignore") for d in (ref, other))
            if x.equals(y):
                continue
        elif name.endswith(".nii.gz"):  # compressed bytes may differ: compare the voxels
            import nibabel as nib

            x, y = nib.load(ref / rel), nib.load(other / rel)
            if np.array_equal(x.affine, y.affine) and np.array_equal(
                    np.asanyarray(x.dataobj), np.asanyarray(y.dataobj), equal_nan=True):
                problems.append(("same voxels, different bytes (header?)", str(rel)))
                continue
        elif roi_table_subset and str(rel) == "group/roi_table.tsv":
            # each array task rebuilds this table from the ROI rows finished so far; two
            # tasks ending together may leave one row out (the group level rebuilds it)
            x, y = (pd.read_csv(d / rel, sep="\t") for d in (ref, other))
            if set(y.itertuples(index=False)) <= set(x.itertuples(index=False)):
                continue
        problems.append(("differs", str(rel)))
    return problems


@pytest.fixture(scope="module")
def study(tmp_path_factory, slurm):
    """Two simulated scans (GE, Siemens; one subject each) and the local MultiProc run."""
    from dmriharmony.simulate import simulate_dataset

    root = _base_dir(tmp_path_factory, "slurm_e2e")
    bids = simulate_dataset(root / "bids", seed=7, subjects_per_site=1, traveling_subjects=0,
                            sites=["ge", "siemens"], progress=False)
    t0 = time.perf_counter()
    _run([*_app_command(), str(bids), str(root / "out_local"), "participant",
          "-w", str(root / "work_local"), "--template", "phantom",
          "--plugin", "MultiProc", "--nprocs", "2"], timeout=900)
    print(f"local MultiProc: {time.perf_counter() - t0:.1f} s")
    return root, bids, root / "out_local" / "dmriharmony"


@pytest.mark.slow
def test_nipype_slurm_plugin_equals_multiproc(study):
    root, bids, ref = study
    out = root / "out_plugin"
    plugin_args = json.dumps({"sbatch_args": JOB_OPTIONS})
    t0 = time.perf_counter()
    proc = _run([*_app_command(), str(bids), str(out), "participant", "-w",
                 str(root / "work_plugin"), "--template", "phantom", "--plugin", "SLURM",
                 "--plugin-args", plugin_args], timeout=1200)
    print(f"--plugin SLURM: {time.perf_counter() - t0:.1f} s")
    assert "participant level done: 2 input(s)" in proc.stdout
    # the nodes really ran as SLURM jobs (Nipype writes each job's log next to its script)
    logs = list((root / "work_plugin").rglob("slurm-*.out"))
    assert len(logs) >= 2, "no SLURM job logs: the nodes did not run through sbatch"
    assert _compare_derivatives(ref, out / "dmriharmony") == []


@pytest.mark.slow
def test_participant_array_equals_multiproc(study):
    root, bids, ref = study
    subjects = root / "subjects.txt"
    subjects.write_text("sub-ge01\nsiemens01\n")  # with and without the sub- prefix
    out = root / "out_array"
    env_cmd = shlex.join(_app_command())
    t0 = time.perf_counter()
    proc = subprocess.run(
        ["sbatch", "--wait", "--array=1-2", *shlex.split(JOB_OPTIONS),
         f"--output={root}/array-%A_%a.out", f"--chdir={root}",
         str(SCRIPTS / "participant_array.sbatch"), str(subjects), str(bids), str(out),
         str(root / "work_array")],
        capture_output=True, text=True, timeout=1200, env=dict(_env(), DMRIHARMONY=env_cmd))
    print(f"sbatch --array=1-2: {time.perf_counter() - t0:.1f} s")
    logs = {p.name: p.read_text(errors="replace")[-2000:] for p in root.glob("array-*.out")}
    assert proc.returncode == 0, (proc.stdout, proc.stderr, logs)
    assert len(logs) == 2
    assert all("participant level done: 1 input(s)" in t for t in logs.values()), logs
    assert {p.name for p in (root / "work_array").iterdir()} == {"ge01", "siemens01"}
    assert _compare_derivatives(ref, out / "dmriharmony", roi_table_subset=True) == []


def _stub(path: Path, log: Path, fail_task: str = "") -> str:
    path.write_text("#!/bin/bash\n"
                    f'echo "${{SLURM_ARRAY_TASK_ID:-group}} $*" >> {shlex.quote(str(log))}\n'
                    + (f'[ "${{SLURM_ARRAY_TASK_ID:-}}" != "{fail_task}" ] || exit 3\n'
                       if fail_task else ""))
    path.chmod(0o755)
    return str(path)


def test_submit_study_chains_group_after_array(tmp_path_factory, slurm):
    """submit_study.sh: one task per sub-* folder, then the group step only after all succeed.

    A stub records each call in place of the app (seconds, not minutes); a failing task
    leaves the group step cancelled (afterok never satisfied).
    """
    root = _base_dir(tmp_path_factory, "slurm_submit")
    bids = root / "bids"
    for s in ("sub-b", "sub-a", "sub-c"):
        (bids / s).mkdir(parents=True)
    (bids / "README").write_text("not a subject\n")
    log = root / "calls.txt"
    env = dict(_env(), DMRIHARMONY=_stub(root / "stub.sh", log), SBATCH_ARGS=JOB_OPTIONS,
               GROUP_SBATCH_ARGS="--wait", GROUP_ARGS="--harmonizers combat --effect dx")
    proc = subprocess.run(["bash", str(SCRIPTS / "submit_study.sh"), str(bids),
                           str(root / "out"), "--", "--syn-iters", "0"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert (root / "out" / "slurm" / "subjects.txt").read_text() == "sub-a\nsub-b\nsub-c\n"
    calls = log.read_text().splitlines()
    assert len(calls) == 4, calls
    tasks = sorted(c for c in calls if not c.startswith("group "))
    out = root / "out"
    assert tasks == [
        f"{i} {bids} {out} participant --participant-label {s} -w {out}/work/{s} --nprocs 1 "
        f"--template phantom --syn-iters 0" for i, s in ((1, "a"), (2, "b"), (3, "c"))]
    assert calls[-1] == f"group {bids} {out} group --harmonizers combat --effect dx"

    # a failing task: the group job never runs (cancelled, dependency never satisfied)
    log.unlink()
    env["DMRIHARMONY"] = _stub(root / "stub_fail.sh", log, fail_task="2")
    env.pop("GROUP_SBATCH_ARGS")
    proc = subprocess.run(["bash", str(SCRIPTS / "submit_study.sh"), str(bids),
                           str(root / "out_fail")], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    ids = dict(line.split(": ", 1)[0:2] for line in proc.stdout.splitlines() if ": " in line)
    array_id, group_id = ids["participant array"].split()[0], ids["group"].split()[0]
    _wait_gone([array_id, group_id], timeout=120)
    assert _job_state(group_id) in ("CANCELLED", "gone"), _job_state(group_id)
    assert not any(c.startswith("group ") for c in log.read_text().splitlines())


def test_submit_study_dry_run(tmp_path):
    """DRY_RUN=1 prints the two sbatch commands (no SLURM needed)."""
    bids = tmp_path / "bids"
    (bids / "sub-01").mkdir(parents=True)
    (bids / "sub-02").mkdir()
    env = dict(os.environ, DRY_RUN="1", MAX_PARALLEL="5", SBATCH_ARGS="-p short")
    proc = subprocess.run(["bash", str(SCRIPTS / "submit_study.sh"), str(bids),
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=60,
                          env=env)
    assert proc.returncode == 0, proc.stderr
    cmds = [shlex.split(c) for c in proc.stderr.splitlines() if c.startswith("sbatch ")]
    assert len(cmds) == 2
    array, group = cmds
    assert "--array=1-2%5" in array and "-p" in array and "short" in array
    assert array[array.index(str(SCRIPTS / "participant_array.sbatch")) + 1] == str(
        tmp_path / "out" / "slurm" / "subjects.txt")
    dep = next(a for a in group if a.startswith("--dependency=afterok:"))
    assert dep.endswith(proc.stdout.split("participant array: ")[1].split()[0])
    wrapped = group[group.index("--wrap") + 1]
    assert shlex.split(wrapped)[-7:] == ["group", "--harmonizers", "combat,meta,mixed",
                                         "--covariates", "age,sex", "--effect", "dx"]
    # NO_GROUP=1: the array only; no sub-* folders: exit 66
    env["NO_GROUP"] = "1"
    proc = subprocess.run(["bash", str(SCRIPTS / "submit_study.sh"), str(bids),
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=60,
                          env=env)
    assert proc.returncode == 0 and "group:" not in proc.stdout
    assert len([c for c in proc.stderr.splitlines() if c.startswith("sbatch ")]) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run(["bash", str(SCRIPTS / "submit_study.sh"), str(empty),
                           str(tmp_path / "out2")], capture_output=True, text=True, timeout=60,
                          env=env)
    assert proc.returncode == 66 and "no sub-* folders" in proc.stderr


GROUP_HARMONIZERS = "combat,covbat,gam,meta,mixed"


def _npz_differences(a: Path, b: Path) -> list:
    """Keys whose arrays differ between two saved models (NaN equals NaN)."""
    with np.load(a, allow_pickle=False) as x, np.load(b, allow_pickle=False) as y:
        if set(x.files) != set(y.files):
            return [("keys differ", sorted(set(x.files) ^ set(y.files)))]
        out = []
        for k in sorted(x.files):
            u, v = x[k], y[k]
            nan = u.dtype.kind in "fc" and v.dtype.kind in "fc"
            if u.shape != v.shape or u.dtype != v.dtype or not np.array_equal(
                    u, v, equal_nan=nan):
                out.append(k)
        return out


@pytest.mark.slow
def test_group_level_slurm_plugin_equals_multiproc(tmp_path_factory, slurm):
    """The group level as sbatch jobs (``--plugin SLURM``) equals ``--plugin MultiProc``.

    Two copies of the same simulated participant outputs (make_group_input twice, same seed),
    one run each way with its own output and work folders; every TSV and report.html under
    ``group/`` is byte-identical and the saved ``.npz`` models are equal array by array. (The
    JSON sidecars name their inputs by absolute path, so they differ by design.)
    """
    from _group_data import make_group_input

    root = _base_dir(tmp_path_factory, "slurm_group")
    inputs = {}
    for name in ("multiproc", "slurm"):
        inputs[name] = make_group_input(root / name, seed=5)
    a, b = (inputs[n]["out"].parent for n in ("multiproc", "slurm"))
    assert _tree(a) == _tree(b) and all(
        filecmp.cmp(a / rel, b / rel, shallow=False) for rel in _tree(a)), "inputs differ"
    common = ["--harmonizers", GROUP_HARMONIZERS, "--covariates", "age,sex", "--effect", "dx",
              "--seed", "7"]
    plugins = {"multiproc": ["--plugin", "MultiProc", "--nprocs", "2"],
               "slurm": ["--plugin", "SLURM", "--plugin-args",
                         json.dumps({"sbatch_args": JOB_OPTIONS})]}
    for name, d in inputs.items():
        t0 = time.perf_counter()
        proc = _run([*_app_command(), str(d["bids"]), str(d["out"]), "group", "-w",
                     str(root / f"work_{name}"), *common, *plugins[name]], timeout=1200)
        print(f"group level, --plugin {plugins[name][1]}: {time.perf_counter() - t0:.1f} s")
        assert "group level done" in proc.stdout, proc.stdout[-2000:]
    logs = list((root / "work_slurm").rglob("slurm-*.out"))
    assert len(logs) >= 3, "no SLURM job logs: the group nodes did not run through sbatch"
    assert not list((root / "work_multiproc").rglob("slurm-*.out"))

    ref, other = (inputs[n]["deriv"] / "group" for n in ("multiproc", "slurm"))

    def outputs(g: Path) -> set[Path]:
        return {p for p in _tree(g) if p.suffix in (".tsv", ".npz") or p.name == "report.html"}

    files = outputs(ref)
    assert files == outputs(other), sorted(map(str, files ^ outputs(other)))
    assert Path("report.html") in files
    assert len([p for p in files if p.suffix == ".npz"]) >= 6  # combat, covbat, gam x fa, md
    problems = []
    for rel in sorted(files):
        if rel.suffix == ".npz":
            diff = _npz_differences(ref / rel, other / rel)
            if diff:
                problems.append((str(rel), diff))
        elif not filecmp.cmp(ref / rel, other / rel, shallow=False):
            problems.append(("differs", str(rel)))
    assert problems == []
