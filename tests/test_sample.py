"""sample_: every backend against the float64 reference (same Philox noise), the guarantees of the
issue (greedy = argmax, forced tokens, filters never leak, the empirical distribution) and bad input."""

from __future__ import annotations

import pytest
import torch

from gtalign_fast import ops, reference
from gtalign_fast.ops import _device_checks
from gtalign_fast.ops import _sample_constants as constants
from gtalign_fast.ops._sample import uniform_noise
from gtalign_fast.ops._seeds import batch_row_seeds

from .conftest import DEVICE, kernel_backends

BACKENDS = kernel_backends("sample") + ["reference"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Log-probs are float32 sums over the same (rounded) inputs the reference sees in float64.
LOGP_TOL = dict(atol=2e-5, rtol=1e-3)
# The processed logits are written back in the buffer's dtype: one rounding of y = z / T.
BUFFER_TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-6),
    torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
    torch.float16: dict(atol=2e-3, rtol=1e-3),
}


def _logits(batch, vocab, dtype, seed, scale=2.0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, vocab, generator=generator, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


def _row_args(batch, vocab, seed):
    """Per-row settings covering every feature: plain, temperature, greedy, top-k (incl. k = 1,
    k >= V), top-p, min-p, combinations, biases (incl. -inf bans) and forced tokens."""
    generator = torch.Generator().manual_seed(seed)
    choices = [
        dict(t=1.0, k=0, p=1.0, mp=0.0), dict(t=0.7, k=5, p=1.0, mp=0.0), dict(t=0.0, k=0, p=1.0, mp=0.0),
        dict(t=1.3, k=0, p=0.6, mp=0.0), dict(t=1.0, k=20, p=0.8, mp=0.0), dict(t=0.9, k=0, p=1.0, mp=0.2),
        dict(t=1.0, k=1, p=1.0, mp=0.0), dict(t=2.0, k=vocab + 3, p=0.95, mp=0.05), dict(t=0.5, k=3, p=0.3, mp=0.5),
    ]
    rows = [choices[i % len(choices)] for i in range(batch)]
    temperature = torch.tensor([r["t"] for r in rows])
    top_k = torch.tensor([r["k"] for r in rows], dtype=torch.int64)
    top_p = torch.tensor([r["p"] for r in rows])
    min_p = torch.tensor([r["mp"] for r in rows])
    forced = torch.full((batch,), -1, dtype=torch.int64)
    forced[2::4] = torch.randint(0, vocab, forced[2::4].shape, generator=generator)
    n_bias = min(3, vocab)
    bias_ids = torch.stack([torch.randperm(vocab, generator=generator)[:n_bias] for _ in range(batch)])
    bias_ids[1::3, -1] = -1  # padding slots
    bias_values = torch.randn(batch, n_bias, generator=generator) * 3
    if vocab > n_bias:
        bias_values[::5, 0] = float("-inf")  # a banned token
    seeds = torch.randint(-(2**62), 2**62, (batch,), generator=generator)
    return {
        "temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p,
        "forced": forced, "bias_ids": bias_ids, "bias_values": bias_values, "seed": seeds,
    }


def _to_device(args):
    return {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}


def _reference(logits, args):
    return reference.sample(
        logits, args["temperature"], args["top_k"], args["top_p"], args["min_p"],
        args["bias_ids"], args["bias_values"], args["forced"], args["seed"],
    )


# ---------------------------------------------------------------------------------------------
# Noise


@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_is_the_same_philox_stream_on_every_backend(backend):
    seeds = torch.tensor([0, 1, -7, 2**62 + 12345, -(2**63), 2**63 - 1], dtype=torch.int64, device=DEVICE)
    expected = reference.philox_uniform(seeds, 77)
    noise = uniform_noise(seeds, 77, backend=backend)
    assert torch.equal(noise, expected)
    assert float(noise.min()) > 0 and float(noise.max()) < 1


def test_philox_matches_the_published_known_answer():
    # Philox4x32-10, key (0, 0), counter (0, 0, 0, 0): first word 0x6627e8d5 (Random123 KAT).
    word = int(reference.philox_uniform(torch.tensor([0]), 1)[0, 0] * 2**24 - 0.5)
    assert word == 0x6627E8D5 >> 8



@pytest.mark.parametrize("backend", BACKENDS)
def test_the_top_philox_word_has_finite_noise(backend):
    """Seed 2857 draws the top Philox word at column 1755, whose ((2^24 - 1) + 0.5) / 2^24 rounds to
    1.0 in float32: noise +inf, a token drawn whatever its logit (once per ~340 draws over a
    49152-token vocabulary). The uniform is bounded by 1 - 2^-24 (noise 16.64): 20 below the max
    that column cannot win, 10 below it can, and every backend draws what the reference draws."""
    seeds = torch.tensor([2857], dtype=torch.int64, device=DEVICE)
    assert float(reference.philox_uniform(seeds, 1756)[0, 1755]) == 1.0 - 2.0**-24
    for below, wins in ((20.0, False), (10.0, True)):
        logits = _logits(1, 4096, torch.float32, seed=3)
        logits[0, 0] = 40.0
        logits[0, 1755] = 40.0 - below
        one = torch.ones(1, device=DEVICE)
        expected = reference.sample(logits, one, 0 * one.long(), one, 0 * one, None, None, -one.long(), seeds)[0]
        assert (expected.tolist() == [1755]) is wins
        tokens, _, _ = ops.sample_(logits, seed=seeds, backend=backend)
        assert tokens.tolist() == expected.tolist()


# The C++ kernel computes Philox words with AVX-512, AVX2 or scalar code, picked at run time;
# GTALIGN_FAST_SAMPLE_ISA forces one, in a fresh process (the choice is made once per process).
# The script checks the words against the specification for counts that end mid-vector and seeds
# at the edges of int64, draws against the reference (long rows too, where most chunks' noise is
# only computed for the few columns that can still win), and prints the draws' bits for comparison.
_ISA_SCRIPT = """
import json
import torch
from gtalign_fast import ops, reference
from gtalign_fast.ops._sample import uniform_noise

seeds = torch.tensor([0, 1, -1, -7, 2**32 - 1, 2**32, 2**62 + 12345, -(2**63), 2**63 - 1], dtype=torch.int64)
for vocab in (1, 7, 8, 9, 15, 16, 17, 31, 255, 256, 257, 1000):
    assert torch.equal(uniform_noise(seeds, vocab, backend="cpu"), reference.philox_uniform(seeds, vocab)), vocab

draws = []
for batch, vocab in ((7, 1), (9, 17), (12, 1000), (5, 4099), (10, 20000)):
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(batch, vocab, generator=g) * 3
    if vocab > 512:
        logits[0::2, 256:512] -= 60.0  # whole chunks out of reach of the max: their noise is skipped
        logits[1::3, vocab - 3] += 30.0
    rows = [dict(t=1.0, k=0, p=1.0, mp=0.0), dict(t=0.7, k=5, p=1.0, mp=0.0), dict(t=0.0, k=0, p=1.0, mp=0.0),
            dict(t=1.3, k=0, p=0.6, mp=0.0), dict(t=0.9, k=0, p=1.0, mp=0.2)]
    rows = [rows[i % len(rows)] for i in range(batch)]
    args = dict(temperature=torch.tensor([r["t"] for r in rows]), top_k=torch.tensor([r["k"] for r in rows]),
                top_p=torch.tensor([r["p"] for r in rows]), min_p=torch.tensor([r["mp"] for r in rows]),
                seed=torch.randint(-(2**63), 2**63 - 1, (batch,), generator=g),
                forced=torch.full((batch,), -1), bias_ids=torch.randint(0, vocab, (batch, 1), generator=g),
                bias_values=torch.randn(batch, 1, generator=g) * 3)
    args["forced"][3::4] = vocab // 2
    args["bias_ids"][1::2] = -1  # padding
    ref_tokens, _, _, _ = reference.sample(logits, args["temperature"], args["top_k"], args["top_p"], args["min_p"],
                                           args["bias_ids"], args["bias_values"], args["forced"], args["seed"])
    buffer = logits.clone()
    tokens, logp, raw = ops.sample_(buffer, backend="cpu", **args)
    assert torch.equal(tokens, ref_tokens), (vocab, tokens, ref_tokens)
    draws.append([tokens.tolist(), logp.view(torch.int32).tolist(), raw.view(torch.int32).tolist(),
                  buffer.view(torch.int32).sum().item()])
print(json.dumps(draws))
"""


def _run_isa_script(isa: str):
    import os
    import subprocess
    import sys

    env = {**os.environ, "GTALIGN_FAST_SAMPLE_ISA": isa}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout's gtalign_fast
    return subprocess.run([sys.executable, "-c", _ISA_SCRIPT], env=env, capture_output=True, text=True, timeout=300,
                          cwd=root)


@pytest.mark.skipif("cpu" not in kernel_backends("sample"), reason="no C++ CPU kernel")
def test_every_cpu_philox_path_draws_the_same_bits():
    import os

    cpu_flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    isas = ["scalar"] + [isa for isa, flag in (("avx2", " avx2 "), ("avx512", " avx512f ")) if flag in cpu_flags]
    draws = {}
    for isa in isas:
        done = _run_isa_script(isa)
        assert done.returncode == 0, (isa, done.stderr[-3000:])
        draws[isa] = done.stdout.strip().splitlines()[-1]
    # Same tokens, log-prob bits and processed buffers whatever computed the words.
    assert all(draws[isa] == draws["scalar"] for isa in isas), {isa: d[:200] for isa, d in draws.items()}
    bad = _run_isa_script("sse9")
    assert bad.returncode != 0 and "must be avx512, avx2 or scalar" in bad.stderr


# ---------------------------------------------------------------------------------------------
# Against the reference


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,vocab", [(1, 1), (9, 37), (11, 515)])
def test_matches_reference(backend, dtype, batch, vocab):
    logits = _logits(batch, vocab, dtype, seed=vocab + batch)
    args = _to_device(_row_args(batch, vocab, seed=batch))
    ref_tokens, ref_logp, ref_raw, ref_processed = _reference(logits, args)

    buffer = logits.clone()
    tokens, logp, raw = ops.sample_(buffer, backend=backend, **args)
    assert ops.last_backend("sample") == backend
    assert tokens.dtype == torch.int64 and logp.dtype == torch.float32 and raw.dtype == torch.float32
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logp.double(), ref_logp, **LOGP_TOL)
    torch.testing.assert_close(raw.double(), ref_raw, **LOGP_TOL)
    # The buffer holds the processed logits: the same kept set, values up to one rounding.
    assert torch.equal(torch.isinf(buffer), torch.isinf(ref_processed))
    kept = ~torch.isinf(buffer)
    torch.testing.assert_close(buffer[kept].double(), ref_processed[kept].double(), **BUFFER_TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_are_kept_whole(backend):
    # Many exact ties (small integers): top-k keeps every token tied with the k-th value and
    # top-p keeps or drops whole tie groups.
    generator = torch.Generator().manual_seed(3)
    logits = torch.randint(-3, 4, (6, 64), generator=generator).float().to(DEVICE)
    args = _row_args(6, 64, seed=4)
    args.update(bias_ids=None, bias_values=None, forced=torch.full((6,), -1, dtype=torch.int64))
    args["top_k"] = torch.tensor([1, 2, 5, 0, 7, 30])
    args["top_p"] = torch.tensor([1.0, 1.0, 0.9, 0.5, 0.7, 1.0])
    args["temperature"], args["min_p"] = torch.ones(6), torch.zeros(6)
    args = _to_device(args)
    _, _, _, ref_processed = _reference(logits, args)
    buffer = logits.clone()
    ops.sample_(buffer, backend=backend, **args)
    assert torch.equal(torch.isinf(buffer), torch.isinf(ref_processed))
    kept = (~torch.isinf(buffer)).sum(dim=1)
    k, only_k = args["top_k"], (args["top_k"] > 0) & (args["top_p"] == 1)
    assert bool((kept[only_k] >= k[only_k]).all())
    # Kept sets are closed under ties: no dropped token equals a kept value.
    for row in range(6):
        kept_values = set(buffer[row][~torch.isinf(buffer[row])].tolist())
        dropped_values = set(logits[row][torch.isinf(buffer[row])].tolist())
        assert not kept_values & dropped_values


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_rows_are_processed_in_place(backend):
    # The last position of [B, T, V] model logits, without a copy.
    full = _logits(4 * 3, 50, torch.float32, seed=11).reshape(4, 3, 50)
    expected_rest = full[:, :-1].clone()
    view = full[:, -1, :]
    args = _to_device(_row_args(4, 50, seed=5))
    ref = _reference(view.clone(), args)
    tokens, _, _ = ops.sample_(view, backend=backend, **args)
    assert torch.equal(tokens, ref[0])
    assert torch.equal(torch.isinf(full[:, -1]), torch.isinf(ref[3]))
    assert torch.equal(full[:, :-1], expected_rest)


# ---------------------------------------------------------------------------------------------
# The guarantees


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_greedy_is_argmax(backend, dtype):
    logits = _logits(7, 301, dtype, seed=1)
    expected = logits.float().argmax(dim=-1)
    tokens, logp, raw = ops.sample_(logits.clone(), temperature=0.0, seed=5, backend=backend)
    assert torch.equal(tokens, expected)
    ref_raw = torch.log_softmax(logits.double(), dim=-1).gather(1, expected[:, None]).squeeze(1)
    torch.testing.assert_close(raw.double(), ref_raw, **LOGP_TOL)
    torch.testing.assert_close(logp, raw)  # no filter: processed = raw distribution at T = 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_forced_tokens_are_always_chosen(backend):
    batch, vocab = 8, 40
    logits = _logits(batch, vocab, torch.float32, seed=2)
    forced = torch.tensor([3, -1, 0, 39, 7, -1, 12, 5], device=DEVICE)
    # Even when top-k = 1 and a -inf bias would exclude the forced token.
    bias_ids = forced.clamp_min(0)[:, None]
    bias_values = torch.full((batch, 1), float("-inf"), device=DEVICE)
    for seed in range(3):
        buffer = logits.clone()
        tokens, logp, raw = ops.sample_(
            buffer, top_k=1, forced=forced, bias_ids=bias_ids, bias_values=bias_values, seed=seed, backend=backend
        )
        is_forced = forced >= 0
        assert torch.equal(tokens[is_forced], forced[is_forced])
        assert bool((logp[is_forced] == 0).all())
        expected_raw = torch.log_softmax(logits.double(), -1).gather(1, forced.clamp_min(0)[:, None]).squeeze(1)
        torch.testing.assert_close(raw[is_forced].double(), expected_raw[is_forced], **LOGP_TOL)
        # The processed row is the forced token alone (its value is -inf here: it is banned).
        others = torch.arange(vocab, device=DEVICE)[None, :] != forced[:, None]
        assert bool(torch.isneginf(buffer[is_forced][others[is_forced]]).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_filters_never_pick_an_excluded_token(backend):
    batch, vocab = 6, 64
    draws = 3 if backend == "triton" and DEVICE.type == "cpu" else 12
    logits = _logits(batch, vocab, torch.float32, seed=9, scale=1.0)
    top_k = torch.tensor([3, 0, 10, 1, 0, 5], device=DEVICE)
    top_p = torch.tensor([1.0, 0.5, 0.7, 1.0, 0.2, 0.9], device=DEVICE)
    none = torch.full((batch,), -1, dtype=torch.int64, device=DEVICE)
    ones, zeros = torch.ones(batch, device=DEVICE), torch.zeros(batch, device=DEVICE)
    _, _, _, processed = reference.sample(logits, ones, top_k, top_p, zeros, None, None, none, none)
    allowed = ~torch.isinf(processed)
    assert bool((allowed.sum(1) < vocab).all())
    for seed in range(draws):
        tokens, _, _ = ops.sample_(logits.clone(), top_k=top_k, top_p=top_p, seed=seed, backend=backend)
        assert bool(allowed.gather(1, tokens[:, None]).all()), f"seed {seed} drew an excluded token"


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_tokens(backend):
    logits = _logits(5, 200, torch.bfloat16, seed=4)
    first = ops.sample_(logits.clone(), top_p=0.9, seed=123, backend=backend)[0]
    second = ops.sample_(logits.clone(), top_p=0.9, seed=123, backend=backend)[0]
    other = ops.sample_(logits.clone(), top_p=0.9, seed=124, backend=backend)[0]
    assert torch.equal(first, second)
    assert not torch.equal(first, other)
    # Per-row seeds: a row's draw does not depend on its position in the batch.
    seeds = batch_row_seeds(123, 5, DEVICE)
    alone = ops.sample_(logits[3:4].clone(), top_p=0.9, seed=seeds[3:4], backend=backend)[0]
    assert int(alone[0]) == int(first[3])


@pytest.mark.parametrize("backend", BACKENDS)
def test_empirical_distribution_matches(backend):
    # Many rows with the same logits and different seeds are independent draws from the processed
    # distribution; chi-square goodness of fit (deterministic: fixed seed).
    # The Triton interpreter runs programs one by one (~0.2 s each here): few draws, low power;
    # its draws equal the reference's for the same noise (test_matches_reference) anyway.
    draws = 60 if backend == "triton" and DEVICE.type == "cpu" else 6000
    base = torch.tensor([2.0, 1.5, 1.0, 0.9, 0.3, 0.0, -0.5, -1.0, -3.0, 0.95], device=DEVICE)
    logits = base.expand(draws, -1).contiguous()
    bias_ids = torch.tensor([[4, 8]], device=DEVICE).expand(draws, 2)
    settings = dict(temperature=0.8, top_k=7, top_p=0.95, bias_ids=bias_ids,
                    bias_values=torch.tensor([[0.5, 2.0]], device=DEVICE).expand(draws, 2))
    tokens, logp, _ = ops.sample_(logits.clone(), seed=2024, backend=backend, **settings)
    one = _to_device({
        "temperature": torch.tensor([0.8]), "top_k": torch.tensor([7]), "top_p": torch.tensor([0.95]),
        "min_p": torch.tensor([0.0]), "forced": torch.tensor([-1]), "bias_ids": torch.tensor([[4, 8]]),
        "bias_values": torch.tensor([[0.5, 2.0]]), "seed": torch.tensor([0]),
    })
    _, _, _, processed = _reference(base[None].clone(), one)
    probs = torch.softmax(processed.double()[0], dim=-1)
    kept = probs > 0
    counts = torch.bincount(tokens, minlength=base.numel()).double()
    assert float(counts[~kept].sum()) == 0
    expected = probs[kept] * draws
    statistic = float(((counts[kept] - expected) ** 2 / expected).sum())
    dof = int(kept.sum()) - 1
    p_value = float(torch.special.gammaincc(torch.tensor(dof / 2.0), torch.tensor(statistic / 2.0)))
    assert p_value > 1e-3, f"chi-square {statistic:.1f} with {dof} dof (p = {p_value:.2g})"
    # And the returned log-probs are those of the processed distribution.
    torch.testing.assert_close(logp.double(), probs.log()[tokens], **LOGP_TOL)


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_logits_raise(backend):
    # CUDA logits are checked on the device, without a host sync: the synchronous mode raises at the call.
    with _device_checks.sync_checks():
        _nan_and_inf_logits_raise(backend)


def _nan_and_inf_logits_raise(backend):
    logits = _logits(3, 20, torch.float32, seed=0)
    bad = logits.clone()
    bad[1, 4] = float("nan")
    with pytest.raises(ValueError, match="row 1 contains NaN"):
        ops.sample_(bad, backend=backend)
    bad = logits.clone()
    bad[2, 0] = float("inf")
    with pytest.raises(ValueError, match="row 2 contains NaN or \\+inf"):
        ops.sample_(bad, backend=backend)
    bad = logits.clone()
    bad[0] = float("-inf")
    with pytest.raises(ValueError, match="row 0 has no finite logit"):
        ops.sample_(bad, backend=backend)
    # Biases that ban every token of a row.
    ids = torch.arange(20, device=DEVICE).expand(3, 20).contiguous()
    values = torch.zeros(3, 20, device=DEVICE)
    values[1] = float("-inf")
    with pytest.raises(ValueError, match="row 1 has no finite logit left after the biases"):
        ops.sample_(logits.clone(), bias_ids=ids, bias_values=values, backend=backend)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(top_k=-1), ValueError, "top_k must be >= 0"),
        (dict(top_k=torch.tensor([1, -2])), ValueError, "top_k must be >= 0 .*row 1"),
        (dict(top_p=0.0), ValueError, "top_p must be in \\(0, 1\\]"),
        (dict(top_p=1.5), ValueError, "top_p must be in \\(0, 1\\]"),
        (dict(top_p=float("nan")), ValueError, "top_p"),
        (dict(min_p=-0.1), ValueError, "min_p must be in \\[0, 1\\]"),
        (dict(temperature=-1.0), ValueError, "temperature must be finite and >= 0"),
        (dict(temperature=float("inf")), ValueError, "temperature"),
        (dict(forced=10), IndexError, "forced must be -1 \\(none\\) or a token id in \\[0, 10\\)"),
        (dict(forced=torch.tensor([0, -2])), IndexError, "forced .* row 1"),
        (dict(top_k=1.5), TypeError, "top_k must be an int"),
        (dict(temperature=torch.tensor([1.0, 1.0, 1.0])), ValueError, "temperature must be a scalar or a \\[B\\]"),
        (dict(seed="x"), TypeError, "seed must be"),
        (dict(bias_ids=torch.tensor([[1], [2]])), ValueError, "given together"),
        (dict(bias_ids=torch.tensor([[1], [10]]), bias_values=torch.zeros(2, 1)), IndexError, "bias_ids"),
        (dict(bias_ids=torch.tensor([[1, 1], [2, 3]]), bias_values=torch.zeros(2, 2)), ValueError, "twice"),
        (dict(bias_ids=torch.tensor([[1], [2]]), bias_values=torch.tensor([[float("nan")], [0.0]])), ValueError,
         "finite or -inf"),
        (dict(bias_ids=torch.tensor([[1], [2]]), bias_values=torch.zeros(2, 2)), ValueError, "\\[B, K\\]"),
    ],
)
def test_bad_arguments_raise(kwargs, error, match):
    logits = _logits(2, 10, torch.float32, seed=0)
    kwargs = _to_device(kwargs)
    # CUDA tensors are checked on the device, without a host sync: the synchronous mode raises at the call.
    with _device_checks.sync_checks(), pytest.raises(error, match=match):
        ops.sample_(logits, **kwargs)


