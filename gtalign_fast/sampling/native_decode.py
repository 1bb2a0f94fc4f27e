"""The CPU decode step of Llama-family models in one native call (``csrc/cpu/decode_layers.cpp``).

With the linear layers on :func:`gtalign_fast.ops.decode_linear` (``fast_decode.py``), a decode
step of SmolLM2-135M at 8 lanes still spent about half its time outside the weight stream: the
eager Hugging Face layer runs some 60 small ATen ops per layer around its linear layers, each a few
microseconds of dispatch and Python for tensors of a few KB (issue 24's profile). ``decode_layers``
runs every layer for one token per lane in one call: q/k/v and gate/up as single passes over their
weights, RMSNorm, RoPE, the cache write and the attention over the static cache in C++. The model's
own modules still compute the embeddings, the rotary cos / sin (any RoPE scaling the config names)
and the prefill, re-fed payoff blocks and refills (more than one token per lane).

This is the CPU's captured decode step: the CUDA path captures the same one-token step as a CUDA
graph (``decode_graph.py``); on the CPU ``torch.compile`` of that step compiled for minutes and ran
slower than eager on this machine (issue 24), and this kernel is compiled with the wheel, so
nothing is compiled per process, per ``generate`` call or per training step.

Which models: ``LlamaForCausalLM`` and ``Qwen2ForCausalLM`` (SmolLM2, Llama 2/3, TinyLlama, Qwen2 /
2.5, ...) in float32 on the CPU with SiLU MLPs, the static cache and plain modules (no adapters,
hooks or replaced forwards: a LoRA layer's product is not in its base weight, so such a model keeps
the Hugging Face forward). :func:`native_decode_support` says why a model cannot, and the sampler
then keeps the Hugging Face step with the linear kernel. The logits equal the Hugging Face
forward's to float32 rounding; the tests check the same tokens for the same seeds.
"""

from __future__ import annotations

from typing import Any

import torch

from ..ops._decode_linear import MAX_ROWS
from ..ops._op import extension_kernel
from .fast_decode import routed_by_decode_linears

__all__ = ["NativeDecodeStep", "native_decode_support"]

# The model classes whose decoder layer decode_layers.cpp implements, with their layer / norm classes.
_FAMILIES = {
    "LlamaForCausalLM": ("LlamaDecoderLayer", "LlamaRMSNorm"),
    "Qwen2ForCausalLM": ("Qwen2DecoderLayer", "Qwen2RMSNorm"),
}
_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _plain(module: torch.nn.Module) -> bool:
    """No hooks and no replaced forward (but the decode kernel's routing of ``fast_decode.py``, which
    computes the same product): the module computes what its class says."""
    replaced = "forward" in module.__dict__ and not routed_by_decode_linears(module)
    return not (module._forward_hooks or module._forward_pre_hooks or replaced)


def _linear_problem(name: str, module: Any) -> str:
    if type(module) is not torch.nn.Linear or not _plain(module):
        return f"{name} is a {type(module).__name__} (adapters, quantized or hooked layers keep the model's forward)"
    weight = module.weight
    if weight.dtype != torch.float32 or weight.device.type != "cpu" or type(weight) is not torch.nn.Parameter:
        return f"{name}'s weight is {module.weight.dtype} on {module.weight.device} (float32 CPU weights needed)"
    return ""


def _layer_problem(index: int, layer: Any, layer_class: str, norm_class: str) -> str:
    if type(layer).__name__ != layer_class or not _plain(layer):
        return f"layer {index} is a {type(layer).__name__}, not a plain {layer_class}"
    for norm in (layer.input_layernorm, layer.post_attention_layernorm):
        if type(norm).__name__ != norm_class or not _plain(norm):
            return f"layer {index} has a {type(norm).__name__} norm"
    if getattr(layer.self_attn, "sliding_window", None) or not _plain(layer.self_attn) or not _plain(layer.mlp):
        return f"layer {index}'s attention or MLP is not the plain full-attention module"
    for name in _PROJECTIONS:
        module = layer.get_submodule(name)
        problem = _linear_problem(f"layer {index} {name}", module)
        if problem:
            return problem
    return ""


