"""The completions of a prompt share its forward in the policy update (training/prompt_sharing.py):
the packed forward gives every completion token the log-prob, entropy, loss and gradients of its
own row's forward, on every supported model and attention, with gradient checkpointing."""

from __future__ import annotations

import pytest
import torch

from gtalign_fast.training.logprobs import CompletionLogprobs
from gtalign_fast.training.model_setup import enable_gradient_checkpointing
from gtalign_fast.training.prompt_sharing import ForwardCost, pack, packing_pays, prompt_runs, sharing_problem

transformers = pytest.importorskip("transformers")

VOCAB = 53


def tiny_model(kind: str, attention: str = "sdpa", seed: int = 0, **extra):
    """A decoder with GQA, 2 layers, odd sizes: float64, but float32 under eager attention (HF's eager
    mask overflows to -inf in float64: left-padded rows give NaN in the plain forward too)."""
    configs = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }
    config_class, model_class = configs[kind]
    torch.manual_seed(seed)
    settings = dict(
        vocab_size=VOCAB, hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, attn_implementation=attention,
        tie_word_embeddings=False,
    )
    settings.update(extra)
    model = model_class(config_class(**settings))
    return model.float() if attention == "eager" else model.double()


def tolerance(model) -> dict:
    return dict(atol=1e-12, rtol=1e-10) if model.dtype == torch.float64 else dict(atol=2e-6, rtol=1e-5)


def assert_same_grads(grads: dict, expected: dict) -> None:
    """Gradients within float32 rounding of their largest entry: HF's RMSNorm computes in float32
    even in a float64 model, so its backward rounds the summed upstream gradient, which the two
    forwards sum in different orders (about 1e-7 of the largest entry)."""
    assert max(float(g.abs().max()) for g in expected.values()) > 1e-6  # something to compare
    for name, want in expected.items():
        scale = float(want.abs().max())
        torch.testing.assert_close(grads[name], want, atol=1e-6 * scale + 1e-12, rtol=1e-5, msg=name)


def batch(runs: list[int], prompt_len: int = 7, completion_len: int = 5, seed: int = 1):
    """Left-padded prompts repeated over ``runs`` rows each, right-padded completions (one empty)."""
    gen = torch.Generator().manual_seed(seed)
    prompt_ids, prompt_mask = [], []
    for r, k in enumerate(runs):
        used = prompt_len - (r % 3)  # prompts of different lengths: left padding
        ids = torch.randint(1, VOCAB, (prompt_len,), generator=gen)
        mask = (torch.arange(prompt_len) >= prompt_len - used).long()
        prompt_ids += [ids.masked_fill(mask == 0, 0)] * k
        prompt_mask += [mask] * k
    n = sum(runs)
    completion_ids = torch.randint(1, VOCAB, (n, completion_len), generator=gen)
    lengths = torch.randint(1, completion_len + 1, (n,), generator=gen)
    lengths[1] = 0  # an empty completion
    lengths[-1] = completion_len  # one that fills every column
    completion_mask = (torch.arange(completion_len)[None, :] < lengths[:, None]).long()
    return torch.stack(prompt_ids), torch.stack(prompt_mask), completion_ids * completion_mask, completion_mask


def loss_and_grads(module: CompletionLogprobs, ids, seed: int = 2):
    """The fused GRPO loss on ``ids`` and the gradients of every parameter (float64)."""
    gen = torch.Generator().manual_seed(seed)
    n, c = ids[2].shape
    loss_kwargs = dict(
        advantages=torch.randn(n, generator=gen, dtype=module.model.dtype),
        mask=ids[3].to(module.model.dtype), old_logp=-torch.rand(n, c, generator=gen, dtype=module.model.dtype),
        loss_type="dapo", epsilon_high=0.28,
    )
    module.model.zero_grad(set_to_none=True)
    loss, metrics = module(*ids, loss_kwargs=loss_kwargs)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in module.model.named_parameters()}
    return loss.detach(), dict(metrics), grads


@pytest.mark.parametrize("kind,attention", [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa"),
                                            ("qwen3", "sdpa"), ("mistral", "eager")])
