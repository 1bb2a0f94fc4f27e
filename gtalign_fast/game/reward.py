"""Batch reward for trainers: :class:`GTAlignReward` and per-source batch normalisation.

``GTAlignReward`` is called like a TRL reward function::

    reward = GTAlignReward({"math-hard": MathJudge(), "medium": CompositeJudge(BleuJudge(), llm_judge)})
    out = reward(prompts=prompts, completions=completions, data_source=sources, answer=answers)
    out.user, out.llm        # U and L per completion (what the fused welfare kernel consumes)
    list(out)                # the scalar per completion (W, normalised per source if asked)
    out.fields[0]["reward_gap"]

The formulas live in :func:`gtalign_fast.game.welfare.score_chain`; this module only gathers the
inputs (completion text, reference answers, data sources), calls the judges in batches, and
collects the results. A judge failure scores 0 for that completion here, flagged ``judge_failed``
and counted; :class:`~gtalign_fast.GRPOTrainer` treats a flagged completion as a missing score
(advantage 0). Nothing the model wrote and nothing a judge does raises out of ``__call__``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping, Sequence

from .chain import Chain, split_chain
from .judges import AnswerScore, JudgeItem, analyze_pareto_score, run_judge
from .welfare import DEFAULT_WEIGHTS, LOGGED_FIELDS, VARIANTS, ScoreResult, WelfareWeights, score_chain

__all__ = ["NORMALIZATIONS", "normalize_by_source", "RewardBatch", "GTAlignReward", "completion_text"]

NORMALIZATIONS: tuple[str, ...] = ("none", "zscore", "minmax")


# --------------------------------------------------------------------------------------------
# Per-source batch normalisation (GTALIGN section 5)
# --------------------------------------------------------------------------------------------


def _zscore(values: list[float]) -> list[float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))  # population std
    if std <= 1e-6:
        std = 1.0
    return [(v - mean) / (std + 1e-6) for v in values]


def _minmax(values: list[float]) -> list[float]:
    low, high = min(values), max(values)
    if high - low < 1e-6:
        return [0.0 for _ in values]
    return [(v - low) / (high - low) for v in values]


def _source_key(source: Any) -> Any:
    """A hashable grouping key for a data source: itself, or its repr when it is unhashable."""
    try:
        hash(source)
    except TypeError:
        return ("<unhashable data_source>", repr(source))
    return source


def normalize_by_source(
    scores: Sequence[float], sources: Sequence[Any] | None = None, method: str = "zscore"
) -> list[float]:
    """Normalise scores within each data source of a batch.

    Parameters
    ----------
    scores : sequence of float
    sources : sequence, optional
        One hashable label per score; ``None`` puts every score in one group.
    method : {"zscore", "minmax", "none"}
        ``zscore``: ``(s - mean) / (std + 1e-6)`` with the population std, and std := 1 when
        std <= 1e-6. ``minmax``: ``(s - min) / (max - min)``, 0 when the range is below 1e-6.

    Returns
    -------
    list of float
        In the input order.
    """
    if method not in NORMALIZATIONS:
        raise ValueError(f"method must be one of {NORMALIZATIONS}, got {method!r}")
    values = [float(s) for s in scores]
    if sources is None:
        sources = [None] * len(values)
    if len(sources) != len(values):
        raise ValueError(f"{len(values)} scores but {len(sources)} sources")
    if method == "none":
        return values
    groups: dict[Any, list[int]] = {}
    for index, source in enumerate(sources):
        groups.setdefault(_source_key(source), []).append(index)
    normalise = _zscore if method == "zscore" else _minmax
    out = [0.0] * len(values)
    for indices in groups.values():
        for index, value in zip(indices, normalise([values[i] for i in indices])):
            out[index] = value
    return out


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def _content_text(content: Any) -> str:
    """Message content as text (a string, or the text parts of a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text", "") if isinstance(p, Mapping) else str(p) for p in content]
        return "".join(p for p in parts if isinstance(p, str))
    return ""


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or the last assistant message of a chat list."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Mapping):
        return _content_text(completion.get("content"))
    if isinstance(completion, (list, tuple)):
        for message in reversed(completion):
            if isinstance(message, Mapping) and message.get("role", "assistant") == "assistant":
                return _content_text(message.get("content"))
        return ""
    return ""


def _prompt_text(prompt: Any) -> str | None:
    """The user's question: a string, or the last user message of a chat list."""
    if prompt is None:
        return None
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, (list, tuple)):
        for message in reversed(prompt):
            if isinstance(message, Mapping) and message.get("role") == "user":
                return _content_text(message.get("content"))
    return None


