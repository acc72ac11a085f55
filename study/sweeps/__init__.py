"""Sweeps: a sweep file's spec (``spec``) and search spaces (``search_space``), the one job
type (``jobs``: a chunk of runs, its budget, the worker function), the executors that
train chunks (``executors``: inline, loky, Dask), the grid's plan of populations
(``runner``), and the drivers that store their results (``grid``, ``optuna``, whose Optuna
internals stay in ``optuna_storage``; ``train`` for one config)."""
