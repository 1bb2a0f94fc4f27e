"""Benchmark rows for steering one response: ``SteeringSampler`` mode ``"rewrite"`` (the payoff is
edited in place, in one decoding pass) against mode ``"reference"`` (the reference's two calls: stop
at ``</payoff>``, then prefill the prompt plus an action instruction again and decode anew).

Both providers get the same randomly initialised Qwen2-shaped model (built from a config, no
downloads), the same in-memory tokenizer, prompts and seeds. Every row's chain is forced up to
``<analyze>`` (``generate(forced_tokens=...)``) with a payoff that the policy
``PricingPolicy.reference(scale_llm=1.0)`` always changes, so every row is steered; the rest is
sampled. The tokenizer's EOS id lies outside the model's vocabulary (it is never sampled), so
every call decodes a fixed number of tokens.

One timed call generates ``B`` responses: the wall time per steered response is
``median_ms / B``. Extra fields of each row (one untimed run in ``cases``):

``tokens_prefilled``  tokens run through the model besides one per decoding step (prompts, the
                      re-fed payoff spans of rewrite, the second prompts of the reference)
``tokens_refed``      of these, the tokens steering added (sum over the ``B`` rows): rewrite
                      re-feeds the payoff span, the reference re-prefills the whole prompt
``prompt_tokens``     the first prefill (sum over the rows)
``decode_steps``      draws made in all (the reference also redraws the response)
``steered``           rows whose payoff was edited (rewrite) or that were re-asked (reference)

Suites: ``default`` (tiny model, 128-token prompts; a few seconds) and ``full`` (a larger model
and 1k / 2k-token prompts on CPU, 1k / 4k on CUDA).

On CPU every call runs with one intra-op thread (``extra["threads"]``), for both providers: a
decode step of these models is a few microseconds of work per op, which OpenMP fork/join overhead
dominates, and on a shared machine two spinning threads made the same call ten times slower.
"""

from __future__ import annotations

import contextlib
import string
from dataclasses import dataclass

import torch

from bench.common import Case, missing, skipped
from gtalign_fast.game.payoff import PAYOFF_KEYS
from gtalign_fast.game.pricing import PricingPolicy
from gtalign_fast.sampling.sampler import SteeringSampler

OP = "steering"
POLICY = PricingPolicy.reference(scale_llm=1.0)  # shifts every LLM payoff: every row is edited
PAYOFF = (
    '{"DQ_AQ": {"LLM": 2.2, "user": 1.9}, "DQ_CQ": {"LLM": 3.1, "user": 3.5}, "DQ_DA": {"LLM": 4.2, "user": 4.3}, '
    '"VQ_AQ": {"LLM": 2.0, "user": 2.1}, "VQ_CQ": {"LLM": 1.3, "user": 1.2}, "VQ_DA": {"LLM": 2.0, "user": 1.8}}'
)
THINKING = "The user asks for an explanation: answer directly."
PROMPT_TEXT = (
    "Please explain, step by step and with an example, how a key-value cache speeds up the decoding of a "
    "transformer language model, what it costs in memory, and when it is worth recomputing instead. "
)
PROVIDERS = {"rewrite": "gtalign_fast[rewrite]", "reference": "reference-two-call"}
# The rewrite row runs on the sampler's default cache (static; on CUDA with the CUDA graph); this
# row runs it on the DynamicCache, so the table shows what the static cache / graph buys.
OTHER_CACHE = {"cpu": "dynamic", "cuda": "dynamic"}


@dataclass(frozen=True)
class Setup:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    rows: int  # responses per call
    prompt_tokens: int  # per row (the tokenizer is character-level outside tags and payoff words)
    free_tokens: int  # tokens sampled after <analyze>

    def shape(self) -> dict:
        return {"B": self.rows, "P": self.prompt_tokens, "free": self.free_tokens, "H": self.hidden,
                "layers": self.layers}


def _setups(suite: str, device: torch.device) -> list[Setup]:
    if suite == "default":
        return [Setup(hidden=64, layers=2, heads=4, kv_heads=2, rows=2, prompt_tokens=128, free_tokens=8)]
    if suite == "full":
        longest = 4096 if device.type == "cuda" else 2048  # ~2 minutes in all on a 2-core CPU
        return [Setup(hidden=256, layers=4, heads=8, kv_heads=4, rows=4, prompt_tokens=prompt, free_tokens=32)
                for prompt in (1024, longest)]
    return []


# ---------------------------------------------------------------------------------------------
# A tiny model and tokenizer, built in memory


