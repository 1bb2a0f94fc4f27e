"""A toy GTAlign game that a randomly initialised tiny model learns on a CPU in a few minutes.

The prompt carries a pricing policy and a payoff matrix in a tiny word-level vocabulary::

    api DA 7 3 CQ 5 8 AQ 9 6 act

read as: under per-token API pricing, the direct answer DA pays the user 7 and the assistant 3, the
clarifying question CQ 5 and 8, the answer-plus-question AQ 9 and 6. Under API pricing the user pays
for every token, so the longer actions cost the user (CQ -3, AQ -2, clamped at 0); under a
subscription ("sub") they do not. The completion names one action and stops: ``AQ <eos>``.

Reward (GTAlign's shape): U and L are the user's and the assistant's payoff of the chosen action
after pricing, scaled to (0, 1]; a completion that does not start with an action is a hard failure
(U = L = 0); one that does not stop right after the action loses half of L (format). The trainer
turns U and L into the Cobb-Douglas welfare ``W = sqrt(U L)`` and group advantages with the fused
``welfare_advantages`` op. The best action maximises the product of the priced payoffs, so the
model must read the pricing token and the numbers.

Run::

    python examples/toy_gtalign_game.py --steps 150 --output-dir /tmp/toy_gtalign

It prints the mean welfare over the first and last steps and how often greedy decoding picks the best
action (chance: 1/3). On a 2-core CPU, 150 steps take about a minute: the welfare rises from ~0.1 (most
completions name no action) to ~0.4-0.6 as the model learns to name an action, stop, and prefer the
better actions.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from gtalign_fast import GRPOConfig, GRPOTrainer  # noqa: E402

ACTIONS = ("DA", "CQ", "AQ")
PRICINGS = ("sub", "api")
# what each action costs the user under per-token pricing (longer answers cost more)
API_USER_COST = {"DA": 0, "CQ": 3, "AQ": 2}
VOCAB = ["<pad>", "<eos>", "act", *PRICINGS, *ACTIONS, *[str(d) for d in range(10)]]


# ---------------------------------------------------------------------------------------------
# The game


def priced_payoffs(pricing: str, user: list[int], llm: list[int]) -> tuple[list[int], list[int]]:
    """The payoffs the players actually get under a pricing policy (only the user's change)."""
    if pricing == "sub":
        return list(user), list(llm)
    return [max(0, u - API_USER_COST[a]) for u, a in zip(user, ACTIONS)], list(llm)


def best_action(user: list[int], llm: list[int]) -> int:
    """The Cobb-Douglas (Nash product) choice on the priced, (0, 1]-scaled payoffs."""
    return max(range(len(ACTIONS)), key=lambda i: ((user[i] + 1) * (llm[i] + 1), user[i]))


def make_row(rng: random.Random) -> dict:
    pricing = rng.choice(PRICINGS)
    user = [rng.randrange(10) for _ in ACTIONS]
    llm = [rng.randrange(10) for _ in ACTIONS]
    words = [pricing] + [w for a, u, lm in zip(ACTIONS, user, llm) for w in (a, str(u), str(lm))] + ["act"]
    priced_user, priced_llm = priced_payoffs(pricing, user, llm)
    return {"prompt": " ".join(words), "user_payoff": priced_user, "llm_payoff": priced_llm,
            "best": best_action(priced_user, priced_llm)}


def build_dataset(n_rows: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [make_row(rng) for _ in range(n_rows)]


class ToyWelfare(list):
    """Per-completion rewards: the list holds W (for logging); ``.user`` / ``.llm`` feed the trainer."""

    def __init__(self, user: list[float], llm: list[float]) -> None:
        super().__init__(math.sqrt(u * lm) for u, lm in zip(user, llm))
        self.user, self.llm = user, llm


class ToyWelfareReward:
    """U and L of the action each completion takes (a TRL-style reward function)."""

    welfare_reward = True  # the trainer feeds .user / .llm to the fused Cobb-Douglas op
    __name__ = "toy_welfare"

    def __init__(self, tokenizer) -> None:
        self.action_ids = [tokenizer.convert_tokens_to_ids(a) for a in ACTIONS]
        self.eos_id = tokenizer.eos_token_id

    def __call__(self, prompts, completions, completion_ids, user_payoff, llm_payoff, **_) -> ToyWelfare:
        user, llm = [], []
        for ids, u_row, l_row in zip(completion_ids, user_payoff, llm_payoff):
            if not ids or ids[0] not in self.action_ids:
                user.append(0.0)  # hard failure: no action
                llm.append(0.0)
                continue
            action = self.action_ids.index(ids[0])
            stopped = len(ids) == 2 and ids[1] == self.eos_id
            user.append((u_row[action] + 1) / 10)
            llm.append((l_row[action] + 1) / 10 * (1.0 if stopped else 0.5))
        return ToyWelfare(user, llm)


# ---------------------------------------------------------------------------------------------
# A tiny model and tokenizer, built in memory


def build_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<pad>"))
    core.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<pad>")


def build_model(tokenizer, seed: int, hidden: int = 64, layers: int = 2):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(VOCAB), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        attn_implementation="sdpa",
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def toy_config(output_dir: str, max_steps: int, seed: int = 0, **overrides) -> GRPOConfig:
    """The settings the toy game learns with on a CPU."""
    settings = dict(
        output_dir=output_dir, max_steps=max_steps, seed=seed, use_cpu=True, bf16=False,
        gradient_checkpointing=False, num_generations=8, per_device_train_batch_size=64,
        max_completion_length=3, learning_rate=1e-3, lr_scheduler_type="constant", max_grad_norm=1.0,
        epsilon_high=0.28,  # DAPO's clip-higher keeps some entropy: the policy collapses more slowly
        logging_steps=1, save_steps=0, loss_type="dapo", beta=0.0, disable_tqdm=True,
    )
    settings.update(overrides)
    return GRPOConfig(**settings)


def make_trainer(output_dir: str, max_steps: int, seed: int = 0, n_rows: int = 512, **overrides) -> GRPOTrainer:
    tokenizer = build_tokenizer()
    return GRPOTrainer(
        model=build_model(tokenizer, seed), reward_funcs=[ToyWelfareReward(tokenizer)],
        args=toy_config(output_dir, max_steps, seed, **overrides), train_dataset=build_dataset(n_rows, seed),
        processing_class=tokenizer,
    )


@torch.no_grad()
def greedy_accuracy(trainer: GRPOTrainer, rows: list[dict]) -> float:
    """How often the model's most likely first token is the best action."""
    tokenizer, model = trainer.processing_class, trainer.model
    model.eval()
    encoded = tokenizer([r["prompt"] for r in rows], return_tensors="pt", padding=True, padding_side="left")
    logits = model(**{k: v.to(trainer.device) for k, v in encoded.items()}).logits[:, -1]
    action_ids = [tokenizer.convert_tokens_to_ids(a) for a in ACTIONS]
    choice = logits.argmax(-1).tolist()
    return sum(c == action_ids[r["best"]] for c, r in zip(choice, rows)) / len(rows)


def read_welfare(output_dir: str) -> list[float]:
    """Mean welfare W per logged step, from the trainer's metrics.jsonl."""
    import json

    with open(os.path.join(output_dir, "metrics.jsonl")) as handle:
        return [json.loads(line)["welfare/W"] for line in handle if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="/tmp/toy_gtalign")
    cli = parser.parse_args()
    os.makedirs(cli.output_dir, exist_ok=True)
    metrics_file = os.path.join(cli.output_dir, "metrics.jsonl")
    if os.path.exists(metrics_file):
        os.remove(metrics_file)
    # 16 completions per prompt explore enough to find "stop after the action" within ~100 steps;
    # the test (tests/test_trainer.py) uses the default 8 to stay fast
    trainer = make_trainer(cli.output_dir, cli.steps, cli.seed, disable_tqdm=False, num_generations=16,
                           per_device_train_batch_size=128)
    held_out = build_dataset(256, cli.seed + 1)
    print(f"greedy best-action accuracy before: {greedy_accuracy(trainer, held_out):.2f}")
    trainer.train()
    welfare = read_welfare(cli.output_dir)
    k = max(1, len(welfare) // 10)
    print(f"mean welfare: first {k} steps {sum(welfare[:k]) / k:.3f}, last {k} steps {sum(welfare[-k:]) / k:.3f}")
    print(f"greedy best-action accuracy after: {greedy_accuracy(trainer, held_out):.2f}")
    trainer.save_model()


if __name__ == "__main__":
    main()
