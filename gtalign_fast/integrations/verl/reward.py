"""GTAlign's reward in verl's signatures: :func:`compute_score`, :func:`compute_score_async`,
:func:`compute_score_batch`, and the judge settings they read (see the package docstring)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import json
import math
import os
import threading
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

# ---------------------------------------------------------------------------------------------
# Reward: settings


JUDGE_ENV = {
    "judge_url": "GTALIGN_JUDGE_URL",
    "judge_model": "GTALIGN_JUDGE_MODEL",
    "judge_api_key": "GTALIGN_JUDGE_API_KEY",
    "judge_timeout": "GTALIGN_JUDGE_TIMEOUT",
    "judge_concurrency": "GTALIGN_JUDGE_CONCURRENCY",
    "judge_max_retries": "GTALIGN_JUDGE_MAX_RETRIES",
    "math_model_judge": "GTALIGN_MATH_MODEL_JUDGE",
}
"""``reward_kwargs`` name -> the environment variable read when it is not given."""

_CONFIG_ONLY = ("judge_max_tokens", "judge_extra_body", "alpha", "variant")
# What verl itself may add to a reward function's kwargs (when a reward model is configured); not ours.
_VERL_KWARGS = ("reward_router_address", "reward_model_tokenizer")
_QUESTION_KEYS = ("question", "prompt", "query", "problem")


@dataclass(frozen=True)
class _Settings:
    """The resolved reward settings; hashable, so one reward (and one HTTP client) serves each setting."""

    url: str | None  # None: no judge configured, rule-judged rows only
    model: str | None
    api_key: str | None
    timeout: float
    concurrency: int
    max_retries: int
    math_model_judge: bool
    max_tokens: int | None
    extra_body: str  # JSON, sorted keys
    alpha: float
    variant: str


def _raw(config: Mapping[str, Any], name: str) -> tuple[Any, str]:
    """(value, where it came from) for a setting: ``reward_kwargs`` first, then its environment variable."""
    if config.get(name) is not None:
        return config[name], f"reward_kwargs[{name!r}]"
    env = JUDGE_ENV.get(name)
    if env is not None and os.environ.get(env, "").strip():
        return os.environ[env].strip(), env
    return None, name


def _number(config: Mapping[str, Any], name: str, kind: type, default: Any, low: float) -> Any:
    value, where = _raw(config, name)
    if value is None:
        return default
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"gtalign_fast compute_score: {where} must be a {kind.__name__}, got {value!r}") from None
    if not (math.isfinite(number) and number >= low):
        raise ValueError(f"gtalign_fast compute_score: {where} must be finite and >= {low}, got {value!r}")
    return number


def _flag(config: Mapping[str, Any], name: str) -> bool:
    value, where = _raw(config, name)
    if value is None or isinstance(value, bool):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"gtalign_fast compute_score: {where} must be a boolean (1/0, true/false), got {value!r}")


_NO_JUDGE = (
    "gtalign_fast compute_score: no judge configured: set GTALIGN_JUDGE_URL and GTALIGN_JUDGE_MODEL (or "
    "reward_kwargs judge_url / judge_model) to an OpenAI-compatible server, e.g. http://127.0.0.1:30000/v1"
)


def _check_judge_needed(settings: _Settings, data_sources: Sequence[Any]) -> None:
    """The "no judge configured" error for the first row whose data source needs a model judge, when none is
    configured; rule-judged rows (``math-hard`` without ``math_model_judge``) need none."""
    from gtalign_fast.recipes.tasks import RULE_JUDGED_TASKS, needs_model_judge

    if settings.url is not None:
        return
    for source in data_sources:
        if needs_model_judge(source, math_model_judge=settings.math_model_judge):
            why = ("math_model_judge is on" if settings.math_model_judge else
                   f"only {list(RULE_JUDGED_TASKS)} are scored without one")
            raise ValueError(f"{_NO_JUDGE}; data source {source!r} needs a model judge ({why})")


def _settings(config: Mapping[str, Any]) -> _Settings:
    unknown = sorted(set(config) - set(JUDGE_ENV) - set(_CONFIG_ONLY) - set(_VERL_KWARGS))
    if unknown:
        raise TypeError(
            f"gtalign_fast compute_score: unknown reward_kwargs {unknown}; "
            f"known: {sorted((*JUDGE_ENV, *_CONFIG_ONLY))}"
        )
    url, _ = _raw(config, "judge_url")
    model, _ = _raw(config, "judge_model")
    if bool(url) != bool(model):  # half a judge is a configuration error even before a model-judged row arrives
        raise ValueError(_NO_JUDGE + " (only one of the two is set)")
    api_key, _ = _raw(config, "judge_api_key")
    extra_body = config.get("judge_extra_body") or {}
    if not isinstance(extra_body, Mapping):
        raise TypeError(f"gtalign_fast compute_score: judge_extra_body must be a mapping, got {type(extra_body)}")
    max_tokens = config.get("judge_max_tokens")
    return _Settings(
        url=str(url) if url else None, model=str(model) if model else None,
        api_key=None if api_key is None else str(api_key),
        timeout=_number(config, "judge_timeout", float, 60.0, 1e-3),
        concurrency=_number(config, "judge_concurrency", int, 8, 1),
        max_retries=_number(config, "judge_max_retries", int, 3, 0),
        math_model_judge=_flag(config, "math_model_judge"),
        max_tokens=None if max_tokens is None else _number(config, "judge_max_tokens", int, None, 1),
        extra_body=json.dumps(_plain(extra_body), sort_keys=True),
        alpha=_number(config, "alpha", float, 0.5, 0.0),
        variant=str(config.get("variant") or "cobb"),
    )


def _plain(value: Any) -> Any:
    """An OmegaConf / nested mapping as plain dicts and lists (JSON-serialisable)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