def test_bad_logits_raise():
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        ops.sample_(torch.zeros(2, 5, dtype=torch.float64, device=DEVICE))
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        ops.sample_(torch.zeros(2, 5, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="must be \\[B, V\\]"):
        ops.sample_(torch.zeros(5, device=DEVICE))
    with pytest.raises(ValueError, match="B >= 1"):
        ops.sample_(torch.zeros(0, 5, device=DEVICE))
    with pytest.raises(TypeError, match="must be a tensor"):
        ops.sample_([[0.0, 1.0]])


def test_fake_tensor_shapes():
    # The fake (meta) kernel gives the output shapes without running a backend.
    from torch._subclasses.fake_tensor import FakeTensorMode

    from gtalign_fast.ops._sample import OP_DEF

    with FakeTensorMode():
        logits = torch.empty(3, 11)
        f, i = torch.ones(3), torch.zeros(3, dtype=torch.int64)
        tokens, logp, raw, status = OP_DEF.custom_op(logits, f, i, f, f * 0, i - 1, i, None, None, "")
    assert tokens.shape == (3,) and tokens.dtype == torch.int64
    assert logp.dtype == raw.dtype == torch.float32 and status.dtype == torch.int32


def test_cuda_backend_is_refused_with_a_reason():
    """sample_ has no CUDA C++ kernel: asking for it names the backend to use instead."""
    logits = torch.randn(2, 7, device=DEVICE)
    with pytest.raises(RuntimeError, match="no CUDA C\\+\\+ kernel.*'triton'"):
        ops.sample_(logits, temperature=1.0, seed=0, backend="cuda")


# ---------------------------------------------------------------------------------------------
# Several programs per row (Triton): the vocabulary split into chunks, reduced in fixed order


def _triton_kernels():
    pytest.importorskip("triton")
    from gtalign_fast.kernels import sample as triton_kernels

    return triton_kernels


@pytest.mark.parametrize(
    "vocab,max_block,programs,parts",
    [
        (515, 64, 4, 3),  # V not a multiple of the block: 9 blocks (the last partial), 3 per chunk
        (515, 64, 128, 9),  # one block per program, the last one partial
        (37, 64, 8, 1),  # V smaller than one block: one program
        (5, 16, 3, 1),  # V smaller than the smallest block
    ],
)
def test_triton_split_rows_match_reference(monkeypatch, vocab, max_block, programs, parts):
    if "triton" not in BACKENDS:
        pytest.skip("no Triton backend here")
    kernels = _triton_kernels()
    monkeypatch.setattr(kernels, "MAX_BLOCK_V", max_block)
    block_v, chunk, n_parts = kernels.launch_grid(5, vocab, DEVICE, programs)
    assert n_parts == parts and chunk % block_v == 0 and (parts - 1) * chunk < vocab <= parts * chunk
    # Rows of _row_args with top-k, greedy + forced, top-p, top-k + top-p, everything (and biases).
    rows = torch.tensor([1, 2, 3, 4, 8])
    batch = len(rows)
    logits = _logits(batch, vocab, torch.float32, seed=vocab)
    args = {key: value[rows] for key, value in _row_args(9, vocab, seed=vocab + 1).items()}
    args = _to_device(args)
    ref_tokens, ref_logp, ref_raw, ref_processed = _reference(logits, args)
    original = kernels.launch_grid
    monkeypatch.setattr(kernels, "launch_grid", lambda b, v, d, p=None: original(b, v, d, programs))
    buffer = logits.clone()
    tokens, logp, raw = ops.sample_(buffer, backend="triton", **args)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logp.double(), ref_logp, **LOGP_TOL)
    torch.testing.assert_close(raw.double(), ref_raw, **LOGP_TOL)
    assert torch.equal(torch.isinf(buffer), torch.isinf(ref_processed))


