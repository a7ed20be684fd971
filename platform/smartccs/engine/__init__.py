"""The screening engine: the steps of ``smartccs.screening`` and ``smartccs.adaptation`` run over
Ray Data, one code path for the batch job (``engine.job``), the service and classifier training."""
