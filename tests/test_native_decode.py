"""The native CPU decode step (csrc/cpu/decode_layers.cpp, sampling/native_decode.py): the logits
against the float64 forward of the same model, the same tokens as the model's own forward with
edits, steering and slots, which models it takes and refuses, and the kernel's input checks."""

from __future__ import annotations

import pytest
import torch

from gtalign_fast.sampling.fast_decode import decode_kernel_unavailable
from gtalign_fast.sampling.native_decode import NativeDecodeStep, native_decode_support
from gtalign_fast.sampling.sampler import SteeringSampler

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(decode_kernel_unavailable() is not None, reason=str(decode_kernel_unavailable()))


@pytest.fixture(scope="module")
def tokenizer():
    from tests.test_sampler import tokenizer as make

    return make.__wrapped__()


def _model(kind: str, vocab_size: int, **config):
    """Awkward sizes: head_dim 12, 6 query heads on 2 key/value heads, hidden 72 and intermediate 100
    (not multiples of the kernels' 16-float vectors), three layers."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    common = dict(vocab_size=vocab_size, hidden_size=72, intermediate_size=100, num_hidden_layers=3,
                  num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
                  eos_token_id=1, bos_token_id=None, rms_norm_eps=1e-5)
    common.update(config)
    make, settings = ((Qwen2ForCausalLM, Qwen2Config) if kind == "qwen2" else (LlamaForCausalLM, LlamaConfig))
    model = make(settings(**common)).float().eval()
    with torch.no_grad():  # norms and biases away from their initial 1 / 0, so that a wrong one shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    return model


# head_dim 12 runs the attention's portable loops; 16 and 64 its AVX-512 path where the CPU has one
# (decode_layers.cpp, attend_group_avx512), 64 with 2 query heads per kv head, 16 with 3.
SHAPES = {"hd12": {}, "hd64": dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1),
          "hd16": dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2)}


@pytest.fixture(scope="module", params=[("llama", "hd12"), ("qwen2", "hd12"), ("llama", "hd64"), ("qwen2", "hd16")],
                ids=lambda p: "-".join(p))
def model(request, tokenizer):
    kind, shape = request.param
    return _model(kind, len(tokenizer), **SHAPES[shape])


def _decode_layers_calls(run):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as trace:
        result = run()
    return result, sum(e.count for e in trace.key_averages() if e.key == "gtalign_fast_C::decode_layers")


PROMPTS = ["Q: a", "A longer prompt than the others, to pad", "Hi", "Q: 1.5, 2.0"]


def test_logits_equal_the_float64_forward(model, tokenizer):
    """Every sampled token's log-prob (from the native step's logits) equals the float64 forward of
    the same model over prompt + completion within 2e-5; left-padded prompts of four lengths."""
    sampler = SteeringSampler(model, tokenizer, mode="off", native_decode=True)
    out, calls = _decode_layers_calls(lambda: sampler.generate(PROMPTS, max_new_tokens=12, temperature=1.0, seed=3))
    assert calls >= 11  # every step after the prefill's first draw
    reference = _float64(model)
    for prompt_ids, ids, logprobs in zip(out.prompt_ids, out.completion_ids, out.logprobs):
        with torch.no_grad():
            logits = reference(torch.tensor([prompt_ids + ids])).logits[0]
        expected = torch.log_softmax(logits[len(prompt_ids) - 1: -1], -1).gather(1, torch.tensor(ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(logprobs, dtype=torch.float64), expected, atol=2e-5, rtol=0)


def _float64(model):
    import copy

    return copy.deepcopy(model).double()


@pytest.mark.parametrize("slots", [None, 2])
def test_the_same_tokens_as_the_models_forward_with_edits_and_steering(tokenizer, slots):
    """The rollout tests' rows (payoff edits re-fed, forced steering, an early EOS, a stop string)
    on the static cache: native steps vs the model's forward with the linear kernel, the same
    tokens, events and finish reasons; log-probs and the logits after each edit within 1e-5."""
    from tests.test_rollout_fast import _generate, _same_rows_and_edits

    qwen = _model("qwen2", len(tokenizer), hidden_size=64, num_attention_heads=4, intermediate_size=128)
    plain, calls = _decode_layers_calls(lambda: _generate(qwen, tokenizer, "static", slots=slots, native_decode=False))
    assert calls == 0
    fast, calls = _decode_layers_calls(lambda: _generate(qwen, tokenizer, "static", slots=slots, native_decode=True))
    assert calls > 10
    _same_rows_and_edits(plain, fast)


def test_default_is_on_where_it_can_run(model, tokenizer):
    assert SteeringSampler(model, tokenizer).native_decode is True
    assert SteeringSampler(model, tokenizer, native_decode=False).native_decode is False
    assert SteeringSampler(model, tokenizer, cache="dynamic").native_decode is False
    assert SteeringSampler(model, tokenizer, decode_kernel=False).native_decode is False


def test_refusals_say_why(tokenizer):
    model = _model("llama", len(tokenizer))
    with pytest.raises(TypeError, match="native_decode must be a bool"):
        SteeringSampler(model, tokenizer, native_decode="yes")
    with pytest.raises(ValueError, match="native_decode=True, but it needs the static cache"):
        SteeringSampler(model, tokenizer, cache="dynamic", native_decode=True)
    with pytest.raises(ValueError, match="native_decode=True, but decode_kernel is off"):
        SteeringSampler(model, tokenizer, decode_kernel=False, native_decode=True)
    hook = model.model.layers[1].mlp.up_proj.register_forward_hook(lambda *args: None)
    assert "layer 1 mlp.up_proj is a Linear" in native_decode_support(model)
    with pytest.raises(ValueError, match="layer 1 mlp.up_proj"):
        SteeringSampler(model, tokenizer, native_decode=True)
    hook.remove()
    assert native_decode_support(model) == ""
    # a hook added after the sampler was built: the next run keeps the model's forward, or raises if required
    default, required = SteeringSampler(model, tokenizer), SteeringSampler(model, tokenizer, native_decode=True)
    hook = model.model.layers[0].self_attn.register_forward_hook(lambda *args: None)
    _, calls = _decode_layers_calls(lambda: default.generate(["Hi"], max_new_tokens=3, seed=0))
    assert calls == 0
    with pytest.raises(ValueError, match="native_decode=True, but layer 0's attention"):
        required.generate(["Hi"], max_new_tokens=3, seed=0)
    hook.remove()
    assert "not 'silu'" in native_decode_support(_model("llama", len(tokenizer), hidden_act="gelu"))
    assert "bfloat16" in native_decode_support(_model("llama", len(tokenizer)).to(torch.bfloat16))
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=len(tokenizer)))
    assert "GPT2LMHeadModel is not one of" in native_decode_support(gpt2)
    assert SteeringSampler(gpt2, tokenizer).native_decode is False  # the default falls back, and says nothing


def test_lora_adapted_layers_keep_the_models_forward(tokenizer):
    """A layer whose product is not its base weight's (LoRA) must not be skipped by the native step."""
    model = _model("llama", len(tokenizer))
    model.model.layers[0].self_attn.q_proj = _LoraLinear(model.model.layers[0].self_attn.q_proj)
    assert "LoraLinear" in native_decode_support(model)


