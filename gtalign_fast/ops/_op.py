"""One way to define every op: :class:`Op`.

An op declares what is particular to it and nothing else:

- its positional ``inputs`` as a schema fragment (``"Tensor logits, Tensor targets"``; tensors and
  the few per-call flags a backward needs),
- its ``options``: the scalar arguments, as one ``NamedTuple`` class (they travel as one named
  value from the public function to every backend; only the ``torch.library`` schema spells them
  out one by one),
- ``outputs(*inputs, options)``: the shape and dtype of each output, used both to allocate the real
  outputs and as the fake (meta) kernel, so no op writes its output shapes twice,
- ``backends``: declared with :func:`backends` (the one way): backend name -> ``kernel(*inputs,
  options, *outputs)``, which fills the outputs, and what the backend needs to run; an op's
  declaration is the one record of which backends it has (:data:`gtalign_fast.ops._backend.DECLARED`),
- optionally ``check(*inputs, options, backend)``: checks that read the data (run inside the op, where
  ``torch.compile`` does not trace them), and an autograd formula (:meth:`Op.register_autograd`).

:class:`Op` does the rest, the same way for every op: backend resolution and
:func:`~gtalign_fast.last_backend` (:mod:`gtalign_fast.ops._backend`), output allocation (poisoned
under test), the ``torch.library`` custom op with its fake kernel and autograd, and the eager
bypass. The custom op is what ``torch.compile``, ``torch.export``, fake tensors and tensor
subclasses see; a plain eager call runs the same functions directly (through a
``torch.autograd.Function`` when a gradient is needed), because torch.library's Python
machinery costs 20-100 us per call (argument re-binding and alias checks), more than the small
ops' kernels themselves.

Kernels of the compiled extension are looked up with :func:`extension_kernel`, which says to
rebuild the extension when it predates the kernel, instead of failing with an AttributeError.
"""

from __future__ import annotations

import functools
import importlib
import typing
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch

from . import _backend

NAMESPACE = "gtalign_fast"

# Python annotation of an options field -> its torch.library schema type.
_SCHEMA_TYPES = {
    float: "float",
    int: "int",
    bool: "bool",
    str: "str",
    float | None: "float?",
    int | None: "int?",
}


class Output(NamedTuple):
    """Shape and dtype of one op output (allocated on the op's device)."""

    shape: Sequence[int]
    dtype: torch.dtype


def _options_schema(options: type | None) -> list[str]:
    if options is None:
        return []
    hints = typing.get_type_hints(options)
    fields = []
    for field in options._fields:
        if hints[field] not in _SCHEMA_TYPES:
            raise TypeError(f"{options.__name__}.{field}: no schema type for {hints[field]!r}")
        fields.append(f"{_SCHEMA_TYPES[hints[field]]} {field}")
    return fields


def plain_eager(*args: Any) -> bool:
    """Whether a call with ``args`` is an ordinary eager call: not traced by torch.compile, no
    torch-function or dispatch mode (fake tensors, make_fx, export), no functorch transform (vmap,
    grad), and only plain tensors and Parameters (no subclasses such as DTensor)."""
    if torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled():
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._are_functorch_transforms_active():
        return False
    for value in args:  # a plain loop: this runs on every call of every op
        if isinstance(value, torch.Tensor) and type(value) not in _PLAIN_TENSOR_TYPES:
            return False
    return True


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


_EXTENSION_KERNELS: dict[tuple[str, str], Any] = {}  # (kernel, dispatch key) -> op, once found


def extension_kernel(name: str, device: torch.device):
    """The compiled extension's kernel ``torch.ops.gtalign_fast_C.<name>`` for ``device``.

    Raises
    ------
    RuntimeError
        When the built extension has no such kernel for the device (built from older sources, or
        without CUDA): it names the fix instead of failing inside the dispatcher.
    """
    key = "CUDA" if device.type == "cuda" else "CPU"
    kernel = _EXTENSION_KERNELS.get((name, key))
    if kernel is not None:
        return kernel
    kernels = torch.ops.gtalign_fast_C
    if not hasattr(kernels, name) or not torch._C._dispatch_has_kernel_for_dispatch_key(f"gtalign_fast_C::{name}", key):
        raise RuntimeError(
            f"gtalign_fast: the compiled extension has no {key} kernel {name!r}; it was built from older "
            "sources: rebuild it (pip install -e . --no-build-isolation)"
        )
    # The overload itself: calling the packet resolves it on every call (~0.15 us; the extension's
    # kernels have one overload each).
    kernel = _EXTENSION_KERNELS[(name, key)] = getattr(kernels, name).default
    return kernel