_REWARDS: dict[_Settings, Any] = {}
_REWARDS_LOCK = threading.Lock()


def _reward_for(settings: _Settings) -> Any:
    """One :class:`~gtalign_fast.game.GTAlignReward` over the task judges per setting (and per process)."""
    with _REWARDS_LOCK:
        reward = _REWARDS.get(settings)
        if reward is None:
            from gtalign_fast.game.judges import OpenAIJudge
            from gtalign_fast.recipes.tasks import gtalign_reward

            judge = None if settings.url is None else OpenAIJudge(
                settings.url, settings.model, api_key=settings.api_key, timeout=settings.timeout,
                concurrency=settings.concurrency, max_retries=settings.max_retries, max_tokens=settings.max_tokens,
                extra_body=json.loads(settings.extra_body),
            )
            reward = gtalign_reward(
                judge, math_model_judge=judge if settings.math_model_judge else None,
                alpha=settings.alpha, variant=settings.variant, name="gtalign",
            )
            _REWARDS[settings] = reward
        return reward


# ---------------------------------------------------------------------------------------------
# Reward: the functions verl calls


def _question(extra_info: Mapping[str, Any]) -> Any:
    for key in _QUESTION_KEYS:
        if extra_info.get(key) is not None:
            value = extra_info[key]
            return value.tolist() if hasattr(value, "tolist") else value  # a numpy array from parquet
    return None


def _row(fields: Mapping[str, Any]) -> dict[str, float]:
    """verl's result dict: numbers only (verl turns each key into a per-sample column and averages it)."""
    return {
        "score": float(fields["score"]),
        "user_reward": float(fields["user_reward"]),
        "llm_reward": float(fields["llm_reward"]),
        "answer_reward": float(fields["answer_reward"]),
        "format_reward": float(fields["format_reward"]),
        "format": float(fields["F"]),
        "payoff_diversity": float(fields["P"]),
        "utility": float(fields["utility"]),
        "reward_gap": float(fields["reward_gap"]),
        "hard_failure": float(bool(fields["hard_failure"])),
        "judge_failed": float(bool(fields["judge_failed"])),
    }


