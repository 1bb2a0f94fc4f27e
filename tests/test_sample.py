"""sample_: every backend against the float64 reference (same Philox noise), the guarantees of the
issue (greedy = argmax, forced tokens, filters never leak, the empirical distribution) and bad input."""

from __future__ import annotations

import pytest
import torch

from gtalign_fast import ops, reference
from gtalign_fast._sample import uniform_noise
from gtalign_fast._seeds import batch_row_seeds

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
    with pytest.raises(error, match=match):
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

    from gtalign_fast._sample import OP_DEF

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
