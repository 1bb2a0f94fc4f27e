"""GTAlign's data (verl parquet) as a ``datasets.Dataset`` for :class:`~gtalign_fast.GRPOTrainer`.

GTAlign's files are verl parquet, one row per prompt::

    data_source   str                        "math-hard" | "medium" | "wildguard" | "ambig_qa" | ...
    prompt        list of {role, content}    the chat (system prompt with the game's rules + the user's turn)
    ability       str
    reward_model  {style, ground_truth}      the reference answer (a string, or a list of them)
    extra_info    {...}                      anything else (split, index, harmfulness for wildguard ...)

:func:`load_gtalign_dataset` reads them with Hugging Face ``datasets`` and keeps every column; the
``prompt`` column stays a list of chat messages, which the trainer turns into token ids with the
tokenizer's chat template (``apply_chat_template(..., add_generation_prompt=True)``), as TRL's
trainer does with conversational data. It adds one column, ``ground_truth``: the reference answer as
text (a list of answers joined by newlines), which :class:`~gtalign_fast.game.GTAlignReward` reads
first. ``data_source`` routes each row to its judge (:func:`~gtalign_fast.recipes.gtalign_task_judges`).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from typing import Any, Iterable, Mapping, Sequence

__all__ = ["REQUIRED_COLUMNS", "NEEDS_REFERENCE", "load_gtalign_dataset", "reference_text"]

logger = logging.getLogger("gtalign_fast.recipes")

REQUIRED_COLUMNS: tuple[str, ...] = ("data_source", "prompt", "reward_model")
"""Columns every file must have; ``ability`` and ``extra_info`` are kept when present."""

NEEDS_REFERENCE: tuple[str, ...] = ("math-hard", "medium")
"""Tasks whose rule-based judge compares with ``reward_model.ground_truth`` (a null one is an error;
wildguard rows may have none)."""


def reference_text(ground_truth: Any) -> str | None:
    """A reference answer as text: a string as is, a list joined by newlines, anything else as JSON."""
    if ground_truth is None:
        return None
    if isinstance(ground_truth, str):
        return ground_truth
    if isinstance(ground_truth, (list, tuple)):
        return "\n".join(str(g) for g in ground_truth if g is not None)
    if hasattr(ground_truth, "tolist"):  # a numpy array from a pandas round trip
        return reference_text(ground_truth.tolist())
    try:
        return json.dumps(ground_truth, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return str(ground_truth)


def _as_paths(path_or_paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    if isinstance(path_or_paths, (str, os.PathLike)):
        paths = [os.fspath(path_or_paths)]
    elif isinstance(path_or_paths, Iterable):
        paths = [os.fspath(p) for p in path_or_paths]
    else:
        raise TypeError(f"path_or_paths must be a path or a list of paths, got {type(path_or_paths).__name__}")
    if not paths:
        raise ValueError("path_or_paths is empty: give at least one parquet file")
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"load_gtalign_dataset: no such parquet file: {path}")
    return paths


def _short(value: Any, limit: int = 200) -> str:
    """``repr(value)``, cut to ``limit`` characters (a bad row may hold a whole document)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _token_count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _check_prompt(prompt: Any, path: str, row: int) -> None:
    """A prompt is a non-empty text or a non-empty list of {role, content} messages."""
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError(f"{path}: row {row}: column 'prompt' is empty")
        return
    if not isinstance(prompt, list) or not prompt:
        raise ValueError(
            f"{path}: row {row}: column 'prompt' must be a non-empty list of chat messages, got {_short(prompt)}"
        )
    for message in prompt:
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str) or "content" not in message:
            raise ValueError(
                f"{path}: row {row}: column 'prompt' has a message without 'role' / 'content': {_short(message)}"
            )


def _check_rows(dataset: Any, path: str) -> None:
    """Every row: a data source, a chat prompt, a reward_model with a ground_truth."""
    for row, (source, prompt, reward_model) in enumerate(
        zip(dataset["data_source"], dataset["prompt"], dataset["reward_model"])
    ):
        if not isinstance(source, str) or not source:
            raise ValueError(f"{path}: row {row}: column 'data_source' must be a non-empty text, got {_short(source)}")
        _check_prompt(prompt, path, row)
        if not isinstance(reward_model, Mapping) or "ground_truth" not in reward_model:
            raise ValueError(
                f"{path}: row {row}: column 'reward_model' must be a dict with a 'ground_truth' key, "
                f"got {_short(reward_model)}"
            )
        if reward_model["ground_truth"] is None and source in NEEDS_REFERENCE:
            raise ValueError(
                f"{path}: row {row}: column 'reward_model' has no ground_truth (null), which {source} is scored against"
            )


def _load_file(path: str, cache_dir: str | None) -> Any:
    import datasets

    dataset = datasets.Dataset.from_parquet(path, cache_dir=cache_dir)
    missing = [c for c in REQUIRED_COLUMNS if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"{path}: missing column {missing[0]!r} (GTAlign's verl parquet needs {list(REQUIRED_COLUMNS)}; "
            f"this file has {dataset.column_names})"
        )
    _check_rows(dataset, path)
    return dataset


