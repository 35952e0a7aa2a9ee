"""Fused multi-tensor RMSprop step in Triton: one launch updates every tensor of a group in one pass.

Contract (shared with kernels/rmsprop.cu, filled by rmsprop_gpu/backends/_tables.py): the tensor table, the block
list and the hyper table of rmsprop_gpu/abi.py, whose constants (columns, flag bits) are this module's constexprs.
Hyperparameters are values in the hyper table (a new lr/alpha/eps never compiles a new kernel); the switches
that change what is read or computed are the constexpr FLAGS (bits of abi.FLAGS) and the layout. Math is
float32; stores round to nearest even.
NATIVE_BF16 is False only under the interpreter (TRITON_INTERPRET=1), whose bf16 cast truncates.
S_DTYPE uint8 is 8-bit blockwise state (state_bits=8): decoded and encoded per block of 16 elements
(_update_chunk_q8; the format: rmsprop_gpu/quantize.py).
"""

import os

import triton
import triton.language as tl

from rmsprop_gpu import abi

# the kernel ABI (rmsprop_gpu/abi.py) as constexprs: flag bits (a launch's FLAGS), table columns
MAXIMIZE: tl.constexpr = tl.constexpr(abi.FLAGS["MAXIMIZE"])
WEIGHT_DECAY: tl.constexpr = tl.constexpr(abi.FLAGS["WEIGHT_DECAY"])
EPS_IN_SQRT: tl.constexpr = tl.constexpr(abi.FLAGS["EPS_IN_SQRT"])
LR_ON_DEVICE: tl.constexpr = tl.constexpr(abi.FLAGS["LR_ON_DEVICE"])
GRAD_SCALE: tl.constexpr = tl.constexpr(abi.FLAGS["GRAD_SCALE"])
FOUND_INF: tl.constexpr = tl.constexpr(abi.FLAGS["FOUND_INF"])
LR_IN_MOMENTUM: tl.constexpr = tl.constexpr(abi.FLAGS["LR_IN_MOMENTUM"])
NESTEROV: tl.constexpr = tl.constexpr(abi.FLAGS["NESTEROV"])
DECOUPLED_WD: tl.constexpr = tl.constexpr(abi.FLAGS["DECOUPLED_WD"])
BIAS_CORRECTION: tl.constexpr = tl.constexpr(abi.FLAGS["BIAS_CORRECTION"])
STOCHASTIC_ROUNDING: tl.constexpr = tl.constexpr(abi.FLAGS["STOCHASTIC_ROUNDING"])
RAW_GRAD_MOMENTUM: tl.constexpr = tl.constexpr(abi.FLAGS["RAW_GRAD_MOMENTUM"])
COL_P: tl.constexpr = tl.constexpr(abi.COL["P"])
COL_G: tl.constexpr = tl.constexpr(abi.COL["G"])
COL_V: tl.constexpr = tl.constexpr(abi.COL["V"])
COL_BUF: tl.constexpr = tl.constexpr(abi.COL["BUF"])
COL_GRAD_AVG: tl.constexpr = tl.constexpr(abi.COL["GRAD_AVG"])
COL_STEP: tl.constexpr = tl.constexpr(abi.COL["STEP"])
COL_NUMEL: tl.constexpr = tl.constexpr(abi.COL["NUMEL"])
COL_SLOT: tl.constexpr = tl.constexpr(abi.COL["SLOT"])
ROW: tl.constexpr = tl.constexpr(abi.ROW)
HYPER_ROW: tl.constexpr = tl.constexpr(abi.HYPER_ROW)
H_LR: tl.constexpr = tl.constexpr(abi.H["LR"])
H_ALPHA: tl.constexpr = tl.constexpr(abi.H["ALPHA"])
H_ONE_MINUS_ALPHA: tl.constexpr = tl.constexpr(abi.H["ONE_MINUS_ALPHA"])
H_EPS: tl.constexpr = tl.constexpr(abi.H["EPS"])
H_WEIGHT_DECAY: tl.constexpr = tl.constexpr(abi.H["WEIGHT_DECAY"])
H_MOMENTUM: tl.constexpr = tl.constexpr(abi.H["MOMENTUM"])
H_SIGN: tl.constexpr = tl.constexpr(abi.H["SIGN"])
H_SEED: tl.constexpr = tl.constexpr(abi.H_SEED)
SLOT_MASK: tl.constexpr = tl.constexpr(abi.SLOT_MASK)
STEP_F64_BIT: tl.constexpr = tl.constexpr(abi.STEP_F64_BIT)


