"""Analysis of a results store: statistics (``stats``, ``reliability``), curves, failure
classes (``failures``), seed tables (``tables``), cross-task aggregates (``aggregate``,
``scores``) and hyperparameter importance. Pure NumPy/pandas/SciPy: never imports the
trainer, torch, gymnasium or numba."""