def test_triton_grid_fills_the_gpu_and_stays_bounded():
    kernels = _triton_kernels()
    cpu = torch.device("cpu")  # the grid uses DEFAULT_SMS (an H100 / H200's 132) off CUDA
    sms = kernels.DEFAULT_SMS
    for batch, vocab in [(8, 32000), (64, 151936)]:
        block_v, chunk, parts = kernels.launch_grid(batch, vocab, cpu)
        assert (parts - 1) * chunk < vocab <= parts * chunk and chunk % block_v == 0
        assert batch * parts >= 2 * sms, (batch, vocab, parts)  # every SM gets programs
        assert parts <= kernels.MAX_PROGRAMS
    assert kernels.launch_grid(64, 151936, cpu) == (512, 33 * 512, 9)
    # Huge inputs: the per-row count stays bounded (grid axis 1 <= 65535), the batch goes on axis 0.
    for batch, vocab in [(1, 2**31 - 1), (10**6, 151936), (1, 1)]:
        _, chunk, parts = kernels.launch_grid(batch, vocab, cpu)
        assert 1 <= parts <= min(kernels.MAX_PROGRAMS, 65535) and parts * chunk >= vocab


@pytest.mark.skipif(DEVICE.type != "cuda", reason="too slow under the Triton interpreter (GPU check)")
def test_triton_large_vocab_row_matches_reference():
    # Rows of Qwen's V = 151936 split over several programs, top-k 50 and top-p 0.9 (the bench setting).
    vocab = 151936
    logits = _logits(2, vocab, torch.bfloat16, seed=151936, scale=3.0)
    args = {"temperature": torch.tensor([0.7, 1.0]), "top_k": torch.tensor([50, 0]),
            "top_p": torch.tensor([0.9, 0.95]), "min_p": torch.zeros(2), "forced": torch.tensor([-1, -1]),
            "bias_ids": None, "bias_values": None, "seed": torch.tensor([5, -9])}
    args = _to_device(args)
    ref_tokens, ref_logp, ref_raw, ref_processed = _reference(logits, args)
    buffer = logits.clone()
    tokens, logp, raw = ops.sample_(buffer, backend="triton", **args)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logp.double(), ref_logp, **LOGP_TOL)
    torch.testing.assert_close(raw.double(), ref_raw, **LOGP_TOL)
    assert torch.equal(torch.isinf(buffer), torch.isinf(ref_processed))


