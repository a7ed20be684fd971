"""The Smart-CCS study as one job: cohort, pretraining, finetuning, screening with and without
adaptation, evaluation and the ablation report (``ccs demo``, ``python -m jobs.study``)."""
