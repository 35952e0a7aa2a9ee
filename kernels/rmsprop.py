"""Fused multi-tensor RMSprop step in Triton: one launch updates every tensor of a group in one pass.

Contract (shared with kernels/rmsprop.cu, built by rmsprop_gpu/backends/_tables.py):
  tensors: int64 [T, 8] = p, g, square_avg, momentum_buffer, grad_avg, step (addresses; 0 = absent), numel, slot
  blocks:  int64 [B]    = (tensor << 32) | chunk; program b updates chunk * BLOCK .. + BLOCK of that tensor
  hyper:   int64 [S, 8] = per slot (param group): lr address (LR_ON_DEVICE), then as float32 columns 2..8:
                          lr, alpha, 1 - alpha, eps, weight_decay, momentum, sign (-1: maximize)
Hyperparameters are values in the hyper table (a new lr/alpha/eps never compiles a new kernel); the switches
that change what is read or computed are constexpr. Math is float32; stores round to nearest even.
NATIVE_BF16 is False only under the interpreter (TRITON_INTERPRET=1), whose bf16 cast truncates.
"""

import triton
import triton.language as tl


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
def _stream_key(seed, step, row):
    return _mix32(seed ^ _mix32(step + 0x9E3779B9 * (row + 1)))


@triton.jit
def _pair_bits(key, start, offs, PAIR: tl.constexpr):
    """32 random bits per element: pair 0 for p (low half) and square_avg (high), 1 for momentum_buffer and
    grad_avg (kernels/rmsprop.cu: pair_bits)."""
    return _mix32(key ^ ((start + offs).to(tl.uint32) * 2 + PAIR))


@triton.jit
def _to_storage_sr(x, DTYPE: tl.constexpr, NATIVE_BF16: tl.constexpr, r16):
    """Stochastic rounding to a 16-bit DTYPE with 16 random bits r16 (kernels/rmsprop.cu: from_float_sr): up with
    probability equal to x's distance from the value below in units of the 16-bit spacing."""
    bits = x.to(tl.uint32, bitcast=True)
    if tl.bfloat16 == DTYPE:
        out = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, (bits + r16) >> 16)  # NaN stays NaN
        return out.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:  # float16
        mag = bits & 0x7FFFFFFF
        e = mag >> 23
        drop = tl.where(e >= 113, 13, 126 - tl.minimum(e, 126))
        drop = tl.minimum(drop, 23)  # (e < 103 takes the tiny path below)
        noise = (r16 << 16) >> (32 - drop)
        big = ((bits & 0x80000000) | ((mag + noise) & (0xFFFFFFFF << drop))).to(tl.float32, bitcast=True)
        up = mag.to(tl.float32, bitcast=True) * 16777216.0 > r16.to(tl.float32) * 1.52587890625e-5
        tiny = tl.where(up, 5.9604644775390625e-8, 0.0)
        tiny = tl.where((bits >> 31) == 1, -tiny, tiny)
        y = tl.where(mag >= 0x7F800000, x, tl.where(e >= 103, big, tiny))  # inf / NaN round as usual (exactly)
        return y.to(tl.float16)


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
           SR: tl.constexpr, r16):
    if SR and tl.float32 != DTYPE:  # float32 stores are exact: nothing to round
        y = _to_storage_sr(x, DTYPE, NATIVE_BF16, r16)
    else:
        y = _to_storage(x, DTYPE, NATIVE_BF16)
    tl.store(_ptr(addr, start, DTYPE, ALIGNED) + offs, y, mask=mask)


