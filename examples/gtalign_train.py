"""Train a local model the GTAlign way on GTAlign's own data (verl parquet), judged by an OpenAI-compatible server.

One command::

    python examples/gtalign_train.py --model_name_or_path ./Qwen2.5-3B-Instruct \\
        --train_files data/train.parquet --judge_url http://127.0.0.1:30000/v1 --judge_model Qwen/Qwen3-32B \\
        --output_dir runs/gtalign --max_steps 200

``--judge_url`` is needed only when a row's task needs a model judge: ``math-hard`` alone is scored by the
``\\boxed{}`` rule without any server (a clear error names the first row that needs a judge when none is given).

Check the wiring first (a few rows per task: generate, judge, print U / L / W per task; no training)::

    python examples/gtalign_train.py ... --dry_run

Every :class:`gtalign_fast.GRPOConfig` field is a flag under its TRL name (``--learning_rate``,
``--num_generations``, ``--beta``, ``--loss_type``, ...). The defaults not given on the command line
are GTAlign's GRPO settings (GTALIGN.md section 6): lr 1e-6, 8 generations, k3 KL with beta 0.001,
clip 0.2, token-mean aggregation, temperature 1.0, advantage eps 1e-6. The reward is
:func:`gtalign_fast.recipes.gtalign_reward`: the four task judges routed by ``data_source``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from gtalign_fast import GRPOConfig, GRPOTrainer  # noqa: E402
from gtalign_fast.game import OpenAIJudge  # noqa: E402
from gtalign_fast.game.reward import NORMALIZATIONS  # noqa: E402
from gtalign_fast.game.welfare import VARIANTS  # noqa: E402
from gtalign_fast.recipes import gtalign_reward, load_gtalign_dataset, require_model_judge  # noqa: E402
from gtalign_fast.recipes.evaluation import format_table, generate_and_score, summarize  # noqa: E402

# GTAlign's GRPO runs (GTALIGN.md section 6), where they differ from GRPOConfig's TRL defaults
RECIPE_DEFAULTS = dict(
    beta=0.001, loss_type="token-mean", advantage_eps=1e-6, max_prompt_length=1024, max_completion_length=1024,
)

# GRPOConfig fields that are not simple command-line values (set in code, or by other flags)
_NOT_FLAGS = {"pricing_policy", "model_init_kwargs", "reward_weights"}


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true / false, got {text!r}")


def _optional(convert):
    def parse(text: str):
        return None if text.strip().lower() == "none" else convert(text)

    parse.__name__ = convert.__name__
    return parse


_CONVERTERS = {"int": int, "float": float, "str": str, "bool": _parse_bool}


def _converter(annotation: str):
    """A command-line converter for a GRPOConfig field's annotation (``"int"``, ``"float | None"``...)."""
    parts = [p.strip() for p in str(annotation).split("|")]
    optional = "None" in parts
    kinds = [p for p in parts if p != "None"]
    if kinds == ["str", "bool"]:  # scale_rewards: TRL accepts true / false too
        return lambda text: _parse_bool(text) if text.lower() in ("true", "false") else text
    if kinds == ["str", "list[str]"]:  # report_to
        return lambda text: [t for t in text.split(",") if t]
    if len(kinds) != 1 or kinds[0] not in _CONVERTERS:
        return None
    convert = _CONVERTERS[kinds[0]]
    return _optional(convert) if optional else convert


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per GRPOConfig field, under its TRL name; the default is the recipe's (or the config's)."""
    group = parser.add_argument_group("GRPOConfig (TRL names)")
    for field in dataclasses.fields(GRPOConfig):
        convert = _converter(field.type)
        if field.name in _NOT_FLAGS or convert is None:
            continue
        default = RECIPE_DEFAULTS.get(field.name, field.default)
        group.add_argument(f"--{field.name}", type=convert, default=default, metavar=str(field.type).upper(),
                           help=f"default: {default!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="a local model directory (or a hub id)")
    parser.add_argument("--train_files", nargs="+", required=True, help="GTAlign verl parquet file(s)")
    parser.add_argument("--data_sources", nargs="*", default=None, help="keep only these tasks")
    parser.add_argument("--max_samples", type=int, default=None, help="keep the first N rows")
    parser.add_argument("--filter_overlong_prompts", action="store_true",
                        help="drop prompts longer than --max_prompt_length tokens (else their end is kept)")
    judge = parser.add_argument_group("judge (an OpenAI-compatible /v1/chat/completions server)")
    judge.add_argument("--judge_url", default=None,
                       help="e.g. http://127.0.0.1:30000/v1; not needed when every row is math-hard (rule-judged)")
    judge.add_argument("--judge_model", default="Qwen/Qwen3-32B")
    judge.add_argument("--judge_api_key_env", default=None, help="name of the environment variable holding the key")
    judge.add_argument("--judge_timeout", type=float, default=60.0, help="deadline per request, seconds")
    judge.add_argument("--judge_max_retries", type=int, default=3)
    judge.add_argument("--judge_concurrency", type=int, default=16)
    judge.add_argument("--judge_max_tokens", type=int, default=None)
    judge.add_argument("--judge_no_thinking", action="store_true",
                       help="send chat_template_kwargs.enable_thinking=false (Qwen3 judges answer faster)")
    judge.add_argument("--math_model_judge", action="store_true",
                       help="math-hard: ask the judge about answers the \\boxed{} rule scored 0")
    reward = parser.add_argument_group("reward")
    reward.add_argument("--reward_variant", choices=VARIANTS, default="cobb")
    reward.add_argument("--reward_normalize", choices=NORMALIZATIONS, default="none")
    dry = parser.add_argument_group("dry run")
    dry.add_argument("--dry_run", action="store_true", help="score a few rows per task and print U, L, W; no training")
    dry.add_argument("--dry_run_rows", type=int, default=2, help="rows per task in the dry run")
    add_config_arguments(parser)
    return parser


def build_judge(args: argparse.Namespace) -> OpenAIJudge | None:
    """The model judge, or None without ``--judge_url`` (rule-judged rows only: :func:`check_judge`)."""
    if args.judge_url is None:
        return None
    api_key = None
    if args.judge_api_key_env:
        api_key = os.environ.get(args.judge_api_key_env)
        if not api_key:
            raise SystemExit(f"--judge_api_key_env: the environment variable {args.judge_api_key_env} is not set")
    extra_body = {"chat_template_kwargs": {"enable_thinking": False}} if args.judge_no_thinking else None
    return OpenAIJudge(
        args.judge_url, args.judge_model, api_key=api_key, timeout=args.judge_timeout,
        max_retries=args.judge_max_retries, concurrency=args.judge_concurrency, max_tokens=args.judge_max_tokens,
        extra_body=extra_body,
    )


def check_judge(args: argparse.Namespace, dataset) -> None:
    """Without ``--judge_url``, every row must be rule-judged: the clear error names the first that is not."""
    if args.judge_url is None:
        try:
            require_model_judge(dataset["data_source"], math_model_judge=args.math_model_judge,
                                how="pass --judge_url (and --judge_model)")
        except ValueError as error:
            raise SystemExit(f"gtalign_train.py: {error}") from None


def build_config(args: argparse.Namespace) -> GRPOConfig:
    names = {f.name for f in dataclasses.fields(GRPOConfig)}
    return GRPOConfig(**{k: v for k, v in vars(args).items() if k in names and k not in _NOT_FLAGS})


def rows_per_task(dataset, k: int):
    """The first ``k`` rows of each data source (a dry run sees every task)."""
    seen: dict[str, int] = {}
    keep = []
    for i, source in enumerate(dataset["data_source"]):
        if seen.get(source, 0) < k:
            seen[source] = seen.get(source, 0) + 1
            keep.append(i)
    return dataset.select(keep)


def dry_run(args: argparse.Namespace, reward, config: GRPOConfig) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    dataset = load_gtalign_dataset(
        args.train_files, tokenizer, data_sources=args.data_sources, max_samples=args.max_samples,
        max_prompt_length=config.max_prompt_length if args.filter_overlong_prompts else None,
    )
    dataset = rows_per_task(dataset, args.dry_run_rows)
    check_judge(args, dataset)
    device = "cuda" if torch.cuda.is_available() and not config.use_cpu else "cpu"
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path).to(device).eval()
    records = generate_and_score(
        model, tokenizer, dataset, reward, policy_name="dry_run", max_new_tokens=config.max_completion_length,
        max_prompt_length=config.max_prompt_length, temperature=config.temperature, top_p=config.top_p,
        seed=config.seed,
    )
    judge = args.judge_url or "none (rule-judged rows only)"
    print(f"dry run: {len(records)} completions from {args.model_name_or_path}, judge {judge}")
    print(format_table(summarize(records), metrics=("U", "L", "W", "format", "length")))


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    config = build_config(args)
    reward = gtalign_reward(
        build_judge(args), math_model_judge=build_judge(args) if args.math_model_judge else None,
        variant=args.reward_variant, normalize=args.reward_normalize, alpha=config.alpha,
    )
    if args.dry_run:
        dry_run(args, reward, config)
        return
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    dataset = load_gtalign_dataset(
        args.train_files, tokenizer, data_sources=args.data_sources, max_samples=args.max_samples,
        max_prompt_length=config.max_prompt_length if args.filter_overlong_prompts else None,
    )
    check_judge(args, dataset)
    trainer = GRPOTrainer(
        args.model_name_or_path, reward, args=config, train_dataset=dataset, processing_class=tokenizer
    )
    result = trainer.train()
    trainer.save_model()
    print(f"trained {result.global_step} steps; loss {result.training_loss:.6f}; model in {config.output_dir}")


if __name__ == "__main__":
    main()
