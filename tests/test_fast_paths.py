"""The 8-bit chunk's grouped fast paths for sqrt.rn and div.rn (kernels/rmsprop.cu: sqrt_rn_all, div_rn_all;
kernels/rmsprop.py: _root_quotient8_asm) give the correctly rounded results in the range their test admits, and
Triton's code encoding asm (_q8_encode4_asm, which only a GPU runs: the interpreter takes its Triton twin) writes
the codes of the spec.

No GPU runs them here (the CPU build of the CUDA C divides on the host, the interpreter takes Triton's sqrt_rn and
div_rn), so this file runs the kernels' own PTX text with exact arithmetic: each rounding is done on rationals and
the results must equal the exactly rounded root and quotient. rsqrt.approx is taken anywhere within an ulp of the
exact value (its documented bound): the root's correction absorbs that. The division's sequence is the one ptxas
emits for each div.rn.f32 (after its FCHK range check): with a reciprocal an ulp off it can miss (1 / (2 - 2^-23)
when rcp gives 0.5), so it relies on the hardware's rcp.approx being better where that matters, as ptxas's own
div.rn does; here rcp.approx is taken correctly rounded. The range tests are checked at their boundaries."""

import math
import random
import re
from fractions import Fraction as Q
from pathlib import Path

import numpy as np
import pytest
from rmsprop_gpu.kernels import rmsprop as triton_kernel
from rmsprop_gpu.kernels.rmsprop import _q8_encode4_asm, _root_quotient8_asm, _sqrt8_asm

CU = Path(triton_kernel.__file__).with_name("rmsprop.cu")


def rn32(x: Q) -> float:
    """x rounded to the nearest float32, ties to even (subnormals included; the fast paths never overflow)."""
    if x == 0:
        return 0.0
    a = abs(x)
    e = a.numerator.bit_length() - a.denominator.bit_length()
    while a >= Q(2) ** (e + 1):
        e += 1
    while a < Q(2) ** e:
        e -= 1
    e = max(e, -126)  # below: the subnormals' spacing, 2^-149
    assert e <= 127, "overflow"
    scaled = a / Q(2) ** (e - 23)
    m, rest = divmod(scaled.numerator, scaled.denominator)
    if 2 * rest > scaled.denominator or (2 * rest == scaled.denominator and m % 2):
        m += 1
    return math.copysign(math.ldexp(m, e - 23), x)


def ulps(x: float, k: int) -> float:
    y = np.float32(x)
    for _ in range(abs(k)):
        y = np.nextafter(y, np.float32(np.inf if k > 0 else 0))
    return float(y)


def rn_sqrt(x: float) -> float:
    c = float(np.float32(math.sqrt(x)))
    return min((ulps(c, k) for k in (-1, 0, 1)), key=lambda r: abs(Q(r) ** 2 - Q(x)))


def run_ptx(lines: list[str], regs: dict, rcp_ulps: int, rsqrt_ulps: int) -> dict:
    """The fast paths' instructions on float32 values, each rounding exact."""
    def val(op):
        op = op.strip()
        if op.startswith("0f"):
            return float(np.frombuffer(bytes.fromhex(op[2:])[::-1], np.float32)[0])
        return regs[op]

    for line in lines:
        m = re.match(r"([\w.]+)\s+(.*?);?$", line.strip())
        if not m:
            continue
        op, args = m.group(1), [a.strip() for a in m.group(2).rstrip(";").split(",")]
        src = [val(a) for a in args[1:]]
        if op in ("mul.f32", "mul.rn.f32", "fma.rn.f32", "add.rn.f32") and 0.0 in src[:2]:  # signed zeros (and
            # a zero product's sum): IEEE's signs, which exact rationals drop
            prod = src[0] * src[1] if op != "add.rn.f32" else src[0]
            rest = src[2] if op == "fma.rn.f32" else src[1] if op == "add.rn.f32" else None
            out = prod if rest is None else prod + rest if prod == 0.0 and rest == 0.0 else rn32(Q(prod) + Q(rest))
        elif op == "rcp.approx.ftz.f32":
            out = ulps(rn32(1 / Q(src[0])), rcp_ulps)
        elif op == "rsqrt.approx.ftz.f32":
            out = ulps(float(np.float32(1 / math.sqrt(src[0]))), rsqrt_ulps)
        elif op == "neg.f32":
            out = -src[0]
        elif op in ("mul.f32", "mul.rn.f32"):
            out = rn32(Q(src[0]) * Q(src[1]))
        elif op == "add.rn.f32":
            out = rn32(Q(src[0]) + Q(src[1]))
        elif op == "fma.rn.f32":
            out = rn32(Q(src[0]) * Q(src[1]) + Q(src[2]))
        elif op == "mov.b32":
            out = src[0]
        else:
            raise AssertionError(f"not a fast-path instruction: {line}")
        regs[args[0]] = out
    return regs


