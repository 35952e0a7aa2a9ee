"""The float64 oracle, written out from the update equations (DESIGN.md), element by element in torch."""

import numpy as np
import torch


def reference_step(p, g, v, buf=None, ga=None, *, lr, alpha, eps, weight_decay=0.0, momentum=0.0,
                   centered=False, maximize=False, eps_in_sqrt=False, grad_scale=None, found_inf=None,
                   clamp_var=False):
    """New (p, v, buf, ga) in float64 for one step; inputs are not modified. clamp_var: v - ga^2 clamped at 0
    (8-bit state)."""
    p, g, v = p.double(), g.double(), v.double()
    buf = buf.double() if buf is not None else None
    ga = ga.double() if ga is not None else None
    if found_inf is not None and float(found_inf) != 0:
        return p, v, buf, ga
    if grad_scale is not None:
        g = g / float(grad_scale)
    lr = float(lr)
    g = -g if maximize else g
    g = g + weight_decay * p
    v = alpha * v + (1 - alpha) * g * g
    var = v
    if centered:
        ga = ga + (1 - alpha) * (g - ga)
        var = v - ga * ga
        if clamp_var:
            var = var.clamp_min(0.0)
    d = torch.sqrt(var + eps) if eps_in_sqrt else torch.sqrt(var) + eps
    if momentum > 0:
        buf = momentum * buf + g / d
        p = p - lr * buf
    else:
        p = p - lr * g / d
    return p, v, buf, ga


# ---- the stochastic-rounding stream (kernels/rmsprop.cu: mix32, stream_key, pair_bits) in numpy
def mix32(x):
    x = np.asarray(x, dtype=np.uint32)
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint32(16))
        x = x * np.uint32(0x7FEB352D)
        x = x ^ (x >> np.uint32(15))
        x = x * np.uint32(0x846CA68B)
        return x ^ (x >> np.uint32(16))


def stream_r16(seed: int, step: int, row: int, n: int, output: int):
    """16 random bits per element of output o (0 p, 1 square_avg, 2 momentum_buffer, 3 grad_avg)."""
    with np.errstate(over="ignore"):
        key = mix32(np.uint32(seed) ^ mix32(np.uint32(step) + np.uint32(0x9E3779B9) * np.uint32(row + 1)))
        h = mix32(key ^ (np.arange(n, dtype=np.uint32) * np.uint32(2) + np.uint32(output // 2)))
    return ((h >> np.uint32(16 * (output % 2))) & np.uint32(0xFFFF)).astype(np.uint64)


# ---- 8-bit state, written out again from its specification (rmsprop_gpu/quantize.py's docstring) in numpy
def q8_encode(x, signed: bool, r16=None):
    """float32 values (flat) -> uint8 codes + one scale byte per block of 16. r16: 16 random bits per element
    (stochastic rounding: up with probability equal to the fraction of a code step), else nearest even."""
    x = np.asarray(x, dtype=np.float32)
    n16 = -(-x.size // 16) * 16
    xs = np.zeros(n16, np.float32)
    xs[: x.size] = x
    bits = xs.view(np.uint32)
    m = (bits & np.uint32(0x7FFFFFFF)).reshape(-1, 16).max(axis=1)
    bad = m >= 0x7F800000
    s = np.where(bad, 255, np.clip(m >> 23, 1, 253)).astype(np.uint32)
    inv = ((254 - np.minimum(s, 253)) << 23).astype(np.uint32)
    with np.errstate(all="ignore"):
        y = (xs * np.repeat(inv.view(np.float32), 16)) * np.float32(2.0**-112)
    yb = y.view(np.uint32).astype(np.uint64)
    mag = yb & 0x7FFFFFFF
    drop = 20 if signed else 19  # float bits below the code's 3 or 4 mantissa bits
    if r16 is None:
        up = (1 << (drop - 1)) - 1 + ((mag >> drop) & 1)
    else:
        up = np.zeros(n16, np.uint64)
        up[: x.size] = np.asarray(r16, np.uint64) * 2 ** (drop - 16)
    c = np.minimum((mag + up) >> drop, 127 if signed else 255)
    if signed:
        c = c | ((yb >> 24) & 0x80)
    c = np.where(np.repeat(bad, 16), 0, c)
    return np.concatenate([c.astype(np.uint8), s.astype(np.uint8)])


def q8_decode(q, numel: int, signed: bool):
    """uint8 codes + scales -> float64 values (exact: every code times its power-of-two scale)."""
    q = np.asarray(q, dtype=np.uint8)
    n16 = -(-numel // 16) * 16
    c, s = q[:n16].astype(np.int64), q[n16:].astype(np.int64)
    e, m = ((c & 0x7F) >> 3, c & 7) if signed else (c >> 4, c & 15)
    frac = 8.0 if signed else 16.0
    mag = np.where(e > 0, 2.0 ** (e - 15.0) * (1 + m / frac), 2.0**-14 * m / frac)
    val = np.where((c & 0x80) != 0, -mag, mag) if signed else mag
    scale = np.repeat(np.where(s == 255, np.inf, 2.0 ** (s - 127.0)), 16)
    with np.errstate(invalid="ignore"):
        out = val * np.where(s[np.arange(n16) // 16] == 0, 0.0, scale)
    return out[:numel]
