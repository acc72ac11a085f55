"""The trainer: populations of (config, seed) members trained as one vectorized computation.

``population`` runs the loop (collect a rollout, compute targets, update, log); the network
(``networks``, stacked layers in ``nets``), the losses and gradients (``updates``), the
per-member optimizers (``optim``), GAE (``gae``), the per-member random streams (``rng``),
the compiled kernels (``kernels``) and the population environments (``envs``) plug into it.
Imports torch; nothing below ``study.analysis`` or ``study.report`` imports this package.
"""