def cuda_division() -> list[str]:
    """div_rn_fast's asm text from kernels/rmsprop.cu."""
    body = CU.read_text().split("float div_rn_fast(float n, float d)")[1].split("#else")[0]
    text = "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', body.split("asm(")[1].split(":")[0]))
    return [s for s in text.replace("\\n", "\n").replace("\\t", "").splitlines() if s and "{" not in s
            and "}" not in s and not s.startswith(".reg")]


def triton_fast_path(add_eps: bool) -> list[str]:
    """The fast branch of _root_quotient8_asm for the first of its 8 values ($0 root, $8 quotient)."""
    asm = _root_quotient8_asm(add_eps, False, "f32")
    fast = asm.split("bra ROOTQ_SLOW_${:uid};\n")[1].split("bra.uni")[0].splitlines()
    return fast[:fast.index(next(s for s in fast if s.startswith("fma.rn.f32 $8,"))) + 1]


def loguniform(rng, lo, hi):
    return float(np.float32(math.ldexp(1 + rng.getrandbits(23) / 2**23, rng.randint(lo, hi))))


RSQRT_ULPS = (-1, 0, 1)  # the root estimate off by up to an ulp either way (the reciprocal's: see above)


def test_the_cuda_division_is_correctly_rounded_in_its_range():
    """d in [2^-51, 1.5 * 2^64] (a root of at most 2^64 plus an eps of at most 2^63), n 0 or in +-[2^-60, 2^68), the
    ends included; n = -0 gives -0 (the remainder is taken negated)."""
    lines = cuda_division()
    assert any("rcp.approx" in s for s in lines) and len(lines) >= 6
    rng = random.Random(0)
    d_max = math.ldexp(1.5, 64)
    top = float(np.nextafter(np.float32(2.0**68), np.float32(0)))
    cases = [(math.ldexp(1, -60), d_max), (top, math.ldexp(1, -51)), (-top, d_max),
             (math.ldexp(1, -60), math.ldexp(1, -51)), (0.0, 1.0), (-0.0, 3.0), (-0.0, d_max), (0.0, 2.0**-51)]
    for _ in range(1500):
        n = loguniform(rng, -60, 67) * rng.choice((-1, 1))
        d = loguniform(rng, -51, 63)
        if rng.random() < 0.3:  # mantissas of all ones, where the reciprocal's rounding is tightest
            d = float(np.float32(math.ldexp(2 - 2**-23 * rng.randint(1, 4), rng.randint(-51, 63))))
        if rng.random() < 0.2:
            n = math.copysign(math.ldexp(1, rng.randint(-60, 67)), n)
        cases.append((n, d))
    for n, d in cases:
        got = run_ptx(lines, {"%1": n, "%2": d}, 0, 0)["%0"]
        want = math.copysign(rn32(Q(n) / Q(d)), n)
        assert (got, math.copysign(1, got)) == (want, math.copysign(1, want)), (n, d)


@pytest.mark.parametrize("add_eps", [True, False])
def test_the_triton_root_and_quotient_are_correctly_rounded_in_their_range(add_eps):
    """x in [2^-96, 2^32), n 0 or in +-[2^-61, 2^68), eps in [0, 2^63], the ends included; n = -0 gives -0."""
    lines = triton_fast_path(add_eps)
    rng = random.Random(1)
    for i in range(500):
        x = loguniform(rng, -96, 31) if i else math.ldexp(1, -96)
        if i % 3 == 1:  # mantissas of all ones
            x = float(np.float32(math.ldexp(2 - 2**-23 * rng.randint(1, 4), rng.randint(-96, 31))))
        n = loguniform(rng, -61, 67) * rng.choice((-1, 1))
        if i % 50 == 2:
            n = rng.choice((0.0, -0.0, math.ldexp(1, -61), -float(np.nextafter(np.float32(2.0**68), np.float32(0)))))
        eps = rng.choice((0.0, 1e-8, 1e-3, 1.0, math.ldexp(1, 63))) if add_eps else 0.0
        root = rn_sqrt(x)
        d = rn32(Q(root) + Q(eps)) if add_eps else root
        want = math.copysign(rn32(Q(n) / Q(d)), n)
        for s in RSQRT_ULPS:
            regs = run_ptx(lines, {"$16": x, "$24": n, "$32": eps}, 0, s)
            got = regs["$8"]
            assert (regs["$0"], got, math.copysign(1, got)) == (root, want, math.copysign(1, want)), (x, n, eps, s)


def bits(x: float) -> int:
    return int(np.float32(x).view(np.uint32))


def below(x: float) -> float:
    return float(np.nextafter(np.float32(x), np.float32(0)))


def test_the_cuda_range_tests_admit_exactly_the_fast_paths_range():
    """CUDA C: x's bits - lo ORed below 2^30 (sqrt_rn_all: x in [2^-96, 2^32)), 2|n|'s bits - c ORed below 2^31
    (div_rn_all: |n| in [2^-60, 2^68)); the slow path's roots of max(x, 0) when the caller asks."""
    cu = CU.read_text()
    sqrt_all = cu.split("bool sqrt_rn_all(")[1].split("\n}\n")[0]
    div_all = cu.split("void div_rn_all(")[1].split("\n}\n")[0]
    x_lo = int(re.search(r"__float_as_uint\(x\[k\]\) - (0x[0-9A-F]+)u;", sqrt_all).group(1), 16)
    x_width = int(re.search(r"out >= (0x[0-9A-F]+)u;", sqrt_all).group(1), 16)
    c = int(re.search(r"__float_as_uint\(n\[k\]\) \* 2u - (0x[0-9A-F]+)u;", div_all).group(1), 16)
    n_width = int(re.search(r"out >= (0x[0-9A-F]+)u", div_all).group(1), 16)
    assert "clamp ? clamp0_nan(x[k]) : x[k]" in sqrt_all
    for x in (math.ldexp(1, -96), below(2.0**-96), below(2.0**32), 2.0**32, 1.0, 0.0, -0.0, -1e-30, 1e-40,
              float("inf"), float("nan"), 3.4e38):
        assert (((bits(x) - x_lo) % 2**32) < x_width) == (2.0**-96 <= x < 2.0**32), x
    lo, hi = math.ldexp(1, -60), math.ldexp(1, 68)
    for n in (0.0, -0.0, lo, -lo, below(hi), -below(hi), hi, -hi, below(lo), 1.0, -3.5, float("inf"),
              float("nan"), 1e-40):
        assert (((bits(n) * 2 - c) % 2**32) < n_width) == (lo <= abs(n) < hi), n


@pytest.mark.parametrize("n_test", ["f32", "none", "bf16"])
@pytest.mark.parametrize("add_eps,clamp", [(True, False), (False, False), (True, True)], ids=["eps", "eps_in", "clamp"])
def test_the_triton_range_tests_admit_exactly_the_fast_paths_range(add_eps, clamp, n_test):
    """Each window by an OR of offset bits: x - lo below 2^30 (x in [2^-96, 2^32)), 2|n| + c below 2^31 (|n| in
    [2^-60, 2^68)), no test of n (fp16 grads) or two bf16 grads per register (the next test); eps by its bits.
    clamp: the slow path's roots are of max(x, 0)."""
    asm = _root_quotient8_asm(add_eps, clamp, n_test)
    x_lo = int(re.search(r"sub\.u32 u0, \$16, (0x[0-9A-F]+)", asm).group(1), 16)
    x_width = int(re.search(r"setp\.ge\.u32 slow, m, (0x[0-9A-F]+)", asm).group(1), 16)
    eps_reg = 36 if n_test == "bf16" else 32
    eps_max = int(re.search(rf"setp\.gt\.u32 bad, \${eps_reg}, (0x[0-9A-F]+)", asm).group(1), 16)
    assert asm.count("or.b32 m,") == {"f32": 14, "none": 7, "bf16": 10}[n_test] and asm.count("sub.u32") == 8
    assert all(f"${eps_reg}" in line for line in asm.splitlines() if line.startswith("add.rn.f32 d"))
    for x in (math.ldexp(1, -96), below(2.0**-96), below(2.0**32), 2.0**32, 1.0, 0.0, -0.0, -1e-30, 1e-40,
              float("inf"), float("nan"), 3.4e38):
        assert (((bits(x) - x_lo) % 2**32) < x_width) == (2.0**-96 <= x < 2.0**32), x
    if n_test == "f32":
        n_add = int(re.search(r"mad\.lo\.u32 u0, \$24, 2, (0x[0-9A-F]+)", asm).group(1), 16)
        n_width = int(re.search(r"setp\.ge\.u32 bad, m, (0x[0-9A-F]+)", asm).group(1), 16)
        lo, hi = math.ldexp(1, -60), math.ldexp(1, 68)
        for n in (0.0, -0.0, lo, -lo, below(hi), -below(hi), hi, -hi, below(lo), 1.0, -3.5, float("inf"),
                  float("nan"), 1e-40):
            assert (((bits(n) * 2 + n_add) % 2**32) < n_width) == (lo <= abs(n) < hi), n
    else:
        assert "$24, 2," not in asm and ("$32, 2," in asm) == (n_test == "bf16")
    for eps in (0.0, 1e-8, math.ldexp(1, 63), float(np.nextafter(np.float32(2.0**63), np.float32(np.inf))), -0.0,
                -1e-8, float("nan"), float("inf")):
        assert (bits(eps) <= eps_max) == (eps >= 0 and eps <= 2.0**63 and math.copysign(1, eps) > 0), eps
    slow = asm.split("ROOTQ_SLOW_${:uid}:")[1]
    roots = re.findall(r"sqrt\.rn\.f32 \$(\d+), (\S+);", slow)
    assert len(roots) == 8 and all(src == ("d" if clamp else f"${16 + int(k)}") for k, src in roots)
    assert slow.count("max.NaN.f32 d, $") == (8 if clamp else 0)


def test_the_bf16_grads_test_admits_the_window_two_at_a_time():
    """n_test "bf16": 2|h| + 0xBD00 for both halves of a register by one mad, each half's top bit tested. Over
    every high half and a spread of low halves (signs, the window's ends, zeros, inf/NaN): admitted pairs have both
    |h| in [2^-60, 2^68) but the high one may be 0x217F (in the fast path's range, [2^-61, 2^68)), and every pair in
    the window is admitted but a high 0x617F."""
    asm = _root_quotient8_asm(True, False, "bf16")
    add = int(re.search(r"mad\.lo\.u32 u0, \$32, 2, (0x[0-9A-F]+)", asm).group(1), 16)
    mask = int(re.search(r"and\.b32 m, m, (0x[0-9A-F]+)", asm).group(1), 16)
    hi = np.arange(2**16, dtype=np.uint64)
    lo_mags = [0, 1, 0x2100, 0x217F, 0x2180, 0x2181, 0x3F80, 0x617F, 0x6180, 0x7F80, 0x7FC0, 0x7FFF]
    lo_mags += list(range(0x2180, 0x6180, 97))

    def win(h):  # |h| in [2^-60, 2^68)
        return ((h & 0x7FFF) >= 0x2180) & ((h & 0x7FFF) < 0x6180)

    hi_mag = hi & 0x7FFF
    for lo in [m | s for m in lo_mags for s in (0, 0x8000)]:
        w = (hi << 16) | lo
        admitted = (((w * 2 + add) % 2**32) & mask) == 0
        assert not (admitted & ~(win(hi) | (hi_mag == 0x217F))).any() and (not admitted.any() or win(lo)), lo
        assert (admitted | ~win(hi) | (hi_mag == 0x617F)).all() or not win(lo), lo


def test_the_triton_roots_alone_take_the_same_window():
    """_sqrt8_asm (the roots of other values: bias correction, eps inside the root) tests x's window as
    _root_quotient8_asm does, on its inputs $8..$15, and its slow path takes sqrt.rn of each."""
    asm = _sqrt8_asm()
    x_lo = int(re.search(r"sub\.u32 u0, \$8, (0x[0-9A-F]+)", asm).group(1), 16)
    x_width = int(re.search(r"setp\.ge\.u32 slow, m, (0x[0-9A-F]+)", asm).group(1), 16)
    assert asm.count("or.b32 m,") == 7 and [f"${8 + k}" for k in range(8)] == re.findall(r"sub\.u32 u\d, (\S+),", asm)
    for x in (math.ldexp(1, -96), below(2.0**-96), below(2.0**32), 2.0**32, 1.0, 0.0, -1e-30, float("inf"),
              float("nan")):
        assert (((bits(x) - x_lo) % 2**32) < x_width) == (2.0**-96 <= x < 2.0**32), x
    slow = asm.split("SQRT_SLOW_${:uid}:")[1]
    assert re.findall(r"sqrt\.rn\.f32 \$(\d+), \$(\d+);", slow) == [(str(k), str(8 + k)) for k in range(8)]


def f16_values() -> np.ndarray:
    return np.arange(2**16, dtype=np.uint16).view(np.float16).astype(np.float32)


def test_fp16_grads_need_no_range_test():
    """_update's N_F16: every finite fp16 but 0 is in the quotient's range, and an inf/NaN grad makes the variance
    inf/NaN (outside x's window, so the slow path divides), whatever alpha, the old average and centering."""
    g = f16_values()
    finite = g[np.isfinite(g) & (g != 0)]
    assert np.abs(finite).min() >= 2.0**-60 and np.abs(finite).max() < 2.0**68
    for bad in (np.inf, -np.inf, np.nan):
        g = np.float32(bad)
        for alpha in (0.0, 0.5, 0.99, 1.0, 2.0):
            a, one_minus = np.float32(alpha), np.float32(1 - alpha)
            for v_old in (0.0, 1e-30, 1.0, 3e38):
                v = a * np.float32(v_old) + (one_minus * g) * g  # _update's order
                for ga_old in (None, 0.0, -2.0):  # centered: var = v - ga^2 (clamped: NaN stays NaN)
                    var = v
                    if ga_old is not None:
                        ga = np.float32(ga_old) + one_minus * (g - np.float32(ga_old))
                        var = var - ga * ga
                    assert not (2.0**-96 <= var < 2.0**32), (bad, alpha, v_old, ga_old, var)


def run_int_ptx(asm: str, inputs: list[int]) -> int:
    """The integer and float32 instructions of an encode asm block on 32-bit values ($1.. = inputs), exactly:
    float32 products rounded once by numpy (IEEE, subnormals kept), prmt in its default mode."""
    regs = {f"${k + 1}": v for k, v in enumerate(inputs)}

    def val(op):
        if op.startswith("0f"):
            return int(op[2:], 16)
        return int(op, 0) if op[0].isdigit() else regs[op]

    def f32(bits):
        return np.array([bits], np.uint32).view(np.float32)[0]

    for line in asm.splitlines():
        m = re.match(r"([\w.]+)\s+(.*);$", line.strip())
        if not m or m.group(1) == ".reg":
            continue
        op, args = m.group(1), [a.strip() for a in m.group(2).split(",")]
        src = [val(a) for a in args[1:]]
        if op == "abs.f32":
            out = src[0] & 0x7FFFFFFF
        elif op == "mul.rn.f32":
            out = int(np.array([f32(src[0]) * f32(src[1])], np.float32).view(np.uint32)[0])
        elif op == "shr.b32":
            out = src[0] >> src[1]
        elif op == "add.u32":
            out = (src[0] + src[1]) & 0xFFFFFFFF
        elif op == "min.u32":
            out = min(src[0], src[1])
        elif op == "and.b32":
            out = src[0] & src[1]
        elif op == "or.b32":
            out = src[0] | src[1]
        elif op == "prmt.b32":
            pool = (src[1] << 32 | src[0]).to_bytes(8, "little")
            out = 0
            for k in range(4):
                sel = (src[2] >> 4 * k) & 0xF
                b = pool[sel & 7]
                out |= ((0xFF if b & 0x80 else 0) if sel & 8 else b) << 8 * k
        else:
            raise AssertionError(f"not an encode instruction: {line}")
        regs[args[0]] = out
    return regs["$0"]


@pytest.mark.parametrize("one_mul", [True, False], ids=["one_mul", "two_mul"])
@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_the_triton_encode_asm_writes_the_specified_codes(signed, one_mul):
    """Four codes per asm call, byte k = value k: the magnitude times 2^(15 - s) (one multiply, or 2^(127 - s) then
    2^-112), rounded with 16 random bits at the top of the dropped field (19 bits unsigned, 20 signed), saturated,
    the sign on top; all zeros for a masked (inf/NaN) block. The expected codes take the older formulation (the
    dropped field's low bits cleared, r << SH added), not the asm's sum, over scales, binades, zeros, ties and
    saturation."""
    asm = _q8_encode4_asm(signed, one_mul)
    rng = np.random.default_rng(3)
    sh, top = (4, 127) if signed else (3, 255)
    for _ in range(3000):
        s = int(rng.integers(1, 165 if one_mul else 254))
        f = np.float32(2.0 ** (15 - s)) if one_mul else np.float32(2.0 ** (127 - s))
        # values up to the block's maximum binade [2^(s-127), 2^(s-126)), down past the smallest codes
        x = (rng.choice([-1, 1], 4) * np.exp2(rng.uniform(-30, 1, 4)) * 2.0 ** (s - 127)).astype(np.float32)
        x[rng.random(4) < 0.1] = 0.0
        x[rng.random(4) < 0.05] = np.float32(2.0 ** (s - 126)) * np.float32(1 - 2**-24)  # the top: saturates
        r = rng.integers(0, 2**16, 4)
        keep = 0 if rng.random() < 0.05 else 0xFFFFFFFF
        xb = [int(v) for v in x.view(np.uint32)]
        limit = [keep & (0x007FFFFF if signed else 0x00FFFFFF)] * 4  # the largest sum with the byte's code; 0 masks
        got = run_int_ptx(asm, xb + [int(v) for v in r] + [int(np.array([f], np.float32).view(np.uint32)[0])] * 4
                          + limit + ([keep & 0x80808080] * 4 if signed else []))
        y = np.abs(x) * f if one_mul else (np.abs(x) * f) * np.float32(2.0**-112)
        want = 0
        for k in range(4):
            yb = int(np.float32(y[k]).view(np.uint32))
            c = min(((yb & ~((1 << sh) - 1)) + (int(r[k]) << sh)) >> (16 + sh), top)
            if signed and xb[k] >> 31:
                c |= 0x80
            want |= c << 8 * k
        assert got == want & keep, (s, x, r)
