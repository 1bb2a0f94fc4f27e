"""Generate, score and summarise GTAlign completions: what ``examples/gtalign_eval.py`` (the paper's
steering experiment) and the dry run of ``examples/gtalign_train.py`` print.

:func:`generate_and_score` samples one completion per row with the
:class:`~gtalign_fast.SteeringSampler` under a pricing policy and scores it with a
:class:`~gtalign_fast.game.GTAlignReward`; each completion becomes a flat record (task, policy, U, L,
W, format, length, the chosen action). :func:`summarize` averages records per (policy, task),
:func:`format_table` prints them and :func:`plot_summary` draws them (matplotlib).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

from ..game.pricing import PricingPolicy

__all__ = [
    "ACTION_COLUMNS",
    "METRICS",
    "pricing_presets",
    "generate_and_score",
    "summarize",
    "format_table",
    "plot_summary",
]

ACTION_COLUMNS: tuple[str, ...] = ("DA", "CQ", "AQ", "none")
"""The action mix: the share of completions whose (steered) payoff picks DA / CQ / AQ, and ``none``
for completions without a payoff that parses (no action was chosen)."""

METRICS: tuple[str, ...] = ("U", "L", "W", "format", "length")
"""Per-(policy, task) means: U, L, W, the format rate F and the completion length in tokens."""


def pricing_presets(
    *, api_price: float = 0.005, clarify_bonus: float = 0.5, followup_bonus: float = 0.25, reference_scale: float = 1.0
) -> dict[str, PricingPolicy]:
    """The pricing policies of the steering experiment, by name.

    ``off`` leaves the model's payoff as written; ``subscription`` and ``per_token_api`` are
    :class:`~gtalign_fast.game.PricingPolicy`'s presets; ``reference_llm`` / ``reference_user`` are
    the reference's two transforms (GTALIGN.md section 7) with shift ``reference_scale``.
    """
    return {
        "off": PricingPolicy.identity(),
        "subscription": PricingPolicy.subscription(clarify_bonus, followup_bonus),
        "per_token_api": PricingPolicy.per_token_api(api_price),
        "reference_llm": PricingPolicy.reference(scale_llm=reference_scale),
        "reference_user": PricingPolicy.reference(scale_user=reference_scale),
    }


def _batches(n: int, size: int) -> list[range]:
    return [range(start, min(n, start + size)) for start in range(0, n, size)]


def generate_and_score(
    model: Any,
    tokenizer: Any,
    dataset: Any,
    reward: Callable[..., Any],
    *,
    policy: PricingPolicy | None = None,
    policy_name: str = "off",
    rule: str = "nash",
    max_new_tokens: int = 512,
    max_prompt_length: int | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 8,
    seed: int = 0,
    generate_kwargs: Mapping[str, Any] | Callable[[range], Mapping[str, Any]] | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """One completion per dataset row, steered by ``policy`` and scored by ``reward``.

    Parameters
    ----------
    model, tokenizer : a Hugging Face causal LM and its tokenizer (with a chat template)
    dataset : datasets.Dataset or sequence of dict
        Rows with ``prompt`` (chat messages or text) and the columns ``reward`` needs
        (:func:`~gtalign_fast.recipes.load_gtalign_dataset`'s output).
    reward : GTAlignReward
        Returns a :class:`~gtalign_fast.game.RewardBatch` (U, L, W, F per completion).
    policy : PricingPolicy, optional
        Payoff edit applied in place while decoding (mode ``"rewrite"``); None: the identity.
    policy_name : str
        Label of the records.
    rule : str
        How the (steered) payoff picks the action recorded as ``action`` (``choose_action``).
    generate_kwargs : mapping or callable, optional
        Extra ``SteeringSampler.generate`` arguments, or ``rows -> arguments`` per batch (tests
        script completions with ``forced_tokens``).
    progress : bool
        Show a tqdm bar over the rows (generation and judging take minutes per batch on a real model).

    Returns
    -------
    list of dict
        One record per row: ``policy``, ``data_source``, ``U``, ``L``, ``W``, ``format`` (F),
        ``length`` (completion tokens), ``action`` (``"DA"``/``"CQ"``/``"AQ"`` or ``"none"``),
        ``hard_failure``, ``judge_failed``, ``finish_reason``, ``text``.
    """
    from tqdm.auto import tqdm

    from ..sampling.sampler import SteeringSampler
    from ..training.rollout import tokenize_prompts

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sampler = SteeringSampler(model, tokenizer, policy=policy, mode="rewrite", rule=rule)
    rows = [dataset[i] for i in range(len(dataset))]
    columns = [name for name in rows[0] if name != "prompt"] if rows else []
    records: list[dict[str, Any]] = []
    bar = tqdm(total=len(rows), desc=f"eval {policy_name}", unit="row", disable=not progress, dynamic_ncols=True)
    for batch in _batches(len(rows), batch_size):
        chunk = [rows[i] for i in batch]
        prompts = [row["prompt"] for row in chunk]
        ids = tokenize_prompts(tokenizer, prompts, max_prompt_length, rows=list(batch))
        extra = generate_kwargs(batch) if callable(generate_kwargs) else dict(generate_kwargs or {})
        out = sampler.generate(
            ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
            seed=[seed + i for i in batch], **extra,
        )
        # what the trainer's reward sees (gtalign_fast.training.scoring.score_completions): special tokens such as
        # the closing EOS dropped (the format rule wants nothing after </response>), chat-shaped completions
        texts = tokenizer.batch_decode(out.completion_ids, skip_special_tokens=True)
        completions = [t if isinstance(p, str) else [{"role": "assistant", "content": t}]
                       for p, t in zip(prompts, texts)]
        scores = reward(
            prompts=prompts, completions=completions, completion_ids=out.completion_ids,
            **{name: [row[name] for row in chunk] for name in columns},
        )
        for j, row in enumerate(chunk):
            fields = scores.fields[j]
            action = out.events[j].action
            records.append({
                "policy": policy_name,
                "data_source": row.get("data_source", "?"),
                "U": scores.user[j],
                "L": scores.llm[j],
                "W": scores.score[j],
                "format": float(fields["F"]),
                "length": len(out.completion_ids[j]),
                "action": action.action if action is not None else "none",
                "hard_failure": bool(fields["hard_failure"]),
                "judge_failed": bool(fields["judge_failed"]),
                "finish_reason": out.finish_reasons[j],
                "text": texts[j],
            })
        bar.update(len(chunk))
    bar.close()
    return records


def summarize(records: Sequence[Mapping[str, Any]], *, overall: bool = True) -> list[dict[str, Any]]:
    """Means per (policy, task): ``n``, :data:`METRICS`, the action mix (:data:`ACTION_COLUMNS`,
    shares summing to 1), ``hard_failures`` (completions that broke the chain rules: every reward 0) and
    ``judge_failures`` (counts). With ``overall``, each policy also gets
    a row over all its tasks (task ``"all"``). Rows come in first-seen policy order, tasks sorted."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    policies: list[str] = []
    for record in records:
        policy, task = str(record["policy"]), str(record["data_source"])
        if policy not in policies:
            policies.append(policy)
        groups.setdefault((policy, task), []).append(record)
        if overall:
            groups.setdefault((policy, "all"), []).append(record)
    out = []
    for policy in policies:
        tasks = sorted(t for p, t in groups if p == policy and t != "all")
        for task in tasks + (["all"] if overall else []):
            members = groups[(policy, task)]
            n = len(members)
            row: dict[str, Any] = {"policy": policy, "task": task, "n": n}
            for metric in METRICS:
                row[metric] = sum(float(m[metric]) for m in members) / n
            for action in ACTION_COLUMNS:
                row[action] = sum(1 for m in members if m["action"] == action) / n
            row["hard_failures"] = sum(1 for m in members if m.get("hard_failure"))
            row["judge_failures"] = sum(1 for m in members if m.get("judge_failed"))
            out.append(row)
    return out


def format_table(summary: Sequence[Mapping[str, Any]], metrics: Sequence[str] = METRICS,
                 actions: Sequence[str] = ACTION_COLUMNS) -> str:
    """A fixed-width text table of :func:`summarize`'s rows (one line per policy and task)."""
    headers = ["policy", "task", "n", *metrics, *actions, "hard_fail", "judge_fail"]
    lines = []
    for row in summary:
        cells = [str(row["policy"]), str(row["task"]), str(row["n"])]
        cells += [f"{row[m]:.1f}" if m == "length" else f"{row[m]:.3f}" for m in metrics]
        cells += [f"{row[a]:.2f}" for a in actions]
        cells += [str(row["hard_failures"]), str(row["judge_failures"])]
        lines.append(cells)
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(headers)]
    render = [" ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
              for cells in [headers, *lines]]
    return "\n".join([render[0], "-" * len(render[0]), *render[1:]])


