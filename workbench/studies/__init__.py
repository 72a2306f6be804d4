"""The two studies the workbench runs on a zoo, and their tables.

- :mod:`~workbench.studies.composition` - the composition study (DAMC / MMER papers): NaiveMC, DAMC,
  MMER, the experts and the oracle on MCUB-mini and the experts' own tasks, every seed; forgetting;
- :mod:`~workbench.studies.merging_benchmark` - the merging benchmark (OptMerge paper): capability and modality
  merging, OptMerge's ablations, λ chosen on validation, reported on test;
- :mod:`~workbench.studies.protocol` - the merging benchmark's protocol: split, λ choice, cached
  evaluation, the merged model at λ, one cell's rows;
- :mod:`~workbench.studies.sweep` - the merging benchmark's cells, run locally or on Ray;
- :mod:`~workbench.studies.search` - the composition study's λ searches (DAMC λ, MMER (λ, α)) as sweeps;
- :mod:`~workbench.studies.tables` - the merging benchmark's tables, paired tests and comparison with the paper;
- :mod:`~workbench.studies.published` - the papers' published tables and headline claims;
- :mod:`~workbench.studies.report` - formatting and reshaping of the studies' tables for the notebooks;
- :mod:`~workbench.studies.cache` - the prediction cache both studies use.
"""