class Backend(NamedTuple):
    """One backend of an op: ``run(*inputs, options, *outputs)`` fills the outputs; ``needs`` is what
    it needs besides tensors on its device (:data:`gtalign_fast.ops._backend.NEEDS`)."""

    run: Callable[..., None]
    needs: str


def backends(
    *,
    reference: Callable[..., None],
    triton: Callable[..., None] | None = None,
    cpu: Callable[..., None] | None = None,
    cuda: Callable[..., None] | None = None,
    torch_paths: tuple[str, ...] = (),
) -> dict[str, Backend]:
    """The one way an op declares its backends: one ``run(*inputs, options, *outputs)`` per backend
    it has; one it leaves out does not exist for it (:func:`~gtalign_fast.available_backends` never
    lists it, and asking for it raises with the reason). ``triton`` needs Triton, ``cpu`` / ``cuda``
    the compiled extension, unless named in ``torch_paths`` (PyTorch code on that device, e.g.
    ``linear_token_logprobs``' passes without the extension); ``reference`` runs anywhere. The run
    functions come from :func:`compiled_kernels`, :func:`chunk_drivers`, or the op's own."""
    runs = {"triton": triton, "cpu": cpu, "cuda": cuda, "reference": reference}
    return {
        name: Backend(run, "torch" if name in torch_paths else _backend.NEEDS[name])
        for name, run in runs.items()
        if run is not None
    }


def compiled_kernels(launch: Callable, *, triton: str, extension: str) -> dict[str, Callable[..., None]]:
    """``triton``, ``cpu`` and ``cuda`` run functions (for :func:`backends`) of an op whose Triton
    launcher and extension kernel take the same arguments.

    ``launch(kernel, *inputs, options, *outputs)`` turns the op's arguments into the kernels' and
    calls ``kernel``; ``triton`` names the launcher as ``"<module>.<function>"`` of
    ``gtalign_fast.kernels`` (imported on first use: Triton is optional); ``extension`` names the
    kernel of the compiled extension, which serves both CPU and CUDA tensors (dispatched by device).
    """
    module_name, function_name = triton.split(".")

    def run_triton(*args):
        module = importlib.import_module(f"gtalign_fast.kernels.{module_name}")
        launch(getattr(module, function_name), *args)

    def run_extension(*args):
        launch(extension_kernel(extension, _device_of(args)), *args)

    return {"triton": run_triton, "cpu": run_extension, "cuda": run_extension}


def chunk_drivers(driver: Callable, *names: str) -> dict[str, Callable[..., None]]:
    """Run functions (for :func:`backends`) of an op whose backends share one driver, told which
    backend runs: ``driver(name, *inputs, options, *outputs)``."""
    return {name: functools.partial(driver, name) for name in names}