@pytest.mark.parametrize("runs", [[3, 1, 2], [4, 4]])
def test_shared_prompts_give_every_row_its_own_forward(kind, attention, runs):
    model = tiny_model(kind, attention, sliding_window=None) if kind == "mistral" else tiny_model(kind, attention)
    ids = batch(runs)
    options = dict(temperature=0.7, fused_head=True, backend="reference")
    shared = CompletionLogprobs(model, share_prompt_prefix=True, **options)
    plain = CompletionLogprobs(model, share_prompt_prefix=False, **options)
    assert shared._packed(  # the shared module really packs this batch
        dict(attention_mask=torch.cat(ids[1::2], 1)), ids[0], ids[2]
    ) is not None
    close = tolerance(model)
    logp, entropy = shared(*ids)
    logp_plain, entropy_plain = plain(*ids)
    assert bool(logp_plain.isfinite().all())
    torch.testing.assert_close(logp, logp_plain, **close)
    torch.testing.assert_close(entropy, entropy_plain, **close)
    assert bool((logp[ids[3] == 0] == 0).all())

    loss, metrics, grads = loss_and_grads(shared, ids)
    loss_plain, metrics_plain, grads_plain = loss_and_grads(plain, ids)
    torch.testing.assert_close(loss, loss_plain, **close)
    for key in metrics_plain:
        torch.testing.assert_close(metrics[key], metrics_plain[key], **close, msg=key)
    assert_same_grads(grads, grads_plain)


def test_shared_prompts_under_gradient_checkpointing():
    model = tiny_model("llama")
    enable_gradient_checkpointing(model)
    model.train()
    ids = batch([2, 3])
    options = dict(temperature=1.0, fused_head=True, backend="reference")
    loss, _, grads = loss_and_grads(CompletionLogprobs(model, share_prompt_prefix=True, **options), ids)
    loss_plain, _, grads_plain = loss_and_grads(CompletionLogprobs(model, share_prompt_prefix=False, **options), ids)
    torch.testing.assert_close(loss, loss_plain, atol=1e-12, rtol=1e-10)
    assert_same_grads(grads, grads_plain)


def test_pack_lays_out_prompt_then_completions():
    prompt_ids = torch.tensor([[0, 5, 6]] * 2 + [[7, 8, 9]])
    prompt_mask = torch.tensor([[0, 1, 1]] * 2 + [[1, 1, 1]])
    completion_ids = torch.tensor([[11, 12], [13, 0], [14, 15]])
    completion_mask = torch.tensor([[1, 1], [1, 0], [1, 1]])
    packed = pack(prompt_ids, prompt_mask, completion_ids, completion_mask, [2, 1])
    assert packed.input_ids.tolist() == [[0, 5, 6, 11, 12, 13, 0], [7, 8, 9, 14, 15, 0, 0]]
    assert packed.position_ids.tolist() == [[0, 0, 1, 2, 3, 2, 2], [0, 1, 2, 3, 4, 0, 0]]
    # completion 1 of row 0 (column 5) sees the prompt's real tokens and itself, not completion 0
    assert packed.attention_mask[0, 0, 5].tolist() == [False, True, True, False, False, True, False]
    assert packed.attention_mask[0, 0, 4].tolist() == [False, True, True, True, True, False, False]
    # a prompt's padding query attends to itself only (no empty row, no NaN)
    assert packed.attention_mask[0, 0, 0].tolist() == [True] + [False] * 6
    # the row's padding is no key for anyone
    assert not bool(packed.attention_mask[1, 0, :5, 5:].any())
    # the states that predict completion tokens: the prompt's last position, then the completion's own
    assert packed.index.view(3, 2).tolist() == [[2, 3], [2, 5], [7 + 2, 7 + 3]]


def test_prompt_runs_compare_ids_and_mask():
    ids = torch.tensor([[1, 2], [1, 2], [1, 2], [3, 2], [3, 2]])
    mask = torch.tensor([[1, 1], [1, 1], [0, 1], [1, 1], [1, 1]])
    assert prompt_runs(ids, mask) == [2, 1, 2]
    assert prompt_runs(ids[:0], mask[:0]) == []


def test_packing_pays_only_where_it_saves_flops():
    model = tiny_model("llama")
    cost = ForwardCost.of(model)
    assert packing_pays([4, 4], 40, 32, cost)
    assert not packing_pays([1, 1, 1], 40, 32, cost)  # no shared prompt
    # a short prompt before long completions: the packed row's attention costs more than it saves
    assert not packing_pays([8], 2, 4000, cost)


