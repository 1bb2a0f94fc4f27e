"""verl plugin: our fused GRPO loss and group advantages inside verl, and GTAlign's reward in verl's signature.

verl 0.9 imports every setuptools entry point of group ``verl.plugins`` when ``verl`` is imported (driver and Ray
workers alike; ``VERL_USE_EXTERNAL_PLUGINS=none`` turns that off). Installing ``gtalign_fast`` declares one pointing
at this module, which then registers, in ``verl.trainer.ppo.core_algos``:

- policy loss ``gtalign_fast`` (``actor_rollout_ref.actor.policy_loss.loss_mode=gtalign_fast``): verl's ``vanilla``
  loss -- clipped surrogate with clip-higher (``clip_ratio_low`` / ``clip_ratio_high``), dual clip for negative
  advantages (``clip_ratio_c``), log-ratio clamped to +-20 -- computed by one :func:`gtalign_fast.ops.grpo_loss`
  call, for every ``loss_agg_mode`` (token-mean, token-sum, seq-mean-token-sum, seq-mean-token-sum-norm,
  seq-mean-token-mean) with verl's global-batch normalisers (``dp_size``, ``batch_num_tokens``,
  ``global_batch_size``, ``loss_scale_factor``) and rollout-correction weights;
- policy loss ``gtalign_fast_gspo``: verl's ``gspo`` loss (GSPO-token: the sequence-level ratio on each token, no
  dual clip) the same way;
- advantage estimator ``gtalign_welfare`` (``algorithm.adv_estimator=gtalign_welfare``): the GRPO group advantage
  of the welfare ``W`` by :func:`gtalign_fast.ops.welfare_advantages` in one kernel, groups by ``uid`` in any order.

verl hands a custom estimator only ``token_level_rewards`` (one scalar per response), not U and L, so the
Cobb-Douglas welfare ``W = U^alpha L^(1 - alpha)`` is computed by :func:`compute_score` and arrives as that scalar;
the estimator then runs the fused kernel with ``alpha = 1`` (W passes through) for the group statistics.

The reward (``reward.custom_reward_function.path=pkg://gtalign_fast.integrations.verl``):

- :func:`compute_score` ``(data_source, solution_str, ground_truth, extra_info=None, **settings) -> dict``:
  ``score`` (= W), ``user_reward`` (U), ``llm_reward`` (L), ``answer_reward``, ``format_reward``, ``format`` (F),
  ``payoff_diversity`` (P), ``utility``, ``reward_gap``, ``hard_failure`` and ``judge_failed`` (0/1);
- :func:`compute_score_async`: the same as a coroutine, run on a thread pool, so verl's reward loop keeps many
  judge calls in flight at once;
- :func:`compute_score_batch`: verl's ``batch`` reward manager signature (``data_sources, solution_strs,
  ground_truths, extra_infos``); one judge call per data source, its requests concurrent.

Each sample is routed by ``data_source`` to its task judge (:func:`gtalign_fast.recipes.gtalign_task_judges`:
``math-hard``, ``medium``, ``wildguard``, ``ambig_qa``, anything else the default). The judge is an
OpenAI-compatible server set by ``reward_kwargs`` (verl's ``custom_reward_function.reward_kwargs``) or, for each
one not given, an environment variable:

==================== ============================= =====================================================
reward_kwargs         environment variable          meaning
==================== ============================= =====================================================
``judge_url``         ``GTALIGN_JUDGE_URL``         base URL, e.g. ``http://127.0.0.1:30000/v1`` (see below)
``judge_model``       ``GTALIGN_JUDGE_MODEL``       the request's ``model`` (see below)
``judge_api_key``     ``GTALIGN_JUDGE_API_KEY``     bearer token (default: none)
``judge_timeout``     ``GTALIGN_JUDGE_TIMEOUT``     deadline of one request in seconds (default 60)
``judge_concurrency`` ``GTALIGN_JUDGE_CONCURRENCY`` requests in flight per batch (default 8)
``judge_max_retries`` ``GTALIGN_JUDGE_MAX_RETRIES`` retries of a failed request (default 3)
``math_model_judge``  ``GTALIGN_MATH_MODEL_JUDGE``  1: the judge re-checks math answers the rule missed
==================== ============================= =====================================================

``judge_max_tokens`` and ``judge_extra_body`` (a dict, e.g. ``{"chat_template_kwargs": {"enable_thinking":
false}}``), ``alpha`` and ``variant`` (of :class:`~gtalign_fast.game.GTAlignReward`) are ``reward_kwargs`` only. The
judge's ``{prompt}`` (the user's question) is read from ``extra_info["question"]`` (else ``prompt``, ``query``,
``problem``): verl does not pass the prompt to a reward function.

No judge is needed for rule-judged rows: ``math-hard`` (the ``\\boxed{}`` rule, unless ``math_model_judge`` is on)
is scored without any server. ``judge_url`` and ``judge_model`` are required only when a row whose data source needs
a model judge arrives; that row raises "no judge configured".

A judge failure follows verl's own convention for a reward that could not be computed (verl 0.9.1's ``limited`` and
``prime`` reward managers score a timeout or an exception 0.0 and flag it in the extra info): ``score`` is the
welfare with the answer terms 0 and ``judge_failed`` is 1 (a column of verl's reward extra info, so its mean is the
step's failure rate). It is not NaN: verl's ``grpo`` estimator would make the whole group NaN. Nothing a completion
or the judge does raises.

Deliberate differences from verl's own code (the README's "verl plugin: differences from verl" lists them too): a
batch without any loss token gives loss 0 (verl: NaN); the GSPO log-ratio is clamped to +-20 (verl: at most 10); a
group with a single response gets advantage 0 (verl's ``grpo``: ``score / (1 + eps)``); a NaN reward is a missing
one, advantage 0 and left out of its group's statistics, with a warning (verl's ``grpo``: the whole group NaN).
Unknown ``global_batch_info`` keys raise ``TypeError`` as in verl, and ``actor/pg_clipfrac`` is verl's, rollout
weights of 0 included.
"""

