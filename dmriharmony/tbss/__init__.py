"""ENIGMA-style TBSS without FSL (Smith et al., NeuroImage 2006; Jahanshad et al., NeuroImage 2013).

Modules (science code: numpy/scipy/DIPY, no Nipype):

- :mod:`.templates` -- one Template interface (FA, mask, skeleton, distance map, labels, label
  table) from the bundled phantom, a user's ENIGMA-DTI folder, or a dmriharmony template folder;
- :mod:`.study` -- study-specific FA template by iterative averaging in a TemplateFlow space;
- :mod:`.register` -- FA -> template registration (centre of mass, translation, rigid, affine
  with mutual information, SyN with cross-correlation), saved transforms;
- :mod:`.skeleton` -- mean-FA skeletonisation and the skeleton distance map;
- :mod:`.project` -- the TBSS search rule projecting FA (and MD/AD/RD at the FA positions);
- :mod:`.roi` -- ENIGMA's ROI extraction, per-run rows and the group ``roi_table.tsv``;
- :mod:`.qc` -- registration-quality number and skeleton-overlay figure;
- :mod:`.pipeline` -- one run end to end (:func:`~dmriharmony.tbss.pipeline.run_tbss`);
- :mod:`.groundtruth`, :mod:`.synthetic` -- accuracy against simulated ground truth, known
  deformations for tests and benchmarks.

Nipype wrappers: :mod:`dmriharmony.interfaces.tbss`; workflows: :mod:`dmriharmony.workflows.tbss`.
"""