class Op:
    """A gtalign_fast op: a ``torch.library`` custom op, its backends and its eager fast path.

    Parameters
    ----------
    name : str
        The custom op is ``torch.ops.gtalign_fast.<name>``.
    inputs : str
        Schema of the positional inputs, e.g. ``"Tensor logits, Tensor targets"``; a mutated
        input is annotated ``Tensor(a!) logits`` and listed in ``mutates``.
    returns : tuple of str
        Names of the outputs (the schema needs their number before any call).
    outputs : callable
        ``outputs(*inputs, options) -> tuple of Output``, one per name in ``returns``: shapes and
        dtypes of the results.
    backends : dict of Backend
        From :func:`backends`: backend name -> ``kernel(*inputs, options, *outputs)`` filling the
        outputs in place, and what it needs to run.
    options : NamedTuple class, optional
        The op's scalar arguments (``float``, ``int``, ``bool``, ``str`` fields, optionally
        ``None``-able). Without it, kernels and ``outputs`` get no options argument.
    key : str, optional
        Name for backend selection and :func:`~gtalign_fast.last_backend` (default ``name``; a
        backward op uses its forward's key, ``sample_`` uses ``"sample"``).
    check : callable, optional
        ``check(*inputs, options, backend)``, run inside the op (``backend``: the one that runs)
        before the outputs are allocated, for checks that read the data (they must not be traced
        by ``torch.compile``).
    mutates : tuple of str
        Names of the inputs written in place.
    """

    def __init__(
        self,
        name: str,
        *,
        inputs: str,
        returns: tuple[str, ...],
        outputs: Callable[..., tuple[Output, ...]],
        backends: Mapping[str, Backend],
        options: type | None = None,
        key: str | None = None,
        check: Callable[..., None] | None = None,
        mutates: tuple[str, ...] = (),
    ) -> None:
        self.name, self.key = name, key or name
        if not all(isinstance(backend, Backend) for backend in backends.values()):
            raise TypeError(f"{name}: declare the backends with gtalign_fast.ops._op.backends(...)")
        _backend.declare(self.key, {backend: declared.needs for backend, declared in backends.items()})
        self.options = options
        self.backends = {backend: declared.run for backend, declared in backends.items()}
        self._outputs, self._check = outputs, check
        self.returns = returns
        self.n_inputs = len([part for part in inputs.split(",") if part.strip()])
        self._backward: Callable | None = None  # set by register_autograd
        self.custom_op = self._define(inputs, mutates)

    # -- the custom op --------------------------------------------------------------------------

    def _define(self, inputs: str, mutates: tuple[str, ...]):
        arguments = ", ".join([inputs, *_options_schema(self.options), "str backend"])
        returns = "(" + ", ".join(["Tensor"] * len(self.returns)) + ")"
        schema = f"({arguments}) -> {returns}"
        custom_op = torch.library.custom_op(
            f"{NAMESPACE}::{self.name}", self._flat_run, mutates_args=mutates, schema=schema
        )
        custom_op.register_fake(self._flat_fake)
        return custom_op

    def _split(self, flat: tuple) -> tuple[tuple, Any, str]:
        """(inputs, options, backend) from the custom op's flat argument list."""
        inputs = flat[: self.n_inputs]
        options = self.options(*flat[self.n_inputs : -1]) if self.options is not None else None
        return inputs, options, flat[-1]

    def _with_options(self, inputs: tuple, options: Any) -> tuple:
        return (*inputs, options) if self.options is not None else inputs

    def _flat_run(self, *flat):
        return _schema_result(self.run(*self._split(flat)))

    def _flat_fake(self, *flat):
        inputs, options, _ = self._split(flat)
        device = _device_of(inputs)
        specs = self._outputs(*self._with_options(inputs, options))
        return _schema_result(tuple(torch.empty(tuple(s.shape), dtype=s.dtype, device=device) for s in specs))

    # -- running ---------------------------------------------------------------------------------

    def resolve(self, device: torch.device, backend: str) -> str:
        """The backend that runs a call on ``device`` (``backend`` may be ``""``: automatic)."""
        return _backend.resolve(self.key, device, backend)

    def run(self, inputs: tuple, options: Any, backend: str) -> tuple[torch.Tensor, ...]:
        """The op's body: resolve and record the backend, check the data, allocate the outputs,
        run the backend's kernel. Both the custom op and the eager path run exactly this."""
        device = inputs[0].device  # every op's first input is a tensor on the op's device
        name = self.resolve(device, backend)
        _backend.record(self.key, name)
        call_args = self._with_options(inputs, options)
        if self._check is not None:
            self._check(*call_args, name)
        outputs = tuple([_backend.new_output(shape, dtype, device) for shape, dtype in self._outputs(*call_args)])
        self.backends[name](*call_args, *outputs)
        return outputs

    def __call__(self, *inputs: Any, options: Any = None, backend: str = "") -> tuple[torch.Tensor, ...]:
        """Run the op: directly in plain eager mode, through the custom op otherwise."""
        if not plain_eager(*inputs):
            flat_options = tuple(options) if self.options is not None else ()
            outputs = self.custom_op(*inputs, *flat_options, backend)
            return outputs if isinstance(outputs, tuple) else (outputs,)
        if self._backward is not None and torch.is_grad_enabled() and _any_requires_grad(inputs):
            return _EagerAutograd.apply(self, options, backend, *inputs)
        return self.run(inputs, options, backend)

    # -- autograd --------------------------------------------------------------------------------

    def register_autograd(self, setup_context: Callable, backward: Callable, *, differentiable: tuple[int, ...]):
        """Give the op a gradient.

        ``setup_context(ctx, inputs, options, outputs)`` saves what the backward needs;
        ``backward(ctx, *grad_outputs)`` returns one gradient (or None) per input, and runs its
        backward op with :meth:`call_in_backward`. Inside both, ``ctx.options`` and ``ctx.backend``
        are the call's; ``ctx.needs_grad`` (backward only) says which inputs need a gradient, and
        grads of unused outputs arrive as None. ``differentiable`` lists the outputs that carry a
        gradient (the others are marked non-differentiable on the eager path).
        """
        self._setup_context, self._backward = setup_context, backward
        self._non_differentiable = tuple(i for i in range(len(self.returns)) if i not in differentiable)
        n_extra = (len(self.options._fields) if self.options is not None else 0) + 1  # options + backend

        def setup(ctx, inputs, output):  # torch.library passes these by name
            inputs, options, backend = self._split(inputs)
            self._setup(ctx, inputs, options, backend, output if isinstance(output, tuple) else (output,), eager=False)

        def flat_backward(ctx, *grads):
            if torch.is_grad_enabled():  # backward(create_graph=True): see _refuse_double_backward
                raise _double_backward_error(self.key)
            ctx.needs_grad = ctx.needs_input_grad[: self.n_inputs]
            return (*backward(ctx, *grads), *(None,) * n_extra)

        self.custom_op.register_autograd(flat_backward, setup_context=setup)

    def _setup(self, ctx, inputs, options, backend, outputs, *, eager: bool) -> None:
        ctx.options, ctx.backend, ctx.eager = options, backend, eager
        ctx.set_materialize_grads(False)
        if eager:  # the backward runs once_differentiable (grad mode off): check in a pre-hook instead
            ctx.register_prehook(functools.partial(_refuse_double_backward, self.key))
        self._setup_context(ctx, inputs, options, outputs)

    def call_in_backward(self, ctx, *inputs: Any) -> tuple[torch.Tensor, ...]:
        """Run this (backward) op inside the forward op's backward, with the forward's options and
        backend: directly when the forward ran on the eager path (nothing traces a backward that an
        eager forward recorded), else through :meth:`__call__`'s checks."""
        if ctx.eager:
            return self.run(inputs, ctx.options, ctx.backend)
        return self(*inputs, options=ctx.options, backend=ctx.backend)


