"""Dynamic Mutual Training (Feng et al., Pattern Recognition 2022, Algorithm 1) and DMTC, one file per step.

* :mod:`~dmtc.dmt.pair` — how models A and B differ (seeds, inits, subsets) and which images each sees;
* :mod:`~dmtc.dmt.phases` — the warm-up and the phases r_1..r_K, and the record a finished one leaves;
* :mod:`~dmtc.dmt.labeling` — each model labels the unlabeled split once per phase (DDP shards);
* :mod:`~dmtc.dmt.scores`, :mod:`~dmtc.dmt.store` — the stored confidence code and the pseudo-label store;
* :mod:`~dmtc.dmt.curriculum` — per-class histograms, class-balanced thresholds, pseudo-label quality;
* :mod:`~dmtc.dmt.phase_data` — labeled + pseudo-labeled batches of a phase;
* :mod:`~dmtc.dmt.mutual` — A trains on B's labels and B on A's (the dynamic mutual loss);
* :mod:`~dmtc.dmt.contrast` — DMTC's contrastive term (pixels, ReCo, memory bank) for either stage;
* :mod:`~dmtc.dmt.protocol` — warm-up, then for each r: label, train mutually; resume;
* :mod:`~dmtc.dmt.results` — what a run reports: A, B and the ensemble per phase.
"""