def _reference_text(value: Any) -> str | None:
    """A reference answer from a column value (verl's ``reward_model`` dict included)."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        for key in ("ground_truth", "answer", "solution", "reference"):
            if value.get(key) is not None:
                return str(value[key])
        return None
    if isinstance(value, (list, tuple)):
        return str(value[0]) if value else None
    return str(value)


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


class RewardBatch(list):
    """Per-completion rewards of one call: a ``list`` of floats plus the details.

    The list itself holds the scalar reward per completion (W of the variant, normalised per source
    when the reward was built with ``normalize``, over the completions whose judge gave a verdict),
    so TRL-style trainers can use it directly.

    Attributes
    ----------
    user, llm : list of float
        U and L per completion.
    score : list of float
        W per completion, before any normalisation.
    fields : list of dict
        Per completion: the reference's logged fields (``score``, ``answer_reward``,
        ``format_reward``, ``user_reward``, ``llm_reward``, ``utility``, ``reward_gap``) plus ``F``,
        ``P``, ``hard_failure``, ``judge_failed``, ``data_source``.
    results : list of ScoreResult
    judge_failures : int
        Completions whose judge failed (scored 0 for the answer terms here; a trainer treats them as
        missing: :attr:`judge_failed`).
    judge_failed : list of bool
        Per completion: its judge failed, so its score is not a verdict. :class:`~gtalign_fast.GRPOTrainer`
        leaves these out of the advantages (advantage 0) and counts them (``gtalign/judge_failures``).
    failed_judges : dict of str to int
        Failures per judge (its ``repr``, e.g. ``OpenAIJudge(model=..., url=...)``), for error messages.
    hard_failures : int
        Completions that failed the chain rules (every field 0).
    """

    def __init__(
        self, values: Iterable[float], *, results: list[ScoreResult], fields: list[dict[str, Any]],
        judge_failures: int, hard_failures: int, failed_judges: dict[str, int] | None = None,
    ) -> None:
        super().__init__(values)
        self.results = results
        self.fields = fields
        self.judge_failed = [bool(row.get("judge_failed", False)) for row in fields]
        self.failed_judges = dict(failed_judges or {})
        self.user = [r.user_reward for r in results]
        self.llm = [r.llm_reward for r in results]
        self.score = [r.score for r in results]
        self.judge_failures = judge_failures
        self.hard_failures = hard_failures

    def columns(self) -> dict[str, list[Any]]:
        """The per-sample fields as columns: ``{"score": [...], "user_reward": [...], ...}``."""
        names = list(self.fields[0]) if self.fields else list(LOGGED_FIELDS)
        return {name: [row[name] for row in self.fields] for name in names}

    def metrics(self) -> dict[str, float]:
        """Batch means of the logged fields, plus the failure counts (for a logger)."""
        out: dict[str, float] = {}
        n = len(self.fields)
        for name in (*LOGGED_FIELDS, "F", "P"):
            out[name] = sum(row[name] for row in self.fields) / n if n else 0.0
        out["judge_failures"] = float(self.judge_failures)
        out["hard_failures"] = float(self.hard_failures)
        return out


# --------------------------------------------------------------------------------------------
# The reward
# --------------------------------------------------------------------------------------------

DEFAULT_REFERENCE_COLUMNS = ("ground_truth", "answer", "solution", "reference", "reward_model")


class GTAlignReward:
    """The GTAlign mutual-welfare reward for a batch of completions.

    Parameters
    ----------
    judge : judge or mapping
        A judge (see :mod:`gtalign_fast.game.judges`) used for every sample, or a mapping
        ``data_source -> judge``; the key ``"*"`` is the fallback for unlisted sources.
    variant : {"cobb", "linear", "user", "llm", "pareto"}
        Welfare variant (``cobb`` is GTAlign).
    alpha : float
        Cobb-Douglas exponent of U.
    weights : WelfareWeights
        Weights of U and L (defaults: the reference's).
    normalize : {"none", "zscore", "minmax"}
        Per-source normalisation of the returned scalar (``.score`` stays raw).
    pareto_judge : callable, optional
        ``(completion_text, matrix) -> 0 | 0.5 | 1`` for ``variant="pareto"``; default
        :func:`~gtalign_fast.game.judges.analyze_pareto_score`.
    source_column : str
        Column holding each sample's data source.
    reference_columns : sequence of str
        Columns tried, in order, for the reference answer (a ``reward_model`` dict's
        ``ground_truth`` is used too).
    name : str
        ``__name__`` (TRL logs rewards under it).
    """

    def __init__(
        self,
        judge: Any,
        *,
        variant: str = "cobb",
        alpha: float = 0.5,
        weights: WelfareWeights = DEFAULT_WEIGHTS,
        normalize: str = "none",
        pareto_judge: Callable[[str, Any], float] | None = None,
        source_column: str = "data_source",
        reference_columns: Sequence[str] = DEFAULT_REFERENCE_COLUMNS,
        name: str = "gtalign",
    ) -> None:
        if judge is None:
            raise ValueError("GTAlignReward needs a judge (or a mapping data_source -> judge)")
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        if not (0.0 <= alpha <= 1.0):
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
        self.judges: Mapping[str, Any] | None = (
            dict(judge) if isinstance(judge, Mapping) and not hasattr(judge, "judge_batch") else None
        )
        self.judge = None if self.judges is not None else judge
        self.variant = variant
        self.alpha = alpha
        self.weights = weights
        self.normalize = normalize
        self.pareto_judge = pareto_judge or analyze_pareto_score
        self.source_column = source_column
        self.reference_columns = tuple(reference_columns)
        self.__name__ = name

    def __repr__(self) -> str:
        return f"GTAlignReward(variant={self.variant!r}, alpha={self.alpha}, normalize={self.normalize!r})"

    def judge_for(self, source: Any) -> Any:
        """The judge used for a data source (raises ``KeyError`` when there is none: a config error)."""
        if self.judges is None:
            return self.judge
        try:
            if source in self.judges:
                return self.judges[source]
        except TypeError:  # an unhashable source (a list, a dict...) matches no key: use the fallback
            pass
        if "*" in self.judges:
            return self.judges["*"]
        raise KeyError(f"no judge for data source {source!r} (known: {sorted(map(str, self.judges))}; add '*')")

    # -- call ------------------------------------------------------------------------------------

    def __call__(
        self,
        prompts: Sequence[Any] | None = None,
        completions: Sequence[Any] | None = None,
        completion_ids: Any = None,
        **columns: Any,
    ) -> RewardBatch:
        """Score a batch (TRL reward-function signature); returns a :class:`RewardBatch`."""
        completions = list(completions or [])
        n = len(completions)
        per_sample = self._per_sample_columns(columns, n)
        texts = [completion_text(c) for c in completions]
        chains = [split_chain(t) for t in texts]
        sources = [row.get(self.source_column) for row in per_sample]
        prompt_texts = [
            _prompt_text(prompts[i]) if prompts is not None and i < len(prompts) else None for i in range(n)
        ]
        references = [self._reference(row) for row in per_sample]

        answers, failed_judges = self._judge_all(chains, sources, prompt_texts, references, per_sample)
        results, fields = [], []
        for i, chain in enumerate(chains):
            answer = answers.get(i, AnswerScore(0.0, 0.0))
            pareto = self._pareto(chain) if self.variant == "pareto" and not chain.hard_failure else None
            result = score_chain(
                chain, answer.user, answer.llm, variant=self.variant,
                pareto=0.0 if self.variant == "pareto" and pareto is None else pareto,
                alpha=self.alpha, weights=self.weights,
            )
            results.append(result)
            row: dict[str, Any] = result.logged()
            row.update(
                F=result.F, P=result.P, hard_failure=result.hard_failure, judge_failed=answer.failed,
                data_source=sources[i],
            )
            fields.append(row)
        scores = [r.score for r in results]
        # a failed judge's score is missing: it stays out of its source's normalisation statistics (its own
        # value is the raw score, which trainers replace by NaN through ``judge_failed``)
        judged = [i for i in range(n) if not answers.get(i, AnswerScore(0.0, 0.0)).failed]
        values = list(scores)
        for i, value in zip(judged, normalize_by_source([scores[i] for i in judged], [sources[i] for i in judged],
                                                        self.normalize)):
            values[i] = value
        return RewardBatch(
            values, results=results, fields=fields,
            judge_failures=sum(1 for i in answers if answers[i].failed),
            hard_failures=sum(1 for r in results if r.hard_failure), failed_judges=failed_judges,
        )

    # -- helpers ---------------------------------------------------------------------------------

    @staticmethod
    def _per_sample_columns(columns: Mapping[str, Any], n: int) -> list[dict[str, Any]]:
        """Split list-valued columns of length n into one dict per sample (others are ignored)."""
        rows: list[dict[str, Any]] = [{} for _ in range(n)]
        for name, values in columns.items():
            if isinstance(values, (list, tuple)) and len(values) == n:
                for row, value in zip(rows, values):
                    row[name] = value
        return rows

    def _reference(self, row: Mapping[str, Any]) -> str | None:
        for name in self.reference_columns:
            if name in row:
                reference = _reference_text(row[name])
                if reference is not None:
                    return reference
        return None

    def _judge_all(
        self, chains: list[Chain], sources: list[Any], prompts: list[str | None],
        references: list[str | None], rows: list[dict[str, Any]],
    ) -> tuple[dict[int, AnswerScore], dict[str, int]]:
        """Call each source's judge once on its samples that passed the chain rules; (the verdicts by sample,
        the failures per judge's repr)."""
        by_source: dict[Any, list[int]] = {}
        for i, chain in enumerate(chains):
            if not chain.hard_failure:  # the reference only asks the judge about parsed chains
                key = _source_key(sources[i]) if self.judges is not None else None
                by_source.setdefault(key, []).append(i)
        answers: dict[int, AnswerScore] = {}
        failed: dict[str, int] = {}
        for indices in by_source.values():
            judge = self.judge_for(sources[indices[0]])
            items = [
                JudgeItem(
                    response=chains[i].response or "", completion=chains[i].text, prompt=prompts[i],
                    reference=references[i], data_source=sources[i], columns=rows[i],
                )
                for i in indices
            ]
            for i, answer in zip(indices, run_judge(judge, items)):
                answers[i] = answer
                if answer.failed:
                    failed[repr(judge)] = failed.get(repr(judge), 0) + 1
        return answers, failed

    def _pareto(self, chain: Chain) -> float:
        """The Pareto judge's verdict snapped to {0, 0.5, 1}; failures count as 0."""
        try:
            value = float(self.pareto_judge(chain.text, chain.matrix))
        except Exception:
            return 0.0
        if math.isnan(value):
            return 0.0
        return min((0.0, 0.5, 1.0), key=lambda allowed: abs(allowed - value))
