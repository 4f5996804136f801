"""Stage 7, runs: a sweep of settings (:mod:`~circuitfind.runs.sweep`), the settings-sensitivity study
(:mod:`~circuitfind.runs.study`), circuits over training (:mod:`~circuitfind.runs.checkpoints`), run
against run (:mod:`~circuitfind.runs.diff`), and the statistics and health flags of a run's records
(:mod:`~circuitfind.runs.statistics`, :mod:`~circuitfind.runs.health`). The Prefect flows that run them
are in :mod:`circuitfind.flows`."""
