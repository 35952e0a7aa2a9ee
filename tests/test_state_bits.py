"""8-bit blockwise state (state_bits=8): the codec against an independent numpy implementation of its spec, every
variant x dtype x layout on both kernels and the torch path against a float64 oracle that quantizes the same way,
the optimizer's state, checkpoints (bit-identical resume, torch's fp32 state both ways) and refusals."""

import copy
import zlib

import numpy as np
import pytest
import torch

import rmsprop_gpu
from rmsprop_gpu import quantize, rmsprop
from tests.matrix import BACKENDS
from tests.test_rounding import check_resume_is_bit_identical
from tests.tolerances import ORACLE, Q8_CODES
from tools.oracle import q8_decode, q8_encode, reference_step, stream_r16

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
VARIANTS = {"plain": (0.0, False), "momentum": (0.9, False), "centered": (0.0, True),
            "centered_momentum": (0.9, True)}


def _wide_values(n, signed, seed):
    """Magnitudes over ~170 binades (subnormal to 1e25), zeros, a NaN and an inf block, a tail (n % 16 != 0)."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * np.exp(rng.uniform(-95, 58, n))).astype(np.float32)
    x[rng.integers(0, n, 20)] = 0.0
    x[7], x[40], x[100:116] = np.nan, np.inf, 1e-42
    return x if signed else np.abs(x)


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_codec_matches_the_independent_numpy_spec_bit_for_bit(signed):
    x = _wide_values(4099, signed, 0)
    q = quantize.encode(torch.from_numpy(x), signed)
    assert q.dtype == torch.uint8 and q.numel() == quantize.q8_nbytes(4099) == 4112 + 257
    assert np.array_equal(q.numpy(), q8_encode(x, signed))
    want = q8_decode(q.numpy(), x.size, signed)
    got = quantize.decode(q, x.size, signed).double().numpy()
    assert np.array_equal(got, want, equal_nan=True)
    assert np.isnan(got[:16]).all() and np.isnan(got[32:48]).all()  # NaN and inf poison their own block only
    assert not np.isnan(got[16:32]).any()


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_stochastic_codes_match_the_spec_and_are_unbiased(signed):
    """The kernels round codes stochastically (an average moving by less than half a code per step still moves):
    bit for bit the numpy spec with the same random bits, and the mean of many roundings is the value."""
    x = _wide_values(4099, signed, 2)
    r16 = stream_r16(5, 7, 3, x.size, 2)
    q = quantize.encode(torch.from_numpy(x), signed, r16=torch.from_numpy(r16.astype(np.int64)))
    assert np.array_equal(q.numpy(), q8_encode(x, signed, r16))
    n = 1 << 14
    value = 1.0 + 2.0**-6  # a quarter of the E4M3 code step (1/8) above 1.0, 1/16 of E4M4's... times the scale
    xs = torch.full((n * 16,), value)
    xs[::16] = 1.5  # each block's maximum: the scale stays 2^0
    rng = torch.Generator().manual_seed(0)
    r = torch.randint(0, 1 << 16, (n * 16,), generator=rng)
    d = quantize.decode(quantize.encode(xs, signed, r16=r), n * 16, signed).view(n, 16)[:, 1:].double()
    step = 2.0**-3 if signed else 2.0**-4
    assert set(d.unique().tolist()) == {1.0, 1.0 + step}  # only the two neighbours
    assert abs(d.mean().item() - value) < 5 * (step / 2) / (n * 15) ** 0.5


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_codec_error_bound_and_exact_round_trip(signed):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(16 * 512) * np.exp(rng.uniform(-8, 8, 16 * 512))).astype(np.float32)
    x = x if signed else np.abs(x)
    q = quantize.encode(torch.from_numpy(x), signed)
    d = quantize.decode(q, x.size, signed).double().numpy()
    blockmax = np.repeat(np.abs(x).reshape(-1, 16).max(axis=1), 16).astype(np.float64)
    step = 2.0**-4 if signed else 2.0**-5  # half the relative spacing of E4M3 / E4M4 codes
    normal = np.abs(x) >= blockmax * 2.0**-13  # above the codes' subnormal range
    rel = np.abs(d - x) / np.abs(x)
    assert (rel[normal] <= step * 1.0001).all()
    assert (np.abs(d - x)[~normal] <= blockmax[~normal] * 2.0**-17).all()  # subnormal codes: absolute
    again = quantize.encode(torch.from_numpy(d.astype(np.float32)), signed)
    assert torch.equal(again, q)  # decode then encode gives the same bytes
    assert (quantize.decode(torch.zeros(quantize.q8_nbytes(37), dtype=torch.uint8), 37, signed) == 0).all()


def _state(n, seed):
    """(v, buf, grad_avg) with v - grad_avg^2 well above 0 (v over ~4 binades): no cancellation in centered."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, generator=gen) * 0.1
    v = a * a + (torch.rand(n, generator=gen) + 0.5) * torch.exp(torch.randn(n, generator=gen) * 0.7)
    return v, torch.randn(n, generator=gen), a