@triton.jit
def _update(
    p, g, v, buf, ga,
    lr, alpha, one_minus_alpha, eps, weight_decay, momentum, sign, grad_scale, inv_bc,
    MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr, MOMENTUM: tl.constexpr, CENTERED: tl.constexpr,
    EPS_IN_SQRT: tl.constexpr, GRAD_SCALE: tl.constexpr,
    LR_IN_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, DECOUPLED_WD: tl.constexpr, BIAS_CORRECTION: tl.constexpr,
):
    """The update of one tile in float32: returns the new p, v, buf, ga (buf/ga unchanged when not used)."""
    if GRAD_SCALE:
        g = tl.div_rn(g, grad_scale)  # exactly torch's unscale
    if MAXIMIZE:  # per slot: sign is -1 for maximize, +1 otherwise (exact either way)
        g = g * sign
    if DECOUPLED_WD:  # Keras: p - p * wd * lr before the update (per slot; wd == 0 keeps p exactly)
        p = tl.where(weight_decay != 0.0, p - (p * weight_decay) * lr, p)
    elif WEIGHT_DECAY:  # per slot: a slot without weight decay keeps g exactly (0 * inf would be NaN)
        g = tl.where(weight_decay != 0.0, g + weight_decay * p, g)
    v = alpha * v + (one_minus_alpha * g) * g  # torch's addcmul order: g * g alone overflows above 1.8e19
    var = v
    if BIAS_CORRECTION:  # optax: the averages / (1 - alpha^t)
        var = v * inv_bc
    if CENTERED:
        ga = ga + one_minus_alpha * (g - ga)
        avg = ga
        if BIAS_CORRECTION:
            avg = ga * inv_bc
        var = var - avg * avg
        if BIAS_CORRECTION:  # rounding can make it slightly negative at step 1 (optax then gives NaN)
            var = tl.where(var < 0.0, 0.0, var)
    if EPS_IN_SQRT:
        denom = tl.sqrt_rn(var + eps)
    else:
        denom = tl.sqrt_rn(var) + eps
    if MOMENTUM:
        if LR_IN_MOMENTUM:  # TF1 / Keras / optax: the buffer accumulates lr * g / d
            step = lr * tl.div_rn(g, denom)
            buf = momentum * buf + step
            if NESTEROV:  # optax: lr * g / d + momentum * buf
                p = p - (step + momentum * buf)
            else:
                p = p - buf
        else:
            buf = momentum * buf + tl.div_rn(g, denom)
            p = p - lr * buf
    else:
        p = p - lr * tl.div_rn(g, denom)
    return p, v, buf, ga


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
    _store(p_addr, start, offs, mask, p, P_DTYPE, ALIGNED, NATIVE_BF16, SR, h0 & 0xFFFF)
    _store(v_addr, start, offs, mask, v, S_DTYPE, ALIGNED, NATIVE_BF16, SR, h0 >> 16)
    if MOMENTUM:
        _store(b_addr, start, offs, mask, b, S_DTYPE, ALIGNED, NATIVE_BF16, SR, h1 & 0xFFFF)
    if CENTERED:
        _store(a_addr, start, offs, mask, a, S_DTYPE, ALIGNED, NATIVE_BF16, SR, h1 >> 16)


