"""SteeringSampler: batched decoding on any Hugging Face causal LM that edits the payoff matrix in
place, in one decoding pass.

Decoding keeps a KV cache, left-pads the prompts, and passes explicit ``position_ids`` and a 2-D
attention mask on every call, so that cache slots can be hidden later. A per-row detector follows
the generated text; when a row closes ``</payoff>`` (mode ``"rewrite"``):

1. the block is parsed (:func:`gtalign_fast.game.payoff.parse_payoff`) and the pricing policy
   applied (:meth:`gtalign_fast.game.pricing.PricingPolicy.apply`); the chosen action is recorded
   (:func:`gtalign_fast.game.pricing.choose_action`);
2. if the matrix changed, the row's tokens from the one holding ``<payoff>`` onwards are hidden
   (their attention-mask columns become 0; the KV entries stay where they are), and the row's
   re-serialised tail (any text that shared those tokens before ``<payoff>``, the new block, and
   any text after ``</payoff>`` in the closing token) is fed at positions continuing from where the
   old block began. The feed is part of the next forward: every row feeds its own list of tokens
   (one sampled token, the re-fed tail, or nothing once finished), right-padded with masked
   padding, and takes its next-token logits at its last real slot. So an edit costs one wider
   forward, never a re-prefill.
3. a block that does not parse, or a policy that leaves the matrix unchanged, leaves the row as it is.

After an edit the row's state is exactly that of a fresh forward over the edited token sequence
(prompt, kept completion tokens, re-fed tail) with contiguous positions; the tests check the
next-token logits against such a fresh forward. Every row samples with its own seed stream (a row
seed mixed with the row's step count), so a row draws the same tokens alone or in any batch.

Speed without changing a token (``cache``, ``cuda_graph``, ``decode_kernel``, ``native_decode``,
``share_prompt_prefix``, ``keep_cache``, ``generate(slots=...)``):

- the row's text is followed incrementally (``detokenize.py``): tags and stop strings are looked
  for in the new token's text, never by decoding the whole row;
- the KV cache is static by default (``static_cache.py``): preallocated for the lanes, the longest
  prompt, ``max_new_tokens`` and room for re-fed blocks, with a visibility mask updated in place
  (hidden payoff columns are masked exactly as in the dynamic cache, positions are the same);
- on CUDA the one-token step (forward + ``sample_`` with the rows' Philox seeds) is a CUDA graph
  (``decode_graph.py``) replayed every plain step; prefill, refills, re-fed payoff blocks and
  biased draws run eagerly; the tokens come back through a pinned buffer once per step; the
  cache and the graph captured on it serve the next ``generate`` call of the same shape
  (``keep_cache``), so a training run captures once per shape;
- on the CPU the decode steps run the model's float32 linear layers and LM head through
  :func:`gtalign_fast.ops.decode_linear` (``fast_decode.py``): a kernel that streams each weight
  once for the few rows of a decode step, where PyTorch's BLAS path reads them at a third of the
  memory bandwidth;
- on the CPU the one-token steps of Llama and Qwen2 models run in one native call
  (``native_decode.py``): every layer in C++ around the same kernel, no per-op dispatch;
- the static cache's prefill packs the prompts end to end in one row (no padding), runs the tokens
  they all start with (a chat template's system prompt) once for all lanes, and each distinct
  prompt once for the rows that share it;
- with ``slots``, at most that many rows decode at once and a finished row's lane takes the next
  waiting row (its prompt prefilled into the lane's columns), so rows of mixed lengths do not
  keep finished rows in the batch.

The tests check that the static cache, the graph and any slot budget sample the same tokens as the
dynamic eager path for the same seeds (float32 logits equal within 1e-5).

Optional logit steering after an edit (``steer_analyze``, mode ``"rewrite"`` only): once an
edited row opens ``<analyze>``, the steering text (by default the key of the action the steered
matrix picks under ``rule``, e.g. ``DQ_DA``, as the tokenizer encodes it without special tokens)
is pushed through ``sample_``'s ``forced`` / ``bias_ids`` arguments:

- ``"force"``: the row's next draws are forced to the steering tokens, in sequence, so the block
  opens by naming the chosen key and the model goes on from there;
- ``"bias"``: at every draw inside the block, ``+steer_strength`` is added to the logit (before
  the temperature) of the next steering token the row has not written yet (the first token until
  the row writes it, then the second, ...; a row that wanders off starts again at the first), until
  the key is written in full or ``</analyze>`` closes;
- ``"off"`` (default): no steering; decoding is exactly what it is without the option.

Tokens forced by ``generate(forced_tokens=...)`` take precedence over steering. The log-prob
reported for a steered token is the model's own (``softmax(z / T)``, without the bias or the
forcing: what a trainer recomputes); steered tokens are off-policy draws.

Mode ``"reference"`` reproduces the reference's two calls: decoding stops at ``</payoff>``, the
steered matrix picks an action, and the model is asked again from scratch with the prompt and a
fixed instruction for that action (a second prefill). Mode ``"off"``: plain sampling.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..game.pricing import PricingPolicy
from .draw import Draw
from .engine import DecodeEngine
from .fast_decode import decode_kernel_unavailable
from .native_decode import native_decode_support
from .payoff_edit import PayoffEdit
from .reference_call import ACTION_INSTRUCTIONS, ReferenceCall
from .rows import GenerationOutput, RowState, SteeringEvent
from .static_cache import static_cache_support
from .steering import AnalyzeSteering, check_steering_options

__all__ = ["SteeringSampler", "SteeringEvent", "GenerationOutput", "ACTION_INSTRUCTIONS"]

MODES = ("rewrite", "reference", "off")
CACHES = ("auto", "static", "dynamic")


class SteeringSampler(DecodeEngine, Draw, PayoffEdit, AnalyzeSteering, ReferenceCall):
    """Batched sampler with in-place payoff steering (see the module docstring).

    Parameters
    ----------
    model : transformers causal LM (``PreTrainedModel`` with a KV cache)
    tokenizer : the model's tokenizer (``encode`` / ``decode``; ``eos_token_id``, ``pad_token_id``)
    policy : PricingPolicy, optional
        Edit applied to every parsed payoff; default: the identity (nothing is ever edited).
    mode : {"rewrite", "reference", "off"}
    rule : str
        Action-choice rule for the events (and the reference mode): see ``choose_action``.
    stop_strings : sequence of str
        A row stops when its text ends with one of these.
    action_instructions : dict, optional
        Per action, the instruction appended to the prompt in mode ``"reference"``.
    backend : str, optional
        Backend of :func:`gtalign_fast.ops.sample_`.
    steer_analyze : {"off", "bias", "force"}
        Logit steering inside ``<analyze>`` after an edit (mode ``"rewrite"`` only; see the module
        docstring): force the steering tokens in sequence, or bias the next one by
        ``steer_strength``. Rows that were not edited are never steered.
    steer_strength : float
        The bias (added to the logit, before the temperature) of mode ``"bias"``; > 0.
    steer_template : str
        The steering text, formatted with the chosen action's ``key`` (``"DQ_DA"``), ``action``
        (``"DA"``) and ``question_type`` (``"DQ"``); default ``"{key}"``. Encoded without special
        tokens.
    cache : {"auto", "static", "dynamic"}
        The KV cache (``gtalign_fast/sampling/static_cache.py``): ``"static"`` preallocates it with an
        in-place mask (SDPA attention, full-attention layers; on CUDA the decode step is then
        captured in a CUDA graph), ``"dynamic"`` is the model's ``DynamicCache``. ``"auto"``:
        static where the model supports it (SDPA, full attention), else dynamic. Both give the
        same tokens for the same seeds (logits equal to float32 rounding).
    cuda_graph : bool
        On CUDA with the static cache, replay the one-token decode step (forward + ``sample_``)
        as a CUDA graph (``decode_graph.py``); False: eager steps. Never used on CPU.
    decode_kernel : bool, optional
        On the CPU, run decode-shaped calls (at most 16 rows) of the model's float32 ``nn.Linear``
        layers through :func:`gtalign_fast.ops.decode_linear` while decoding (``fast_decode.py``).
        None (default): where the compiled extension is built; True: required (an error names why
        it cannot run); False: never. The tokens are the same either way (the products agree to
        float32 rounding).
    native_decode : bool, optional
        On the CPU with the static cache and ``decode_kernel``, run each one-token step of a Llama
        or Qwen2 model (float32, plain modules) in one native call (``native_decode.py``:
        every layer in C++, q/k/v and gate/up as single passes over their weights). None
        (default): where the model and settings allow it; True: required (an error says why it
        cannot run); False: never (the model's forward, with ``decode_kernel``'s linear layers).
        The tokens are the same either way (logits agree to float32 rounding).
    share_prompt_prefix : bool
        With the static cache, run the tokens that every prompt of a batch starts with (a chat
        template's system prompt) once and write their keys and values into every lane
        (``StaticKV.prefill_packed``: the static cache's prefill packs the prompts end to end, no
        padding, so the prefix costs no forward of its own). The tokens are the same either way
        (logits agree to float32 rounding); False: each prompt is prefilled whole.
    keep_cache : bool, optional
        Keep the static KV cache, and on CUDA the decode step captured on it, for the next
        ``generate`` call with the same lanes, columns (rounded up to ``engine.CAPACITY_STEP``, 128),
        autocast, training mode and weight storage: the graph is then captured once per shape,
        not once per call. Between calls it holds ``2 x layers x lanes x kv_heads x columns x
        head_dim`` values; :meth:`release_cache` frees them. None (default): where a decode step
        was captured (CUDA graphs), whose capture costs far more than the allocation; on the CPU
        nothing is captured, and a cache per call keeps that memory free between calls (for a
        training step's update). False: a cache per call, freed with it.

    Attributes
    ----------
    graph_stats : dict
        ``{"captures": int, "seconds": float}``: the CUDA graphs this sampler captured and their
        host time (0 on the CPU, where the native step ships compiled).
    """

    def __init__(
        self,
        model,
        tokenizer,
        policy: PricingPolicy | None = None,
        mode: str = "rewrite",
        *,
        rule: str = "nash",
        stop_strings: Sequence[str] = (),
        action_instructions: dict[str, str] | None = None,
        backend: str | None = None,
        steer_analyze: str = "off",
        steer_strength: float = 5.0,
        steer_template: str = "{key}",
        cache: str = "auto",
        cuda_graph: bool = True,
        decode_kernel: bool | None = None,
        native_decode: bool | None = None,
        share_prompt_prefix: bool = True,
        keep_cache: bool | None = None,
    ):
        if mode not in MODES:
            raise ValueError(f"SteeringSampler: mode must be one of {MODES}, got {mode!r}")
        if cache not in CACHES:
            raise ValueError(f"SteeringSampler: cache must be one of {CACHES}, got {cache!r}")
        self._static_unsupported = static_cache_support(getattr(model, "module", model))
        if cache == "static" and self._static_unsupported:
            raise ValueError(f"SteeringSampler: cache='static' cannot run this model: {self._static_unsupported}")
        self.cache = cache
        self.cuda_graph = bool(cuda_graph)
        if decode_kernel is not None and not isinstance(decode_kernel, bool):
            raise TypeError(f"SteeringSampler: decode_kernel must be a bool or None, got {decode_kernel!r}")
        if decode_kernel and decode_kernel_unavailable():
            raise RuntimeError(f"SteeringSampler: decode_kernel=True, but {decode_kernel_unavailable()}")
        self.decode_kernel = decode_kernel_unavailable() is None if decode_kernel is None else decode_kernel
        self.native_decode = self._check_native_decode(native_decode, model)
        self._native_decode_required = native_decode is True
        if not isinstance(share_prompt_prefix, bool):
            raise TypeError(f"SteeringSampler: share_prompt_prefix must be a bool, got {share_prompt_prefix!r}")
        self.share_prompt_prefix = share_prompt_prefix
        if keep_cache is not None and not isinstance(keep_cache, bool):
            raise TypeError(f"SteeringSampler: keep_cache must be a bool or None, got {keep_cache!r}")
        self.keep_cache = keep_cache
        self._kept_kv = None
        self.graph_stats = {"captures": 0, "seconds": 0.0}
        check_steering_options(mode, steer_analyze, steer_strength, steer_template)
        if policy is not None and not isinstance(policy, PricingPolicy):
            raise TypeError(f"SteeringSampler: policy must be a PricingPolicy or None, got {type(policy).__name__}")
        self.model = model
        self.tokenizer = tokenizer
        self.policy = policy if policy is not None else PricingPolicy.identity()
        self.mode = mode
        self.rule = rule
        self.stop_strings = tuple(stop_strings)
        self.action_instructions = dict(ACTION_INSTRUCTIONS if action_instructions is None else action_instructions)
        self.backend = backend
        self.steer_analyze = steer_analyze
        self.steer_strength = float(steer_strength)
        self.steer_template = steer_template
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            eos = getattr(model.config, "eos_token_id", None)
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos]))
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = pad if pad is not None else (min(self.eos_ids) if self.eos_ids else 0)

    def _check_native_decode(self, native_decode: bool | None, model) -> bool:
        """``native_decode`` resolved (see the class docstring); True that cannot run raises."""
        if native_decode is not None and not isinstance(native_decode, bool):
            raise TypeError(f"SteeringSampler: native_decode must be a bool or None, got {native_decode!r}")
        if native_decode is False:
            return False
        why = native_decode_support(getattr(model, "module", model))
        if not self.decode_kernel:
            why = "decode_kernel is off"
        elif self.cache == "dynamic" or self._static_unsupported:
            why = f"it needs the static cache ({self._static_unsupported or 'cache=dynamic'})"
        if why and native_decode:
            raise ValueError(f"SteeringSampler: native_decode=True, but {why}")
        return not why

    # -----------------------------------------------------------------------------------------
    # Public API

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        max_new_tokens: int = 256,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        num_return_sequences: int = 1,
        seed: int | Sequence[int] | None = None,
        *,
        forced_tokens: Sequence[Sequence[int] | None] | None = None,
        keep_edit_logits: bool = False,
        slots: int | None = None,
    ) -> GenerationOutput:
        """Sample completions; see :class:`GenerationOutput`.

        Parameters
        ----------
        prompts : list of str or list of token-id lists
        max_new_tokens : int
            Draws per row (re-fed payload tokens do not count).
        temperature, top_k, top_p : as in :func:`gtalign_fast.ops.sample_`
        num_return_sequences : int
            Rows per prompt (row ``i * n + j`` is prompt ``i``'s ``j``-th sequence).
        seed : int or list of int, optional
            One int seeds row ``r`` with ``seed + r``; a list gives each row its own seed. A row's
            tokens depend only on its prompt, its seed and the settings, not on the batch.
        forced_tokens : list (per row) of token-id lists or None, optional
            Tokens to emit at a row's first draws (``-1`` = sample that one); for tests and
            scripted prefixes. They go through ``sample_``'s forced-token path.
        keep_edit_logits : bool
            Keep each edited row's next-token logits in its event (for exactness checks).
        slots : int, optional
            At most this many rows decode at once; when one finishes (EOS, stop string, length),
            the next waiting row takes its place. Default: all rows at once. The output does not
            depend on it (each row samples from its own seed and sees only its own cache columns).
        """
        if max_new_tokens < 0 or num_return_sequences < 1:
            raise ValueError("SteeringSampler.generate: max_new_tokens must be >= 0 and num_return_sequences >= 1")
        if slots is not None and (isinstance(slots, bool) or not isinstance(slots, int) or slots < 1):
            raise ValueError(f"SteeringSampler.generate: slots must be a positive int or None, got {slots!r}")
        prompt_ids = [self._encode(p) for p in prompts for _ in range(num_return_sequences)]
        n_rows = len(prompt_ids)
        if n_rows == 0:
            raise ValueError("SteeringSampler.generate: no prompts")
        empty = next((r // num_return_sequences for r, ids in enumerate(prompt_ids) if not ids), None)
        if empty is not None:
            raise ValueError(f"SteeringSampler.generate: prompt {empty} has no tokens (the first draw needs "
                             "the logits after at least one)")
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()))
        seeds = [seed + r for r in range(n_rows)] if isinstance(seed, int) else [int(s) for s in seed]
        if len(seeds) != n_rows:
            raise ValueError(f"SteeringSampler.generate: {len(seeds)} seeds for {n_rows} rows")
        if forced_tokens is not None and len(forced_tokens) != n_rows:
            raise ValueError(
                f"SteeringSampler.generate: forced_tokens has {len(forced_tokens)} entries for {n_rows} rows"
            )
        rows = [
            RowState(prompt_ids=ids, seed=s, forced=None if forced_tokens is None else forced_tokens[r], index=r)
            for r, (ids, s) in enumerate(zip(prompt_ids, seeds))
        ]
        settings = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        stop_at_payoff = self.mode == "reference"
        with self._decode_linears():
            prefilled = self._decode_rows(rows, max_new_tokens, settings, keep_edit_logits, stop_at_payoff, slots)
            if self.mode == "reference":
                prefilled += self._reask(rows, max_new_tokens, settings, slots)
        return self._output(rows, prefilled)


    def _output(self, rows: list[RowState], prefilled: int) -> GenerationOutput:
        events = []
        for r, row in enumerate(rows):
            if row.event is None:
                status = "off" if self.mode == "off" else "no_payoff"
                reason = "mode off" if status == "off" else "no </payoff> closed"
                row.event = SteeringEvent(row=r, status=status, reason=reason)
            if row.steer is not None:
                row.event.steer_draws, row.event.steer_status = row.steer.draws, row.steer.status
            events.append(row.event)
        return GenerationOutput(
            completion_ids=[row.ids for row in rows],
            texts=[self.tokenizer.decode(row.ids) for row in rows],
            logprobs=[row.logprobs for row in rows],
            finish_reasons=[row.finished or "length" for row in rows],
            events=events,
            prompt_ids=[row.prompt_ids for row in rows],
            tokens_prefilled=prefilled,
        )