class _EagerAutograd(torch.autograd.Function):
    """The eager path of an op with a gradient: the op's own run / setup / backward, without
    torch.library in between."""

    @staticmethod
    def forward(ctx, op: Op, options, backend: str, *inputs):
        outputs = op.run(inputs, options, backend)
        op._setup(ctx, inputs, options, backend, outputs, eager=True)
        ctx.mark_non_differentiable(*[outputs[i] for i in op._non_differentiable])
        ctx.op = op
        return outputs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        ctx.needs_grad = ctx.needs_input_grad[3:]  # after (op, options, backend)
        return (None, None, None, *ctx.op._backward(ctx, *grads))


def _double_backward_error(op: str) -> RuntimeError:
    return RuntimeError(
        f"gtalign_fast.{op}: double backward is not supported: the backward kernel computes the gradient "
        "without an autograd graph, so torch.autograd.grad(..., create_graph=True) would return a gradient "
        "that cannot be differentiated again (use gtalign_fast.reference for higher-order gradients)"
    )


def _refuse_double_backward(op: str, _grad_outputs) -> None:
    """Pre-hook of an eager op's backward node. The engine runs it under the grad mode of the
    backward call, which is on exactly when ``create_graph=True`` was asked: raise then, instead of
    returning a first-order gradient without a graph."""
    if torch.is_grad_enabled():
        raise _double_backward_error(op)


def _schema_result(outputs: tuple):
    """A schema with one return gives (and expects) a Tensor, not a tuple of one."""
    return outputs[0] if len(outputs) == 1 else outputs


def _device_of(inputs: tuple) -> torch.device:
    for value in inputs:
        if isinstance(value, torch.Tensor):
            return value.device
    raise TypeError("an op needs at least one tensor input")


def _any_requires_grad(inputs: tuple) -> bool:
    for value in inputs:
        if isinstance(value, torch.Tensor) and value.requires_grad:
            return True
    return False