def _with_ground_truth(dataset: Any) -> Any:
    texts = [reference_text(r.get("ground_truth")) for r in dataset["reward_model"]]
    if "ground_truth" in dataset.column_names:
        dataset = dataset.remove_columns("ground_truth")
    return dataset.add_column("ground_truth", texts)


def _concatenate(parts: list[Any], paths: list[str]) -> Any:
    """One dataset from several files; files whose nested columns differ are merged row by row."""
    import datasets

    if len(parts) == 1:
        return parts[0]
    try:
        return datasets.concatenate_datasets(parts)
    except ValueError as exc:  # e.g. a ground_truth that is a string in one file and a list in another
        mismatch = exc
    logger.info("load_gtalign_dataset: %s have different schemas (%s); merging their rows", paths, mismatch)
    rows = [row for part in parts for row in part]
    if "on_mixed_types" in inspect.signature(datasets.Dataset.from_list).parameters:
        return datasets.Dataset.from_list(rows, on_mixed_types="use_json")  # datasets >= 5: a Json() column
    try:
        return datasets.Dataset.from_list(rows)
    except Exception as exc:
        raise ValueError(
            f"load_gtalign_dataset: {paths} have columns of different types ({mismatch}); load them separately "
            "or upgrade datasets (>= 5 merges mixed nested columns)"
        ) from exc


def _filter_by_tokenizer(dataset: Any, tokenizer: Any, max_prompt_length: int | None) -> Any:
    """Check that the chat template renders every prompt; drop prompts over ``max_prompt_length`` tokens."""
    from tqdm.auto import tqdm

    keep = []
    # every prompt is rendered (and tokenized): a minute or more on GTAlign's tens of thousands of rows
    prompts = tqdm(dataset["prompt"], desc="checking prompts", unit="prompt", disable=len(dataset) < 1000)
    for row, prompt in enumerate(prompts):
        try:
            text = prompt if isinstance(prompt, str) else tokenizer.apply_chat_template(
                prompt, tokenize=False, add_generation_prompt=True
            )
        except Exception as exc:
            raise ValueError(
                f"load_gtalign_dataset: the tokenizer's chat template cannot render the prompt of row {row} "
                f"({type(exc).__name__}: {exc}); give a tokenizer with a chat template"
            ) from exc
        if max_prompt_length is None or _token_count(tokenizer, text) <= max_prompt_length:
            keep.append(row)
    if len(keep) < len(dataset):
        logger.warning(
            "load_gtalign_dataset: dropped %d of %d prompts longer than %s tokens",
            len(dataset) - len(keep), len(dataset), max_prompt_length,
        )
        dataset = dataset.select(keep)
    return dataset


def load_gtalign_dataset(
    path_or_paths: str | os.PathLike | Sequence[str | os.PathLike],
    tokenizer: Any = None,
    *,
    max_prompt_length: int | None = None,
    data_sources: Sequence[str] | None = None,
    max_samples: int | None = None,
    cache_dir: str | None = None,
) -> Any:
    """Load GTAlign's verl parquet file(s) as a ``datasets.Dataset`` for ``GRPOTrainer``.

    Parameters
    ----------
    path_or_paths : path or list of paths
        Parquet files with the columns ``data_source``, ``prompt`` (chat messages) and
        ``reward_model`` (``{style, ground_truth}``); ``ability``, ``extra_info`` and any other
        columns are kept (they reach the reward functions by name).
    tokenizer : tokenizer, optional
        When given, every prompt is rendered with its chat template once (a template that cannot
        render a prompt raises here, naming the row, instead of at the first training step).
    max_prompt_length : int, optional
        With ``tokenizer``: drop prompts longer than this many tokens (verl's
        ``filter_overlong_prompts``; the trainer would otherwise keep only their last tokens).
    data_sources : sequence of str, optional
        Keep only these tasks (e.g. ``["math-hard", "medium"]``).
    max_samples : int, optional
        Keep the first ``max_samples`` rows (after the other filters).
    cache_dir : str, optional
        ``datasets``' cache directory for the Arrow copies of the files.

    Returns
    -------
    datasets.Dataset
        The files' rows in order, every original column plus ``ground_truth`` (str).

    Raises
    ------
    FileNotFoundError
        A file does not exist.
    ValueError
        A file lacks a required column, or a row has a bad ``data_source`` / ``prompt`` /
        ``reward_model`` (the message names the file, the row and the column); nothing is left
        after the filters; the chat template fails on a prompt.
    """
    if max_prompt_length is not None and tokenizer is None:
        raise ValueError("load_gtalign_dataset: max_prompt_length needs a tokenizer to count tokens")
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"load_gtalign_dataset: max_samples must be >= 1, got {max_samples}")
    paths = _as_paths(path_or_paths)
    dataset = _concatenate([_with_ground_truth(_load_file(p, cache_dir)) for p in paths], paths)
    if data_sources is not None:
        wanted = set(data_sources)
        dataset = dataset.select([i for i, s in enumerate(dataset["data_source"]) if s in wanted])
    if tokenizer is not None:
        dataset = _filter_by_tokenizer(dataset, tokenizer, max_prompt_length)
    if max_samples is not None and len(dataset) > max_samples:
        dataset = dataset.select(range(max_samples))
    if len(dataset) == 0:
        raise ValueError(f"load_gtalign_dataset: no rows left in {paths} (data_sources={data_sources!r})")
    return dataset
