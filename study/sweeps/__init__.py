"""Sweeps: a sweep file's spec (``spec``: its runs, their ``Budget`` and ids) and search
spaces (``search_space``), the one job type (``jobs``: a chunk of runs and the worker
function), the executors that train chunks (``executors``: inline, loky, Dask, and the one
progress bar), the grid's plan of populations (``runner``), the manifest both drivers write
(``manifest``), and the drivers that store their results (``grid``, ``optuna``, whose
Optuna internals stay in ``optuna_storage``; ``train`` for one config)."""