class _LoraLinear(torch.nn.Module):
    def __init__(self, base: torch.nn.Linear) -> None:
        super().__init__()
        self.base, self.weight, self.bias = base, base.weight, base.bias
        self.a = torch.nn.Linear(base.in_features, 2, bias=False)
        self.b = torch.nn.Linear(2, base.out_features, bias=False)

    def forward(self, x):
        return self.base(x) + self.b(self.a(x))


def _kernel_inputs(model, rows=2, capacity=8, column=3):
    step = NativeDecodeStep(model)
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    cache = [torch.zeros(rows, config.num_key_value_heads, capacity, head_dim) for _ in model.model.layers]
    return dict(hidden=torch.randn(rows, config.hidden_size), weights=step.weights, biases=step.biases,
                keys=cache, values=[c.clone() for c in cache], cos=torch.ones(rows, head_dim),
                sin=torch.zeros(rows, head_dim), visible=torch.ones(rows, capacity, dtype=torch.bool), column=column,
                num_heads=config.num_attention_heads, num_kv_heads=config.num_key_value_heads, eps=1e-5,
                scaling=head_dim ** -0.5, final_norm=model.model.norm.weight)


@pytest.mark.parametrize("change, message", [
    (dict(column=8), "column 8 outside the cache's 8 columns"),
    (dict(column=-1), "column -1 outside"),
    (dict(hidden=torch.randn(17, 72)), "1 <= rows <= 16"),
    (dict(cos=torch.ones(2, 13)), "even head_dim"),
    (dict(sin=torch.zeros(2, 12, dtype=torch.float64)), "sin must be a contiguous Float"),
    (dict(visible=torch.ones(2, 9, dtype=torch.bool)), "visible must be"),
    (dict(num_heads=5), "multiple of num_kv_heads"),
    (dict(weights=[]), "per layer 9 weights"),
])
def test_kernel_input_checks(tokenizer, change, message):
    """Every size the kernel's loops use is checked: bad inputs raise, nothing is read out of bounds."""
    model = _model("llama", len(tokenizer))
    inputs = _kernel_inputs(model)
    inputs.update(change)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.gtalign_fast_C.decode_layers(**inputs)


