"""Helpers for checking gtalign_fast against the peers' own code (parity tests, benchmarks)."""

from __future__ import annotations

import collections
import inspect
import types

import torch

_OBJECTIVE_ARGS = frozenset(("sapo_temperature_pos", "sapo_temperature_neg", "vespo_k_pos", "vespo_lambda_pos",
                             "vespo_k_neg", "vespo_lambda_neg"))


def trl_grpo_loss(*args, **kwargs) -> torch.Tensor:
    """TRL's own ``GRPOTrainer._compute_loss`` on given per-token log-probs (the arguments of
    :func:`trl_trainer_stub`). Differentiable w.r.t. ``logp``.

    Raises
    ------
    ImportError
        When TRL is not installed.
    """
    from trl.trainer.grpo_trainer import GRPOTrainer

    trainer, inputs = trl_trainer_stub(*args, **kwargs)
    return GRPOTrainer._compute_loss(trainer, None, inputs)


def trl_trainer_stub(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    loss_type: str = "grpo",
    importance_sampling_level: str = "token",
    num_items_in_batch: torch.Tensor | None = None,
    use_bias_correction_kl: bool = False,
    importance_sampling_ratio: torch.Tensor | None = None,
    **objective_args: float,
) -> tuple[types.SimpleNamespace, dict]:
    """A minimal stand-in for TRL's ``GRPOTrainer`` state and the inputs of its ``_compute_loss``, on
    given per-token log-probs: one process, no gradient accumulation, no vLLM generation, no entropy
    masking. ``GRPOTrainer._compute_loss(trainer, None, inputs)`` runs TRL's own code on it (and the
    TRL patch's ``_compute_loss`` runs on the same stand-in); the metrics land in ``trainer._metrics``.

    Parameters
    ----------
    logp, old_logp : Tensor, shape ``[B, T]``
    advantages : Tensor, shape ``[B]`` or ``[B, T]``
    mask : Tensor, shape ``[B, T]``
    ref_logp : Tensor, shape ``[B, T]``, optional
        Needed when ``beta != 0``.
    importance_sampling_ratio : Tensor, shape ``[B, T]`` or ``[B, 1]``, optional
        TRL's vLLM importance-sampling ratio (``inputs["importance_sampling_ratio"]``); given, TRL runs
        as with ``use_vllm`` and ``vllm_importance_sampling_correction``.
    **objective_args : float
        TRL's ``GRPOConfig`` fields of the SAPO and VESPO objectives (``sapo_temperature_pos``,
        ``vespo_k_pos``, ...); default: TRL's defaults (those of ``GrpoObjective``).

    Raises
    ------
    ImportError
        When TRL is not installed.
    """
    from trl.trainer.grpo_trainer import GRPOTrainer

    from gtalign_fast.ops._grpo_objective import OPTION_DEFAULTS

    unknown = objective_args.keys() - _OBJECTIVE_ARGS
    if unknown:
        raise TypeError(f"trl_trainer_stub() got unexpected keyword arguments {sorted(unknown)}")
    objective_args = {name: OPTION_DEFAULTS[name] for name in _OBJECTIVE_ARGS} | objective_args
    vllm_is = importance_sampling_ratio is not None
    args = types.SimpleNamespace(delta=None, use_bias_correction_kl=use_bias_correction_kl,
                                 vllm_importance_sampling_correction=vllm_is, **objective_args,
                                 top_entropy_quantile=1.0, off_policy_mask_threshold=None, steps_per_generation=1)
    accelerator = types.SimpleNamespace(num_processes=1, gather=lambda x: x, gather_for_metrics=lambda x: x,
                                        reduce=lambda x, reduction="sum": x, sync_gradients=True)
    # TRL >= 1.0 returns (logps, entropies, aux_loss) from this method; older versions a pair.
    returns_aux = "aux_loss" in inspect.getsource(GRPOTrainer._compute_loss)
    entropies = torch.zeros_like(logp)
    outputs = (logp, entropies, None) if returns_aux else (logp, entropies)
    trainer = types.SimpleNamespace(
        beta=beta, epsilon_low=epsilon_low, epsilon_high=epsilon_high, loss_type=loss_type,
        importance_sampling_level=importance_sampling_level, max_completion_length=logp.shape[1],
        current_gradient_accumulation_steps=1, args=args, tools=None, accelerator=accelerator,
        model=types.SimpleNamespace(training=True),
        _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
        top_entropy_quantile=1.0, use_liger_kernel=False, use_vllm=vllm_is, num_iterations=2,
        vllm_importance_sampling_correction=vllm_is, temperature=1.0,
        get_gamma_weights=GRPOTrainer.get_gamma_weights, aux_loss_enabled=False,
        off_policy_mask_threshold=None, _entropy_bonus_enabled=False,
        _get_per_token_logps_and_entropies=lambda *a, **k: outputs,
    )
    batch, length = logp.shape
    device = logp.device
    inputs = dict(prompt_ids=torch.zeros(batch, 1, dtype=torch.long, device=device),
                  prompt_mask=torch.ones(batch, 1, dtype=torch.long, device=device),
                  completion_ids=torch.zeros(batch, length, dtype=torch.long, device=device),
                  completion_mask=mask.long(), advantages=advantages, old_per_token_logps=old_logp,
                  ref_per_token_logps=ref_logp,
                  num_items_in_batch=mask.sum() if num_items_in_batch is None else num_items_in_batch)
    if vllm_is:
        inputs["importance_sampling_ratio"] = importance_sampling_ratio
    return trainer, inputs
