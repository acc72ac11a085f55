"""Sweeps: a sweep file's spec (``spec``) and search spaces (``search_space``), the plan of
populations and the executors that train them (``runner``), and the drivers that store
their results (``grid``, ``optuna``; ``train`` for one config)."""
