"""decode_linear: the C++ CPU kernel against the float64 reference at awkward sizes (outputs poisoned
by conftest), the fake kernel under torch.compile, bad inputs, and DecodeLinears (the sampler's CPU
decode step) against F.linear."""

from __future__ import annotations

import pytest
import torch

from gtalign_fast import ops, reference
from gtalign_fast.ops import _backend
from gtalign_fast.ops._decode_linear import MAX_ROWS
from gtalign_fast.sampling.fast_decode import DecodeLinears

NO_KERNEL = _backend.why_unavailable("cpu", torch.device("cpu"))
needs_kernel = pytest.mark.skipif(NO_KERNEL is not None, reason=f"no C++ CPU kernel: {NO_KERNEL}")
BACKENDS = ["reference"] + ([] if NO_KERNEL else ["cpu"])


def _inputs(m, k, n, seed=0, bias=True):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=generator)
    weight = torch.randn(n, k, generator=generator) / k**0.5
    b = torch.randn(n, generator=generator) if bias else None
    return x, weight, b


def _tolerance(k):
    # float32 sums of k products of size ~1/sqrt(k): rounding grows like sqrt(k) * eps at worst here
    return dict(atol=2e-6 * max(1, k) ** 0.5 + 1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m", range(1, MAX_ROWS + 1))
def test_matches_the_float64_reference_for_every_row_count(backend, m):
    for k, n in ((17, 33), (576, 129), (1, 3)):  # K, N not multiples of 16 (AVX-512 tail, odd row blocks)
        x, weight, bias = _inputs(m, k, n, seed=m * 7 + k)
        out = ops.decode_linear(x, weight, bias, backend=backend)
        assert ops.last_backend("decode_linear") == backend
        assert out.dtype == torch.float32 and out.shape == (m, n)
        torch.testing.assert_close(out.double(), reference.decode_linear(x, weight, bias), **_tolerance(k))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [8, 15, 16, 31, 64, 100, 1536])
def test_awkward_widths_without_bias(backend, k):
    x, weight, _ = _inputs(8, k, 50, seed=k, bias=False)
    out = ops.decode_linear(x, weight, backend=backend)
    torch.testing.assert_close(out.double(), reference.decode_linear(x, weight), **_tolerance(k))


@needs_kernel
@pytest.mark.parametrize("m", [8, 13, 16])
def test_a_row_gets_the_same_bits_whatever_rows_share_the_call(m):
    """A row of x is summed in one order however many rows are multiplied with it: blocks of 8 rows
    sum their 8 accumulators together (store_sums8), a lone row on its own, and the bits agree. So a
    lane's logits do not depend on the other lanes of its batch."""
    x, weight, bias = _inputs(m, 576, 67, seed=m)
    together = ops.decode_linear(x, weight, bias)
    for row in range(m):
        assert torch.equal(ops.decode_linear(x[row:row + 1], weight, bias)[0], together[row]), row


@needs_kernel
def test_the_bits_do_not_depend_on_the_threads_or_who_takes_which_rows():
    """Threads take chunks of W's rows from their own share and then from the back of the others'
    (decode_linear.cpp, Share): with more threads than cores (so that some fall behind and the others
    take their rows) and with one, every output keeps its bits."""
    x, weight, bias = _inputs(8, 64, 6001, seed=3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = ops.decode_linear(x, weight, bias)
        for count in (2, 3, 7):
            torch.set_num_threads(count)
            for _ in range(20):
                assert torch.equal(ops.decode_linear(x, weight, bias), alone), count
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(alone.double(), reference.decode_linear(x, weight, bias), **_tolerance(64))


@needs_kernel
def test_kernel_reads_strided_rows_and_writes_only_its_output():
    """x and out as row-strided views of bigger buffers (a slice of a hidden state): the kernel
    honours the row strides and leaves the other columns alone."""
    big_x = torch.randn(5, 40)
    x = big_x[:, 3:23]  # [5, 20], row stride 40
    weight = torch.randn(9, 20)
    big_out = torch.full((5, 30), 7.0)
    out = big_out[:, 2:11]  # [5, 9], row stride 30
    torch.ops.gtalign_fast_C.decode_linear_out(x, weight, None, out)
    torch.testing.assert_close(out.double(), reference.decode_linear(x, weight), **_tolerance(20))
    assert (big_out[:, :2] == 7).all() and (big_out[:, 11:] == 7).all()


@needs_kernel
def test_fake_kernel_traces_under_torch_compile():
    x, weight, bias = _inputs(8, 24, 10)
    meta = torch.ops.gtalign_fast_C.decode_linear(x.to("meta"), weight.to("meta"), bias.to("meta"))
    assert meta.shape == (8, 10) and meta.device.type == "meta"

    def step(x):
        return torch.ops.gtalign_fast_C.decode_linear(torch.relu(x), weight, bias).sum(-1)

    with torch.no_grad():
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), step(x))
        torch.testing.assert_close(torch.compile(ops.decode_linear, fullgraph=True, backend="aot_eager")(x, weight),
                                   ops.decode_linear(x, weight))