def test_kernel_rejects_a_wrong_layer_weight(tokenizer):
    model = _model("llama", len(tokenizer))
    inputs = _kernel_inputs(model)
    inputs["weights"] = list(inputs["weights"])
    inputs["weights"][9 + 2] = inputs["weights"][9 + 2][:-1]  # layer 1's k_proj one row short
    with pytest.raises(RuntimeError, match="a layer weight must be"):
        torch.ops.gtalign_fast_C.decode_layers(**inputs)
    inputs = _kernel_inputs(model)
    inputs["keys"][2] = inputs["keys"][2][:, :, :-1]  # a key buffer one column short
    with pytest.raises(RuntimeError, match="a key buffer must be"):
        torch.ops.gtalign_fast_C.decode_layers(**inputs)


_PORTABLE_SCRIPT = """
import sys
import torch
sys.path.insert(0, ".")
from tests.test_native_decode import _attention_case
out = torch.ops.gtalign_fast_C.decode_layers(**_attention_case())
torch.save(out, sys.argv[1])
"""


def _attention_case():
    """A step of a 2-layer model with head_dim 64 over 37 filled cache columns (two blocks of 16
    and a tail), some hidden: random keys and values, a real rotation."""
    torch.manual_seed(5)
    model = _model("llama", 64, hidden_size=256, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
    inputs = _kernel_inputs(model, rows=3, capacity=48, column=36)
    inputs["keys"] = [torch.randn_like(k) for k in inputs["keys"]]
    inputs["values"] = [torch.randn_like(v) for v in inputs["values"]]
    angles = torch.rand(3, 32) * 6
    inputs["cos"], inputs["sin"] = torch.cat([angles.cos()] * 2, 1), torch.cat([angles.sin()] * 2, 1)
    inputs["visible"][0, 5:9] = False
    inputs["visible"][2, 20] = False
    return inputs


def test_attentions_avx512_path_agrees_with_the_portable_loops(tmp_path):
    """GTALIGN_FAST_DECODE_LAYERS_ISA=avx2 (a fresh process: read once) runs the portable attention;
    here the default runs AVX-512 where the CPU has it. The two agree to float32 rounding (the
    scores are summed in another order), and a bad value is refused by name."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "GTALIGN_FAST_DECODE_LAYERS_ISA": "avx2"}
    path = tmp_path / "portable.pt"
    done = subprocess.run([sys.executable, "-c", _PORTABLE_SCRIPT, str(path)], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    here = torch.ops.gtalign_fast_C.decode_layers(**_attention_case())
    torch.testing.assert_close(here, torch.load(path), atol=1e-5, rtol=1e-5)
    bad = subprocess.run([sys.executable, "-c", _PORTABLE_SCRIPT, str(path)], cwd=root, capture_output=True, text=True,
                         env={**env, "GTALIGN_FAST_DECODE_LAYERS_ISA": "sse9"}, timeout=300)
    assert bad.returncode != 0 and "must be avx512, avx2 or scalar" in bad.stderr