def build_tokenizer():
    """A word-level tokenizer: tags, payoff keys, ``"LLM"``/``"user"``, separators and one-decimal
    numbers are one token each (so a payoff block is ~80 tokens, as with a real BPE tokenizer);
    everything else is one character. ``<eos>`` is the last id."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tags = [f"<{t}>" for t in ("thinking", "payoff", "analyze", "response")]
    tags += [f"</{t}>" for t in ("thinking", "payoff", "analyze", "response")]
    words = [f'"{k}"' for k in PAYOFF_KEYS] + ['"LLM"', '"user"', ": ", ", "]
    numbers = [f"{sign}{i / 10:.1f}" for i in range(100) for sign in ("", "-")]
    vocab = {"<pad>": 0, "<unk>": 1}
    for token in tags + words + numbers + list(string.printable):
        vocab.setdefault(token, len(vocab))
    vocab["<eos>"] = len(vocab)
    model = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    pattern = r'</?[a-z]+>|"(?:[DV]Q_[ACD][AQ]|LLM|user)"|: |, |-?\d\.\d|[\s\S]'
    model.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    model.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=model, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def build_model(setup: Setup, tokenizer, device: torch.device):
    """A randomly initialised Qwen2 whose vocabulary stops short of the tokenizer's ``<eos>``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=tokenizer.eos_token_id, hidden_size=setup.hidden, intermediate_size=2 * setup.hidden,
        num_hidden_layers=setup.layers, num_attention_heads=setup.heads, num_key_value_heads=setup.kv_heads,
        max_position_embeddings=2 * setup.prompt_tokens + 1024, pad_token_id=0, eos_token_id=None, bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config)
    return model.float().eval().to(device)


def _prompts(setup: Setup, tokenizer) -> list[list[int]]:
    """``rows`` prompts of exactly ``prompt_tokens`` tokens each (as token ids), all different."""
    prompts = []
    for row in range(setup.rows):
        text = f"Q{row}: " + PROMPT_TEXT * (setup.prompt_tokens // len(PROMPT_TEXT) + 1)
        prompts.append(list(tokenizer(text, add_special_tokens=False)["input_ids"])[: setup.prompt_tokens])
    return prompts


def _script(tokenizer) -> list[int]:
    text = f"<thinking>{THINKING}</thinking>\n<payoff>{PAYOFF}</payoff>\n<analyze>"
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# ---------------------------------------------------------------------------------------------
# Cases


@contextlib.contextmanager
def _threads(device: torch.device):
    """One intra-op thread on CPU for the duration (see the module docstring)."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Workload:
    """The model, tokenizer and ``generate`` arguments of one setup, shared by its providers."""

    def __init__(self, setup: Setup, device: torch.device):
        self.device = device
        self.tokenizer = build_tokenizer()
        self.model = build_model(setup, self.tokenizer, device)
        script = _script(self.tokenizer)
        self.arguments = dict(
            prompts=_prompts(setup, self.tokenizer), max_new_tokens=len(script) + setup.free_tokens,
            temperature=1.0, top_p=0.95, seed=list(range(setup.rows)), forced_tokens=[script] * setup.rows,
        )

    def sampler(self, mode: str, cache: str = "auto") -> SteeringSampler:
        return SteeringSampler(self.model, self.tokenizer, policy=POLICY, mode=mode, cache=cache)

    def generate(self, sampler: SteeringSampler):
        with _threads(self.device):
            return sampler.generate(**self.arguments)


def _counts(workload: _Workload, mode: str) -> dict:
    """One untimed run: what steering costs in prefilled tokens (identical on every run: fixed seeds)."""
    out = workload.generate(workload.sampler(mode))
    steered = sum(e.status in ("edited", "reasked") for e in out.events)
    if steered != len(out.events):
        raise RuntimeError(f"bench steering: {len(out.events) - steered} rows were not steered ({mode})")
    refed = sum(e.tokens_refed for e in out.events)
    if mode == "rewrite":  # drawn = kept + hidden (the old payoff) + drawn after the edit
        draws = sum(len(ids) - e.tokens_refed + e.tokens_hidden for ids, e in zip(out.completion_ids, out.events))
    else:  # drawn up to </payoff> in the first call, then the whole second completion
        draws = sum(e.step + len(ids) for ids, e in zip(out.completion_ids, out.events))
    return {
        "tokens_prefilled": out.tokens_prefilled,
        "tokens_refed": refed,
        "prompt_tokens": sum(len(p) for p in out.prompt_ids),
        "decode_steps": draws,
        "steered": steered,
    }


def _make(workload: _Workload, mode: str, cache: str = "auto"):
    def make():
        sampler = workload.sampler(mode, cache)
        return lambda: workload.generate(sampler)

    return make


def cases(device: torch.device, suite: str) -> list[Case]:
    setups = _setups(suite, device)
    if not setups:
        return []
    reason = missing("transformers") or missing("tokenizers")
    if reason:
        return [row for setup in setups for provider in PROVIDERS.values()
                for row in skipped(OP, provider, ["full"], setup.shape(), "float32", reason)]
    rows: list[Case] = []
    for setup in setups:
        workload = _Workload(setup, device)
        for mode, provider in PROVIDERS.items():
            extra = {**_counts(workload, mode), "responses_per_call": setup.rows,
                     "threads": 1 if device.type == "cpu" else None}
            rows.append(Case(OP, provider, "full", setup.shape(), "float32", _make(workload, mode), extra=extra))
        other = OTHER_CACHE.get(device.type)
        if other:
            extra = {**rows[-len(PROVIDERS)].extra, "cache": other}
            rows.append(Case(OP, f"gtalign_fast[rewrite,{other}]", "full", setup.shape(), "float32",
                             _make(workload, "rewrite", other), extra=extra))
    return rows
