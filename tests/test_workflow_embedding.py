"""Embedding: a user's own Nipype graph over subjects runs dmriharmony's participant, TBSS and
group sub-workflows (README, "Embedding the workflows").

Slow (DWI -> DTI -> registration -> skeleton -> ROI rows -> JoinNode -> group): in CI.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.slow


def test_user_graph_connects_participant_tbss_and_group(tmp_path):
    from nipype.interfaces import utility as niu
    from nipype.pipeline import engine as pe

    from dmriharmony.workflows.group import init_group_wf
    from dmriharmony.workflows.participant import init_participant_wf
    from dmriharmony.workflows.tbss import init_tbss_wf

    ds = tmp_path / "ds"
    subprocess.run([sys.executable, "-m", "dmriharmony.simulate.cli", str(ds), "--seed", "2",
                    "--subjects-per-site", "3", "--traveling-subjects", "0",
                    "--voxel-size", "3", "--quiet"], check=True)
    runs = sorted(ds.glob("sub-*/ses-*/dwi/*_dwi.nii.gz"))
    subs = [r.name.split("_")[0][4:] for r in runs]
    sess = [r.name.split("_")[1][4:] for r in runs]
    parts = pd.read_csv(ds / "participants.tsv", sep="\t")
    site_table = tmp_path / "site_table.tsv"
    pd.DataFrame({"subject": parts["participant_id"].str[4:], "site": parts["site"]}).to_csv(
        site_table, sep="\t", index=False)

    wf = pe.Workflow(name="my_study", base_dir=str(tmp_path / "work"))
    scans = pe.Node(niu.IdentityInterface(
        fields=["dwi", "bval", "bvec", "subject", "session", "prefix"]), name="scans")
    scans.iterables = [("dwi", [str(r) for r in runs]),
                       ("bval", [str(r).replace(".nii.gz", ".bval") for r in runs]),
                       ("bvec", [str(r).replace(".nii.gz", ".bvec") for r in runs]),
                       ("subject", subs), ("session", sess),
                       ("prefix", [f"sub-{a}_ses-{b}" for a, b in zip(subs, sess, strict=True)])]
    scans.synchronize = True
    dti = init_participant_wf()
    tbss = init_tbss_wf(name="tbss_wf", template_source="phantom",
                        registration={"syn_iters": [10, 5]})
    join = pe.JoinNode(niu.IdentityInterface(fields=["roi_files"]), joinsource="scans",
                       joinfield=["roi_files"], name="join_rois")
    group = init_group_wf(harmonizers=["combat", "mixed"], covariates=["age"], effect="dx",
                          report=False, evaluate=False)
    group.inputs.inputnode.participants_tsv = str(ds / "participants.tsv")
    group.inputs.inputnode.site_table = str(site_table)
    mine = pe.Node(niu.Function(input_names=["group_dir"], output_names=["n_rows"],
                                function=_count_rows), name="my_summary")
    wf.connect([
        (scans, dti, [("dwi", "inputnode.dwi_file"), ("bval", "inputnode.bval_file"),
                      ("bvec", "inputnode.bvec_file")]),
        (dti, tbss, [("outputnode.fa", "inputnode.fa"), ("outputnode.md", "inputnode.md"),
                     ("outputnode.ad", "inputnode.ad"), ("outputnode.rd", "inputnode.rd")]),
        (scans, tbss, [("subject", "inputnode.subject"), ("session", "inputnode.session"),
                       ("prefix", "inputnode.prefix")]),
        (tbss, join, [("outputnode.roi_tsv", "roi_files")]),
        (join, group, [("roi_files", "inputnode.roi_files")]),
        (group, mine, [("outputnode.group_dir", "group_dir")]),
    ])
    graph = wf.run(plugin="MultiProc", plugin_args={"n_procs": 2})
    node = next(n for n in graph.nodes() if n.name == "my_summary")
    assert node.result.outputs.n_rows == len(runs) * 2  # the FA and MD rows of every run
    harm = next(n for n in graph.nodes() if n.name == "harmonize")
    out = Path(harm.result.outputs.out_dir)
    assert (out / "effects_desc-mixed.tsv").is_file()
    assert (out / "models" / "combat" / "fa_model.npz").is_file()


def _count_rows(group_dir):
    from pathlib import Path

    import pandas as pd

    return len(pd.read_csv(Path(group_dir) / "roi_table_desc-combat.tsv", sep="\t"))