def test_share_prompt_prefix_refusals():
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=VOCAB))
        CompletionLogprobs(gpt2, temperature=1.0, fused_head=True, backend=None, share_prompt_prefix=True)
    with pytest.raises(ValueError, match="fused LM head"):
        CompletionLogprobs(tiny_model("llama"), temperature=1.0, fused_head=False, backend=None,
                           share_prompt_prefix=True)
    # None: the plain forward where the model cannot share, and the log line says why
    auto = CompletionLogprobs(gpt2, temperature=1.0, fused_head=True, backend=None)
    assert auto.share_prompt_prefix is False
    assert auto.sharing == "shared prompt forward off (model_type 'gpt2' is not one of " \
        "('llama', 'qwen2', 'qwen3', 'mistral'))"
    llama = tiny_model("llama")
    assert CompletionLogprobs(llama, temperature=1.0, fused_head=True, backend=None).sharing == \
        "shared prompt forward on where it saves flops"
    assert CompletionLogprobs(llama, temperature=1.0, fused_head=False, backend=None).sharing == \
        "shared prompt forward off (it needs the fused LM head)"
    off = CompletionLogprobs(llama, temperature=1.0, fused_head=True, backend=None, share_prompt_prefix=False)
    assert off.sharing == "shared prompt forward off (share_prompt_prefix=False)"

    class FlashModel(torch.nn.Module):
        config = transformers.LlamaConfig(attn_implementation="eager")

    FlashModel.config._attn_implementation = "flash_attention_2"
    assert "takes no custom 4D mask" in sharing_problem(FlashModel())


def test_a_sliding_window_shorter_than_the_row_is_not_packed():
    model = tiny_model("qwen2", use_sliding_window=True, sliding_window=6, max_window_layers=0)
    ids = batch([3, 2])  # prompt + completion: 12 tokens
    options = dict(temperature=1.0, fused_head=True, backend="reference")
    with pytest.raises(ValueError, match="sliding window"):
        CompletionLogprobs(model, share_prompt_prefix=True, **options)(*ids)
    auto = CompletionLogprobs(model, **options)  # None: the plain forward
    logp, _ = auto(*ids)
    logp_plain, _ = CompletionLogprobs(model, share_prompt_prefix=False, **options)(*ids)
    torch.testing.assert_close(logp, logp_plain, atol=0, rtol=0)


def test_the_grpo_op_sees_the_same_hidden_states():
    """The fused op's own check: packed hidden states equal the plain rows' (the op is given both)."""
    model = tiny_model("qwen2")
    ids = batch([2, 2, 1])
    module = CompletionLogprobs(model, temperature=1.0, fused_head=True, backend="reference", share_prompt_prefix=True)
    inputs = dict(attention_mask=torch.cat([ids[1], ids[3]], 1))
    packed = module._packed(inputs, ids[0], ids[2])
    hidden = model.base_model(input_ids=packed.input_ids, attention_mask=packed.attention_mask,
                              position_ids=packed.position_ids).last_hidden_state
    shared = packed.gather(hidden, ids[2].shape)
    full_ids = torch.cat([ids[0], ids[2]], 1)
    positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    plain = model.base_model(input_ids=full_ids, attention_mask=inputs["attention_mask"],
                             position_ids=positions).last_hidden_state[:, -(ids[2].shape[1] + 1):-1]
    real = torch.cat([torch.ones(len(ids[3]), 1, dtype=torch.long), ids[3][:, :-1]], 1).bool()  # predicting states
    torch.testing.assert_close(shared[real], plain[real], atol=1e-12, rtol=1e-10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA check (bench/device_check.sh)")
@pytest.mark.parametrize("bf16", [False, True])
def test_shared_prompts_on_cuda(bf16):
    """sdpa's CUDA kernels with the packed boolean mask: float32 within 1e-4 of the plain forward; under
    bf16 autocast within bf16 rounding (a wrong mask moves log-probs by whole units)."""
    model = tiny_model("llama").float().cuda()
    ids = [t.cuda() for t in batch([3, 1, 2])]
    options = dict(temperature=1.0, fused_head=True, backend=None)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        logp, _ = CompletionLogprobs(model, share_prompt_prefix=True, **options)(*ids)
        logp_plain, _ = CompletionLogprobs(model, share_prompt_prefix=False, **options)(*ids)
    assert bool(logp.isfinite().all())
    close = dict(atol=5e-2, rtol=2e-2) if bf16 else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logp.float(), logp_plain.float(), **close)