@triton.jit
def _update_chunk(
    p_addr, g_addr, v_addr, b_addr, a_addr, start, numel,
    lr, alpha, one_minus_alpha, eps, weight_decay, momentum, sign, grad_scale, inv_bc, key,
    P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr,
    MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr, MOMENTUM: tl.constexpr, CENTERED: tl.constexpr,
    EPS_IN_SQRT: tl.constexpr, GRAD_SCALE: tl.constexpr,
    LR_IN_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, DECOUPLED_WD: tl.constexpr, BIAS_CORRECTION: tl.constexpr,
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
    p0, v0, b0, a0 = _update(p0, g0, v0, b0, a0, lr, alpha, one_minus_alpha, eps, weight_decay, momentum, sign,
                             grad_scale, inv_bc, MAXIMIZE, WEIGHT_DECAY, MOMENTUM, CENTERED, EPS_IN_SQRT, GRAD_SCALE,
                             LR_IN_MOMENTUM, NESTEROV, DECOUPLED_WD, BIAS_CORRECTION)
    _store_tile(p0, v0, b0, a0, p_addr, v_addr, b_addr, a_addr, start, offs, m0, key, P_DTYPE, S_DTYPE, MOMENTUM,
                CENTERED, SR, FULL_ALIGNED, NATIVE_BF16)
    p1, v1, b1, a1 = _update(p1, g1, v1, b1, a1, lr, alpha, one_minus_alpha, eps, weight_decay, momentum, sign,
                             grad_scale, inv_bc, MAXIMIZE, WEIGHT_DECAY, MOMENTUM, CENTERED, EPS_IN_SQRT, GRAD_SCALE,
                             LR_IN_MOMENTUM, NESTEROV, DECOUPLED_WD, BIAS_CORRECTION)
    _store_tile(p1, v1, b1, a1, p_addr, v_addr, b_addr, a_addr, s1, offs, m1, key, P_DTYPE, S_DTYPE, MOMENTUM,
                CENTERED, SR, FULL_ALIGNED, NATIVE_BF16)


@triton.jit
def _rmsprop_kernel(
    tensors, blocks, hyper_ptrs, hyper_vals, grad_scale_ptr, found_inf_ptr,
    P_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr,
    MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr, MOMENTUM: tl.constexpr, CENTERED: tl.constexpr,
    EPS_IN_SQRT: tl.constexpr, LR_ON_DEVICE: tl.constexpr, GRAD_SCALE: tl.constexpr, FOUND_INF: tl.constexpr,
    LR_IN_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, DECOUPLED_WD: tl.constexpr, BIAS_CORRECTION: tl.constexpr,
    STOCHASTIC_ROUNDING: tl.constexpr, NATIVE_BF16: tl.constexpr, BLOCK: tl.constexpr,
):
    found = 0.0
    if FOUND_INF:
        found = tl.load(found_inf_ptr)
    if found == 0.0:  # a step with inf/NaN grads writes nothing (GradScaler's skip)
        info = tl.load(blocks + tl.program_id(0))
        row = tensors + (info >> 32) * 8
        chunk = info & 0xFFFFFFFF
        p_addr = tl.load(row + 0)
        g_addr = tl.load(row + 1)
        v_addr = tl.load(row + 2)
        b_addr = tl.load(row + 3)
        a_addr = tl.load(row + 4)
        step_addr = tl.load(row + 5)
        numel = tl.load(row + 6)
        slot = tl.load(row + 7)
        h = hyper_vals + slot * 16  # float32 columns of this tensor's slot
        if LR_ON_DEVICE:
            lr = tl.load(tl.load(hyper_ptrs + slot * 8).to(tl.pointer_type(tl.float32)))
        else:
            lr = tl.load(h + 2)
        alpha = tl.load(h + 3)
        one_minus_alpha = tl.load(h + 4)
        eps = tl.load(h + 5)
        weight_decay = tl.load(h + 6)
        momentum = tl.load(h + 7)
        sign = tl.load(h + 8)
        start = chunk * BLOCK  # int64: tensors beyond 2**31 elements are fine
        grad_scale = 1.0
        if GRAD_SCALE:
            grad_scale = tl.load(grad_scale_ptr)
        key = tl.full((), 0, tl.uint32)
        if STOCHASTIC_ROUNDING:  # the random stream of this tensor at this step (the host advances the counter)
            t_now = tl.load(step_addr.to(tl.pointer_type(tl.float32))).to(tl.int32).to(tl.uint32)
            key = _stream_key(tl.load(h + 9).to(tl.uint32, bitcast=True), t_now, (info >> 32).to(tl.uint32))
        inv_bc = 1.0
        if BIAS_CORRECTION:  # 1 / (1 - alpha^t), t = this step's count (the host advances the counter after)
            t = tl.load(step_addr.to(tl.pointer_type(tl.float32))) + 1.0
            e = t.to(tl.int32)
            base = alpha * 1.0
            acc = alpha * 0.0 + 1.0
            while e > 0:  # alpha^t by squaring: log2(t) multiplications
                acc = tl.where((e & 1) == 1, acc * base, acc)
                base = base * base
                e = e >> 1
            inv_bc = tl.div_rn(1.0 + alpha * 0.0, 1.0 - acc)
        aligned = ((p_addr | g_addr | v_addr | b_addr | a_addr) & 15) == 0
        if aligned and (start + BLOCK <= numel):
            _update_chunk(p_addr, g_addr, v_addr, b_addr, a_addr, start, numel,
                          lr, alpha, one_minus_alpha, eps, weight_decay, momentum, sign, grad_scale, inv_bc, key,
                          P_DTYPE, S_DTYPE, MAXIMIZE, WEIGHT_DECAY, MOMENTUM, CENTERED, EPS_IN_SQRT, GRAD_SCALE,
                          LR_IN_MOMENTUM, NESTEROV, DECOUPLED_WD, BIAS_CORRECTION, STOCHASTIC_ROUNDING, True,
                          NATIVE_BF16, BLOCK)
        else:
            _update_chunk(p_addr, g_addr, v_addr, b_addr, a_addr, start, numel,
                          lr, alpha, one_minus_alpha, eps, weight_decay, momentum, sign, grad_scale, inv_bc, key,
                          P_DTYPE, S_DTYPE, MAXIMIZE, WEIGHT_DECAY, MOMENTUM, CENTERED, EPS_IN_SQRT, GRAD_SCALE,
                          LR_IN_MOMENTUM, NESTEROV, DECOUPLED_WD, BIAS_CORRECTION, STOCHASTIC_ROUNDING, False,
                          NATIVE_BF16, BLOCK)
        if not (BIAS_CORRECTION or STOCHASTIC_ROUNDING):  # noqa: SIM102  (constexpr; else the host advances them)
            if (chunk == 0) and (step_addr != 0):
                sp = step_addr.to(tl.pointer_type(tl.float32))
                tl.store(sp, tl.load(sp) + 1.0)
