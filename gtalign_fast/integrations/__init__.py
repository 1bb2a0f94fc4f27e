"""Adapters for TRL and verl: our kernels and the GTAlign reward inside the trainers people already run.

- :mod:`gtalign_fast.integrations.trl`: the GTAlign reward as a TRL reward function, and
  :func:`~gtalign_fast.integrations.trl.patch_grpo_trainer`, which routes TRL's ``GRPOTrainer`` log-probs and
  GRPO loss through our fused ops.
- :mod:`gtalign_fast.integrations.verl`: a verl plugin (policy loss, advantage estimator, ``compute_score``).

Each submodule imports its framework only when used; importing this package imports neither.
"""
