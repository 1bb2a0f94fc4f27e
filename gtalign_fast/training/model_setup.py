"""The trainer's model setup: the policy and its tokenizer loaded (or checked), bf16, the prompt
length the model's positions allow, the frozen reference policy, gradient checkpointing, and the
refusal of a model whose checkpoints would fail or hold no training."""

from __future__ import annotations

import copy
import importlib.util
import logging
from typing import Any

import torch
from torch import nn

logger = logging.getLogger("gtalign_fast.trainer")


def attention_implementation(device: torch.device) -> str:
    """flash-attn 2 on CUDA when it is installed, PyTorch SDPA otherwise."""
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_model(model: nn.Module | str, init_kwargs: dict | None, device: torch.device) -> nn.Module:
    """``model`` itself, or the causal LM at that path / hub id (``init_kwargs``: GRPOConfig's
    ``model_init_kwargs``; the attention implementation defaults to :func:`attention_implementation`)."""
    if not isinstance(model, str):
        return model
    from transformers import AutoModelForCausalLM

    kwargs = dict(init_kwargs or {})
    kwargs.setdefault("attn_implementation", attention_implementation(device))
    return AutoModelForCausalLM.from_pretrained(model, **kwargs)


def load_tokenizer(model: nn.Module | str, tokenizer: Any) -> Any:
    """``tokenizer``, or the one at ``model``'s path; it needs a pad or an EOS token."""
    if tokenizer is None and isinstance(model, str):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model)
    if tokenizer is None:
        raise ValueError("GRPOTrainer: processing_class (the tokenizer) is required when model is an instance")
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
        raise ValueError("GRPOTrainer: the tokenizer needs a pad token or an EOS token")
    return tokenizer


def bf16_enabled(bf16: bool | None, device: torch.device) -> bool:
    """GRPOConfig's ``bf16``; None: on CUDA devices that support it."""
    if bf16 is None:
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return bool(bf16)


def prompt_length_limit(model: nn.Module, max_prompt_length: int | None, max_completion_length: int) -> int | None:
    """The longest prompt (tokens) generation may start from: ``max_prompt_length``, capped so
    that prompt + ``max_completion_length`` fits the model's position limit
    (``max_position_embeddings`` / ``n_positions``). Longer prompts keep their END (TRL's left
    truncation); a cap below ``max_prompt_length`` is logged once, here."""
    config = getattr(model, "config", None)
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not isinstance(positions, int) or positions <= 0:
        return max_prompt_length
    room = positions - max_completion_length
    if room < 1:
        raise ValueError(
            f"GRPOTrainer: max_completion_length={max_completion_length} leaves no room for a prompt in the "
            f"model's {positions} positions (max_position_embeddings); lower max_completion_length"
        )
    if max_prompt_length is None or max_prompt_length > room:
        logger.warning(
            "GRPOTrainer: prompts are truncated to their last %d tokens (the model has %d positions, "
            "max_completion_length=%d; max_prompt_length=%s)", room, positions, max_completion_length,
            max_prompt_length,
        )
        return room
    return max_prompt_length


def reference_model(model: nn.Module, ref_model: nn.Module | None, beta: float, device: torch.device):
    """The frozen reference policy of the KL term: ``ref_model``, or a copy of ``model`` as passed
    (before any update); None when ``beta == 0`` (TRL: no reference model without a KL term)."""
    if beta == 0:
        return None
    if ref_model is None:
        ref_model = copy.deepcopy(model)
    ref_model = ref_model.to(device).eval()
    ref_model.requires_grad_(False)
    return ref_model


def enable_gradient_checkpointing(model: nn.Module) -> None:
    # transformers 5.2x renamed gradient_checkpointing_enable (deprecated, removed in v6).
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        raise ValueError(f"gradient_checkpointing=True, but {type(model).__name__} has no "
                         "activation_checkpointing_enable / gradient_checkpointing_enable method")


_DEQUANTIZE = (
    "Dequantize it into a plain model first: GGUF weights are already floats once loaded, so copy them into a "
    "model built from the same config without its quantization_config:\n"
    "    config = copy.deepcopy(model.config); del config.quantization_config\n"
    "    plain = type(model)(config).to(model.dtype); plain.load_state_dict(model.state_dict())\n"
    "(bitsandbytes: `model = model.dequantize()`, or attach trainable adapters with peft)."
)


def refuse_unsaveable(model: nn.Module) -> None:
    """Raise ``ValueError`` for a quantized model whose checkpoints would fail or hold no training.

    ``save_pretrained`` refuses a quantized model whose quantizer is not serializable (GGUF-loaded
    models keep their GGUF quantizer after dequantizing): found at the first checkpoint, that is
    hours into a run. A purely quantized model (bitsandbytes, ...) without adapters has frozen
    weights: nothing would train (transformers' ``Trainer`` refuses it too). Adapters (peft) make
    either trainable and saveable, so a model with them passes.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or getattr(model, "_hf_peft_config_loaded", False) or hasattr(model, "peft_config"):
        return
    method = getattr(quantizer.quantization_config.quant_method, "value", quantizer.quantization_config.quant_method)
    if not quantizer.is_serializable():
        problem = (f"the model is quantized with {method} (is_quantized=True), and save_pretrained refuses such a "
                   "model ('not serializable'): the first checkpoint would fail.")
    elif not quantizer.is_qat_trainable:
        problem = (f"the model is purely quantized with {method} and has no trainable adapters: its quantized "
                   "weights cannot be trained.")
    else:
        return
    raise ValueError(f"GRPOTrainer: {problem} {_DEQUANTIZE}")