SHAPES = {"flat": (5003,), "transposed": (96, 67), "channels_last": (5, 24, 7, 9), "sliced": (70, 100)}


def _param(shape_name, dtype, gen):
    p = torch.randn(SHAPES[shape_name], generator=gen).to(dtype)
    if shape_name == "sliced":  # not dense: the kernels see it through a contiguous temporary
        p = p[:, :90]
    if shape_name == "transposed":
        p = p.t()
    if shape_name == "channels_last":
        p = p.contiguous(memory_format=torch.channels_last)
    return p


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_variant_dtype_layout_against_the_quantizing_float64_oracle(backend, dtype, variant, shape):
    momentum, centered = VARIANTS[variant]
    gen = torch.Generator().manual_seed(zlib.crc32(f"{dtype}{variant}{shape}".encode()))
    p = _param(shape, DTYPES[dtype], gen)
    g = torch.randn(p.shape, generator=gen).to(p.dtype).contiguous(memory_format=torch.contiguous_format)
    n = p.numel()
    v0, b0, a0 = _state(n, 3)
    qv = quantize.encode(v0.sqrt(), False)
    qb = quantize.encode(b0, True) if momentum else None
    qa = quantize.encode(a0, True) if centered else None
    # the oracle: decode (exact), one float64 step, in the kernels' element order (p's memory order)
    flat = lambda t: quantize.kernel_order(t, p).double()
    dv = torch.from_numpy(q8_decode(qv.numpy(), n, False)) ** 2  # v; centered: the variance v - ga^2
    db = torch.from_numpy(q8_decode(qb.numpy(), n, True)) if momentum else None
    da = torch.from_numpy(q8_decode(qa.numpy(), n, True)) if centered else None
    if centered:
        dv = dv + da * da
    hyper = dict(lr=0.01, alpha=0.9, eps=1e-6, weight_decay=0.01, momentum=momentum, centered=centered)
    want_p, want_v, want_b, want_a = reference_step(flat(p), flat(g), dv, db, da, clamp_var=True, **hyper)
    r16 = {out: stream_r16(0, 0, 0, n, out) for out in (1, 2, 3)}  # seed 0, step 0, row 0: square_avg, buf, ga
    states = [qv.clone(), None if qb is None else qb.clone(), None if qa is None else qa.clone()]
    got_p = p.clone() if shape != "sliced" else p._base.clone()[:, :90]  # the same (non-dense) strides
    rmsprop([got_p], [g], [states[0]], None if qa is None else [states[2]], None if qb is None else [states[1]],
            [torch.zeros(())], backend=backend, **hyper)
    assert got_p.stride() == p.stride()
    torch.testing.assert_close(quantize.kernel_order(got_p, p).double(), want_p, **ORACLE[dtype])
    kept = (want_v - want_a * want_a).clamp_min(0.0) if centered else want_v
    for out, (q, want, signed) in enumerate(zip(states, (kept.sqrt(), want_b, want_a), (False, True, True)), 1):
        if q is None:
            continue
        oracle_codes = q8_encode(want.float().numpy(), signed, r16[out])
        same = (q.numpy() == oracle_codes).mean()
        assert same >= Q8_CODES["same_fraction"], (signed, same)
        got = torch.from_numpy(q8_decode(q.numpy(), n, signed))
        blockmax = want.abs().view(-1)[: n // 16 * 16].reshape(-1, 16).amax(1).repeat_interleave(16)
        err = (got[: blockmax.numel()] - want[: blockmax.numel()]).abs()
        bound = Q8_CODES["signed" if signed else "unsigned"] * want[: blockmax.numel()].abs() + blockmax * 2.0**-16
        assert (err <= bound).all(), signed


@pytest.mark.parametrize("backend", BACKENDS)
def test_centered_keeps_the_variance_so_steady_grads_do_not_cancel(backend):
    """Centered 8-bit state stores the variance v - ga^2, not v: with steady grads (v ~ ga^2, variance 1e-4 of
    v) the step follows the float64 oracle to a few float32 roundings. Storing v, its 3% code error alone would
    be 300 times the variance (the denominator off by any factor, or v - ga^2 < 0)."""
    n = 4100
    p, g = torch.zeros(n), torch.ones(n)
    w = quantize.encode(torch.full((n,), 1e-4).sqrt(), False)  # the stored variance
    a = quantize.encode(torch.ones(n), True)  # grad_avg = 1, exact
    var0 = float(quantize.decode(w, n, False)[0]) ** 2
    rmsprop([p], [g], [w], [a], state_steps=[torch.zeros(())], lr=1e-3, alpha=0.9, eps=1e-8, centered=True,
            backend=backend)
    var1 = 0.9 * var0  # v = 0.9 (var0 + 1) + 0.1, ga = 1: v - ga^2 = 0.9 var0
    want = -1e-3 / (var1**0.5 + 1e-8)
    torch.testing.assert_close(p.double(), torch.full((n,), want, dtype=torch.float64), rtol=1e-3, atol=0)
    assert torch.equal(quantize.decode(a, n, True), torch.ones(n))


@pytest.mark.parametrize("dtype", DTYPES)
def test_both_kernels_and_the_torch_path_write_the_same_bytes(dtype):
    """Three steps, momentum and centered, stochastic rounding of 16-bit params: the kernels write identical
    bytes; the torch path the same codes but where float32 rounding differences straddle a code boundary."""
    gen = torch.Generator().manual_seed(5)
    sizes = [4096, 2048 * 3 + 17, 5003]
    ps = [torch.randn(n, generator=gen).to(DTYPES[dtype]) for n in sizes]
    gs = [[torch.randn(n, generator=gen).to(DTYPES[dtype]) for n in sizes] for _ in range(3)]
    sr = dtype != "float32"
    out = {}
    for backend in BACKENDS:
        p = [x.clone() for x in ps]
        vs, bs, as_ = ([quantize.zeros_state(x) for x in ps] for _ in range(3))
        steps = [torch.zeros(()) for _ in ps]
        for k in range(3):
            rmsprop(p, gs[k], vs, as_, bs, steps, lr=0.01, momentum=0.9, centered=True, backend=backend,
                    stochastic_rounding=sr, sr_seed=3)
        out[backend] = (p, vs + bs + as_)
    for a, b in zip(out["triton"][0] + out["triton"][1], out["cupy"][0] + out["cupy"][1]):
        assert torch.equal(a, b)  # the two kernels: one spec, the same bytes
    # the torch path (torch's own addcmul and friends, their rounding) agrees but where a float32 difference
    # straddles a code boundary; such a code moves later updates by a few percent of a step (lr = 0.01)
    for a, b in zip(out["triton"][1], out["torch"][1]):
        assert (a == b).float().mean() >= Q8_CODES["same_fraction"]
    for a, b in zip(out["triton"][0], out["torch"][0]):
        close = torch.isclose(a.double(), b.double(), **ORACLE[dtype])
        assert close.float().mean() >= Q8_CODES["same_fraction"]
        assert (a.double() - b.double()).abs().max() <= 3 * 0.01


@pytest.mark.parametrize("momentum", [0.0, 0.9], ids=["centered", "centered_momentum"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_variance_that_rounds_below_zero_counts_as_zero(dtype, momentum):
    """Centered 8-bit state with no variance stored (v - ga^2 = 0) and grads equal to grad_avg: v - ga^2 after the
    update rounds to either side of 0; below, it counts as 0 (the root 0, the denominator eps), NaN nowhere. The
    kernels clamp on their roots' slow path (which any negative takes) and write the same bytes."""
    n = 2048 * 2 + 37
    rng = np.random.default_rng(21)
    ga = (rng.standard_normal(n) * np.exp2(rng.integers(-8, 8, n))).astype(np.float32)
    a0 = quantize.encode(torch.from_numpy(ga), True)
    g = quantize.decode(a0, n, True).to(DTYPES[dtype])  # codes' values: exact in every dtype
    gf = g.float().numpy()
    v = np.float32(0.9) * (gf * gf) + (np.float32(0.1) * gf) * gf  # the update's v (decoded: ga^2 + 0)
    assert ((v - gf * gf) < 0).mean() > 0.05  # the case this test is for
    p0 = torch.from_numpy(rng.standard_normal(n).astype(np.float32)).to(DTYPES[dtype])
    out = {}
    for backend in BACKENDS:
        p = p0.clone()
        vs, bs, as_ = quantize.zeros_state(p), quantize.zeros_state(p), a0.clone()
        out[backend] = (p, [vs, as_] + ([bs] if momentum else []))
        rmsprop([p], [g], [vs], [as_], [bs] if momentum else None, [torch.zeros(())], lr=0.01, alpha=0.9,
                momentum=momentum, centered=True, backend=backend)
    for backend in BACKENDS:
        assert not out[backend][0].isnan().any(), backend
    for x, y in zip([out["triton"][0], *out["triton"][1]], [out["cupy"][0], *out["cupy"][1]]):
        assert torch.equal(x.view(torch.uint8), y.view(torch.uint8))


def _block_values(n, signed, seed, lo=-135, hi=60, special=True):
    """Each block of 16 in its own binade 2^lo .. 2^hi (subnormal to 2^60: squares stay finite, otherwise nearly
    every block of an update's result holds inf or NaN and only its NaN code would be compared), its values within
    a few binades of each other (most codes nonzero), zeros; special: a NaN and an inf block; a tail."""
    rng = np.random.default_rng(seed)
    top = np.exp2(rng.uniform(lo, hi, (n + 15) // 16)).repeat(16)[:n]
    x = (rng.standard_normal(n) * top * np.exp2(rng.uniform(-6, 0, n))).astype(np.float32)
    x[rng.integers(0, n, 20)] = 0.0
    if special:
        x[7], x[40] = np.nan, np.inf
    return x if signed else np.abs(x)


def _binade_step(backend, dtype, variant, sr):
    """One step with values over ~195 binades (subnormals, zeros, a NaN and an inf block), params down to f16's
    subnormals and below: the params and states written, as bytes."""
    momentum, centered = VARIANTS[variant]
    n = 2048 * 2 + 16 * 5 + 3  # two full chunks, then a chunk with whole blocks and a partial one
    rng = np.random.default_rng(11)
    params = (rng.standard_normal(n) * np.exp2(rng.uniform(-30, 12, n))).astype(np.float32)
    # NaN / inf come from the state here (its own blocks); float16 grads within its range
    grads = _block_values(n, True, 12, *((-30, 14) if dtype == "float16" else (-135, 60)), special=False)
    if dtype == "bfloat16":  # Triton's interpreter reads bf16 subnormals as zeros (the GPU exactly)
        grads[np.abs(grads) < 2.0**-126] = 0.0
    states = [quantize.encode(torch.from_numpy(_block_values(n, signed, seed)), signed)
              for signed, seed in ((False, 13), (True, 14), (True, 15))]
    p = torch.from_numpy(params).to(DTYPES[dtype])
    v, b, a = (q.clone() for q in states)
    g = torch.from_numpy(grads).to(DTYPES[dtype])
    rmsprop([p], [g], [v], [a] if centered else None, [b] if momentum else None, [torch.full((), 6.0)],
            lr=0.01, alpha=0.9, eps=1e-8, momentum=momentum, centered=centered, backend=backend,
            stochastic_rounding=sr, sr_seed=9)
    return [x.view(torch.uint8) for x in [p, v] + ([b] if momentum else []) + ([a] if centered else [])]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("sr", [False, True], ids=["nearest", "stochastic"])
def test_both_kernels_write_the_same_bytes_over_every_binade(dtype, variant, sr):
    """Every code, scale byte and (stochastically) rounded param of the two kernels agrees, over every binade."""
    if sr and dtype == "float32":
        pytest.skip("float32 params store exactly: nothing to round")
    for x, y in zip(_binade_step("triton", dtype, variant, sr), _binade_step("cupy", dtype, variant, sr)):
        assert torch.equal(x, y)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("sr", [False, True], ids=["nearest", "stochastic"])
def test_the_cuda_kernels_sm90_code_packing_writes_the_same_bytes(variant, sr):
    """kernels/rmsprop.cu saturates two codes with one min.u16x2 on sm_90 (Q8_PAIR_MIN), one code at a time before:
    the CPU build with that path (-DRMSPROP_Q8_PAIR_MIN, the compile-time instantiations of the launches) writes
    the same bytes as the default one, over every binade (saturated codes, NaN blocks and the padding included)."""
    from rmsprop_gpu.backends import BACKENDS as BACKEND_OBJECTS
    from tools.cuda_cpu.cpu_module import static_kernel

    cupy = BACKEND_OBJECTS["cupy"]
    saved = dict(cupy._kernels)
    cupy._kernels.clear()
    try:
        want = _binade_step("cupy", "float16", variant, sr)  # the launches' kernels: these keys
        for key in list(cupy._kernels):
            cupy._kernels[key] = static_kernel(key[1], ("RMSPROP_Q8_PAIR_MIN",))
        got = _binade_step("cupy", "float16", variant, sr)
        assert all(k.calls for k in cupy._kernels.values())
    finally:
        cupy._kernels.clear()
        cupy._kernels.update(saved)
    for x, y in zip(want, got):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_optimizer_keeps_8_bit_state_for_large_tensors_only(backend):
    gen = torch.Generator().manual_seed(7)
    big, small = torch.randn(64, 80, generator=gen), torch.randn(4095, generator=gen).bfloat16()
    opt = rmsprop_gpu.RMSprop([big, small], lr=1e-3, momentum=0.9, centered=True, state_bits=8, backend=backend)
    for _ in range(2):
        big.grad, small.grad = torch.randn_like(big), torch.randn_like(small)
        opt.step()
    sb, ss = opt.state[big], opt.state[small]
    for key in quantize.SIGNED:
        assert sb[key].dtype == torch.uint8 and sb[key].shape == (quantize.q8_nbytes(big.numel()),)
        assert ss[key].dtype == torch.bfloat16 and ss[key].shape == small.shape
        assert sb[key].numel() / big.numel() <= 1.0625
    assert quantize.q8_nbytes(4096) / 4096 == 1.0625


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_from_a_checkpoint_is_bit_identical(backend):
    saved = check_resume_is_bit_identical((70, 90), 8, lr=0.01, momentum=0.9, centered=True, backend=backend,
                                          state_bits=8, stochastic_rounding=True, sr_seed=5)
    assert saved["state"][0]["square_avg"].dtype == torch.uint8 and saved["param_groups"][0]["state_bits"] == 8


def test_torch_fp32_state_both_ways():
    """float_state_dict -> torch.optim.RMSprop (decoded state, param shape); a torch checkpoint -> our 8-bit
    optimizer (encoded on load, state_bits kept); float_state_dict into ours (each keeps its state_bits); the
    bytes survive the trip (centered: v = variance + grad_avg^2 in float32 rounds the variance where it is tiny,
    so a few of square_avg's codes may move by one)."""
    gen = torch.Generator().manual_seed(9)
    w = torch.randn(96, 67, generator=gen).t()  # transposed: codes follow memory order, torch's state the shape
    ours = rmsprop_gpu.RMSprop([w], lr=1e-3, momentum=0.9, centered=True, state_bits=8)
    for _ in range(3):
        w.grad = torch.randn(w.shape, generator=gen)
        ours.step()
    sd = rmsprop_gpu.float_state_dict(ours)
    q = ours.state[w]

    def same_bytes(got: dict):
        for key in ("momentum_buffer", "grad_avg"):
            assert torch.equal(got[key], q[key]), key
        codes = got["square_avg"] != q["square_avg"]
        assert codes.float().mean() <= 0.01 and ((got["square_avg"].int() - q["square_avg"].int())[codes].abs()
                                                  <= 1).all()

    for key in quantize.SIGNED:
        x = sd["state"][0][key]
        assert x.dtype == torch.float32 and x.shape == w.shape
    v = quantize.dequantize_state(q["square_avg"], w, "square_avg")  # the variance (centered)
    ga = quantize.dequantize_state(q["grad_avg"], w, "grad_avg")
    torch.testing.assert_close(sd["state"][0]["square_avg"], v + ga * ga, rtol=0, atol=0)  # torch's v
    same_bytes(quantize.q8_state(sd["state"][0], w, centered=True))
    w2 = w.detach().clone().requires_grad_()
    ref = torch.optim.RMSprop([w2], lr=1e-3, momentum=0.9, centered=True)
    ref.load_state_dict(sd)
    plain_torch = {"state": ref.state_dict()["state"], "param_groups": [
        {k: x for k, x in ref.state_dict()["param_groups"][0].items() if k in torch.optim.RMSprop([w2]).defaults
         or k == "params"}]}  # a checkpoint torch.optim.RMSprop wrote itself: none of our options
    back = rmsprop_gpu.RMSprop([w], lr=1e-3, momentum=0.9, centered=True, state_bits=8)
    back.load_state_dict(plain_torch)  # torch's float state, encoded on load
    assert back.param_groups[0]["state_bits"] == 8  # the optimizer's own option, not the default
    same_bytes(back.state[w])
    wide = rmsprop_gpu.RMSprop([w], lr=1e-3, momentum=0.9, centered=True, state_bits=8)
    wide.load_state_dict(ours.state_dict())  # a checkpoint restores its options (state_bits=8): bytes kept
    assert wide.state[w]["square_avg"].dtype == torch.uint8
    wide.load_state_dict(rmsprop_gpu.float_state_dict(ours))  # float state: the optimizer keeps its 8 bits
    assert wide.param_groups[0]["state_bits"] == 8
    same_bytes(wide.state[w])
    wide = rmsprop_gpu.RMSprop([w], lr=1e-3, momentum=0.9, centered=True)
    wide.load_state_dict(rmsprop_gpu.float_state_dict(ours))  # into a 32-bit optimizer: float state as saved
    assert wide.param_groups[0]["state_bits"] == 32
    for key in quantize.SIGNED:
        assert wide.state[w][key].dtype == torch.float32 and wide.state[w][key].shape == w.shape
        torch.testing.assert_close(wide.state[w][key], sd["state"][0][key], rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_complex_params_keep_8_bit_state_of_their_real_view(backend):
    """A complex param is updated as its real view (as torch does): the same bytes as that real tensor's."""
    gen = torch.Generator().manual_seed(13)
    z = torch.randn(2500, dtype=torch.complex64, generator=gen)  # 5000 real elements
    r = torch.view_as_real(z).clone()
    kw = dict(lr=1e-2, momentum=0.9, centered=True, state_bits=8, backend=backend)
    oz, orr = rmsprop_gpu.RMSprop([z], **kw), rmsprop_gpu.RMSprop([r], **kw)
    for _ in range(3):
        z.grad = torch.randn(z.shape, dtype=z.dtype, generator=gen)
        r.grad = torch.view_as_real(z.grad).clone()
        oz.step()
        orr.step()
    assert torch.equal(torch.view_as_real(z), r)
    for key in quantize.SIGNED:
        assert oz.state[z][key].shape == (quantize.q8_nbytes(5000),)
        assert torch.equal(oz.state[z][key], orr.state[r][key]), key
    got, want = rmsprop_gpu.float_state_dict(oz)["state"][0], rmsprop_gpu.float_state_dict(orr)["state"][0]
    for key in quantize.SIGNED:  # torch's complex state: the param's shape and dtype
        assert got[key].dtype == torch.complex64 and got[key].shape == z.shape
        assert torch.equal(torch.view_as_real(got[key]), want[key]), key


def test_initial_accumulator_value_is_encoded():
    w = torch.randn(5000)
    opt = rmsprop_gpu.RMSprop.tf1([w], learning_rate=0.01, state_bits=8)
    w.grad = torch.zeros_like(w)
    pending = {}
    opt._gather(opt.param_groups[0], pending)
    v = quantize.dequantize_state(pending[w]["square_avg"], w, "square_avg")
    assert (v == 1.0).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_training_with_8_bit_state_tracks_32_bit(backend):
    """A small regression net: the loss after 60 steps within 5% of the 32-bit run (evidence: make state-bits)."""
    gen = torch.Generator().manual_seed(10)
    x, w_true = torch.randn(256, 64, generator=gen), torch.randn(64, 96, generator=gen)
    y = torch.tanh(x @ w_true)
    losses = {}
    for bits in (32, 8):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 96))
        opt = rmsprop_gpu.RMSprop(model.parameters(), lr=3e-3, momentum=0.9, state_bits=bits, backend=backend)
        for _ in range(60):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
        losses[bits] = loss.item()
    assert abs(losses[8] - losses[32]) <= 0.05 * losses[32], losses


def test_in_backward_with_8_bit_state_equals_step():
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(32, 80, generator=gen)
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(80, 96), torch.nn.ReLU(), torch.nn.Linear(96, 64))
    b = copy.deepcopy(a)
    kw = dict(lr=1e-3, momentum=0.9, centered=True, state_bits=8)
    oa = rmsprop_gpu.RMSprop(a.parameters(), **kw)
    ob = rmsprop_gpu.RMSprop(b.parameters(), in_backward=True, bucket_mb=1e-4, **kw)  # a bucket per param
    for _ in range(3):
        oa.zero_grad()
        a(x).square().mean().backward()
        oa.step()
        b(x).square().mean().backward()
        ob.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
        for key, s in oa.state[p].items():
            assert torch.equal(s, ob.state[q][key]), key


def test_refusals_are_clear():
    for bad in (16, 4, "8", True):
        with pytest.raises(ValueError, match="state_bits"):
            rmsprop_gpu.RMSprop([torch.randn(8)], state_bits=bad)
    with pytest.raises(ValueError, match="state_bits=8"):
        rmsprop_gpu.RMSprop([torch.randn(8)], state_bits=8, differentiable=True)
    w = torch.randn(5000, dtype=torch.float64)
    opt = rmsprop_gpu.RMSprop([w], state_bits=8)
    w.grad = torch.randn_like(w)
    with pytest.raises(ValueError, match="float64"):
        opt.step()
    assert opt.state == {}  # nothing created, nothing written
    p, g = torch.randn(5000), torch.randn(5000)
    with pytest.raises(ValueError, match="needs a contiguous 1-D tensor of 5321 bytes"):
        rmsprop([p], [g], [torch.zeros(5000, dtype=torch.uint8)])
    with pytest.raises(ValueError, match="8-bit state"):
        rmsprop([p.double()], [g.double()], [quantize.zeros_state(p)])
    sd = rmsprop_gpu.RMSprop([p], state_bits=8).state_dict()
    sd["state"] = {0: {"step": torch.tensor(1.0), "square_avg": torch.zeros(17, dtype=torch.uint8)}}
    with pytest.raises(ValueError, match="8-bit state of shape"):
        rmsprop_gpu.RMSprop([p], state_bits=8).load_state_dict(sd)


@pytest.mark.parametrize("backend", ["torch", "cupy"])
def test_compiled_step_with_8_bit_state_equals_eager(backend):
    """torch.compile(opt.step, fullgraph=True): the uint8 state goes through the custom op like float state."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()  # earlier tests' compiled steps count against dynamo's recompile limit for step()
    gen = torch.Generator().manual_seed(12)
    a = [torch.randn(80, 70, generator=gen), torch.randn(9, generator=gen)]
    b = [p.clone() for p in a]
    kw = dict(lr=0.01, momentum=0.9, centered=True, backend=backend, state_bits=8)
    ours, ref = rmsprop_gpu.RMSprop(a, **kw), rmsprop_gpu.RMSprop(b, **kw)
    counter = CompileCounterWithBackend("aot_eager")
    step = torch.compile(ours.step, fullgraph=True, backend=counter)
    for i in range(4):
        for p, q in zip(a, b):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        step()
        ref.step()
        if i == 1:  # the first step creates state, the second compiles the steady graph
            frames = counter.frame_count
    assert counter.frame_count == frames  # no recompile per step
    assert ours.state[a[0]]["square_avg"].dtype == torch.uint8
    for p, q in zip(a, b):
        assert torch.equal(p, q)
        for key, s in ours.state[p].items():
            assert torch.equal(s, ref.state[q][key]), key