def compute_score_batch(
    data_sources: Sequence[Any],
    solution_strs: Sequence[str],
    ground_truths: Sequence[Any],
    extra_infos: Sequence[Mapping[str, Any] | None] | None = None,
    **settings: Any,
) -> list[dict[str, float]]:
    """GTAlign's reward for a batch (verl's ``batch`` reward manager signature); one result dict per sample.

    The samples of each ``data_source`` go to their task judge in one call, whose requests run concurrently
    (``judge_concurrency`` at a time). ``settings`` are the ``reward_kwargs`` of the module docstring.
    """
    from gtalign_fast.recipes.data import reference_text

    n = len(solution_strs)
    extras = [None] * n if extra_infos is None else list(extra_infos)
    if len(data_sources) != n or len(ground_truths) != n or len(extras) != n:
        raise ValueError(
            f"gtalign_fast compute_score_batch: {len(data_sources)} data_sources, {n} solution_strs, "
            f"{len(ground_truths)} ground_truths and {len(extras)} extra_infos must have the same length"
        )
    resolved = _settings(settings)
    _check_judge_needed(resolved, data_sources)
    reward = _reward_for(resolved)
    extras = [dict(e) if isinstance(e, Mapping) else {} for e in extras]
    batch = reward(
        prompts=[_question(e) for e in extras], completions=[str(s) for s in solution_strs],
        data_source=list(data_sources), ground_truth=[reference_text(g) for g in ground_truths], extra_info=extras,
    )
    return [_row(fields) for fields in batch.fields]


def compute_score(
    data_source: Any, solution_str: str, ground_truth: Any, extra_info: Mapping[str, Any] | None = None,
    **settings: Any,
) -> dict[str, float]:
    """GTAlign's reward for one sample, in verl's ``compute_score`` signature.

    Returns
    -------
    dict
        ``score`` (W), ``user_reward`` (U), ``llm_reward`` (L), ``answer_reward``, ``format_reward``
        (``0.1 F + 0.15 P``), ``format`` (F), ``payoff_diversity`` (P), ``utility``, ``reward_gap``,
        ``hard_failure`` and ``judge_failed`` (0 or 1).

    Raises
    ------
    ValueError, TypeError
        Only for a configuration error (no judge URL / model while ``data_source`` needs a model judge, a bad or
        unknown setting); never for what the model wrote or what the judge answered. ``math-hard`` rows are
        scored by the ``\\boxed{}`` rule without any judge unless ``math_model_judge`` is on.
    """
    return compute_score_batch([data_source], [solution_str], [ground_truth], [extra_info], **settings)[0]


_EXECUTOR: tuple[int, concurrent.futures.ThreadPoolExecutor] | None = None
_EXECUTOR_LOCK = threading.Lock()
# Threads that mostly wait on the judge's own event loop: cheap, and more than asyncio's default (cores + 4),
# so that a reward loop firing a whole batch of coroutines keeps that many judge calls in flight.
_ASYNC_WORKERS = 64


def _executor() -> concurrent.futures.ThreadPoolExecutor:
    global _EXECUTOR
    with _EXECUTOR_LOCK:
        if _EXECUTOR is None or _EXECUTOR[0] != os.getpid():  # a forked child gets its own threads
            pool = concurrent.futures.ThreadPoolExecutor(_ASYNC_WORKERS, thread_name_prefix="gtalign-verl-score")
            _EXECUTOR = (os.getpid(), pool)
        return _EXECUTOR[1]


async def compute_score_async(
    data_source: Any, solution_str: str, ground_truth: Any, extra_info: Mapping[str, Any] | None = None,
    **settings: Any,
) -> dict[str, float]:
    """:func:`compute_score` as a coroutine (verl's reward loop awaits it): the scoring runs on a thread pool of
    the module, so concurrent calls overlap their judge requests instead of queueing behind each other."""
    call = functools.partial(compute_score, data_source, solution_str, ground_truth, extra_info, **settings)
    return await asyncio.get_running_loop().run_in_executor(_executor(), call)