def _interpreter_fma_rounds_twice() -> bool:
    """Triton's interpreter before 3.9 computes tl.fma as a multiply, then an add (compiled code has a real FMA)."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        return False
    from triton.runtime import interpreter

    return not hasattr(getattr(interpreter, "_interpreter", None), "fma_fp32")


# under such an interpreter the FMA is computed in float64, where a product of float32s is exact
_FMA_IN_FLOAT64: tl.constexpr = tl.constexpr(_interpreter_fma_rounds_twice())


_INTERPRETED: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


def _sqrt_fast_ptx(out: str, x: str) -> str:
    """The fast path ptxas emits for sqrt.rn.f32 (kernels/rmsprop.cu: sqrt_rn_fast), for x in [2^-101, the largest
    float]: rsqrt, then one FMA correction (registers r, s, h, e)."""
    return (f"rsqrt.approx.ftz.f32 r, {x};\nmul.f32 s, {x}, r;\nmul.f32 h, r, 0f3F000000;\nneg.f32 e, s;\n"
            f"fma.rn.f32 e, e, s, {x};\nfma.rn.f32 {out}, e, h, s;\n")


def _x_window_ptx(first: int) -> str:
    """Sets `slow` when any of the 8 values $first.. (bits) is outside [2^-96, 2^32), the window of 2^30 bit
    patterns (0x0F800000 ..) within sqrt_rn_fast's range: their offset bits ORed are below 2^30 exactly when all
    are in it, 1.5 instructions per value where a max chain takes 2 (kernels/rmsprop.cu: sqrt_rn_all). Uses
    registers u0..u7 and m."""
    return ("".join(f"sub.u32 u{k}, ${first + k}, 0x0F800000;\n" for k in range(8)) + "or.b32 m, u0, u1;\n"
            + "".join(f"or.b32 m, m, u{k};\n" for k in range(2, 8)) + "setp.ge.u32 slow, m, 0x40000000;\n")


_WINDOW_REGS = ", ".join(f"u{k}" for k in range(8))


def _sqrt8_asm() -> str:
    """PTX for sqrt.rn of a thread's 8 values ($8..$15 -> $0..$7, as bits) with one range test and branch
    (_x_window_ptx): the fast path ptxas emits for each sqrt.rn.f32 (kernels/rmsprop.cu: sqrt_rn_fast,
    sqrt_rn_all), else sqrt.rn for all 8."""
    fast = "".join(_sqrt_fast_ptx(f"${k}", f"${8 + k}") for k in range(8))
    slow = "".join(f"sqrt.rn.f32 ${k}, ${8 + k};\n" for k in range(8))
    return ("{\n.reg .pred slow;\n.reg .b32 m, r, s, h, e, " + _WINDOW_REGS + ";\n" + _x_window_ptx(8)
            + "@slow bra SQRT_SLOW_${:uid};\n" + fast + "bra.uni SQRT_DONE_${:uid};\nSQRT_SLOW_${:uid}:\n" + slow
            + "SQRT_DONE_${:uid}:\n}")


_SQRT8_ASM: tl.constexpr = tl.constexpr(_sqrt8_asm())


def _root_quotient8_asm(add_eps: bool, clamp: bool, n_test: str) -> str:
    """PTX for a thread's 8 roots and quotients with one range test and branch (kernels/rmsprop.cu: sqrt_rn_all,
    div_rn_all): $0..$7 = sqrt.rn(x), $8..$15 = n / d rounded to nearest, d = root + eps (add_eps) or root, from
    x $16..$23, n $24..$31, eps $32 (bits; $36 with n_test "bf16"). Fast path for x in [2^-96, 2^32)
    (_x_window_ptx), n 0 or in +-[2^-61, 2^68) and eps in [0, 2^63] (div_rn_fast's range), else sqrt.rn and div.rn
    for all 8. n's range is a window of 2^31 patterns of 2|n|'s bits, tested by an OR as x's.
    clamp: x below 0 counts as 0 (max.NaN: NaN stays NaN), on the slow path only (the fast path's x is positive).
    n_test: "f32" tests |n| in [2^-60, 2^68); "none": the caller knows n is in range, 0, or inf/NaN only where x is
    inf/NaN (the slow path's): an fp16 grad as loaded (_update); "bf16": n is a bf16 grad as loaded, also given as
    $32..$35 (two per register, element 2j low): 2|h| + 0x..BD00 for both halves of a register at once, each
    half's top bit tested (the low half's carry and sign may add 2 to the high half's sum, which is even: the only
    change is |h| = 0x217F, just below 2^-60, also admitted, and 0x617F, just below 2^68, not).
    The residual is taken negated, d * y - n, so that n = -0 gives -0 as div.rn does (n - d * y is +0 for either
    zero; for every other n the two residuals are exact negations)."""
    e = 36 if n_test == "bf16" else 32
    test = _x_window_ptx(16)
    if n_test == "f32":
        test += ("".join(f"mad.lo.u32 u{k}, ${24 + k}, 2, 0xBD000000;\n" for k in range(8)) + "or.b32 m, u0, u1;\n"
                 + "".join(f"or.b32 m, m, u{k};\n" for k in range(2, 8))
                 + "setp.ge.u32 bad, m, 0x80000000;\nor.pred slow, slow, bad;\n")
    elif n_test == "bf16":
        test += ("".join(f"mad.lo.u32 u{k}, ${32 + k}, 2, 0xBD00BD00;\n" for k in range(4))
                 + "or.b32 m, u0, u1;\nor.b32 m, m, u2;\nor.b32 m, m, u3;\nand.b32 m, m, 0x80008000;\n"
                 "setp.ne.u32 bad, m, 0;\nor.pred slow, slow, bad;\n")
    test += f"setp.gt.u32 bad, ${e}, 0x5F000000;\nor.pred slow, slow, bad;\n"
    denom = (lambda k: f"add.rn.f32 d, ${k}, ${e};\n") if add_eps else (lambda k: f"mov.b32 d, ${k};\n")
    fast = "".join(
        _sqrt_fast_ptx(f"${k}", f"${16 + k}") + denom(k)
        + f"rcp.approx.ftz.f32 r, d;\nneg.f32 t, d;\nfma.rn.f32 e, t, r, 0f3F800000;\nfma.rn.f32 r, r, e, r;\n"
        f"mul.rn.f32 y, ${24 + k}, r;\nneg.f32 t, ${24 + k};\nfma.rn.f32 e, d, y, t;\nneg.f32 e, e;\n"
        f"fma.rn.f32 ${8 + k}, e, r, y;\n"
        for k in range(8))
    root = (lambda k: f"max.NaN.f32 d, ${16 + k}, 0f00000000;\nsqrt.rn.f32 ${k}, d;\n") if clamp else (
        lambda k: f"sqrt.rn.f32 ${k}, ${16 + k};\n")
    slow = "".join(root(k) + denom(k) + f"div.rn.f32 ${8 + k}, ${24 + k}, d;\n" for k in range(8))
    return ("{\n.reg .pred slow, bad;\n.reg .b32 m, r, s, h, e, t, y, d, " + _WINDOW_REGS + ";\n" + test
            + "@slow bra ROOTQ_SLOW_${:uid};\n" + fast + "bra.uni ROOTQ_DONE_${:uid};\nROOTQ_SLOW_${:uid}:\n" + slow
            + "ROOTQ_DONE_${:uid}:\n}")


# _root_quotient's choices: (add eps, clamp x at 0) x n's test (f32, none: fp16 grads, bf16 grads packed)
_ROOT_QUOTIENT8_ASM: tl.constexpr = tl.constexpr(_root_quotient8_asm(True, False, "f32"))
_ROOT_QUOTIENT8_NO_EPS_ASM: tl.constexpr = tl.constexpr(_root_quotient8_asm(False, False, "f32"))
_ROOT_QUOTIENT8_CLAMP_ASM: tl.constexpr = tl.constexpr(_root_quotient8_asm(True, True, "f32"))
_ROOT_QUOTIENT8_F16_ASM: tl.constexpr = tl.constexpr(_root_quotient8_asm(True, False, "none"))
_ROOT_QUOTIENT8_NO_EPS_F16_ASM: tl.constexpr = tl.constexpr(_root_quotient8_asm(False, False, "none"))
_ROOT_QUOTIENT8_CLAMP_F16_ASM: tl.constexpr = tl.constexpr(_root_quotient8_asm(True, True, "none"))
_ROOT_QUOTIENT8_BF16_ASM: tl.constexpr = tl.constexpr(_root_quotient8_asm(True, False, "bf16"))
_ROOT_QUOTIENT8_NO_EPS_BF16_ASM: tl.constexpr = tl.constexpr(_root_quotient8_asm(False, False, "bf16"))
_ROOT_QUOTIENT8_CLAMP_BF16_ASM: tl.constexpr = tl.constexpr(_root_quotient8_asm(True, True, "bf16"))
# Four consecutive codes (pack=4 with uint8 results: the four leave packed in $0, byte k = value k) from the values
# ($1..$4, float32 bits), their random bits ($5..$8), the block's multiplier ($9..$12) and limit ($13..$16; signed:
# and sign mask, $17..$20): kernels/rmsprop.cu's q8_sum and q8_encode4, the same operations and selectors. |x| * f
# (and * 2^-112 unless one_mul), its bits >> SH plus r, clamped to the limit, byte 2 of each packed; signed: each
# code's sign on top (bit 7 of its byte) from the values' bits (0xB / 0xF: the top byte's sign replicated). A block
# that held inf/NaN has limit and sign mask 0: its codes are 0 with no instruction of their own.
def _q8_encode4_asm(signed: bool, one_mul: bool) -> str:
    sh = 4 if signed else 3
    out = ""
    for k, t in enumerate("abcd"):
        out += (f"abs.f32 {t}, ${1 + k};\nmul.rn.f32 {t}, {t}, ${9 + k};\n"
                + ("" if one_mul else f"mul.rn.f32 {t}, {t}, 0f07800000;\n")
                + f"shr.b32 {t}, {t}, {sh};\nadd.u32 {t}, {t}, ${5 + k};\nmin.u32 {t}, {t}, ${13 + k};\n")
    out += "prmt.b32 a, a, b, 0x0062;\nprmt.b32 c, c, d, 0x0062;\n"
    if signed:
        out += ("prmt.b32 a, a, c, 0x5410;\nprmt.b32 b, $1, $2, 0x00FB;\nprmt.b32 d, $3, $4, 0x00FB;\n"
                "prmt.b32 b, b, d, 0x5410;\nand.b32 b, b, $17;\nor.b32 $0, a, b;\n")
    else:
        out += "prmt.b32 $0, a, c, 0x5410;\n"
    return "{\n.reg .b32 a, b, c, d;\n" + out + "}"


# the block's limit: the largest sum that keeps the code's byte (0x00FFFFFF unsigned, 0x007FFFFF signed)
_Q8_LIMIT: tl.constexpr = tl.constexpr(0x00FFFFFF)
_Q8_SIGNED_LIMIT: tl.constexpr = tl.constexpr(0x007FFFFF)
_Q8_ENC4_CONSTRAINTS: tl.constexpr = tl.constexpr("=r," + ",".join(["r"] * 16))
_Q8_ENC4_SIGNED_CONSTRAINTS: tl.constexpr = tl.constexpr("=r," + ",".join(["r"] * 20))
_Q8_ENC4_ASM: tl.constexpr = tl.constexpr(_q8_encode4_asm(False, True))
_Q8_ENC4_TWO_MUL_ASM: tl.constexpr = tl.constexpr(_q8_encode4_asm(False, False))
_Q8_ENC4_SIGNED_ASM: tl.constexpr = tl.constexpr(_q8_encode4_asm(True, True))
_Q8_ENC4_SIGNED_TWO_MUL_ASM: tl.constexpr = tl.constexpr(_q8_encode4_asm(True, False))


@triton.jit
def _sqrt(x, BY8: tl.constexpr):
    """sqrt.rn of float32 x; BY8 (x's layout gives each thread a multiple of 8 values, as the 8-bit chunk's do):
    one range test and branch per 8 of them (_sqrt8_asm) in compiled code; the interpreter takes sqrt_rn."""
    if BY8 and not _INTERPRETED:
        return tl.inline_asm_elementwise(_SQRT8_ASM, "=&r," * 8 + "r," * 7 + "r", [x.to(tl.uint32, bitcast=True)],
                                         dtype=tl.uint32, is_pure=True, pack=8).to(tl.float32, bitcast=True)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _root_quotient(x, n, eps, ADD_EPS: tl.constexpr, BY8: tl.constexpr, CLAMP: tl.constexpr = False,
                   N_AS_LOADED: tl.constexpr = None):
    """root = sqrt.rn(x) and n / (root + eps if ADD_EPS else root) rounded to nearest; BY8 (as _sqrt's): one range
    test and branch per 8 of them (_root_quotient8_asm) in compiled code. CLAMP (with ADD_EPS): x below 0 counts as
    0, NaN stays NaN (in compiled code on the slow path only: the fast path's range is positive). N_AS_LOADED: n is
    a grad of this dtype as loaded (times +-1), and x inf/NaN where n is (_update): fp16, in range but for 0, inf and
    NaN, is not tested; bf16 is tested two at a time."""
    if BY8 and not _INTERPRETED:
        if tl.float16 == N_AS_LOADED:
            if CLAMP:
                asm: tl.constexpr = _ROOT_QUOTIENT8_CLAMP_F16_ASM
            elif ADD_EPS:
                asm: tl.constexpr = _ROOT_QUOTIENT8_F16_ASM
            else:
                asm: tl.constexpr = _ROOT_QUOTIENT8_NO_EPS_F16_ASM
        elif tl.bfloat16 == N_AS_LOADED:
            if CLAMP:
                asm: tl.constexpr = _ROOT_QUOTIENT8_CLAMP_BF16_ASM
            elif ADD_EPS:
                asm: tl.constexpr = _ROOT_QUOTIENT8_BF16_ASM
            else:
                asm: tl.constexpr = _ROOT_QUOTIENT8_NO_EPS_BF16_ASM
        elif CLAMP:
            asm: tl.constexpr = _ROOT_QUOTIENT8_CLAMP_ASM
        elif ADD_EPS:
            asm: tl.constexpr = _ROOT_QUOTIENT8_ASM
        else:
            asm: tl.constexpr = _ROOT_QUOTIENT8_NO_EPS_ASM
        xb = x.to(tl.uint32, bitcast=True)
        nb = n.to(tl.uint32, bitcast=True)
        eb = eps.to(tl.uint32, bitcast=True)
        if tl.bfloat16 == N_AS_LOADED:  # (exact: n is a bf16)
            root, q = tl.inline_asm_elementwise(asm, "=&r," * 16 + "r," * 27 + "r",
                                                [xb, nb, n.to(tl.bfloat16).to(tl.uint16, bitcast=True), eb],
                                                dtype=(tl.uint32, tl.uint32), is_pure=True, pack=8)
        else:
            root, q = tl.inline_asm_elementwise(asm, "=&r," * 16 + "r," * 23 + "r", [xb, nb, eb],
                                                dtype=(tl.uint32, tl.uint32), is_pure=True, pack=8)
        return root.to(tl.float32, bitcast=True), q.to(tl.float32, bitcast=True)
    else:
        if CLAMP:
            x = _max_nan(x, 0.0)
        root = tl.sqrt_rn(x)
        if ADD_EPS:
            return root, tl.div_rn(n, root + eps)
        else:
            return root, tl.div_rn(n, root)


@triton.jit
def _fma(a, b, c):
    if _FMA_IN_FLOAT64:
        return (a.to(tl.float64) * b.to(tl.float64) + c.to(tl.float64)).to(tl.float32)
    else:
        return tl.fma(a, b, c)


@triton.jit
def _to_storage(x, DTYPE: tl.constexpr, NATIVE_BF16: tl.constexpr):
    """float32 -> storage dtype, round to nearest even. bf16: the GPU's own conversion (cvt.rn.bf16x2.f32, one
    instruction per two elements); under the interpreter, which truncates, the same rounding by hand."""
    if tl.bfloat16 == DTYPE and not NATIVE_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)  # keep NaN a NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def _mix32(x):
    """"lowbias32" integer hash of uint32 values (kernels/rmsprop.cu: mix32)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _stream_key(seed, step, stream):
    """step: int64. Past 2**32 steps (float64 counters) its high half gives other streams, never a repeat."""
    key = _mix32(seed ^ _mix32(step.to(tl.uint32) + 0x9E3779B9 * (stream + 1)))
    hi = (step >> 32).to(tl.uint32)
    if hi != 0:  # a branch around a call, not a select: the rare mix is not issued at every launch
        key = _mix32_rare(key ^ hi)
    return key


@triton.jit(noinline=True)
def _mix32_rare(x):
    return _mix32(x)


@triton.jit
def _pair_bits(key, start, offs, PAIR: tl.constexpr):
    """32 random bits per element: pair 0 for p (low half) and square_avg (high), 1 for momentum_buffer and
    grad_avg (kernels/rmsprop.cu: pair_bits) = mix32(key ^ (2 (start + offs) + PAIR)), computed per group of 8
    (start a multiple of 8): the group's part once (_hash_base), then each element's low bits."""
    x = _hash_base(key, start + (offs & -8)) ^ ((offs & 7).to(tl.uint32) * 2 + PAIR)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _sr_key(x):
    """f16 stochastic rounding may take its short path for values whose key is >= 2^-14 (_sr_normal): 0 and
    |x| >= 2^-14 (nothing below f16's normal range to round, nothing NaN; kernels/rmsprop.cu: f16_sr_general).
    Keys reduce by their minimum (NaN wins), so one test covers a tile."""
    return tl.where(x == 0.0, 1.0, tl.abs(x))


@triton.jit
def _sr_key_p(x):
    """_sr_key for an 8-bit chunk's params: |x| alone (the minimum takes it as an operand modifier), so 0 takes
    the exact path too: a param sits at 0 rarely (the float tiles' states do for long: _sr_key keeps 0 short)."""
    return tl.abs(x)


@triton.jit
def _min_nan(a, b):
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _sr_normal(key):
    return key >= 6.103515625e-05  # ordered: NaN is not


@triton.jit
def _to_storage_sr(x, DTYPE: tl.constexpr, r16, NORMAL: tl.constexpr):
    """Stochastic rounding to a 16-bit DTYPE with 16 random bits r16 (kernels/rmsprop.cu: from_float_sr): up with
    probability equal to x's distance from the value below in units of the 16-bit spacing. NORMAL: the caller
    knows no value needs the exact path (f16: below its normal range, _sr_normal; bf16: NaN)."""
    bits = x.to(tl.uint32, bitcast=True)
    if tl.bfloat16 == DTYPE:
        if NORMAL:
            out = (bits + r16) >> 16
        else:
            out = tl.where(x != x, 0x7FC0, (bits + r16) >> 16)  # NaN stays NaN
        return out.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    elif NORMAL:  # 13 dropped bits, the top 13 random bits added, truncate (inf stays inf)
        return (((bits + (r16 >> 3)) >> 13) << 13).to(tl.float32, bitcast=True).to(tl.float16)
    else:  # float16
        mag = bits & 0x7FFFFFFF
        e = mag >> 23
        # |x| >= 2^-24: drop the bits below the f16 spacing (13; up to 23 below f16's normal range), the random
        # bits at the top of the dropped field (a finite x never carries into the sign)
        drop = tl.minimum(tl.maximum(126 - e.to(tl.int32), 13), 23).to(tl.uint32)
        big = ((bits + ((r16 << 16) >> (32 - drop))) >> drop) << drop
        # below: 0 or 2^-24, up with probability |x| / 2^-24 (|x| * 2^40 and r16 are exact in float32)
        up = mag.to(tl.float32, bitcast=True) * 1099511627776.0 > r16.to(tl.float32)
        tiny = (bits & 0x80000000) | tl.where(up, 0x33800000, 0)
        y = tl.where(mag >= 0x7F800000, bits, tl.where(e >= 103, big, tiny))  # inf / NaN as they are
        return y.to(tl.float32, bitcast=True).to(tl.float16)


# 8-bit blockwise state (rmsprop_gpu/quantize.py: the format; kernels/rmsprop.cu: q8_*): codes, then one scale
# exponent byte per block of 16 elements; square_avg holds sqrt(v) as unsigned E4M4, the others signed E4M3. A
# chunk is handled as two [BLOCK / 16, 8] halves, row r of both being block r: with 8 elements of every dtype per
# thread, a thread holds whole blocks and nothing changes layout (no shuffles, no shared memory).
@triton.jit
def _half(h):
    """The half whose bits are h's low 16 (h < 2^16 or garbage above), as float32."""
    return h.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _q8_decode(w, s, SIGNED: tl.constexpr):
    """Codes as little-endian words [R, N] (4 per word; block r in row r) and their blocks' scale bytes [R] ->
    float32 [R, 4N]: a code's bits placed as a half's are its value * 2^112, subnormal codes included
    (kernels/rmsprop.cu: q8_decode_word). Two codes per 32-bit operation: codes 0 and 2 of a word (bytes 0 and 2)
    move into the two halves of one register, codes 1 and 3 into another."""
    if SIGNED:  # sign at 15, magnitude at 13..7
        even = ((w << 8) & 0x80008000) | ((w << 7) & 0x3F803F80)
        odd = (w & 0x80008000) | ((w >> 1) & 0x3F803F80)
    else:  # at 13..6
        even = (w << 6) & 0x3FC03FC0
        odd = (w >> 2) & 0x3FC03FC0
    scale = ((s.to(tl.uint32) << 23).to(tl.float32, bitcast=True))[:, None]  # 2^(s - 127); 0 for s = 0; inf: 255
    x = tl.join(tl.join(_half(even) * scale, _half(even >> 16) * scale),
                tl.join(_half(odd) * scale, _half(odd >> 16) * scale))  # [R, N, 2, 2]: element 4j + 2m + n
    return tl.reshape(x, [x.shape[0], 4 * x.shape[1]])


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _q8_scale(lo, hi):
    """The blocks' scale bytes [R] from their values (two [R, 8] halves): the largest magnitude (inf and NaN
    largest: 255) sets s = its exponent in [1, 253]. Also returns the multiplier 2^(127 - s) and a mask that is 0
    for a block that held inf/NaN (its codes are 0)."""
    m = _max_nan(tl.reduce(tl.abs(lo), 1, _max_nan), tl.reduce(tl.abs(hi), 1, _max_nan)).to(tl.uint32, bitcast=True)
    s = tl.minimum(tl.maximum(m >> 23, 1), 253)
    bad = m >= 0x7F800000
    inv = ((254 - s) << 23).to(tl.float32, bitcast=True)
    return tl.where(bad, 255, s), inv, tl.where(bad, 0, 0xFFFFFFFF).to(tl.uint32)


@triton.jit
def _q8_codes(x, f, keep, r, SIGNED: tl.constexpr, ONE_MUL: tl.constexpr):
    """float32 [R, 8] -> codes uint8 [R, 8], rounded stochastically with r, 16 random bits each: a code is the high
    half of r + (|y|'s bits >> 3, or 4 signed), saturated (kernels/rmsprop.cu: q8_sum, q8_encode4), y = x * 2^(15 - s)
    rounded once, f = 2^(127 - s) per block: |x| * f (exact) then * 2^-112, or (ONE_MUL: every block's s <= 164 or
    255, _q8_one_mul) |x| * (f * 2^-112), one multiply per code. keep (0 for a block that held inf/NaN) masks."""
    fm = f * 1.925929944387236e-34 if ONE_MUL else f
    if _INTERPRETED:
        if ONE_MUL:
            y = tl.abs(x) * fm[:, None]
        else:
            y = (tl.abs(x) * fm[:, None]) * 1.925929944387236e-34
        c = tl.minimum((r + (y.to(tl.uint32, bitcast=True) >> (4 if SIGNED else 3))) >> 16, 127 if SIGNED else 255)
        if SIGNED:
            c = c | ((x.to(tl.uint32, bitcast=True) >> 24) & 0x80)
        return (c & keep[:, None]).to(tl.uint8)
    # four consecutive values per asm call (pack=4: a thread's 8 values in place; the four codes leave in one
    # register)
    xb = x.to(tl.uint32, bitcast=True)
    fb = tl.broadcast_to(fm.to(tl.uint32, bitcast=True)[:, None], x.shape)
    if SIGNED:
        lim = tl.broadcast_to((keep & _Q8_SIGNED_LIMIT)[:, None], x.shape)
        signs = tl.broadcast_to((keep & 0x80808080)[:, None], x.shape)
        if ONE_MUL:
            return tl.inline_asm_elementwise(_Q8_ENC4_SIGNED_ASM, _Q8_ENC4_SIGNED_CONSTRAINTS,
                                             [xb, r, fb, lim, signs], dtype=tl.uint8, is_pure=True, pack=4)
        else:
            return tl.inline_asm_elementwise(_Q8_ENC4_SIGNED_TWO_MUL_ASM, _Q8_ENC4_SIGNED_CONSTRAINTS,
                                             [xb, r, fb, lim, signs], dtype=tl.uint8, is_pure=True, pack=4)
    else:
        lim = tl.broadcast_to((keep & _Q8_LIMIT)[:, None], x.shape)
        if ONE_MUL:
            return tl.inline_asm_elementwise(_Q8_ENC4_ASM, _Q8_ENC4_CONSTRAINTS, [xb, r, fb, lim], dtype=tl.uint8,
                                             is_pure=True, pack=4)
        else:
            return tl.inline_asm_elementwise(_Q8_ENC4_TWO_MUL_ASM, _Q8_ENC4_CONSTRAINTS, [xb, r, fb, lim],
                                             dtype=tl.uint8, is_pure=True, pack=4)


@triton.jit
def _hash_base(key, first):
    """The hashes of the aligned group of elements first .. (first a multiple of 16, or of a tile row): for
    low = 2k + pair < 32, key ^ (2(first + k) + pair) = (key ^ 2 first) ^ low, and mix32's first xorshift leaves
    low in place: that part once per group (kernels/rmsprop.cu: HashGroup)."""
    x = key ^ (first.to(tl.uint32) * 2)
    return x ^ (x >> 16)


@triton.jit
def _flip(base, BIT: tl.constexpr):
    """(base ^ 2^BIT) - base: +2^BIT or -2^BIT (mod 2^32), times mix32's first multiplier."""
    return ((1 << BIT) - 2 * (base & (1 << BIT))) * 0x7FEB352D


@triton.jit
def _hash_pre(base, OFF: tl.constexpr):
    """mix32 of base ^ (2c + OFF) but its last xorshift, for the 8 columns c of a half (base [R] -> [R, 8]; OFF < 32
    with bits 1-3 clear): the hash's high 16 bits are pre >> 16, its low 16 bits (pre ^ pre >> 16) & 0xFFFF.
    Flipping distinct bits of base adds +-2^bit for each (mod 2^32), so (base ^ (2c + OFF)) * M is
    (base ^ OFF) * M plus a per-row flip for each bit of c: an add per column where an xor and a multiply were
    two, the same bits (kernels/rmsprop.cu: HashGroup::pre16)."""
    c = tl.arange(0, 8)
    x = ((base ^ OFF) * 0x7FEB352D)[:, None]
    x = x + tl.where((c & 1) != 0, _flip(base, 1)[:, None], 0)
    x = x + tl.where((c & 2) != 0, _flip(base, 2)[:, None], 0)
    x = x + tl.where((c & 4) != 0, _flip(base, 3)[:, None], 0)
    x = x ^ (x >> 15)
    return x * 0x846CA68B


@triton.jit
def _hi16(pre):
    return pre >> 16  # the hash's high 16 bits


@triton.jit
def _lo16_of(pre, hi):
    return (pre ^ hi) & 0xFFFF  # the hash's low 16 bits, given its high 16 (one shift for both)


@triton.jit
def _q8_load(addr, start, rows, block, mask, ALIGNED: tl.constexpr):
    """Each row's block of codes as little-endian words, two [R, 2] halves (elements 0-7, 8-15): one 128-bit load
    when aligned, else bytes."""
    if ALIGNED:
        ptr = tl.multiple_of((addr + start).to(tl.pointer_type(tl.uint32)), 16)
        w = tl.load(ptr + rows[:, None] * 4 + tl.arange(0, 4)[None, :])
    else:
        c = tl.load(_ptr(addr, start, tl.uint8, ALIGNED) + block, mask=mask).to(tl.uint32)
        w = tl.sum(tl.reshape(c, [c.shape[0], 4, 4]) << (tl.arange(0, 4) * 8).to(tl.uint32)[None, None, :], 2)
    return tl.split(tl.permute(tl.reshape(w, [w.shape[0], 2, 2]), [0, 2, 1]))


@triton.jit
def _q8_store(addr, start, block, mask, x_lo, x_hi, f, keep, r_lo, r_hi,
              SIGNED: tl.constexpr, ALIGNED: tl.constexpr, ONE_MUL: tl.constexpr):
    """A state's codes for the two halves [R, 8] of the blocks, r_lo / r_hi their random bits."""
    c = tl.join(_q8_codes(x_lo, f, keep, r_lo, SIGNED, ONE_MUL), _q8_codes(x_hi, f, keep, r_hi, SIGNED, ONE_MUL))
    c = tl.reshape(tl.permute(c, [0, 2, 1]), [c.shape[0], 16])  # [R, 16]: each block's codes in order
    if ALIGNED:
        ptr = tl.multiple_of(addr.to(tl.pointer_type(tl.uint8)) + start, 16)
        tl.store(ptr + tl.arange(0, c.shape[0])[:, None] * 16 + tl.arange(0, 16)[None, :], c)
    else:
        tl.store(_ptr(addr, start, tl.uint8, ALIGNED) + block, c, mask=mask)


@triton.jit
def _ptr(addr, start, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Scalar base pointer of this chunk: int64 math once per program, int32 offsets per element."""
    p = addr.to(tl.pointer_type(DTYPE)) + start
    if ALIGNED:
        p = tl.multiple_of(p, 16)  # lets the compiler emit 128-bit loads and stores
    return p


@triton.jit
def _load(addr, start, offs, mask, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    return tl.load(_ptr(addr, start, DTYPE, ALIGNED) + offs, mask=mask).to(tl.float32)


@triton.jit
def _store(addr, start, offs, mask, x, DTYPE: tl.constexpr, ALIGNED: tl.constexpr, NATIVE_BF16: tl.constexpr,
           SR: tl.constexpr, r16, NORMAL: tl.constexpr):
    """NORMAL: stochastic rounding's short path (the caller branches on its test around all its stores: a
    branch around each store, or one yielding values, costs registers or a layout conversion)."""
    if SR and tl.float32 != DTYPE:
        y = _to_storage_sr(x, DTYPE, r16, NORMAL)
    else:  # float32 stores are exact: nothing to round
        y = _to_storage(x, DTYPE, NATIVE_BF16)
    tl.store(_ptr(addr, start, DTYPE, ALIGNED) + offs, y, mask=mask)


@triton.jit
def _update(
    p, g, v, buf, ga,
    lr, alpha, one_minus_alpha, eps, weight_decay, momentum, sign, grad_scale, inv_bc,
    MOMENTUM: tl.constexpr, CENTERED: tl.constexpr, FLAGS: tl.constexpr,
    Q8: tl.constexpr = False, SQRT_BY8: tl.constexpr = False, G_DTYPE: tl.constexpr = None,
):
    """The update of one tile in float32: returns the new p, v, buf, ga (buf/ga unchanged when not used) and the
    root the denominator took.
    Q8: 8-bit state, whose v and grad_avg can cross (v - ga^2 < 0): clamped at 0.
    SQRT_BY8: roots 8 at a time (_sqrt; the caller's layout allows it).
    G_DTYPE: the dtype g was loaded from (the 8-bit chunk's; fp16: 0, inf, NaN or within [2^-24, 65504] in
    magnitude)."""
    if GRAD_SCALE & FLAGS:
        g = tl.div_rn(g, grad_scale)  # exactly torch's unscale
    if MAXIMIZE & FLAGS:  # per slot: sign is -1 for maximize, +1 otherwise (exact either way)
        g = g * sign
    if DECOUPLED_WD & FLAGS:  # Keras: p - p * wd * lr before the update (per slot; wd == 0 keeps p exactly)
        p = tl.where(weight_decay != 0.0, p - (p * weight_decay) * lr, p)
    elif WEIGHT_DECAY & FLAGS:  # per slot: a slot without weight decay keeps g exactly (0 * inf would be NaN)
        g = tl.where(weight_decay != 0.0, g + weight_decay * p, g)
    v = alpha * v + (one_minus_alpha * g) * g  # torch's addcmul order: g * g alone overflows above 1.8e19
    var = v
    if BIAS_CORRECTION & FLAGS:  # optax: the averages / (1 - alpha^t)
        var = v * inv_bc
    if CENTERED:
        ga = ga + one_minus_alpha * (g - ga)
        avg = ga
        if BIAS_CORRECTION & FLAGS:
            avg = ga * inv_bc
        if (BIAS_CORRECTION & FLAGS) or Q8:  # optax's subtraction (clamped below); 8-bit: inf is a NaN
            # block anyway
            var = var - avg * avg
        else:  # torch's addcmul(value=-1) is an FMA: v = inf stays inf though avg^2 overflows
            var = _fma(-avg, avg, var)
    # negative by rounding at step 1 (optax: NaN), or by quantization: clamped at 0, NaN kept (-0 -> +0 or -0: the
    # same bits downstream); with the root of var itself, by _root_quotient (on its slow path, in compiled code)
    clamp: tl.constexpr = CENTERED and ((BIAS_CORRECTION & FLAGS) or Q8)
    if EPS_IN_SQRT & FLAGS:
        if clamp:
            var = _max_nan(var, 0.0)
        var = var + eps
    n = g
    if MOMENTUM and (RAW_GRAD_MOMENTUM & FLAGS):  # fastai: a momentum of raw grads, divided after
        buf = momentum * buf + g
        n = buf
    # n = a 16-bit grad as loaded (times +-1): a cheaper range test, none for fp16 (inf/NaN makes var inf/NaN, the
    # slow path's: v holds ((1 - alpha) * g) * g)
    as_loaded: tl.constexpr = not ((GRAD_SCALE | WEIGHT_DECAY) & FLAGS) and not (
        MOMENTUM and (RAW_GRAD_MOMENTUM & FLAGS))
    n_dtype: tl.constexpr = G_DTYPE if as_loaded else None
    root, q = _root_quotient(var, n, eps, not (EPS_IN_SQRT & FLAGS), SQRT_BY8,
                             clamp and not (EPS_IN_SQRT & FLAGS), n_dtype)  # q = n / denominator
    if MOMENTUM:
        if RAW_GRAD_MOMENTUM & FLAGS:
            p = p - lr * q
        elif LR_IN_MOMENTUM & FLAGS:  # TF1 / Keras / optax: the buffer accumulates lr * g / d
            step = lr * q
            buf = momentum * buf + step
            if NESTEROV & FLAGS:  # optax: lr * g / d + momentum * buf
                p = p - (step + momentum * buf)
            else:
                p = p - buf
        else:
            buf = momentum * buf + q
            p = p - lr * buf
    else:
        p = p - lr * q
    return p, v, buf, ga, root


@triton.jit
def _store_tile(p, v, b, a, p_addr, v_addr, b_addr, a_addr, start, offs, mask, key,
                P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, MOMENTUM: tl.constexpr, CENTERED: tl.constexpr,
                SR: tl.constexpr, ALIGNED: tl.constexpr, NATIVE_BF16: tl.constexpr):
    """One tile's stores; with SR, 16 random bits each from one hash per element and pair of outputs."""
    h0 = key
    h1 = key
    if SR:
        h0 = _pair_bits(key, start, offs, 0)
        if MOMENTUM or CENTERED:
            h1 = _pair_bits(key, start, offs, 1)
    if SR and tl.float16 == P_DTYPE:  # one test for the tile's f16 outputs (f16 state comes with f16 params)
        key = _sr_key(p)
        if tl.float16 == S_DTYPE:
            key = _min_nan(key, _sr_key(v))
            if MOMENTUM:
                key = _min_nan(key, _sr_key(b))
            if CENTERED:
                key = _min_nan(key, _sr_key(a))
        if _sr_normal(tl.reduce(key, 0, _min_nan)):
            _store_outputs(p, v, b, a, p_addr, v_addr, b_addr, a_addr, start, offs, mask, h0, h1, P_DTYPE, S_DTYPE,
                           MOMENTUM, CENTERED, SR, ALIGNED, NATIVE_BF16, True)
        else:
            _store_outputs(p, v, b, a, p_addr, v_addr, b_addr, a_addr, start, offs, mask, h0, h1, P_DTYPE, S_DTYPE,
                           MOMENTUM, CENTERED, SR, ALIGNED, NATIVE_BF16, False)
    else:
        _store_outputs(p, v, b, a, p_addr, v_addr, b_addr, a_addr, start, offs, mask, h0, h1, P_DTYPE, S_DTYPE,
                       MOMENTUM, CENTERED, SR, ALIGNED, NATIVE_BF16, False)


@triton.jit
def _store_outputs(p, v, b, a, p_addr, v_addr, b_addr, a_addr, start, offs, mask, h0, h1,
                   P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, MOMENTUM: tl.constexpr, CENTERED: tl.constexpr,
                   SR: tl.constexpr, ALIGNED: tl.constexpr, NATIVE_BF16: tl.constexpr, NORMAL: tl.constexpr):
    _store(p_addr, start, offs, mask, p, P_DTYPE, ALIGNED, NATIVE_BF16, SR, h0 & 0xFFFF, NORMAL)
    _store(v_addr, start, offs, mask, v, S_DTYPE, ALIGNED, NATIVE_BF16, SR, h0 >> 16, NORMAL)
    if MOMENTUM:
        _store(b_addr, start, offs, mask, b, S_DTYPE, ALIGNED, NATIVE_BF16, SR, h1 & 0xFFFF, NORMAL)
    if CENTERED:
        _store(a_addr, start, offs, mask, a, S_DTYPE, ALIGNED, NATIVE_BF16, SR, h1 >> 16, NORMAL)


@triton.jit
def _update_chunk(
    p_addr, g_addr, v_addr, b_addr, a_addr, start, numel,
    lr, alpha, one_minus_alpha, eps, weight_decay, momentum, sign, grad_scale, inv_bc, key,
    P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr,
    MOMENTUM: tl.constexpr, CENTERED: tl.constexpr, FLAGS: tl.constexpr,
    SR: tl.constexpr, FULL_ALIGNED: tl.constexpr, NATIVE_BF16: tl.constexpr, BLOCK: tl.constexpr,
):
    """The chunk as two tiles of BLOCK / 2: every load of both first (one memory wave), then the math and stores
    of one tile at a time, so only one tile's intermediates are live (the registers of 8, not 16, elements per
    thread) and, with 8 elements of every dtype per thread, no layout conversion between 16- and 32-bit data."""
    TILE: tl.constexpr = BLOCK // 2
    offs = tl.arange(0, TILE)
    s1 = start + TILE
    m0 = offs < numel - start
    m1 = offs < numel - s1
    if FULL_ALIGNED:  # whole chunk in bounds: no predicate, so loads vectorize
        m0 = None
        m1 = None
    # (state first: ptxas then keeps every load ahead of the first unpack in all variants; see kernel_report)
    v0 = _load(v_addr, start, offs, m0, S_DTYPE, FULL_ALIGNED)
    v1 = _load(v_addr, s1, offs, m1, S_DTYPE, FULL_ALIGNED)
    b0 = v0
    b1 = v1
    a0 = v0
    a1 = v1
    if MOMENTUM:
        b0 = _load(b_addr, start, offs, m0, S_DTYPE, FULL_ALIGNED)
        b1 = _load(b_addr, s1, offs, m1, S_DTYPE, FULL_ALIGNED)
    if CENTERED:
        a0 = _load(a_addr, start, offs, m0, S_DTYPE, FULL_ALIGNED)
        a1 = _load(a_addr, s1, offs, m1, S_DTYPE, FULL_ALIGNED)
    p0 = _load(p_addr, start, offs, m0, P_DTYPE, FULL_ALIGNED)
    g0 = _load(g_addr, start, offs, m0, P_DTYPE, FULL_ALIGNED)
    p1 = _load(p_addr, s1, offs, m1, P_DTYPE, FULL_ALIGNED)
    g1 = _load(g_addr, s1, offs, m1, P_DTYPE, FULL_ALIGNED)
    p0, v0, b0, a0, _ = _update(p0, g0, v0, b0, a0, lr, alpha, one_minus_alpha, eps, weight_decay, momentum,
                                sign, grad_scale, inv_bc, MOMENTUM, CENTERED, FLAGS)
    _store_tile(p0, v0, b0, a0, p_addr, v_addr, b_addr, a_addr, start, offs, m0, key, P_DTYPE, S_DTYPE, MOMENTUM,
                CENTERED, SR, FULL_ALIGNED, NATIVE_BF16)
    p1, v1, b1, a1, _ = _update(p1, g1, v1, b1, a1, lr, alpha, one_minus_alpha, eps, weight_decay, momentum,
                                sign, grad_scale, inv_bc, MOMENTUM, CENTERED, FLAGS)
    _store_tile(p1, v1, b1, a1, p_addr, v_addr, b_addr, a_addr, s1, offs, m1, key, P_DTYPE, S_DTYPE, MOMENTUM,
                CENTERED, SR, FULL_ALIGNED, NATIVE_BF16)


@triton.jit
def _load_row(addr, start, first, left, N: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Elements first .. first + N - 1 of each row (first [R]; left [R]: how many of them exist, unless ALIGNED)."""
    c = tl.arange(0, N)
    if ALIGNED:
        return _load(addr, start, first[:, None] + c[None, :], None, DTYPE, ALIGNED)
    else:
        return _load(addr, start, first[:, None] + c[None, :], c[None, :] < left[:, None], DTYPE, ALIGNED)


@triton.jit
def _store_row(addr, start, first, left, x, DTYPE: tl.constexpr, ALIGNED: tl.constexpr, NATIVE_BF16: tl.constexpr,
               SR: tl.constexpr, r16, NORMAL: tl.constexpr):
    c = tl.arange(0, x.shape[1])
    if ALIGNED:
        _store(addr, start, first[:, None] + c[None, :], None, x, DTYPE, ALIGNED, NATIVE_BF16, SR, r16, NORMAL)
    else:
        _store(addr, start, first[:, None] + c[None, :], c[None, :] < left[:, None], x, DTYPE, ALIGNED, NATIVE_BF16,
               SR, r16, NORMAL)


@triton.jit
def _load8(addr, start, first, left, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Elements first .. first + 7 of each row ([R]; left: how many exist, ALIGNED: all) as float32 [R, 8].
    float32: two [R, 4] quarters (128 bits each) joined in registers, so a thread holds its blocks in every dtype
    (one layout, no conversion)."""
    if tl.float32 == DTYPE:
        x = tl.join(_load_row(addr, start, first, left, 4, DTYPE, ALIGNED),
                    _load_row(addr, start, first + 4, left - 4, 4, DTYPE, ALIGNED))
        return tl.reshape(tl.permute(x, [0, 2, 1]), [x.shape[0], 8])
    else:
        return _load_row(addr, start, first, left, 8, DTYPE, ALIGNED)


@triton.jit
def _store8(addr, start, first, left, x, DTYPE: tl.constexpr, ALIGNED: tl.constexpr, NATIVE_BF16: tl.constexpr,
            SR: tl.constexpr, r16, NORMAL: tl.constexpr):
    """The store of _load8's elements (float32 stores are exact: r16 unused)."""
    if tl.float32 == DTYPE:
        x0, x1 = tl.split(tl.permute(tl.reshape(x, [x.shape[0], 2, 4]), [0, 2, 1]))
        _store_row(addr, start, first, left, x0, DTYPE, ALIGNED, NATIVE_BF16, SR, r16, NORMAL)
        _store_row(addr, start, first + 4, left - 4, x1, DTYPE, ALIGNED, NATIVE_BF16, SR, r16, NORMAL)
    else:
        _store_row(addr, start, first, left, x, DTYPE, ALIGNED, NATIVE_BF16, SR, r16, NORMAL)


@triton.jit
def _update_chunk_q8(
    p_addr, g_addr, v_addr, b_addr, a_addr, start, numel,
    lr, alpha, one_minus_alpha, eps, weight_decay, momentum, sign, grad_scale, inv_bc, key,
    P_DTYPE: tl.constexpr,
    MOMENTUM: tl.constexpr, CENTERED: tl.constexpr, FLAGS: tl.constexpr,
    SR: tl.constexpr, FULL_ALIGNED: tl.constexpr, NATIVE_BF16: tl.constexpr, ELEMS: tl.constexpr,
):
    """ELEMS elements from start with 8-bit state, block r (16 elements) as row r of two [ELEMS / 16, 8] halves:
    every load first (one memory wave), then per half decode and the float32 update, each block's new scale,
    encode, store. Padding past numel encodes as 0. Masks (None for a full chunk): elements, codes of whole blocks,
    scale bytes."""
    ROWS: tl.constexpr = ELEMS // 16
    rows = tl.arange(0, ROWS)
    n16 = (numel + 15) // 16 * 16
    left = numel - start - rows * 16  # per block: its real elements (16 or more: all)
    block = rows[:, None] * 16 + tl.arange(0, 16)[None, :]
    c_all = rows[:, None] * 16 < numel - start  # whole blocks (padding included)
    r_mask = rows * 16 < numel - start
    if FULL_ALIGNED:
        c_all, r_mask = None, None
    scale_ptr = start // 16 + n16 + rows  # the blocks' scale bytes, after the codes
    vw_lo, vw_hi = _q8_load(v_addr, start, rows, block, c_all, FULL_ALIGNED)
    v_sp = v_addr.to(tl.pointer_type(tl.uint8)) + scale_ptr
    b_sp, a_sp = v_sp, v_sp
    vs = tl.load(v_sp, mask=r_mask)
    bw_lo, bw_hi, bs, aw_lo, aw_hi, as_ = vw_lo, vw_hi, vs, vw_lo, vw_hi, vs
    if MOMENTUM:
        bw_lo, bw_hi = _q8_load(b_addr, start, rows, block, c_all, FULL_ALIGNED)
        b_sp = b_addr.to(tl.pointer_type(tl.uint8)) + scale_ptr
        bs = tl.load(b_sp, mask=r_mask)
    if CENTERED:
        aw_lo, aw_hi = _q8_load(a_addr, start, rows, block, c_all, FULL_ALIGNED)
        a_sp = a_addr.to(tl.pointer_type(tl.uint8)) + scale_ptr
        as_ = tl.load(a_sp, mask=r_mask)
    p_lo = _load8(p_addr, start, rows * 16, left, P_DTYPE, FULL_ALIGNED)
    p_hi = _load8(p_addr, start, rows * 16 + 8, left - 8, P_DTYPE, FULL_ALIGNED)
    g_lo = _load8(g_addr, start, rows * 16, left, P_DTYPE, FULL_ALIGNED)
    g_hi = _load8(g_addr, start, rows * 16 + 8, left - 8, P_DTYPE, FULL_ALIGNED)
    # one half at a time: decode, update (fewer values live). The roots 8 at a time with 16-bit params (with
    # float32 params, within the budget either way, ptxas then spills in the centered variant)
    SQRT_BY8: tl.constexpr = tl.float32 != P_DTYPE
    v_lo = _q8_decode(vw_lo, vs, False)
    b_lo, a_lo = v_lo, v_lo
    if MOMENTUM:
        b_lo = _q8_decode(bw_lo, bs, True)
    if CENTERED:
        a_lo = _q8_decode(aw_lo, as_, True)
    p_lo, v_lo, b_lo, a_lo = _update_q8(p_lo, g_lo, v_lo, b_lo, a_lo, left, lr, alpha, one_minus_alpha, eps,
                                        weight_decay, momentum, sign, grad_scale, inv_bc, MOMENTUM, CENTERED, FLAGS,
                                        FULL_ALIGNED, SQRT_BY8, P_DTYPE)
    v_hi = _q8_decode(vw_hi, vs, False)
    b_hi, a_hi = v_hi, v_hi
    if MOMENTUM:
        b_hi = _q8_decode(bw_hi, bs, True)
    if CENTERED:
        a_hi = _q8_decode(aw_hi, as_, True)
    p_hi, v_hi, b_hi, a_hi = _update_q8(p_hi, g_hi, v_hi, b_hi, a_hi, left - 8, lr, alpha, one_minus_alpha, eps,
                                        weight_decay, momentum, sign, grad_scale, inv_bc, MOMENTUM, CENTERED, FLAGS,
                                        FULL_ALIGNED, SQRT_BY8, P_DTYPE)
    # random bits (kernels/rmsprop.cu: q8_chunk): pair 0 for p (low half, with SR) and square_avg's codes (high),
    # pair 1 for momentum_buffer (low) and grad_avg (high)
    base = _hash_base(key, start + rows * 16)
    pre0_lo = _hash_pre(base, 0)
    pre0_hi = _hash_pre(base, 16)
    sv, fv, kv = _q8_scale(v_lo, v_hi)
    sb, fb, kb, sa, fa, ka = sv, fv, kv, sv, fv, kv
    if MOMENTUM:
        sb, fb, kb = _q8_scale(b_lo, b_hi)
    if CENTERED:
        sa, fa, ka = _q8_scale(a_lo, a_hi)
    # the scale bytes here, before the codes: their pointers die before the encoding, the kernel's busiest part
    # (with fp16 params, centered + momentum and stochastic rounding, Triton 3.6's ptxas otherwise parks the
    # chunk's addresses in uniform registers: about 35 more instructions)
    tl.store(v_sp, sv.to(tl.uint8), mask=r_mask)
    if MOMENTUM:
        tl.store(b_sp, sb.to(tl.uint8), mask=r_mask)
    if CENTERED:
        tl.store(a_sp, sa.to(tl.uint8), mask=r_mask)
    # With three states, or stochastic rounding of 16-bit params, one test for the chunk (a program-uniform branch;
    # the .cu's is per thread): every block's codes with one multiply (_q8_one_mul), and with stochastic rounding
    # no p needing its exact path (f16: _sr_normal; bf16: no NaN). The reduction across the program costs about
    # two instructions per element: worth it for three states' codes, or with p's test; not for one or two
    # states' codes alone (static report).
    if (MOMENTUM and CENTERED) or (SR and tl.float32 != P_DTYPE):
        ok = tl.where(_q8_one_mul(sv) & _q8_one_mul(sb) & _q8_one_mul(sa), 1.0, -1.0)  # per block, as a key
        if SR and tl.float32 != P_DTYPE:
            ok = _min_nan(ok, _min_nan(tl.reduce(_sr_key_p(p_lo), 1, _min_nan),
                                       tl.reduce(_sr_key_p(p_hi), 1, _min_nan)))
        ok = tl.reduce(ok, 0, _min_nan)
        if SR and tl.float16 == P_DTYPE:
            short = _sr_normal(ok)
        else:  # bf16: p's short path needs no NaN (the key's minimum is NaN then); the codes' needs no block's -1
            short = ok >= 0.0
        if short:
            _q8_store_chunk(p_addr, v_addr, b_addr, a_addr, start, rows, block, c_all, left, base,
                            pre0_lo, pre0_hi, p_lo, p_hi, v_lo, v_hi, b_lo, b_hi, a_lo, a_hi, fv, kv, fb, kb, fa, ka,
                            P_DTYPE, MOMENTUM, CENTERED, SR, FULL_ALIGNED, NATIVE_BF16, True, True)
        else:
            _q8_store_chunk(p_addr, v_addr, b_addr, a_addr, start, rows, block, c_all, left, base,
                            pre0_lo, pre0_hi, p_lo, p_hi, v_lo, v_hi, b_lo, b_hi, a_lo, a_hi, fv, kv, fb, kb, fa, ka,
                            P_DTYPE, MOMENTUM, CENTERED, SR, FULL_ALIGNED, NATIVE_BF16, False, False)
    else:
        _q8_store_chunk(p_addr, v_addr, b_addr, a_addr, start, rows, block, c_all, left, base, pre0_lo,
                        pre0_hi, p_lo, p_hi, v_lo, v_hi, b_lo, b_hi, a_lo, a_hi, fv, kv, fb, kb, fa, ka,
                        P_DTYPE, MOMENTUM, CENTERED, SR, FULL_ALIGNED, NATIVE_BF16, False, False)


@triton.jit
def _q8_one_mul(s):
    """Blocks [R] whose codes take one multiply: s <= 164 (2^(15 - s) is a float) or 255 (codes masked)."""
    return (s - 165).to(tl.uint32) > 89


@triton.jit
def _q8_store_chunk(p_addr, v_addr, b_addr, a_addr, start, rows, block, c_all, left, base,
                    pre0_lo, pre0_hi, p_lo, p_hi, v_lo, v_hi, b_lo, b_hi, a_lo, a_hi, fv, kv, fb, kb, fa, ka,
                    P_DTYPE: tl.constexpr, MOMENTUM: tl.constexpr, CENTERED: tl.constexpr, SR: tl.constexpr,
                    FULL_ALIGNED: tl.constexpr, NATIVE_BF16: tl.constexpr, ONE_MUL: tl.constexpr,
                    NORMAL: tl.constexpr):
    """The rest of an 8-bit chunk's stores (the caller stored the scale bytes): each state's codes (_q8_codes:
    ONE_MUL), then p (_store: NORMAL: stochastic rounding's short path for p, which the caller's test chose)."""
    _q8_store(v_addr, start, block, c_all, v_lo, v_hi, fv, kv, _hi16(pre0_lo), _hi16(pre0_hi), False, FULL_ALIGNED,
              ONE_MUL)
    if MOMENTUM or CENTERED:  # (after square_avg's codes: fewer values live)
        pre1_lo = _hash_pre(base, 1)
        pre1_hi = _hash_pre(base, 17)
        if MOMENTUM:
            _q8_store(b_addr, start, block, c_all, b_lo, b_hi, fb, kb, _lo16_of(pre1_lo, _hi16(pre1_lo)),
                      _lo16_of(pre1_hi, _hi16(pre1_hi)), True, FULL_ALIGNED, ONE_MUL)
        if CENTERED:
            _q8_store(a_addr, start, block, c_all, a_lo, a_hi, fa, ka, _hi16(pre1_lo), _hi16(pre1_hi), True,
                      FULL_ALIGNED, ONE_MUL)
    _store_p_q8(p_addr, start, rows, left, p_lo, p_hi, pre0_lo, pre0_hi, P_DTYPE, FULL_ALIGNED, NATIVE_BF16, SR,
                NORMAL)


@triton.jit
def _store_p_q8(p_addr, start, rows, left, p_lo, p_hi, pre0_lo, pre0_hi, P_DTYPE: tl.constexpr,
                FULL_ALIGNED: tl.constexpr, NATIVE_BF16: tl.constexpr, SR: tl.constexpr, NORMAL: tl.constexpr):
    _store8(p_addr, start, rows * 16, left, p_lo, P_DTYPE, FULL_ALIGNED, NATIVE_BF16, SR,
            _lo16_of(pre0_lo, _hi16(pre0_lo)), NORMAL)  # (the shift square_avg's codes take too)
    _store8(p_addr, start, rows * 16 + 8, left - 8, p_hi, P_DTYPE, FULL_ALIGNED, NATIVE_BF16, SR,
            _lo16_of(pre0_hi, _hi16(pre0_hi)), NORMAL)


@triton.jit
def _update_q8(
    p, g, v, b, a, left,
    lr, alpha, one_minus_alpha, eps, weight_decay, momentum, sign, grad_scale, inv_bc,
    MOMENTUM: tl.constexpr, CENTERED: tl.constexpr, FLAGS: tl.constexpr, FULL_ALIGNED: tl.constexpr,
    SQRT_BY8: tl.constexpr, G_DTYPE: tl.constexpr,
):
    """One half's update from decoded 8-bit state: returns p, sqrt of the variance (what square_avg stores; centered
    sqrt(v - ga^2): its quantization error is relative to the variance, kernels/rmsprop.cu: q8_chunk), buf, ga.
    SQRT_BY8: the roots 8 at a time (_sqrt). G_DTYPE: the grads' dtype (_update)."""
    v = v * v
    if CENTERED:
        v = v + a * a
    p, v, b, a, root = _update(p, g, v, b, a, lr, alpha, one_minus_alpha, eps, weight_decay, momentum, sign,
                               grad_scale, inv_bc, MOMENTUM, CENTERED, FLAGS, True, SQRT_BY8, G_DTYPE)
    if CENTERED:
        v = v - a * a
        v = _max_nan(v, 0.0)
    if (BIAS_CORRECTION | EPS_IN_SQRT) & FLAGS:  # the update's root is of another value
        root = _sqrt(v, SQRT_BY8)
    if not FULL_ALIGNED:  # padding past numel encodes as 0 (mask: how many elements of each row are real)
        real = tl.arange(0, 8)[None, :] < left[:, None]
        root = tl.where(real, root, 0.0)
        b = tl.where(real, b, 0.0)
        a = tl.where(real, a, 0.0)
    return p, root, b, a


@triton.jit
def _rmsprop_kernel(
    tensors, blocks, hyper_ptrs, hyper_vals, grad_scale_ptr, found_inf_ptr,
    P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr,
    MOMENTUM: tl.constexpr, CENTERED: tl.constexpr, FLAGS: tl.constexpr, NATIVE_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    found = 0.0
    if FOUND_INF & FLAGS:
        found = tl.load(found_inf_ptr)
    if found == 0.0:  # a step with inf/NaN grads writes nothing (GradScaler's skip)
        info = tl.load(blocks + tl.program_id(0))
        row = tensors + (info >> 32) * ROW
        chunk = info & 0xFFFFFFFF
        p_addr = tl.load(row + COL_P)
        g_addr = tl.load(row + COL_G)
        v_addr = tl.load(row + COL_V)
        b_addr = tl.load(row + COL_BUF)
        a_addr = tl.load(row + COL_GRAD_AVG)
        step_addr = tl.load(row + COL_STEP)
        numel = tl.load(row + COL_NUMEL)
        # bits 0-30: the slot; bit 31: the step counter is float64 (it counts exactly past 2**24); high 32: the
        # tensor's random stream id
        slot_stream = tl.load(row + COL_SLOT)
        slot = slot_stream & SLOT_MASK
        h = hyper_vals + slot * (2 * HYPER_ROW)  # float32 columns of this tensor's slot
        if LR_ON_DEVICE & FLAGS:
            lr = tl.load(tl.load(hyper_ptrs + slot * HYPER_ROW).to(tl.pointer_type(tl.float32)))
        else:
            lr = tl.load(h + H_LR)
        alpha = tl.load(h + H_ALPHA)
        one_minus_alpha = tl.load(h + H_ONE_MINUS_ALPHA)
        eps = tl.load(h + H_EPS)
        weight_decay = tl.load(h + H_WEIGHT_DECAY)
        momentum = tl.load(h + H_MOMENTUM)
        sign = tl.load(h + H_SIGN)
        start = chunk * BLOCK  # int64: tensors beyond 2**31 elements are fine
        grad_scale = 1.0
        if GRAD_SCALE & FLAGS:
            grad_scale = tl.load(grad_scale_ptr)
        key = tl.full((), 0, tl.uint32)
        count = tl.full((), 0, tl.int64)
        if ((STOCHASTIC_ROUNDING | BIAS_CORRECTION) & FLAGS) or (tl.uint8 == S_DTYPE):  # this step's count (the host
            # advances the counter after the launch)
            if ((slot_stream >> STEP_F64_BIT) & 1) == 1:
                count = tl.load(step_addr.to(tl.pointer_type(tl.float64))).to(tl.int64)
            else:
                count = tl.load(step_addr.to(tl.pointer_type(tl.float32))).to(tl.int64)
        if (STOCHASTIC_ROUNDING & FLAGS) or (tl.uint8 == S_DTYPE):  # the random stream of this tensor at this
            # step (16-bit stores with SR, 8-bit codes always)
            key = _stream_key(tl.load(h + H_SEED).to(tl.uint32, bitcast=True), count, (slot_stream >> 32).to(tl.uint32))
        inv_bc = 1.0
        if BIAS_CORRECTION & FLAGS:  # 1 / (1 - alpha^t), t = this step's count
            # past 2**30, alpha^t < 2**-90 for every float32 alpha < 1: 1 - alpha^t rounds to 1 as for the true t
            e = tl.minimum(count + 1, 1 << 30).to(tl.int32)
            base = alpha * 1.0
            acc = alpha * 0.0 + 1.0
            while e > 0:  # alpha^t by squaring: log2(t) multiplications
                acc = tl.where((e & 1) == 1, acc * base, acc)
                base = base * base
                e = e >> 1
            inv_bc = tl.div_rn(1.0 + alpha * 0.0, 1.0 - acc)
        aligned = ((p_addr | g_addr | v_addr | b_addr | a_addr) & 15) == 0
        if tl.uint8 == S_DTYPE:  # 8-bit blockwise state
            if aligned and (start + BLOCK <= numel):
                _update_chunk_q8(p_addr, g_addr, v_addr, b_addr, a_addr, start, numel,
                                 lr, alpha, one_minus_alpha, eps, weight_decay, momentum, sign, grad_scale, inv_bc,
                                 key, P_DTYPE, MOMENTUM, CENTERED, FLAGS, STOCHASTIC_ROUNDING & FLAGS, True,
                                 NATIVE_BF16, BLOCK)
            else:  # a tail or unaligned chunk: masked, in two halves (half the registers: the kernel's count is
                # that of its heaviest path; the extra work is on a rare path)
                _update_chunk_q8(p_addr, g_addr, v_addr, b_addr, a_addr, start, numel,
                                 lr, alpha, one_minus_alpha, eps, weight_decay, momentum, sign, grad_scale, inv_bc,
                                 key, P_DTYPE, MOMENTUM, CENTERED, FLAGS, STOCHASTIC_ROUNDING & FLAGS, False,
                                 NATIVE_BF16, BLOCK // 2)
                _update_chunk_q8(p_addr, g_addr, v_addr, b_addr, a_addr, start + BLOCK // 2, numel,
                                 lr, alpha, one_minus_alpha, eps, weight_decay, momentum, sign, grad_scale, inv_bc,
                                 key, P_DTYPE, MOMENTUM, CENTERED, FLAGS, STOCHASTIC_ROUNDING & FLAGS, False,
                                 NATIVE_BF16, BLOCK // 2)
        elif aligned and (start + BLOCK <= numel):
            _update_chunk(p_addr, g_addr, v_addr, b_addr, a_addr, start, numel,
                          lr, alpha, one_minus_alpha, eps, weight_decay, momentum, sign, grad_scale, inv_bc, key,
                          P_DTYPE, S_DTYPE, MOMENTUM, CENTERED, FLAGS, STOCHASTIC_ROUNDING & FLAGS, True,
                          NATIVE_BF16, BLOCK)
        else:
            _update_chunk(p_addr, g_addr, v_addr, b_addr, a_addr, start, numel,
                          lr, alpha, one_minus_alpha, eps, weight_decay, momentum, sign, grad_scale, inv_bc, key,
                          P_DTYPE, S_DTYPE, MOMENTUM, CENTERED, FLAGS, STOCHASTIC_ROUNDING & FLAGS, False,
                          NATIVE_BF16, BLOCK)
        if not (((BIAS_CORRECTION | STOCHASTIC_ROUNDING) & FLAGS) or (tl.uint8 == S_DTYPE)):  # noqa: SIM102  (constexpr;
            # else the host advances the counters)
            if (chunk == 0) and (step_addr != 0):
                sp = step_addr.to(tl.pointer_type(tl.float32))
                tl.store(sp, tl.load(sp) + 1.0)
