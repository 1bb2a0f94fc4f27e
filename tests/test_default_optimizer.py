"""The trainer's default AdamW: fused where torch has the kernel (transformers' default), and the
same update as a float64 AdamW written out here."""

from types import SimpleNamespace

import torch

from gtalign_fast.training.optimization import default_optimizer

ARGS = SimpleNamespace(learning_rate=1e-2, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=0.1)


def _adamw64(param: torch.Tensor, grads: list[torch.Tensor]) -> torch.Tensor:
    """Decoupled-weight-decay Adam (Loshchilov & Hutter), float64, bias-corrected."""
    p = param.double().clone()
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    b1, b2 = ARGS.adam_beta1, ARGS.adam_beta2
    for t, g in enumerate(grads, 1):
        g = g.double()
        p = p * (1 - ARGS.learning_rate * ARGS.weight_decay)
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        p = p - ARGS.learning_rate * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + ARGS.adam_epsilon)
    return p


def test_default_optimizer_is_fused_on_cpu_and_matches_float64_adamw():
    torch.manual_seed(0)
    model = torch.nn.Linear(7, 5)
    start = [p.detach().clone() for p in model.parameters()]
    optimizer = default_optimizer(model, ARGS)
    assert optimizer.defaults["fused"] is True
    grads = [[torch.randn_like(p) for _ in range(3)] for p in model.parameters()]
    for step in range(3):
        for p, g in zip(model.parameters(), grads):
            p.grad = g[step].clone()
        optimizer.step()
    for p, p0, g in zip(model.parameters(), start, grads):
        torch.testing.assert_close(p.detach().double(), _adamw64(p0, g), rtol=0, atol=1e-6)


def test_default_optimizer_not_fused_where_torch_has_no_kernel():
    model = torch.nn.Linear(3, 2, device="meta")
    assert default_optimizer(model, ARGS).defaults["fused"] is None
