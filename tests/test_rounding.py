"""Stochastic rounding of 16-bit stores (stochastic_rounding=True): unbiased, the same stream on every backend
(checked bit for bit against an independent numpy implementation), reproducible per seed and step, resumable,
and refused where it cannot apply."""

import copy

import numpy as np
import pytest
import torch

import rmsprop_gpu
from rmsprop_gpu import rmsprop
from tests.matrix import BACKENDS
from tools.oracle import mix32 as _mix32

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------- an independent reference (numpy, uint32)


def reference_round(x32: np.ndarray, dtype: str, seed: int, step: int, row: int, output: int) -> np.ndarray:
    """Stochastic rounding of float32 values (memory order) as specified in kernels/rmsprop.cu, from scratch:
    16 random bits u per store; the value rounds up iff u >= (1 - frac) * 2^16 at the 16-bit spacing (frac: the
    distance from the value below, in spacings), i.e. with probability frac (to 2^-16 below f16's normal range)."""
    with np.errstate(over="ignore"):
        key = _mix32(np.uint32(seed) ^ _mix32(np.uint32(step & 0xFFFFFFFF) + np.uint32(0x9E3779B9)
                                              * np.uint32(row + 1)))
        if step >> 32:  # past 2**32 steps the high half makes other streams
            key = _mix32(key ^ np.uint32(step >> 32))
        idx = np.arange(x32.size, dtype=np.uint32)
        h = _mix32(key ^ (idx * np.uint32(2) + np.uint32(output // 2)))
    u = ((h >> np.uint32(16 * (output % 2))) & np.uint32(0xFFFF)).astype(np.int64)
    out = np.empty(x32.size, dtype=np.float64)
    for i in range(x32.size):
        x = float(x32[i])
        if np.isnan(x) or np.isinf(x) or x == 0:
            out[i] = x
            continue
        if dtype == "bfloat16":
            quantum = 2.0 ** (np.floor(np.log2(abs(x))) - 7)
        else:
            quantum = max(2.0 ** (np.floor(np.log2(abs(x))) - 10), 2.0**-24)
        lower = np.floor(abs(x) / quantum) * quantum
        frac = (abs(x) - lower) / quantum  # exact in float64
        bits = int(round(frac * 2**23))  # frac has at most 23 bits here
        if dtype == "float16" and abs(x) < 2.0**-24:
            up = abs(x) * 2**24 > u[i] * 2.0**-16
        else:  # the kernels add u at the top of the dropped bits and truncate
            drop = 16 if dtype == "bfloat16" else (13 if abs(x) >= 2.0**-14 else
                                                    int(-24 - (np.floor(np.log2(abs(x))) - 23)))
            dropped = bits >> (23 - drop) if drop <= 23 else bits
            noise = (u[i] << 16) >> (32 - drop)
            up = dropped + noise >= 2**drop
        out[i] = np.copysign(lower + quantum * up, x)
    largest = float(torch.finfo(DTYPES[dtype]).max)
    return np.where(np.abs(out) > largest, np.copysign(np.inf, out), out)  # past the largest finite: inf


# ---------------------------------------------------------------- helpers
def exact_case(seed, n, dtype, state_dtype=None):
    """alpha=1, eps=0, v a power of 4, lr and momentum powers of 2: every backend's float32 math is exact up to
    the one rounding of the final add, so the values before the 16-bit store agree bit for bit and only the
    rounding is compared."""
    gen = torch.Generator().manual_seed(seed)
    sd = state_dtype or dtype
    p = torch.randn(n, generator=gen).to(dtype)
    g = torch.randn(n, generator=gen).to(dtype)
    v = (4.0 ** torch.randint(-3, 3, (n,), generator=gen)).to(sd)
    buf = torch.randn(n, generator=gen).to(sd)
    return p, g, v, buf


def run(backend, case, step=0, seed=123, momentum=0.0):
    p, g, v, buf = (t.clone() for t in case)
    st = torch.full((), float(step), dtype=torch.float32 if step < 2**24 else torch.float64)
    rmsprop([p], [g], [v], None, [buf] if momentum else None, [st], lr=2**-6, alpha=1.0, eps=0.0,
            momentum=momentum, backend=backend, stochastic_rounding=True, sr_seed=seed)
    return p, v, buf, st


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("step", [5, 2**24 + 3, 2**32 + 5], ids=["step5", "step2^24+3", "step2^32+5"])
def test_every_backend_rounds_with_the_specified_stream_bit_for_bit(backend, dtype, step):
    """float32 counters for small steps; float64 (what the optimizer keeps where the kernels read the counter)
    beyond 2**24, where float32 stops counting, and beyond 2**32, where the high half of the count keys the
    stream: no step's stream repeats another's."""
    dt = DTYPES[dtype]
    case = exact_case(1, 4099, dt)  # two full chunks and an unaligned tail
    p, v, buf, st = run(backend, case, step=step, momentum=0.5)
    p0, g0, v0, b0 = (t.double().numpy() for t in case)
    d = np.sqrt(v0)
    b_new = (0.5 * b0 + g0 / d).astype(np.float32)  # exact in float64, then the one float32 rounding
    p_new = (p0 - 2**-6 * b_new.astype(np.float64)).astype(np.float32)  # (the float32 buffer, before its store)
    assert float(st) == step + 1
    np.testing.assert_array_equal(buf.double().numpy(), reference_round(b_new, dtype, 123, step, 0, 2))
    np.testing.assert_array_equal(p.double().numpy(), reference_round(p_new, dtype, 123, step, 0, 0))
    np.testing.assert_array_equal(v.double().numpy(), v0)  # alpha = 1: v unchanged, exactly representable
    rne = torch.from_numpy(p_new).to(dt).double().numpy()
    assert (p.double().numpy() != rne).mean() > 0.2  # it is not round-to-nearest
    if step >> 32:  # not the stream of the step 2**32 below
        assert (p.double().numpy() != reference_round(p_new, dtype, 123, step & 0xFFFFFFFF, 0, 0)).mean() > 0.2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_every_binade_rounds_as_specified(backend, dtype):
    """Buffers and grads over 2^-40 .. 2^12 with both signs (f16: its subnormals, and values below its smallest
    that round to 0 or 2^-24), NaN and infinite buffers, one chunk with an unaligned tail: every stored bit as the
    numpy spec says."""
    rng = np.random.default_rng(4)
    n = 2048 + 999
    dt = DTYPES[dtype]
    p = torch.from_numpy(rng.standard_normal(n).astype(np.float32)).to(dt)
    wide = [torch.from_numpy((rng.choice([-1.0, 1.0], n) * np.exp2(rng.uniform(-40, 12, n))).astype(np.float32))
            .to(dt) for _ in range(2)]
    wide[1][[5, 77, 2100]] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=dt)  # buffers: kept
    v = torch.from_numpy(4.0 ** rng.integers(-3, 3, n)).to(dt)
    p1, v1, buf, st = run(backend, (p, wide[0], v, wide[1]), step=7, momentum=0.5)
    p0, g0, v0, b0 = (t.double().numpy() for t in (p, wide[0], v, wide[1]))
    b_new = (0.5 * b0 + g0 / np.sqrt(v0)).astype(np.float32)  # exact in float64, then the one float32 rounding
    p_new = (p0 - 2**-6 * b_new.astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(buf.double().numpy(), reference_round(b_new, dtype, 123, 7, 0, 2))
    np.testing.assert_array_equal(p1.double().numpy(), reference_round(p_new, dtype, 123, 7, 0, 0))
    if dtype == "float16":
        tiny, sub = np.abs(b_new) < 2.0**-24, np.abs(b_new) < 2.0**-14
        assert tiny.sum() > 50 and (sub & ~tiny).sum() > 50  # both of f16's paths below its normal range


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_values_at_the_largest_finite_round_up_to_inf_as_specified(backend, dtype):
    """At the top of the range a value rounds up to inf with the probability of any other rounding up (the kernels'
    short paths stop below the largest finite value: f16's truncates with cvt.rz, which never reaches inf).
    Chunk 0: buffers and params well inside the range; chunk 1: buffers within 1.5 spacings above the largest
    finite value M; chunk 2 (and an unaligned tail): params there."""
    rng = np.random.default_rng(8)
    dt = DTYPES[dtype]
    largest = float(torch.finfo(dt).max)
    spacing = largest - float(torch.tensor(largest, dtype=dt).nextafter(torch.tensor(0.0, dtype=dt)))
    n = 3 * 2048 + 5
    sign = rng.choice([-1.0, 1.0], n)
    b0, g0 = np.zeros(n), np.zeros(n)
    b0[:2048], g0[:2048] = rng.uniform(0, largest, 2048), largest / 4  # buffers in [M / 4, 3 M / 4)
    b0[2048:4096], g0[2048:4096] = rng.uniform(0, 3 * spacing, 2048), largest  # [M, M + 1.5 spacings)
    g0[4096:] = -rng.uniform(0, 96 * spacing, n - 4096)  # params: M + [0, 1.5 spacings) below
    p0 = rng.standard_normal(n) * 64
    p0[4096:] = largest
    p, g, buf = (torch.from_numpy(sign * x).to(dt) for x in (p0, g0, b0))
    p1, v1, buf1, _ = run(backend, (p, g, torch.ones(n, dtype=dt), buf), step=3, momentum=0.5)
    p_, g_, b_ = (t.double().numpy() for t in (p, g, buf))
    with np.errstate(over="ignore"):
        b_new = (0.5 * b_ + g_).astype(np.float32)  # v = 1: d = 1; exact in float64, then the float32 rounding
        p_new = (p_ - 2**-6 * b_new.astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(buf1.double().numpy(), reference_round(b_new, dtype, 123, 3, 0, 2))
    np.testing.assert_array_equal(p1.double().numpy(), reference_round(p_new, dtype, 123, 3, 0, 0))
    for x, where in ((buf1, slice(2048, 4096)), (p1, slice(4096, n))):  # both ways at the top
        top = x.double().numpy()[where]
        assert (np.isinf(top).mean() > 0.2) and (np.abs(top) == largest).mean() > 0.2


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_optimizer_counts_steps_exactly_past_2_to_the_24(backend):
    """Where the kernels read step counters (stochastic rounding, 8-bit state, bias correction) the optimizer keeps
    them in float64: they go on counting at 2**24 (float32's step += 1 stops there), so the random streams go on
    changing; a float32 counter from an old checkpoint is widened on load."""
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(3000, generator=gen).bfloat16()
    opt = rmsprop_gpu.RMSprop([p], lr=1e-3, backend=backend, stochastic_rounding=True)
    p.grad = torch.randn(3000, generator=gen).bfloat16()
    opt.step()
    assert opt.state[p]["step"].dtype == torch.float64
    sd = opt.state_dict()
    sd["state"][0]["step"] = torch.tensor(float(2**24), dtype=torch.float32)  # a torch-style float32 counter
    opt.load_state_dict(sd)
    assert opt.state[p]["step"].dtype == torch.float64
    for expected in (2**24 + 1, 2**24 + 2):
        opt.step()
        assert float(opt.state[p]["step"]) == expected

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, p0, g0, lr", [("bfloat16", 1.0, 1.0, 2**-10), ("float16", 1.0, 0.25, 2**-10),
                                               ("float16", 2.0**-20, 2.0**-20, 2**-10),
                                               ("float16", 2.0**-24, 2.0**-24, 0.5)],
                         ids=["bf16", "f16", "f16_subnormal", "f16_below_smallest"])
def test_stochastic_rounding_is_unbiased(backend, dtype, p0, g0, lr):
    """2**16 copies of one update that falls between two 16-bit values: the mean of the rounded results is the
    exact value within 5 standard errors; round-to-nearest would be off by far more."""
    dt, n = DTYPES[dtype], 1 << 16
    p = torch.full((n,), p0, dtype=dt)
    g = torch.full((n,), g0, dtype=dt)
    st = torch.zeros(())
    rmsprop([p], [g], [torch.ones(n, dtype=dt)], state_steps=[st], lr=lr, alpha=1.0, eps=0.0, backend=backend,
            stochastic_rounding=True, sr_seed=99)
    exact = torch.tensor(p0, dtype=torch.float32).double().item() - lr * torch.tensor(g0, dtype=dt).double().item()
    lo, hi = p.double().min().item(), p.double().max().item()
    assert lo < hi and lo <= exact <= hi  # the two neighbours, both taken
    frac = (exact - lo) / (hi - lo)
    bound = 5 * (hi - lo) * (frac * (1 - frac)) ** 0.5 / n**0.5
    assert abs(p.double().mean().item() - exact) <= bound
    nearest = torch.tensor(exact, dtype=torch.float64).to(dt).double().item()
    assert abs(nearest - exact) > 5 * bound  # the test can tell SR from round-to-nearest


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_stream_depends_on_seed_and_step_and_repeats_exactly(backend):
    case = exact_case(2, 3000, torch.bfloat16)
    a = run(backend, case, step=3, seed=1)[0]
    assert torch.equal(a, run(backend, case, step=3, seed=1)[0])
    assert not torch.equal(a, run(backend, case, step=3, seed=2)[0])
    assert not torch.equal(a, run(backend, case, step=4, seed=1)[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", [dict(), dict(momentum=0.9, centered=True)], ids=["plain", "centered_momentum"])
def test_optimizer_with_16_bit_state_stays_within_one_spacing_of_float64(backend, variant):
    """Generic hyperparameters, every state in bf16: each stored value is one of the two bf16 neighbours of the
    float64 oracle's value (float32 math error aside), params and states alike."""
    from tools.oracle import reference_step

    gen = torch.Generator().manual_seed(3)
    p = torch.randn(5000, generator=gen).bfloat16()
    opt = rmsprop_gpu.RMSprop([p], lr=0.01, weight_decay=0.01, backend=backend, stochastic_rounding=True,
                              sr_seed=5, **variant)
    p.grad = torch.randn(5000, generator=gen).bfloat16()
    p_before = p.double()
    opt.step()
    st = opt.state[p]
    zeros = torch.zeros(5000, dtype=torch.float64)
    ref = reference_step(p_before, p.grad.double(), zeros, zeros if variant else None, zeros if variant else None,
                         lr=0.01, alpha=0.99, eps=1e-8, weight_decay=0.01, **variant)
    names = ("param", "square_avg", "momentum_buffer", "grad_avg")
    for name, want in zip(names, ref):
        if want is None:
            continue
        got = p if name == "param" else st[name]
        assert got.dtype == torch.bfloat16
        spacing = 2.0 ** (torch.floor(torch.log2(want.abs().clamp_min(2.0**-126))) - 7)
        err = (got.double() - want).abs()
        assert (err <= spacing * 1.01 + 1e-30).all(), name


def check_resume_is_bit_identical(shape, seed: int, **kw) -> dict:
    """6 steps in one run == 3 steps, state_dict saved and loaded into a new optimizer, 3 more: bit for bit
    (bf16 params). Returns the saved state_dict."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(shape, generator=gen).bfloat16()
    grads = [torch.randn(shape, generator=gen).bfloat16() for _ in range(6)]

    def steps(opt, param, ks):
        for k in ks:
            param.grad = grads[k].clone()
            opt.step()

    q = p.clone()
    a = rmsprop_gpu.RMSprop([p], **kw)
    steps(a, p, range(6))
    b = rmsprop_gpu.RMSprop([q], **kw)
    steps(b, q, range(3))
    saved = copy.deepcopy(b.state_dict())
    c = rmsprop_gpu.RMSprop([q], **{**kw, "sr_seed": 0})  # the checkpoint restores the seed
    c.load_state_dict(saved)
    steps(c, q, range(3, 6))
    assert torch.equal(p.view(torch.int16), q.view(torch.int16))
    for key, x in a.state[p].items():
        assert torch.equal(x, c.state[q][key]), key
    return saved


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_from_a_checkpoint_is_bit_identical(backend):
    saved = check_resume_is_bit_identical(3000, 4, lr=0.01, momentum=0.9, backend=backend, stochastic_rounding=True,
                                          sr_seed=11)
    assert saved["param_groups"][0]["stochastic_rounding"] and saved["param_groups"][0]["sr_seed"] == 11


@pytest.mark.parametrize("backend", BACKENDS)
def test_streams_belong_to_params_not_to_launches(backend):
    """A param's random stream is its position in the optimizer: one launch for all, one per param (foreach=False)
    or one param group each give the same bits, for 16-bit stores and 8-bit codes alike; and two identical params
    round differently (independent streams)."""
    gen = torch.Generator().manual_seed(14)
    base = [torch.randn(70, 80, generator=gen).bfloat16() for _ in range(3)]
    base[1] = base[0].clone()  # identical values and grads: only their streams differ
    grads = [[torch.randn(70, 80, generator=gen).bfloat16() for _ in range(3)] for _ in range(2)]
    grads[0][1], grads[1][1] = grads[0][0].clone(), grads[1][0].clone()
    kw = dict(lr=0.01, momentum=0.9, backend=backend, stochastic_rounding=True, sr_seed=3, state_bits=8)
    out = []
    for layout in ("one launch", "foreach=False", "param groups"):
        ps = [p.clone() for p in base]
        groups = [{"params": [p]} for p in ps] if layout == "param groups" else ps
        opt = rmsprop_gpu.RMSprop(groups, foreach=False if layout == "foreach=False" else None, **kw)
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            opt.step()
        out.append([p.view(torch.int16) for p in ps] + [x for p in ps for x in opt.state[p].values()])
    for other in out[1:]:
        for a, b in zip(out[0], other):
            assert torch.equal(a, b)
    assert not torch.equal(out[0][0], out[0][1])


def test_a_non_dense_param_rounds_alike_on_every_backend():
    """The kernels update a non-dense param through a contiguous temporary, so its elements are numbered in
    logical order; the torch path numbers them the same way (not by stride)."""
    out = []
    for backend in BACKENDS:
        gen = torch.Generator().manual_seed(15)
        p = torch.randn(100, 70, generator=gen).bfloat16().t()[:50]  # strides (1, 70): not dense
        g = torch.randn(p.shape, generator=gen).bfloat16()
        v = (torch.rand(p.shape, generator=gen) + 0.1).bfloat16()
        rmsprop([p], [g], [v], state_steps=[torch.zeros(())], lr=0.01, backend=backend, stochastic_rounding=True,
                sr_seed=1)
        out.append(p.view(torch.int16))
    assert all(torch.equal(out[0], o) for o in out[1:])


def test_refusals_are_clear():
    p = torch.randn(8).bfloat16()
    g, v = torch.randn(8).bfloat16(), torch.zeros(8).bfloat16()
    with pytest.raises(ValueError, match="needs state_steps"):
        rmsprop([p], [g], [v], stochastic_rounding=True)
    with pytest.raises(ValueError, match="16-bit"):
        rmsprop([torch.randn(8)], [torch.randn(8)], [torch.zeros(8)], state_steps=[torch.zeros(())],
                stochastic_rounding=True)
    for bad in (-1, 2**32, 1.5, True):
        with pytest.raises(ValueError, match="sr_seed"):
            rmsprop_gpu.RMSprop([p], stochastic_rounding=True, sr_seed=bad)
    with pytest.raises(ValueError, match="differentiable=True.*stochastic_rounding=True"):
        rmsprop_gpu.RMSprop([p], stochastic_rounding=True, differentiable=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_step_rounds_like_the_eager_step(backend):
    """torch.compile(opt.step, fullgraph=True) carries stochastic_rounding and sr_seed into the custom op."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()  # earlier tests' compiled steps count against dynamo's recompile limit for step()
    gen = torch.Generator().manual_seed(6)
    a = [torch.randn(2100, generator=gen).bfloat16(), torch.randn(7, 3, generator=gen).bfloat16()]
    b = [p.clone() for p in a]
    kw = dict(lr=0.01, momentum=0.9, backend=backend, stochastic_rounding=True, sr_seed=77)
    # two param groups: the traced op gets each param's stream id (its position in the optimizer) as eager does
    ours = rmsprop_gpu.RMSprop([{"params": [a[0]]}, {"params": [a[1]]}], **kw)
    ref = rmsprop_gpu.RMSprop([{"params": [b[0]]}, {"params": [b[1]]}], **kw)
    counter = CompileCounterWithBackend("aot_eager")
    step = torch.compile(ours.step, fullgraph=True, backend=counter)
    for i in range(4):
        for p, q in zip(a, b):
            p.grad = torch.randn(p.shape, generator=gen).bfloat16()
            q.grad = p.grad.clone()
        step()
        ref.step()
        if i == 1:  # the first step creates state, the second compiles the steady graph
            frames = counter.frame_count
    assert counter.frame_count == frames  # no recompile per step
    for p, q in zip(a, b):
        assert torch.equal(p.view(torch.int16), q.view(torch.int16))
