"""Nipype interface writing BIDS derivatives (atomic copy + JSON sidecar)."""

from __future__ import annotations

import json
import os

os.environ.setdefault("NIPYPE_NO_ET", "1")  # no version check over the network

import shutil  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

from nipype.interfaces.base import (  # noqa: E402
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    SimpleInterface,
    TraitedSpec,
    Undefined,
    traits,
)

from dmriharmony._fs import set_default_mode  # noqa: E402
from dmriharmony.bids.derivatives import derivative_dir, derivative_name, provenance  # noqa: E402
from dmriharmony.dti.io import atomic_write_bytes  # noqa: E402


class _SinkInputSpec(BaseInterfaceInputSpec):
    base_directory = traits.Directory(mandatory=True, desc="derivatives root (out/dmriharmony)")
    prefix = traits.Str(mandatory=True, desc="entity prefix of the name (sub-01_ses-A_run-1)")
    entities = traits.Dict(mandatory=True, desc="entities (subject, session) for the folder")
    source_files = InputMultiObject(File(exists=True), mandatory=True,
                                    desc="the raw DWI run(s), for Sources")
    in_file = File(exists=True, mandatory=True, desc="file to store")
    bids_root = traits.Directory(desc="raw dataset root, for BIDS URIs in Sources")
    suffix = traits.Str(mandatory=True)
    extension = traits.Str(".nii.gz", usedefault=True)
    space = traits.Str()
    model = traits.Str()
    param = traits.Str()
    desc = traits.Str()
    description = traits.Str("", usedefault=True, desc="sidecar Description")
    metadata = traits.Dict(desc="extra sidecar fields")
    write_sidecar = traits.Bool(True, usedefault=True)
    out_name = traits.Str(desc="store under this file name instead of the one built from the "
                               "entities (names with from-/to-/mode- entities, e.g. transforms)")


class _SinkOutputSpec(TraitedSpec):
    out_file = File(desc="the stored derivative")
    out_meta = File(desc="its JSON sidecar")


class DerivativesDataSink(SimpleInterface):
    """Copy a result into ``out/dmriharmony/sub-X/[ses-Y/]dwi/`` with its BIDS name.

    The copy goes to a temporary file in the destination folder then is renamed, so the
    output folder never holds a half-written file. Always re-runs (cheap) so that outputs
    deleted by hand are restored from the cache of the heavy nodes.
    """

    input_spec = _SinkInputSpec
    output_spec = _SinkOutputSpec
    always_run = True

    def _opt(self, name: str):
        value = getattr(self.inputs, name)
        return None if value is Undefined or value == "" or value == {} else value

    def _run_interface(self, runtime):
        inputs = self.inputs
        out_dir = derivative_dir(inputs.base_directory, inputs.entities)
        out_dir.mkdir(parents=True, exist_ok=True)
        name = self._opt("out_name") or derivative_name(
            inputs.prefix, inputs.suffix, inputs.extension, space=self._opt("space"),
            model=self._opt("model"), param=self._opt("param"), desc=self._opt("desc"),
        )
        dest = out_dir / name
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=out_dir)
        os.close(fd)
        try:
            shutil.copyfile(inputs.in_file, tmp)
            set_default_mode(tmp)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._results["out_file"] = str(dest)
        if inputs.write_sidecar:
            meta = provenance(sources=list(inputs.source_files), description=inputs.description,
                              bids_root=self._opt("bids_root"),
                              extra=dict(inputs.metadata) if self._opt("metadata") else None)
            stem = name[: -len(inputs.extension)]
            meta_path = atomic_write_bytes(
                (json.dumps(meta, indent=2, default=str) + "\n").encode(),
                out_dir / f"{stem}.json",
            )
            self._results["out_meta"] = str(meta_path)
        return runtime
