"""The fast rollout path: incremental detokenization, the static (slot) KV cache, slots that
refill, and (on CUDA) the graph-captured decode step, each against the plain eager path."""

from __future__ import annotations

import math
import random

import pytest
import torch

from gtalign_fast.sampling.detokenize import IncrementalText, TagScanner
from gtalign_fast.sampling.engine import shared_prefix_length
from gtalign_fast.sampling.fast_decode import decode_kernel_unavailable
from gtalign_fast.sampling.sampler import SteeringSampler

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

TEXT = ("Le café coûte 3 €, the naïve user said: <payoff>{\"DQ_DA\": 1.5}</payoff> then 日本語のテキスト "
        "and emoji 🙂🙃 <analyze>ok</analyze> done.\n")


def _byte_bpe():
    """A byte-level BPE (GPT-2 / Qwen style) trained in memory: multi-byte characters span tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator([TEXT * 3, "hello world café"], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")


def _metaspace():
    """A SentencePiece-style (Metaspace) unigram-free BPE: decode strips the first token's space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    core.pre_tokenizer = pre_tokenizers.Metaspace()
    core.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse(), decoders.Metaspace()])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<pad>", "<eos>", "<unk>"] + byte_tokens)
    core.train_from_iterator([TEXT.replace("日本語のテキスト", "") * 3], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


@pytest.mark.parametrize("make", [_byte_bpe, _metaspace])
def test_incremental_text_equals_the_full_decode_after_every_token(make):
    tokenizer = make()
    rng = random.Random(0)
    texts = [TEXT, "x" + TEXT[::-1], "🙂" * 5 + " a b  c"]
    sequences = [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    if make is _byte_bpe:  # random tokens, broken UTF-8 too (a byte-fallback decoder's U+FFFD runs differ there)
        sequences.append([rng.randrange(len(tokenizer)) for _ in range(80)])
    checked = 0
    for ids in sequences:
        for start in (0, 7):  # from nothing, and restarted (after an edit) in the middle
            text = IncrementalText(tokenizer, ids[:start])
            for n in range(start + 1, len(ids) + 1):
                text.push(tokenizer, ids[:n])
                full = tokenizer.decode(ids[:n])
                # While a character is incomplete, a byte-fallback decoder turns the whole byte run
                # into U+FFFD (earlier complete characters too); the text agrees again once it ends.
                if not full.endswith("\ufffd"):
                    assert text.text == full, (ids[:n], text.text)
                    checked += 1
    assert checked > 100


def test_incremental_text_window_is_bounded_on_invalid_bytes():
    """A model that emits bytes that never complete a character (text ending in U+FFFD for ever)
    must not make every push decode the whole run again (quadratic in the completion length)."""
    tokenizer = _byte_bpe()
    bad = tokenizer.convert_tokens_to_ids("\u00ff")  # byte 0xFF: never valid UTF-8
    decoded = []

    class Counting:
        def decode(self, ids):
            decoded.append(len(ids))
            return tokenizer.decode(ids)

    ids = list(tokenizer("ok ", add_special_tokens=False)["input_ids"])
    text = IncrementalText(Counting(), ids)
    for _ in range(300):
        ids.append(bad)
        text.push(Counting(), ids)
    assert max(decoded[1:]) <= 20, max(decoded)
    assert text.text == tokenizer.decode(ids)


def test_tag_scanner_finds_the_first_tag_searching_each_character_about_once():
    tag = "</payoff>"
    text = "ab</pay" + "off> and again </payoff>"
    for cut in range(len(text) + 1):
        scanner = TagScanner(tag)
        found = -1
        for end in range(1, cut + 1):  # the text grows one character at a time
            hit = scanner.find(text[:end], end)
            if hit >= 0 and found < 0:
                found = hit
        assert found == text[:cut].find(tag)
    assert TagScanner(tag, start=3).find(text, len(text)) == text.find(tag, 3)


# ---------------------------------------------------------------------------------------------
# The sampler on the static cache and with slots, against the dynamic path


@pytest.fixture(scope="module")
def tokenizer():
    from tests.test_sampler import tokenizer as make

    return make.__wrapped__()


@pytest.fixture(scope="module")
def qwen(tokenizer):
    from tests.test_sampler import _model

    return _model("qwen2", len(tokenizer))


def _ids(tokenizer, text):
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _chain(tokenizer, thinking="ok"):
    from tests.test_sampler import PAYOFF

    return _ids(tokenizer, f"<thinking>{thinking}</thinking>\n<payoff>{PAYOFF}</payoff>\n<analyze>")


def _same(a, b, atol=1e-5):
    """Same tokens, finish reasons, events and re-fed spans; sampled log-probs within ``atol``."""
    assert a.completion_ids == b.completion_ids
    assert a.finish_reasons == b.finish_reasons
    assert [e.status for e in a.events] == [e.status for e in b.events]
    assert [e.steer_status for e in a.events] == [e.steer_status for e in b.events]
    assert a.tokens_prefilled == b.tokens_prefilled
    for x, y in zip(a.logprobs, b.logprobs):
        assert [math.isnan(v) for v in x] == [math.isnan(v) for v in y]
        assert all(math.isnan(u) or abs(u - v) <= atol for u, v in zip(x, y))


def _rows(tokenizer):
    """Rows of mixed fates: an edit, free sampling, an early EOS, a longer edit, a stop string."""
    early = _ids(tokenizer, "<thinking>") + [tokenizer.eos_token_id]
    stop = _ids(tokenizer, "<thinking>x</thinking>\n<payoff>{}</payoff>\nEND")
    return [("Q: short", _chain(tokenizer)), ("A longer prompt than the others", None), ("Q: stop soon", early),
            ("Q: again, the edit", _chain(tokenizer, "a longer thought")), ("Q: s", stop), ("Hi", None)]


def _generate(model, tokenizer, cache, slots=None, steer="force", graph=True, kernel=None, native_decode=None,
              **kwargs):
    from tests.test_sampler import POLICY

    rows = _rows(tokenizer)
    sampler = SteeringSampler(model, tokenizer, policy=POLICY, mode="rewrite", steer_analyze=steer, cache=cache,
                              stop_strings=("END",), cuda_graph=graph, decode_kernel=kernel,
                              native_decode=native_decode)
    settings = dict(max_new_tokens=len(_chain(tokenizer, "a longer thought")) + 6, temperature=0.9, top_p=0.95,
                    seed=[11, 12, 13, 14, 15, 16], forced_tokens=[s for _, s in rows], keep_edit_logits=True)
    settings.update(kwargs)
    return sampler.generate([p for p, _ in rows], slots=slots, **settings)


def test_static_cache_samples_what_the_dynamic_cache_samples(qwen, tokenizer):
    dynamic = _generate(qwen, tokenizer, "dynamic")
    static = _generate(qwen, tokenizer, "static")
    statuses = [e.status for e in dynamic.events]
    assert statuses[0] == statuses[3] == "edited" and dynamic.finish_reasons[2] == "eos"
    assert dynamic.finish_reasons[4] == "stop" and dynamic.texts[4].endswith("END")
    assert dynamic.events[0].steer_status == "named"
    _same(dynamic, static)
    for a, b in zip(dynamic.events, static.events):  # float32 logits right after each edit
        if a.next_logits is not None:
            torch.testing.assert_close(b.next_logits, a.next_logits, atol=1e-5, rtol=1e-5)


def _decode_kernel_calls(run):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as trace:
        result = run()
    return result, sum(e.count for e in trace.key_averages() if e.key == "gtalign_fast_C::decode_linear")


@pytest.mark.skipif(decode_kernel_unavailable() is not None, reason=str(decode_kernel_unavailable()))
@pytest.mark.parametrize("cache, slots", [("static", None), ("dynamic", 2)])
def test_the_decode_kernel_samples_what_f_linear_samples(qwen, tokenizer, cache, slots):
    """On the CPU the decode steps' linear layers run ops.decode_linear (another summation order):
    the same tokens, edits, steering and finish reasons for the same seeds, log-probs and the logits
    after each edit within 1e-5; the kernel ran on the plain steps and not with decode_kernel=False."""
    plain, calls = _decode_kernel_calls(lambda: _generate(qwen, tokenizer, cache, slots=slots, kernel=False))
    assert calls == 0
    fast, calls = _decode_kernel_calls(lambda: _generate(qwen, tokenizer, cache, slots=slots, kernel=True,
                                                         native_decode=False))  # tests/test_native_decode.py
    assert calls > 20
    _same_rows_and_edits(plain, fast)
    assert all("forward" not in m.__dict__ for m in qwen.modules())  # the model is restored


def _same_rows_and_edits(plain, fast):
    """``_rows``' two edits happened, and ``_same`` holds, with the logits after each edit within 1e-5."""
    assert [e.status for e in plain.events].count("edited") == 2
    _same(plain, fast)
    for a, b in zip(plain.events, fast.events):
        if a.next_logits is not None:
            torch.testing.assert_close(b.next_logits, a.next_logits, atol=1e-5, rtol=1e-5)


def test_bad_decode_kernel_setting(qwen, tokenizer):
    with pytest.raises(TypeError, match="decode_kernel"):
        SteeringSampler(qwen, tokenizer, decode_kernel="yes")
    assert SteeringSampler(qwen, tokenizer, decode_kernel=False).decode_kernel is False
    assert SteeringSampler(qwen, tokenizer).decode_kernel is (decode_kernel_unavailable() is None)


@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_rows_do_not_depend_on_slots(qwen, tokenizer, cache):
    everything = _generate(qwen, tokenizer, cache, steer="off")
    assert len(set(map(len, everything.completion_ids))) > 1  # rows finish at different steps: lanes refill
    for slots in (1, 4):
        widths = []  # rows per model forward: at most `slots` decode at once
        hook = qwen.register_forward_pre_hook(
            lambda _module, _args, kwargs: widths.append(kwargs["input_ids"].shape[0]), with_kwargs=True
        )
        try:
            out = _generate(qwen, tokenizer, cache, slots=slots, steer="off")
        finally:
            hook.remove()
        assert widths and max(widths) == slots
        _same(everything, out, atol=1e-4)


@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_rows_of_one_prompt_share_its_prefill(qwen, tokenizer, cache):
    """num_return_sequences rows of a prompt (GRPO's group) prefill it once and copy its keys and
    values into their lanes: the same tokens, edits and log-probs as rows prefilled one by one
    (slots=1), and only the distinct prompts' tokens run through the model."""
    from tests.test_sampler import POLICY

    prompts = ["Q: short", "A longer prompt than the other"]
    chain, plain = _chain(tokenizer), [-1]
    forced = [chain, plain, chain, plain, plain, chain]  # 3 rows per prompt: edits in some lanes only

    def generate(slots):
        sampler = SteeringSampler(qwen, tokenizer, policy=POLICY, mode="rewrite", cache=cache)
        return sampler.generate(prompts, num_return_sequences=3, max_new_tokens=len(chain) + 4, temperature=0.9,
                                seed=7, forced_tokens=forced, keep_edit_logits=True, slots=slots)

    shared, alone = generate(None), generate(1)
    assert [e.status for e in shared.events].count("edited") == 3
    assert shared.completion_ids[0] != shared.completion_ids[1]
    refed = shared.tokens_prefilled - sum(len(_ids(tokenizer, p)) for p in prompts)
    assert alone.tokens_prefilled - refed == sum(map(len, alone.prompt_ids))  # 6 prompts run vs 2
    alone.tokens_prefilled = shared.tokens_prefilled
    _same(alone, shared, atol=1e-5)
    for a, b in zip(alone.events, shared.events):
        if a.next_logits is not None:
            torch.testing.assert_close(b.next_logits, a.next_logits, atol=1e-5, rtol=1e-5)


def test_shared_prefix_length():
    assert shared_prefix_length([[1] * 40 + [2], [1] * 40 + [3, 4]]) == 40
    assert shared_prefix_length([[1] * 40, [1] * 50]) == 39  # each prompt keeps a token of its own
    assert shared_prefix_length([[1] * 20 + [2], [1] * 20 + [3], [1] * 20 + [4]]) == 20  # 2 x 20 saved
    assert shared_prefix_length([[1] * 20 + [2], [1] * 20 + [3]]) == 20  # the packed prefill: any count saves
    assert shared_prefix_length([[5] + [1] * 40, [6] + [1] * 40]) == 0
    assert shared_prefix_length([[1] * 40]) == 0  # one distinct prompt: its rows share it whole already
    assert shared_prefix_length([[], [1] * 40]) == 0


@pytest.mark.parametrize("slots", [None, 3])
def test_prompts_share_their_common_prefix_in_the_prefill(qwen, tokenizer, slots, monkeypatch):
    """Prompts that start alike (a chat template's system prompt) prefill those tokens once on the
    static cache, packed end to end without padding: the same tokens, edits and log-probs as the
    dynamic cache's padded batch, with and without the shared prefix, in one packed forward or in
    chunks (the later ones read the prefix from the cache). With ``slots``, the lanes refilled
    later take whole prompts (mixed layouts in one cache)."""
    import gtalign_fast.sampling.static_cache as static_cache
    from tests.test_sampler import POLICY

    system = "Q: " + " ".join(["short"] * 24) + " A longer prompt than the others"
    prompts = [system + tail for tail in (" Q: stop soon", "", " Q: short Q: short", " END")]
    chain = _chain(tokenizer)
    forced = [chain, None, None, chain, None, None, chain, None]  # 2 rows per prompt: edits in some lanes

    def generate(cache="static", share_prompt_prefix=True):
        sampler = SteeringSampler(qwen, tokenizer, policy=POLICY, mode="rewrite", cache=cache,
                                  share_prompt_prefix=share_prompt_prefix)
        return sampler.generate(prompts, num_return_sequences=2, max_new_tokens=len(chain) + 4, temperature=0.9,
                                seed=3, forced_tokens=forced, keep_edit_logits=True, slots=slots)

    padded, shared, whole = generate("dynamic"), generate(), generate(share_prompt_prefix=False)
    monkeypatch.setattr(static_cache, "PACKED_PREFILL_TOKENS", 40)  # a chunk per prompt after the first
    chunked = generate()
    encoded = [_ids(tokenizer, p) for p in prompts]
    first = encoded[: 2 if slots else 4]  # the distinct prompts of the first prefill (2 rows each)
    common = shared_prefix_length(first)
    assert common >= 30 and whole.tokens_prefilled - shared.tokens_prefilled == common * (len(first) - 1)
    assert padded.tokens_prefilled == whole.tokens_prefilled == chunked.tokens_prefilled + common * (len(first) - 1)
    assert [e.status for e in shared.events].count("edited") == 3
    for out in (shared, whole, chunked):
        out.tokens_prefilled = padded.tokens_prefilled
        _same(padded, out, atol=1e-5)
        for a, b in zip(padded.events, out.events):
            if a.next_logits is not None:
                torch.testing.assert_close(b.next_logits, a.next_logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError, match="share_prompt_prefix"):
        SteeringSampler(qwen, tokenizer, share_prompt_prefix="yes")


def test_packed_prefill_layout(monkeypatch):
    """pack_prompts: the prefix once (segment -1, seen by all), each prompt's own tokens once,
    scattered into every lane that takes it, ending at column ``width``; chunks past the limit."""
    import gtalign_fast.sampling.static_cache as static_cache
    from gtalign_fast.sampling.static_cache import pack_prompts

    prompts = [[7, 7, 1, 2], [7, 7, 3], [7, 7, 4, 5, 6]]
    (chunk,) = pack_prompts(prompts, [0, 1, 1, 2], common=2, width=5, device=torch.device("cpu"))
    assert chunk.feed.tolist() == [[7, 7, 1, 2, 3, 4, 5, 6]]
    assert chunk.positions.tolist() == [[0, 1, 2, 3, 2, 2, 3, 4]]
    assert chunk.last.tolist() == [3, 4, 7] and chunk.prefix_columns == 0
    seen = chunk.mask[0, 0].int().tolist()
    assert seen[4] == [1, 1, 0, 0, 1, 0, 0, 0]  # prompt 1's token: the prefix and itself
    assert seen[7] == [1, 1, 0, 0, 0, 1, 1, 1]
    assert seen[1] == [1, 1, 0, 0, 0, 0, 0, 0]
    where = sorted(zip(chunk.lanes.tolist(), chunk.columns.tolist(), chunk.tokens.tolist()))
    expected = [(lane, c, c) for lane in range(4) for c in range(2)]  # the prefix into every lane
    expected += [(0, 3, 2), (0, 4, 3), (1, 4, 4), (2, 4, 4), (3, 2, 5), (3, 3, 6), (3, 4, 7)]
    assert where == sorted(expected)

    monkeypatch.setattr(static_cache, "PACKED_PREFILL_TOKENS", 5)
    first, second = pack_prompts(prompts, [0, 1, 1, 2], common=2, width=5, device=torch.device("cpu"))
    assert first.feed.tolist() == [[7, 7, 1, 2, 3]] and first.prefix_columns == 0
    assert second.feed.tolist() == [[4, 5, 6]] and second.positions.tolist() == [[2, 3, 4]]
    assert second.prefix_columns == 2 and second.mask.shape == (1, 1, 3, 5) and second.mask[0, 0, :, :2].all()
    assert second.lanes.tolist() == [3, 3, 3] and second.columns.tolist() == [2, 3, 4]


def test_static_cache_compacts_and_grows_when_full(qwen, tokenizer, monkeypatch):
    import gtalign_fast.sampling.engine as engine
    import gtalign_fast.sampling.static_cache as static_cache

    made = []

    class Spy(static_cache.StaticKV):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.compactions = 0
            made.append(self)

        def make_room(self, width):
            compacted = super().make_room(width)
            self.compactions += compacted
            return compacted

    monkeypatch.setattr(engine, "ROOM", 0)  # capacity: longest prompt + max_new_tokens, no room
    monkeypatch.setattr(engine, "StaticKV", Spy)
    expected = _generate(qwen, tokenizer, "dynamic", steer="off")
    _same(expected, _generate(qwen, tokenizer, "static", slots=2, steer="off"), atol=1e-4)  # 3 waves: compacts
    _same(expected, _generate(qwen, tokenizer, "static", steer="off"), atol=1e-4)  # re-fed blocks: grows
    assert made[0].compactions > 0 and made[1].generation > 0


def test_reference_mode_on_the_static_cache(qwen, tokenizer):
    from tests.test_sampler import POLICY

    script = _chain(tokenizer)
    outs = [
        SteeringSampler(qwen, tokenizer, policy=POLICY, mode="reference", cache=cache).generate(
            ["Q: explain", "Q: other"], max_new_tokens=len(script) + 4, seed=2, forced_tokens=[script, None],
            slots=slots)
        for cache, slots in (("dynamic", None), ("static", None), ("static", 1))
    ]
    assert outs[0].events[0].status == "reasked"
    common = shared_prefix_length(outs[0].prompt_ids)  # "Q:": run once by the static cache's packed prefill
    assert common == 2 and outs[1].tokens_prefilled == outs[0].tokens_prefilled - common
    outs[1].tokens_prefilled = outs[0].tokens_prefilled
    _same(outs[0], outs[1])
    _same(outs[0], outs[2], atol=1e-4)  # one lane: nothing shared


def test_bad_cache_and_slots(qwen, tokenizer):
    with pytest.raises(ValueError, match="cache"):
        SteeringSampler(qwen, tokenizer, cache="paged")
    eager = _model_with_attention(tokenizer, "eager")
    with pytest.raises(ValueError, match="sdpa"):
        SteeringSampler(eager, tokenizer, cache="static")
    assert SteeringSampler(eager, tokenizer).generate(["a"], max_new_tokens=2, seed=1).completion_ids
    for slots in (0, 1.5, True):
        with pytest.raises(ValueError, match="slots"):
            SteeringSampler(qwen, tokenizer).generate(["a"], max_new_tokens=2, slots=slots)


def _model_with_attention(tokenizer, attention):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=0, eos_token_id=1)
    config._attn_implementation = attention
    return Qwen2ForCausalLM(config).eval()


def test_cpu_never_takes_the_graph(qwen, tokenizer, monkeypatch):
    import gtalign_fast.sampling.engine as engine

    def refuse(*args, **kwargs):
        raise AssertionError("the CUDA graph step was built on CPU")

    monkeypatch.setattr(engine, "GraphedDecodeStep", refuse)
    out = SteeringSampler(qwen, tokenizer, mode="off", cache="static").generate(["a", "bc"], max_new_tokens=3, seed=0)
    assert all(len(ids) == 3 for ids in out.completion_ids)


def test_sync_checks_keep_the_graph_off(qwen, tokenizer, monkeypatch):
    """GTALIGN_FAST_SYNC_CHECKS reads the error flag after every launch: a host sync, which a CUDA
    graph capture refuses, so the decode step stays eager."""
    import gtalign_fast.sampling.engine as engine
    from gtalign_fast.ops._device_checks import sync_checks

    built = []
    monkeypatch.setattr(engine, "graph_supported", lambda device: True)
    monkeypatch.setattr(engine, "GraphedDecodeStep", lambda *args: built.append(args))
    sampler = SteeringSampler(qwen, tokenizer, mode="off", cache="static")
    with sync_checks():
        out = sampler.generate(["a", "bc"], max_new_tokens=3, seed=0)
    assert built == [] and all(len(ids) == 3 for ids in out.completion_ids)
    sampler.generate(["a", "bc"], max_new_tokens=1, seed=0)
    assert len(built) == 1  # without them the graph step is built


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("steer", ["force", "bias"])
def test_cuda_graph_step_samples_what_the_eager_step_samples(qwen, tokenizer, steer):
    """On CUDA: graph replay vs eager static steps vs the dynamic cache, float32 model, same seeds;
    with slots (refills between replays) too."""
    from tests.test_sampler import POLICY

    model = qwen.to("cuda")
    try:
        rows = _rows(tokenizer)
        settings = dict(max_new_tokens=len(_chain(tokenizer, "a longer thought")) + 6, temperature=0.9, top_p=0.95,
                        seed=[11, 12, 13, 14, 15, 16], forced_tokens=[s for _, s in rows], keep_edit_logits=True)
        prompts = [p for p, _ in rows]

        def run(cache, graph, slots=None):
            sampler = SteeringSampler(model, tokenizer, policy=POLICY, mode="rewrite", steer_analyze=steer,
                                      cache=cache, cuda_graph=graph, stop_strings=("END",))
            return sampler.generate(prompts, slots=slots, **settings)

        eager = run("static", False)
        graphed = run("static", True)
        _same(eager, graphed)
        for a, b in zip(eager.events, graphed.events):
            if a.next_logits is not None:
                torch.testing.assert_close(b.next_logits, a.next_logits, atol=1e-5, rtol=1e-5)
        _same(run("dynamic", False), graphed)
        _same(graphed, run("static", True, slots=2), atol=1e-4)
    finally:
        qwen.to("cpu")


def test_kept_cache_is_reused_by_the_next_call_of_the_same_shape(qwen, tokenizer):
    """keep_cache: the next generate call with the same lanes and columns (rounded up to
    CAPACITY_STEP) reuses the static cache's buffers, reset in place, and samples what a fresh
    sampler samples; another shape, another training mode or release_cache() gives a new one."""
    from gtalign_fast.sampling.engine import CAPACITY_STEP

    prompts = ["Q: one", "Q: two and more words", "Q: three"]
    settings = dict(max_new_tokens=12, temperature=0.9, seed=5)

    def fresh(keep_cache=True, **changes):
        sampler = SteeringSampler(qwen, tokenizer, mode="off", cache="static", keep_cache=keep_cache)
        return sampler, sampler.generate(prompts, **{**settings, **changes})

    assert fresh(keep_cache=None)[0]._kept_kv is None  # the default on the CPU: nothing captured, nothing kept
    sampler, first = fresh()
    kept = sampler._kept_kv
    assert kept is not None and kept.capacity % CAPACITY_STEP == 0
    buffer = kept.cache.layers[0].keys.data_ptr()
    again = sampler.generate(prompts, **{**settings, "seed": 6})
    assert sampler._kept_kv is kept and kept.cache.layers[0].keys.data_ptr() == buffer
    _same(fresh(seed=6)[1], again)
    _same(first, sampler.generate(prompts, **settings))  # back to the first seed: the same rows
    sampler.generate(prompts[:2], **settings)  # 2 lanes: another shape
    assert sampler._kept_kv is not kept
    qwen.train()
    try:
        trained = sampler._kept_kv
        sampler.generate(prompts[:2], **settings)
        assert sampler._kept_kv is not trained  # the training mode is part of the key
    finally:
        qwen.eval()
    sampler.release_cache()
    assert sampler._kept_kv is None
    unkept, out = fresh(keep_cache=False)
    assert unkept._kept_kv is None
    _same(first, out)
    with pytest.raises(TypeError, match="keep_cache"):
        SteeringSampler(qwen, tokenizer, keep_cache=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_is_captured_once_for_successive_calls(qwen, tokenizer):
    """On CUDA (keep_cache's default keeps a captured step): two generate calls of the same shape
    replay one captured step (graph_stats counts one capture) and sample what fresh samplers
    sample, settings included."""
    model = qwen.to("cuda")
    try:
        prompts = ["Q: one", "Q: two and more words", "Q: three"]

        def run(sampler, seed, temperature):
            return sampler.generate(prompts, max_new_tokens=12, temperature=temperature, seed=seed)

        sampler = SteeringSampler(model, tokenizer, mode="off", cache="static")
        first, second = run(sampler, 1, 0.9), run(sampler, 2, 0.7)
        assert sampler.graph_stats["captures"] == 1 and sampler.graph_stats["seconds"] > 0
        for out, seed, temperature in ((first, 1, 0.9), (second, 2, 0.7)):
            _same(run(SteeringSampler(model, tokenizer, mode="off", cache="static", keep_cache=False), seed,
                      temperature), out)
    finally:
        qwen.to("cpu")


def test_trainer_passes_the_slot_budget_and_cache_through(tmp_path):
    """max_num_seqs (slots) and cache_implementation reach the sampler; the completions
    of a step do not depend on them."""
    from gtalign_fast import GRPOConfig
    from tests.test_trainer import install_missing_ops, toy

    install_missing_ops()
    outs = []
    for slots, cache in ((None, None), (5, "static"), (3, "dynamic")):
        trainer = toy.make_trainer(str(tmp_path / f"run{slots}"), 1, n_rows=16, per_device_train_batch_size=16,
                                   max_num_seqs=slots, cache_implementation=cache)
        assert trainer.sampler.cache == (cache or "auto")
        prompts = [row["prompt"] for row in trainer._process_rows(0)]
        outs.append(trainer._generate(prompts, 0))
    for gen in outs[1:]:
        assert torch.equal(gen.completion_ids, outs[0].completion_ids)
        assert torch.equal(gen.completion_mask, outs[0].completion_mask)
    for bad in (dict(max_num_seqs=0), dict(max_num_seqs=2.5), dict(cache_implementation="paged")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            GRPOConfig(output_dir=str(tmp_path), **bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_step_under_bf16_autocast(qwen, tokenizer):
    """The trainer generates under bf16 autocast: the graph is captured without autocast's weight
    cache and gives the eager static path's rows (scripted chains, edits, lengths)."""
    from tests.test_sampler import POLICY

    model = qwen.to("cuda")
    try:
        rows = _rows(tokenizer)
        outs = []
        for graph in (False, True):
            sampler = SteeringSampler(model, tokenizer, policy=POLICY, mode="rewrite", cache="static",
                                      cuda_graph=graph, stop_strings=("END",))
            with torch.autocast("cuda", dtype=torch.bfloat16):
                outs.append(sampler.generate([p for p, _ in rows], temperature=0.0, seed=1,
                                             max_new_tokens=len(_chain(tokenizer, "a longer thought")) + 4,
                                             forced_tokens=[s for _, s in rows]))
        eager, graphed = outs
        assert [e.status for e in eager.events] == [e.status for e in graphed.events]
        assert graphed.events[0].status == "edited" and graphed.finish_reasons[4] == "stop"
        for script, a, b in zip([s for _, s in rows], eager.completion_ids, graphed.completion_ids):
            n = len(script) if script else 1  # scripted tokens, or at least the first greedy draw
            assert a[:n] == b[:n]
    finally:
        qwen.to("cpu")


def test_graph_step_logic_on_cpu_equals_the_eager_step(qwen, tokenizer, monkeypatch):
    """The graph step's body (inputs packed in one buffer, the visibility bit written at the
    column, the mask, forward + sample_ fused, the next draw made with the step) run eagerly on
    CPU in place of capture / replay: the same rows as the eager static path, re-fed blocks,
    refills, compaction and steering included."""
    import gtalign_fast.sampling.decode_graph as decode_graph
    import gtalign_fast.sampling.engine as engine

    replays = []

    class Uncaptured(decode_graph.GraphedDecodeStep):
        def _capture(self):
            self.graph = "uncaptured"

        def _replay(self):
            replays.append(1)
            self._body()

        def _wait(self):
            pass

    monkeypatch.setattr(engine, "graph_supported", lambda device: True)
    monkeypatch.setattr(engine, "GraphedDecodeStep", Uncaptured)
    monkeypatch.setattr(engine, "ROOM", 0)  # compaction / growth between replays
    for steer, slots in (("force", None), ("bias", 2)):
        eager = _generate(qwen, tokenizer, "static", slots=slots, steer=steer, graph=False)
        before = len(replays)
        graphed = _generate(qwen, tokenizer, "static", slots=slots, steer=steer, graph=True)
        assert len(replays) > before + 20
        _same(eager, graphed, atol=1e-4)
