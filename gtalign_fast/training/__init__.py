"""The GRPO trainer and its stages, one module per stage.

``GRPOTrainer._training_step`` (trainer.py) reads top to bottom: rollout.py picks prompts and
generates, scoring.py scores and builds advantages, logprobs.py and optimization.py compute the
log-probs, the loss and the update; distributed.py, metrics.py, checkpoint.py and callbacks.py
serve every stage; grpo_config.py holds the configuration (TRL's field names).
preemption.py stops a run cleanly when the cluster asks.
"""