def native_decode_support(model: Any) -> str:
    """``""`` when :class:`NativeDecodeStep` can run ``model``'s decode step, else why not."""
    family = _FAMILIES.get(type(model).__name__)
    if family is None:
        return f"{type(model).__name__} is not one of {sorted(_FAMILIES)}"
    config = model.config
    if getattr(config, "hidden_act", None) != "silu":
        return f"the MLP's activation is {getattr(config, 'hidden_act', None)!r}, not 'silu'"
    if getattr(config, "pretraining_tp", 1) != 1:
        return "pretraining_tp > 1 splits the projections"
    if not _plain(model) or not _plain(model.model) or not _plain(model.model.norm):
        return "the model has hooks or a replaced forward"
    problem = _linear_problem("lm_head", model.lm_head)
    if problem:
        return problem
    embedding = model.model.embed_tokens
    if type(embedding) is not torch.nn.Embedding or embedding.weight.dtype != torch.float32:
        return "the embedding is not a float32 nn.Embedding"
    for index, layer in enumerate(model.model.layers):
        problem = _layer_problem(index, layer, *family)
        if problem:
            return problem
    return ""


class NativeDecodeStep:
    """One-token decode steps of a supported model through ``decode_layers`` (module docstring).

    The weights are collected from the model's modules when the step is made (once per ``generate``
    call, by the sampler): lists of references to the parameters, no copy, so an optimizer step
    between two ``generate`` calls (in place, as every torch optimizer updates) is seen.

    Parameters
    ----------
    model : LlamaForCausalLM or Qwen2ForCausalLM
        Checked with :func:`native_decode_support` by the caller.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.kernel = extension_kernel("decode_layers", torch.device("cpu"))
        self.linear = extension_kernel("decode_linear", torch.device("cpu"))
        attention = model.model.layers[0].self_attn
        self.heads = model.config.num_attention_heads
        self.kv_heads = getattr(model.config, "num_key_value_heads", None) or self.heads
        self.scaling = float(attention.scaling)
        self.eps = float(model.model.layers[0].input_layernorm.variance_epsilon)
        self.dropout = float(getattr(model.config, "attention_dropout", 0.0) or 0.0)  # the kernel has none
        self.weights, self.biases = self._collect()

    def _collect(self) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """The layers' tensors in ``decode_layers``' order: 9 weights and 7 optional biases per layer
        (collecting them costs about 3 ms for 30 layers: once per run, not per step)."""
        weights, biases = [], []
        for layer in self.model.model.layers:
            projections = [layer.get_submodule(name) for name in _PROJECTIONS]
            q, k, v, o, gate, up, down = (p.weight for p in projections)
            weights += [layer.input_layernorm.weight, q, k, v, o, layer.post_attention_layernorm.weight, gate, up, down]
            biases += [p.bias for p in projections]
        return weights, biases

    def usable(self, feed: torch.Tensor) -> bool:
        """Whether this step can run now: one token for at most 16 lanes, no autocast, no grad, no
        attention dropout (a model in training mode with ``attention_dropout > 0``)."""
        return (feed.shape[1] == 1 and 1 <= feed.shape[0] <= MAX_ROWS and not torch.is_grad_enabled()
                and not torch.is_autocast_enabled("cpu") and not (self.model.training and self.dropout))

    def __call__(self, feed: torch.Tensor, positions: torch.Tensor, kv: Any) -> torch.Tensor:
        """Logits ``[lanes, 1, vocab]`` float32 of one step; writes the step's keys and values at
        ``kv.cursor`` (the caller marks the column's visibility first, as for the model's forward).

        Parameters
        ----------
        feed, positions : [lanes, 1] int64
        kv : StaticKV
            Its buffers were allocated by the prefill (float32, ``[lanes, kv_heads, capacity, head_dim]``).
        """
        inner = self.model.model
        hidden = inner.embed_tokens(feed[:, 0])
        cos, sin = inner.rotary_emb(hidden[:, None, :], positions)
        layers = kv.cache.layers
        keys, values = [layer.keys for layer in layers], [layer.values for layer in layers]
        normed = self.kernel(hidden.contiguous(), self.weights, self.biases, keys, values, cos[:, 0].contiguous(),
                             sin[:, 0].contiguous(), kv.visible, kv.cursor, self.heads, self.kv_heads, self.eps,
                             self.scaling, inner.norm.weight)
        head = self.model.lm_head
        return self.linear(normed, head.weight, head.bias)[:, None, :]
