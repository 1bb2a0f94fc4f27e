"""The op-definition helper (gtalign_fast.ops._op.Op) on a toy op: one schema from the declaration,
the same results on the eager path and through the custom op, a fake kernel from the output
declaration, autograd on both paths, backend choice and the stale-extension check."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from gtalign_fast.ops import _backend, _op
from gtalign_fast.ops._op import Op, Output, backends


class ScaleOptions(NamedTuple):
    factor: float
    shift: float | None
    label: str


def _outputs(x, options):
    return Output(x.shape, torch.float32), Output((x.shape[0],), torch.float32)


def _scale(x, options, y, row_sums):
    y.copy_(x * options.factor + (options.shift or 0.0))
    row_sums.copy_(y.sum(dim=1))


def _scale_backward_outputs(grad_y, x, options):
    return (Output(x.shape, x.dtype),)


def _scale_backward(grad_y, x, options, dx):
    dx.copy_(grad_y * options.factor)


SCALE = Op(
    "test_op_scale",
    inputs="Tensor x",
    options=ScaleOptions,
    returns=("y", "row_sums"),
    outputs=_outputs,
    backends=backends(reference=_scale, cpu=_scale, torch_paths=("cpu",)),
)
SCALE_BACKWARD = Op(
    "test_op_scale_backward",
    key="test_op_scale",
    inputs="Tensor grad_y, Tensor x",
    options=ScaleOptions,
    returns=("dx",),
    outputs=_scale_backward_outputs,
    backends=backends(reference=_scale_backward, cpu=_scale_backward, torch_paths=("cpu",)),
)


def _save(ctx, inputs, options, outputs):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_y, _grad_row_sums):
    (x,) = ctx.saved_tensors
    (dx,) = SCALE_BACKWARD.call_in_backward(ctx, grad_y, x)
    return (dx if ctx.needs_grad[0] else None,)


SCALE.register_autograd(_save, _backward, differentiable=(0,))
OPTIONS = ScaleOptions(factor=3.0, shift=0.5, label="x")


def test_schema_spells_out_inputs_options_and_backend():
    schema = str(SCALE.custom_op._opoverload._schema)
    assert schema == (
        "gtalign_fast::test_op_scale(Tensor x, float factor, float? shift, str label, str backend) -> (Tensor, Tensor)"
    )


def test_eager_path_equals_custom_op_and_records_backend():
    x = torch.randn(3, 5, dtype=torch.float64)
    eager = SCALE(x, options=OPTIONS, backend="reference")
    assert _backend.last_backend("test_op_scale") == "reference"
    through_op = SCALE.custom_op(x, *OPTIONS, "reference")
    expected = (x * 3.0 + 0.5).float()
    for outputs in (eager, through_op):
        torch.testing.assert_close(outputs[0], expected, rtol=0, atol=0)
        torch.testing.assert_close(outputs[1], expected.sum(dim=1))


def test_fake_kernel_comes_from_the_output_declaration():
    with FakeTensorMode():
        x = torch.empty(4, 7)
        y, row_sums = SCALE.custom_op(x, *OPTIONS, "")
    assert y.shape == (4, 7) and y.dtype == torch.float32
    assert row_sums.shape == (4,) and row_sums.dtype == torch.float32


@pytest.mark.parametrize("through_op", [False, True])
def test_gradient_on_both_paths(monkeypatch, through_op):
    if through_op:
        monkeypatch.setattr(_op, "plain_eager", lambda *args: False)
    x = torch.randn(2, 3, requires_grad=True)
    y, _ = SCALE(x, options=OPTIONS, backend="reference")
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.full((2, 3), 3.0))


def test_non_differentiable_outputs_on_the_eager_path():
    x = torch.randn(2, 3, requires_grad=True)
    y, row_sums = SCALE(x, options=OPTIONS, backend="reference")
    assert y.requires_grad and not row_sums.requires_grad


def test_compiled_graph_has_no_break():
    x = torch.randn(2, 3)
    compiled = torch.compile(lambda t: SCALE(t, options=OPTIONS, backend="reference")[0] * 2, fullgraph=True,
                             backend="aot_eager")
    torch.testing.assert_close(compiled(x), (x * 3.0 + 0.5) * 2)


def test_a_backend_the_op_lacks_is_refused():
    with pytest.raises(RuntimeError, match="no 'triton' backend|cannot run"):
        SCALE(torch.randn(2, 3), options=OPTIONS, backend="triton")


def test_options_of_an_unsupported_type_are_refused():
    class BadOptions(NamedTuple):
        sizes: list

    with pytest.raises(TypeError, match="no schema type"):
        Op("test_op_bad", inputs="Tensor x", options=BadOptions, returns=("y",), outputs=_outputs,
           backends=backends(reference=_scale))


@pytest.mark.skipif(not _backend.extension_available(), reason="needs the compiled extension")
def test_backends_are_declared_one_way_and_recorded_once():
    """A plain dict is refused (every op declares its backends with _op.backends); the declaration is
    what available_backends reads: the toy op has no Triton or CUDA backend, and says so."""
    with pytest.raises(TypeError, match="declare the backends"):
        Op("test_op_plain_dict", inputs="Tensor x", options=ScaleOptions, returns=("y", "row_sums"),
           outputs=_outputs, backends={"reference": _scale})
    assert _backend.available_backends("cpu", "test_op_scale") == ["cpu", "reference"]
    assert "has no CUDA C++ kernel" in _backend.why_unavailable("cuda", torch.device("cuda"), "test_op_scale")
    with pytest.raises(RuntimeError, match="test_op_scale has no Triton kernel"):
        SCALE(torch.ones(2, 3), options=ScaleOptions(2.0, None, "x"), backend="triton")
    with pytest.raises(ValueError, match="different backends"):
        Op("test_op_scale_other", key="test_op_scale", inputs="Tensor x", options=ScaleOptions,
           returns=("y", "row_sums"), outputs=_outputs, backends=backends(reference=_scale))


@pytest.mark.skipif(not _backend.extension_available(), reason="needs the compiled extension")
def test_stale_extension_names_the_fix():
    with pytest.raises(RuntimeError, match="rebuild it"):
        _op.extension_kernel("no_such_kernel", torch.device("cpu"))