from __future__ import annotations

import importlib.util

from .advantage import compute_gtalign_welfare_advantage
from .loss import LOSS_AGG_MODES, compute_policy_loss_gtalign_fast, compute_policy_loss_gtalign_fast_gspo
from .reward import JUDGE_ENV, compute_score, compute_score_async, compute_score_batch

__all__ = [
    "ADV_ESTIMATOR",
    "JUDGE_ENV",
    "LOSS_AGG_MODES",
    "POLICY_LOSS",
    "POLICY_LOSS_GSPO",
    "compute_gtalign_welfare_advantage",
    "compute_policy_loss_gtalign_fast",
    "compute_policy_loss_gtalign_fast_gspo",
    "compute_score",
    "compute_score_async",
    "compute_score_batch",
    "register",
]


POLICY_LOSS = "gtalign_fast"
POLICY_LOSS_GSPO = "gtalign_fast_gspo"
ADV_ESTIMATOR = "gtalign_welfare"


# ---------------------------------------------------------------------------------------------
# Registration (run when verl loads the plugin; a no-op where verl is not installed)


def register() -> bool:
    """Register the two policy losses and the advantage estimator with verl; False when verl is not installed.

    Safe to call again. A *different* estimator already registered as ``gtalign_welfare`` makes verl raise.
    """
    if importlib.util.find_spec("verl") is None:
        return False
    from verl.trainer.ppo import core_algos

    core_algos.register_policy_loss(POLICY_LOSS)(compute_policy_loss_gtalign_fast)
    core_algos.register_policy_loss(POLICY_LOSS_GSPO)(compute_policy_loss_gtalign_fast_gspo)
    existing = core_algos.ADV_ESTIMATOR_REGISTRY.get(ADV_ESTIMATOR)
    ours = compute_gtalign_welfare_advantage
    if existing is not None and (existing.__module__, existing.__qualname__) == (ours.__module__, ours.__qualname__):
        core_algos.ADV_ESTIMATOR_REGISTRY[ADV_ESTIMATOR] = ours  # this module imported again (a reload)
    else:
        core_algos.register_adv_est(ADV_ESTIMATOR)(ours)
    return True


register()