@pytest.mark.parametrize("make, error, message", [
    (lambda x, w, b: (x[:0], w, b), ValueError, "1 to 16 rows"),
    (lambda x, w, b: (torch.cat([x, x, x]), w, b), ValueError, "1 to 16 rows"),
    (lambda x, w, b: (x[:, :5], w, b), ValueError, "K = 5"),
    (lambda x, w, b: (x.double(), w, b), TypeError, "x must be float32"),
    (lambda x, w, b: (x, w.half(), b), TypeError, "weight must be float32"),
    (lambda x, w, b: (x, w, b[:3]), ValueError, "bias must be"),
    (lambda x, w, b: (x[0], w, b), ValueError, r"\[M, K\]"),
    (lambda x, w, b: (x, w.numpy(), b), TypeError, "weight must be a tensor"),
    (lambda x, w, b: (x.requires_grad_(), w, b), RuntimeError, "no gradient"),
])
def test_bad_inputs_raise_clear_errors(make, error, message):
    x, weight, bias = _inputs(8, 24, 10)
    with pytest.raises(error, match=message):
        ops.decode_linear(*make(x, weight, bias))


def test_unknown_backends_are_refused_by_name():
    x, weight, bias = _inputs(2, 8, 4)
    with pytest.raises(RuntimeError, match=r"no Triton kernel; its backends are \['cpu', 'reference'\]"):
        ops.decode_linear(x, weight, bias, backend="triton")
    with pytest.raises(ValueError, match="unknown backend"):
        ops.decode_linear(x, weight, bias, backend="fastest")


@needs_kernel
def test_the_kernel_refuses_what_the_python_checks_refuse():
    """The C++ entry point checks its inputs itself (it is reachable without the Python wrapper)."""
    x, weight, bias = _inputs(17, 8, 4)
    with pytest.raises(RuntimeError, match="rows"):
        torch.ops.gtalign_fast_C.decode_linear(x, weight, bias)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.gtalign_fast_C.decode_linear(x[:4].double(), weight.double(), None)
    with pytest.raises(RuntimeError, match="K = "):
        torch.ops.gtalign_fast_C.decode_linear(x[:4, :5], weight, None)


def _kernel_calls(run) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as trace:
        run()
    return sum(event.count for event in trace.key_averages() if event.key == "gtalign_fast_C::decode_linear")


@needs_kernel
def test_decode_linears_route_small_inputs_to_the_kernel_and_restore_the_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.GELU(), torch.nn.Linear(40, 7, bias=False))
    small, wide = torch.randn(2, 3, 24), torch.randn(5, 4, 24)  # 6 rows: the kernel; 20 rows: F.linear
    with torch.no_grad():
        expected_small, expected_wide = model(small), model(wide)
        with DecodeLinears(model) as linears:
            assert len(linears.layers) == 2
            assert _kernel_calls(lambda: model(small)) == 2
            assert _kernel_calls(lambda: model(wide)) == 0
            got_small, got_wide = model(small), model(wide)
    torch.testing.assert_close(got_small, expected_small, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_wide, expected_wide, atol=0, rtol=0)  # F.linear, bit for bit
    assert all("forward" not in layer.__dict__ for layer in model)  # restored
    assert _kernel_calls(lambda: model(small)) == 0
    with DecodeLinears(model):  # grad mode on: F.linear, which has a gradient
        model(small).sum().backward()
    assert model[0].weight.grad is not None


_ISA_SCRIPT = """
import torch
from gtalign_fast import ops, reference
for m in range(1, 17):
    for k, n in ((1, 3), (7, 5), (17, 33), (100, 9)):
        g = torch.Generator().manual_seed(m * 100 + k)
        x, w, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
        for bias in (b, None):
            out = ops.decode_linear(x, w, bias, backend="cpu")
            torch.testing.assert_close(out.double(), reference.decode_linear(x, w, bias), atol=1e-5, rtol=1e-5)
print("ok")
"""


@needs_kernel
@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_every_instruction_set_path_matches_the_reference(isa):
    """The kernel picks its instruction set at run time (AVX-512 here); GTALIGN_FAST_DECODE_LINEAR_ISA
    forces the others, in a fresh process (the choice is made once per process)."""
    import os
    import subprocess
    import sys

    cpu_flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if isa == "avx2" and " avx2 " not in cpu_flags:
        pytest.skip("this CPU has no AVX2")
    env = {**os.environ, "GTALIGN_FAST_DECODE_LINEAR_ISA": isa, "GTALIGN_FAST_POISON": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout's gtalign_fast
    done = subprocess.run([sys.executable, "-c", _ISA_SCRIPT], env=env, capture_output=True, text=True, timeout=300,
                          cwd=root)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
    bad = subprocess.run([sys.executable, "-c", _ISA_SCRIPT], env={**env, "GTALIGN_FAST_DECODE_LINEAR_ISA": "sse9"},
                         capture_output=True, text=True, timeout=300, cwd=root)
    assert bad.returncode != 0 and "must be avx512, avx2 or scalar" in bad.stderr