# ---------------------------------------------------------------------------------------------
# Issue 15 item 9: the low-level op never reads or writes outside the logits


def _padded_logits(batch, vocab, pad, sentinel=12345.0):
    """``[batch, vocab]`` logits inside a larger buffer: ``pad`` sentinel columns before and after
    every row, and a sentinel row before and after the whole tensor."""
    storage = torch.full((batch + 2, vocab + 2 * pad), sentinel, dtype=torch.float32, device=DEVICE)
    view = storage[1:-1, pad:pad + vocab]
    view.copy_(_logits(batch, vocab, torch.float32, seed=vocab))
    outside = torch.ones_like(storage, dtype=torch.bool)
    outside[1:-1, pad:pad + vocab] = False
    return storage, view, outside


def _low_level_args(batch, forced, ids=None, values=None):
    f32 = dict(dtype=torch.float32, device=DEVICE)
    i64 = dict(dtype=torch.int64, device=DEVICE)
    return (torch.full((batch,), 0.9, **f32), torch.full((batch,), 3, **i64), torch.full((batch,), 0.9, **f32),
            torch.zeros(batch, **f32), torch.tensor(forced, **i64), torch.arange(batch, **i64), ids, values)


@pytest.mark.skipif("triton" not in BACKENDS, reason="no Triton backend here")
def test_triton_out_of_range_ids_flag_and_stay_inside():
    from gtalign_fast.ops._device_checks import ERR_FORCED_TOKEN, ERR_TARGET_RANGE

    kernels = _triton_kernels()
    batch, vocab, pad = 5, 40, 9
    storage, view, outside = _padded_logits(batch, vocab, pad)
    before = storage.clone()
    # Forced ids past either end of the row (the next row's padding, the next row, far away).
    forced = [vocab, -1, vocab + pad, -(pad + 2), 2**40]
    ids = torch.tensor([[vocab + 1, 2], [-3, 4], [1, vocab + pad + 1], [-1, -1], [0, 2**35]], device=DEVICE)
    values = torch.full((batch, 2), 1.5, device=DEVICE)
    args = _low_level_args(batch, forced, ids, values)
    outputs = [torch.full((batch,), -7, dtype=torch.int64, device=DEVICE)] + [
        torch.full((batch,), 7.0, device=DEVICE) for _ in range(2)] + [torch.zeros(batch, dtype=torch.int32,
                                                                                    device=DEVICE)]
    flag = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    kernels.sample(view, *args, *outputs, flag)
    assert int(flag) == ERR_FORCED_TOKEN | ERR_TARGET_RANGE
    assert torch.equal(storage[outside], before[outside])  # no write outside the logits
    tokens, logp, raw, _ = outputs
    # Every row here has a bad id: token 0 and NaN log-probs, never a value read from elsewhere.
    assert torch.equal(tokens, torch.zeros(batch, dtype=torch.int64, device=DEVICE))
    assert bool(torch.isnan(logp).all()) and bool(torch.isnan(raw).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_level_op_refuses_out_of_range_forced_token(backend):
    """The registered op (what torch.compile and direct callers reach) with an out-of-range forced
    id: an IndexError naming it on every backend (Triton: through the device flag), and the
    padding around the logits untouched."""
    from gtalign_fast.ops._sample import OP_DEF

    batch, vocab, pad = 4, 30, 6
    storage, view, outside = _padded_logits(batch, vocab, pad)
    before = storage.clone()
    for forced in ([-1, vocab, 2, -1], [-1, -1, -(pad + 3), -1], [2**40, 0, 1, 2]):
        with _device_checks.sync_checks(), pytest.raises(IndexError, match="forced"):  # CUDA: checked on the device
            OP_DEF.custom_op(view, *_low_level_args(batch, forced), backend)
        assert torch.equal(storage[outside], before[outside])
    # And bias ids past the row (Triton: ERR_TARGET_RANGE; C++: its own pre-pass).
    ids = torch.tensor([[0], [vocab + pad], [1], [2]], device=DEVICE)
    with _device_checks.sync_checks(), pytest.raises(IndexError, match="bias"):
        OP_DEF.custom_op(view, *_low_level_args(batch, [-1] * batch, ids, torch.ones(batch, 1, device=DEVICE)),
                         backend)
    assert torch.equal(storage[outside], before[outside])


@pytest.mark.skipif("triton" not in BACKENDS, reason="no Triton backend here")
def test_triton_flags_bad_values_instead_of_reading_them_on_the_host():
    """On CUDA the public function cannot read per-row tensors without a sync: the kernel checks
    them. Called directly (as on CUDA), bad values and NaN rows set ERR_SAMPLE_INPUT, the row gets
    NaN log-probs and the others are still sampled correctly."""
    kernels = _triton_kernels()
    batch, vocab = 6, 33
    logits = _logits(batch, vocab, torch.float32, seed=3)
    logits[5, 7] = float("nan")
    t, k, p, mp, forced, seeds, _, _ = _low_level_args(batch, [-1] * batch)
    t[1], k[2], p[3], mp[4] = -1.0, -5, 1.5, float("nan")
    good = torch.tensor([True, False, False, False, False, False], device=DEVICE)
    outputs = [torch.empty(batch, dtype=torch.int64, device=DEVICE), torch.empty(batch, device=DEVICE),
               torch.empty(batch, device=DEVICE), torch.empty(batch, dtype=torch.int32, device=DEVICE)]
    flag = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    ref = reference.sample(logits[:1], t[:1], k[:1], p[:1], mp[:1], None, None, forced[:1], seeds[:1])
    kernels.sample(logits, t, k, p, mp, forced, seeds, None, None, *outputs, flag)
    assert int(flag) == _device_checks.ERR_SAMPLE_INPUT
    tokens, logp, raw, status = outputs
    assert int(tokens[0]) == int(ref[0][0]) and bool(torch.isfinite(logp[good]).all())
    assert bool(torch.isnan(logp[~good]).all()) and bool(torch.isnan(raw[~good]).all())
    assert int(status[5]) == constants.STATUS_BAD_LOGITS


def test_duplicate_bias_ids_set_the_flag_on_the_device():
    """The Triton path's duplicate check (device ops, no host read): repeated padding is fine, a
    token named twice in one row sets ERR_SAMPLE_INPUT (the same rule the host check applies)."""
    from gtalign_fast.ops._sample import _flag_duplicate_biases

    flag = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    _flag_duplicate_biases(torch.tensor([[1, -1, -1], [2, 3, 4]], device=DEVICE), flag)
    assert int(flag) == 0
    _flag_duplicate_biases(torch.tensor([[1, -1, -1], [4, 3, 4]], device=DEVICE), flag)
    assert int(flag) == _device_checks.ERR_SAMPLE_INPUT


def test_int_seed_rows_equal_batch_row_seeds():
    # The device-side construction of per-row seeds (no host -> device copy) is the documented one.
    from gtalign_fast.ops._sample import _row_seeds

    for seed in (0, 123, -1, 2**63 - 1, -(2**63), 2**64 + 5):
        assert torch.equal(_row_seeds(seed, 9, DEVICE), batch_row_seeds(seed, 9, DEVICE))


@pytest.mark.skipif(DEVICE.type != "cuda", reason="a CUDA check (torch.cuda.set_sync_debug_mode)")
def test_no_host_sync_on_cuda_and_lazy_errors():
    """Issue 12: no host synchronisation on the CUDA path (scalars, per-row tensors, biases); an
    out-of-range forced id is reported by check_device_errors, not by a sync inside the call."""
    batch, vocab = 8, 32000
    logits = _logits(batch, vocab, torch.bfloat16, seed=0)
    tensors = dict(
        temperature=torch.full((batch,), 0.7, device=DEVICE), top_k=torch.full((batch,), 50, device=DEVICE),
        forced=torch.tensor([-1, 3, -1, -1, 7, -1, -1, -1], device=DEVICE),
        seed=torch.arange(batch, device=DEVICE), bias_ids=torch.randint(0, vocab, (batch, 3), device=DEVICE),
        bias_values=torch.randn(batch, 3, device=DEVICE),
    )
    tensors["bias_ids"][:, 1] = -1  # no duplicates
    calls = [dict(temperature=0.7, top_k=50, top_p=0.9, seed=1), dict(top_p=0.9, **tensors)]
    for kwargs in calls:  # warm-up: compilation may synchronise
        ops.sample_(logits.clone(), backend="triton", **kwargs)
    ops.check_device_errors()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for kwargs in calls:
            ops.sample_(logits.clone(), backend="triton", **kwargs)
        bad = dict(tensors, forced=torch.full((batch,), vocab + 5, device=DEVICE))
        tokens, logp, _ = ops.sample_(logits.clone(), backend="triton", **bad)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    with pytest.raises(RuntimeError, match="ERR_FORCED_TOKEN"):
        ops.check_device_errors()
    assert bool(torch.isnan(logp).all()) and bool((tokens == 0).all())


_COMPILE_SCRIPT = r"""
import inspect
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from gtalign_fast.ops import _sample_constants as constants
from gtalign_fast.kernels import sample as K

INTS = {"stride_b": "i64", "stride_v": "i64", "min_temperature": "fp32"}
POINTERS = {"top_k_ptr": "*i64", "forced_ptr": "*i64", "seeds_ptr": "*i64", "bias_ids_ptr": "*i64",
            "counts_ptr": "*i32", "state_i_ptr": "*i64", "draw_i_ptr": "*i64", "tokens_ptr": "*i64",
            "status_ptr": "*i32", "flag_ptr": "*i32"}


def compile_one(fn, logits, constexprs, warps):
    signature = {}
    for name in inspect.signature(fn.fn).parameters:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name == "logits_ptr":
            signature[name] = logits
        elif name.endswith("_ptr"):
            signature[name] = POINTERS.get(name, "*fp32")
        else:
            signature[name] = INTS.get(name, "i32")
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))


meta = dict(LEVELS=K.LEVELS_PER_SEARCH, P_BLOCK=16, BLOCK_V=512, NB=constants.NUM_BUCKETS)
for logits in ("*fp32", "*bf16", "*fp16"):
    for has_bias in (False, True):
        compile_one(K._stats_kernel, logits, dict(HAS_BIAS=has_bias, BLOCK_K=4, BLOCK_V=512, NB=16), 8)
    for first in (False, True):
        compile_one(K._level_kernel, logits, dict(FIRST=first, **meta), 8)
    compile_one(K._final_kernel, logits, meta, 8)
for has_bias in (False, True):
    compile_one(K._reduce_kernel, "*fp32", dict(ERR_FORCED_TOKEN=8, ERR_TARGET_RANGE=1, HAS_BIAS=has_bias,
                                                  BLOCK_K=4, P_BLOCK=16), 4)
print("compiled")
"""


@pytest.mark.skipif(DEVICE.type == "cuda", reason="on a GPU the kernels are compiled and run by the tests above")
def test_triton_kernels_compile_for_sm90():
    """The interpreter runs the kernels as Python; the GPU compiler is stricter (a name set in both
    branches of a runtime `if` must keep one type, loop bounds, constexpr use...). Compile every
    kernel variant for sm_90 in a process without TRITON_INTERPRET (no GPU needed)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], cwd=root, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-4000:]
