"""The steering experiment: score a test parquet under each pricing policy and see behaviour change.

For every pricing preset (``off``: the model's own payoff; ``subscription``; ``per_token_api``; the
reference's ``reference_llm`` / ``reference_user`` transforms) the :class:`gtalign_fast.SteeringSampler`
generates one completion per row, editing each payoff matrix in place as the policy says, and the
GTAlign reward scores it. Per task and per policy it reports U, L, W, the format rate, the
completion length (tokens) and the mix of chosen actions (DA / CQ / AQ; ``none`` = no payoff that
parses), as a table (stdout and ``summary.csv``), a PNG (``steering.png``) and the raw completions
(``records.jsonl``) in ``--output_dir``::

    python examples/gtalign_eval.py --model_name_or_path runs/gtalign --test_files data/test.parquet \\
        --judge_url http://127.0.0.1:30000/v1 --judge_model Qwen/Qwen3-32B --output_dir runs/gtalign/eval

``--judge_url`` may be left out when every row is ``math-hard`` (scored by the ``\\boxed{}`` rule).

The same seeds are used under every policy, so two policies differ only where a payoff edit
changed the completion.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from gtalign_fast.game import OpenAIJudge  # noqa: E402
from gtalign_fast.game.pricing import RULES  # noqa: E402
from gtalign_fast.recipes import gtalign_reward, load_gtalign_dataset, require_model_judge  # noqa: E402
from gtalign_fast.recipes.evaluation import (  # noqa: E402
    format_table,
    generate_and_score,
    plot_summary,
    pricing_presets,
    summarize,
)

PRESETS = tuple(pricing_presets())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="a local model directory (or a hub id)")
    parser.add_argument("--test_files", nargs="+", required=True, help="GTAlign verl parquet file(s)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--data_sources", nargs="*", default=None, help="keep only these tasks")
    parser.add_argument("--max_samples", type=int, default=None, help="keep the first N rows")
    parser.add_argument("--policies", nargs="+", choices=PRESETS, default=list(PRESETS))
    parser.add_argument("--api_price", type=float, default=0.005, help="per_token_api: payoff units per token")
    parser.add_argument("--clarify_bonus", type=float, default=0.5, help="subscription: user bonus of CQ")
    parser.add_argument("--followup_bonus", type=float, default=0.25, help="subscription: user bonus of AQ")
    parser.add_argument("--reference_scale", type=float, default=1.0, help="reference_llm / reference_user shift")
    parser.add_argument("--rule", choices=RULES, default="nash", help="how a payoff matrix picks the action")
    parser.add_argument("--max_new_tokens", type=int, default=1024)
    parser.add_argument("--max_prompt_length", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--use_cpu", action="store_true")
    judge = parser.add_argument_group("judge (an OpenAI-compatible /v1/chat/completions server)")
    judge.add_argument("--judge_url", default=None, help="not needed when every row is math-hard (rule-judged)")
    judge.add_argument("--judge_model", default="Qwen/Qwen3-32B")
    judge.add_argument("--judge_api_key_env", default=None, help="name of the environment variable holding the key")
    judge.add_argument("--judge_timeout", type=float, default=60.0)
    judge.add_argument("--judge_max_retries", type=int, default=3)
    judge.add_argument("--judge_concurrency", type=int, default=16)
    judge.add_argument("--math_model_judge", action="store_true",
                       help="math-hard: ask the judge about answers the \\boxed{} rule scored 0")
    return parser


def build_judge(args: argparse.Namespace) -> OpenAIJudge | None:
    """The model judge, or None without ``--judge_url`` (then every row must be rule-judged)."""
    if args.judge_url is None:
        return None
    api_key = os.environ.get(args.judge_api_key_env) if args.judge_api_key_env else None
    if args.judge_api_key_env and not api_key:
        raise SystemExit(f"--judge_api_key_env: the environment variable {args.judge_api_key_env} is not set")
    return OpenAIJudge(
        args.judge_url, args.judge_model, api_key=api_key, timeout=args.judge_timeout,
        max_retries=args.judge_max_retries, concurrency=args.judge_concurrency,
    )


def write_outputs(records: list[dict], summary: list[dict], output_dir: str) -> None:
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "records.jsonl"), "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    with open(os.path.join(output_dir, "summary.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)
    with open(os.path.join(output_dir, "summary.txt"), "w") as f:
        f.write(format_table(summary) + "\n")
    plot_summary(summary, os.path.join(output_dir, "steering.png"))


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    dataset = load_gtalign_dataset(
        args.test_files, tokenizer, data_sources=args.data_sources, max_samples=args.max_samples
    )
    if args.judge_url is None:  # before the model loads: say at once which row needs a judge
        try:
            require_model_judge(dataset["data_source"], math_model_judge=args.math_model_judge,
                                how="pass --judge_url (and --judge_model)")
        except ValueError as error:
            raise SystemExit(f"gtalign_eval.py: {error}") from None
    device = "cuda" if torch.cuda.is_available() and not args.use_cpu else "cpu"
    model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path).to(device).eval()
    reward = gtalign_reward(build_judge(args), math_model_judge=build_judge(args) if args.math_model_judge else None)
    presets = pricing_presets(
        api_price=args.api_price, clarify_bonus=args.clarify_bonus, followup_bonus=args.followup_bonus,
        reference_scale=args.reference_scale,
    )
    records = []
    for name in args.policies:
        logging.info("policy %s: %d rows", name, len(dataset))
        records += generate_and_score(
            model, tokenizer, dataset, reward, policy=presets[name], policy_name=name, rule=args.rule,
            max_new_tokens=args.max_new_tokens, max_prompt_length=args.max_prompt_length,
            temperature=args.temperature, top_p=args.top_p, batch_size=args.batch_size, seed=args.seed,
        )
    summary = summarize(records)
    write_outputs(records, summary, args.output_dir)
    print(format_table(summary))
    print(f"table, PNG and completions in {args.output_dir}")


if __name__ == "__main__":
    main()