# not the default colour cycle, which the policies use in the other panels
_ACTION_COLORS = {"DA": "#1b9e77", "CQ": "#d95f02", "AQ": "#7570b3", "none": "#bbbbbb"}


def plot_summary(summary: Sequence[Mapping[str, Any]], path: str, *, title: str = "GTAlign steering") -> None:
    """Save a PNG: one bar panel per metric (tasks on x, one bar per policy) and the action mix
    (stacked DA / CQ / AQ / none per policy, over all tasks). Every value axis starts at 0."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, no display needed

    policies = list(dict.fromkeys(str(r["policy"]) for r in summary))
    tasks = list(dict.fromkeys(str(r["task"]) for r in summary))
    by_key = {(str(r["policy"]), str(r["task"])): r for r in summary}
    panels = len(METRICS) + 1
    cols = 3
    fig = Figure(figsize=(5 * cols, 3.6 * math.ceil(panels / cols)))
    axes = list(fig.subplots(math.ceil(panels / cols), cols).flat)
    width = 0.8 / max(1, len(policies))
    for ax, metric in zip(axes, METRICS):
        for k, policy in enumerate(policies):
            xs = [t + k * width for t in range(len(tasks))]
            ys = [by_key[(policy, task)][metric] if (policy, task) in by_key else 0.0 for task in tasks]
            ax.bar(xs, ys, width, label=policy)
        ax.set_xticks([t + 0.4 - width / 2 for t in range(len(tasks))], tasks, rotation=20, fontsize=8)
        ax.set_title({"format": "format rate", "length": "completion length (tokens)"}.get(metric, metric))
        ax.set_ylim(bottom=0)
    mix = axes[len(METRICS)]
    task = "all" if "all" in tasks else tasks[0]
    bottoms = [0.0] * len(policies)
    for action in ACTION_COLUMNS:
        shares = [by_key[(p, task)][action] if (p, task) in by_key else 0.0 for p in policies]
        mix.bar(range(len(policies)), shares, 0.6, bottom=bottoms, label=action, color=_ACTION_COLORS[action])
        bottoms = [b + s for b, s in zip(bottoms, shares)]
    mix.set_xticks(range(len(policies)), policies, rotation=20, fontsize=8)
    mix.set_ylim(0, 1.05)
    mix.set_title(f"chosen action ({task})")
    mix.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", ncol=len(policies), fontsize=8)
    for ax in axes[panels:]:
        ax.axis("off")
    fig.suptitle(title, x=0.02, ha="left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
