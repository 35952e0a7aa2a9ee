"""8-bit blockwise optimizer state (state_bits=8): the storage format, and its codec in torch.

One uint8 tensor per state tensor (square_avg, momentum_buffer, grad_avg), so the kernel contract keeps one
address per state:
    bytes [0, n16)             codes, one per element, in the order the kernels walk the param (its memory
                               order when it is dense, else its logical order); n16 = numel rounded up to 16
    bytes [n16, n16 + n16/16)  scale exponents, one per block of 16 elements (block j: elements 16j..16j+15)
That is 17/16 = 1.0625 bytes per element (fp32 state: 4). A block is what one CUDA thread owns, so the kernels
need no cross-thread reduction for its maximum.

Scale byte s: the block's values are code_value * 2**(s - 127); s = 0 (a zero-initialized tensor) decodes to 0,
s = 255 marks a block that held inf or NaN (it decodes to NaN). Encoding a block: m = the largest magnitude
(compared as integer bits, so NaN and inf count), s = exponent(m) clamped to [1, 253], y = x * 2**(127 - s)
(|y| < 2: the maximum lands in the codes' top binade), then y's float32 bits are rounded to nearest even onto
the code grid (y scaled by 2**-112 first, so that the code's 4 exponent bits are the float's: the half-precision
trick), saturating at the largest code. Decoding then encoding gives the same bytes back (the decoded maximum
has exponent s again), so a state converted to float and back is unchanged.
Codes (8-bit floats, exponent bias 15, subnormals, no inf/NaN):
    square_avg       sqrt(v) as unsigned E4M4: 2**-18 .. 1.9375 times the block scale, relative step 1/16
                     (storing the root halves the error of the denominator sqrt(v) and doubles v's range);
                     with centered=True sqrt(v - grad_avg**2), the variance, so that its error is relative to
                     the variance (v - grad_avg**2 cancels where grads are steady: from quantized v and
                     grad_avg the denominator could be off by any factor); v = variance + grad_avg**2
    momentum_buffer  signed E4M3: +-(2**-17 .. 1.875), relative step 1/8
    grad_avg         signed E4M3
Every step of it is an exact integer operation or one IEEE float32 multiply (no flush to zero), so the Triton
kernel, the CUDA C kernel and this torch code produce the same bytes from the same float32 values.
Tensors under Q8_MIN_NUMEL elements keep 32-bit state (as bitsandbytes does): their bytes are negligible.
"""

from __future__ import annotations

import torch

from ._arrays import dense_strides

Q8_MIN_NUMEL = 4096
Q8_PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
Q8_BLOCK = 16
SIGNED = {"square_avg": False, "momentum_buffer": True, "grad_avg": True}
TWO_112 = 2.0**112
TWO_M112 = 2.0**-112
M31 = 0x7FFFFFFF


def q8_nbytes(numel: int) -> int:
    """Bytes of one 8-bit state tensor for `numel` elements: codes padded to 16, then one scale byte per 16."""
    n16 = -(-numel // Q8_BLOCK) * Q8_BLOCK
    return n16 + n16 // Q8_BLOCK


def real_numel(p: torch.Tensor) -> int:
    """Elements the kernels update for p (a complex param counts its real and imaginary parts)."""
    return p.numel() * (2 if p.is_complex() else 1)


def quantizable(p: torch.Tensor) -> bool:
    """Whether state_bits=8 gives p 8-bit state (else it keeps 32-bit state: a small tensor)."""
    return real_numel(p) >= Q8_MIN_NUMEL


def check_quantizable_dtype(p: torch.Tensor) -> None:
    dtype = p.real.dtype if p.is_complex() else p.dtype
    if dtype not in Q8_PARAM_DTYPES:
        raise ValueError(f"state_bits=8 keeps the state of float32, float16 and bfloat16 params; this param is "
                         f"{p.dtype} (use state_bits=32 for its param group)")
    if type(p).__name__ == "DTensor":
        raise ValueError("state_bits=8 does not support DTensor (FSDP2) params: each shard's blocks would change "
                         "with the sharding")


def _bits(x: torch.Tensor) -> torch.Tensor:
    """float32 -> its bits as int64 in [0, 2**32)."""
    return x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def _from_bits(b: torch.Tensor) -> torch.Tensor:
    return b.to(torch.int32).view(torch.float32)  # low 32 bits (int64 -> int32 wraps)


def decode(q: torch.Tensor, numel: int, signed: bool) -> torch.Tensor:
    """uint8 state (codes + scales) -> float32 values, flat (numel,). For square_avg (unsigned) the value is the
    stored root: square it for v."""
    n16 = -(-numel // Q8_BLOCK) * Q8_BLOCK
    c = q[:n16].to(torch.int64)
    s = q[n16:n16 + n16 // Q8_BLOCK].to(torch.int64)
    mag = ((c & 0x7F) << 20) if signed else (c << 19)
    x = _from_bits(mag) * TWO_112  # exact: the code's exponent becomes the float's
    if signed:
        x = torch.where((c & 0x80) != 0, -x, x)
    scale = _from_bits(s << 23).repeat_interleave(Q8_BLOCK)  # 2**(s - 127); 0 for s = 0, inf for s = 255
    return (x * scale)[:numel]


def encode(x: torch.Tensor, signed: bool, out: torch.Tensor | None = None,
           r16: torch.Tensor | None = None) -> torch.Tensor:
    """float32 values, flat (numel,) -> uint8 state (codes + scales), written into out when given. r16: 16 random
    bits per element (int64): stochastic rounding of the codes (the step's), else round to nearest even."""
    numel = x.numel()
    n16 = -(-numel // Q8_BLOCK) * Q8_BLOCK
    xs = torch.zeros(n16, dtype=torch.float32, device=x.device)
    xs[:numel] = x
    b = _bits(xs)
    mb = (b & M31).view(-1, Q8_BLOCK).amax(dim=1)  # the block's largest magnitude, as bits (NaN > inf > finite)
    bad = mb >= 0x7F800000
    s = torch.where(bad, 255, (mb >> 23).clamp(1, 253))
    inv = _from_bits((254 - s.clamp(max=253)) << 23).repeat_interleave(Q8_BLOCK)  # 2**(127 - s)
    y = (xs * inv) * TWO_M112  # two roundings, in this order, as in the kernels
    yb = _bits(y)
    mag = yb & M31
    shift = 20 if signed else 19  # the float bits below the code's mantissa
    if r16 is None:
        up = (1 << (shift - 1)) - 1 + ((mag >> shift) & 1)  # to nearest even
    else:
        up = torch.zeros(n16, dtype=torch.int64, device=x.device)
        up[:numel] = r16 << (shift - 16)  # random bits at the top of the dropped field: up with p = fraction
    c = ((mag + up) >> shift).clamp(max=127 if signed else 255)
    if signed:
        c = c | ((yb >> 24) & 0x80)
    c = torch.where(bad.repeat_interleave(Q8_BLOCK), 0, c)
    if out is None:
        out = torch.empty(q8_nbytes(numel), dtype=torch.uint8, device=x.device)
    out[:n16] = c.to(torch.uint8)
    out[n16:] = s.to(torch.uint8)
    return out


def kernel_order(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t (shaped like `like`) flattened in the order the kernels walk `like`: its memory order when `like` is
    dense, else its logical order. A view of t when t shares that layout, else a copy."""
    if t.is_complex():
        t, like = torch.view_as_real(t), torch.view_as_real(like) if like.is_complex() else like
    strides = dense_strides(like)
    order = sorted(range(t.dim()), key=lambda d: (-strides[d], d))
    return t.permute(order).reshape(-1)


def from_kernel_order(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The inverse of kernel_order: a tensor with like's shape (and its layout when dense) holding flat."""
    real = torch.view_as_real(like) if like.is_complex() else like
    out = torch.empty_strided(real.shape, dense_strides(real), dtype=flat.dtype, device=flat.device)
    kernel_order(out, real).copy_(flat)  # a view: out's layout is the kernel order
    return out


def quantize_state(x: torch.Tensor, param: torch.Tensor, key: str) -> torch.Tensor:
    """A float state tensor of `param` (torch's layout: param's shape) -> its 8-bit state (uint8, flat)."""
    flat = kernel_order(x.detach(), param).to(device=param.device, dtype=torch.float32)
    if not SIGNED[key]:
        flat = flat.sqrt()
    return encode(flat, SIGNED[key])


def dequantize_state(q: torch.Tensor, param: torch.Tensor, key: str, dtype=torch.float32) -> torch.Tensor:
    """An 8-bit state tensor of `param` -> float state shaped (and laid out) like param, in `dtype`."""
    flat = decode(q.to(param.device), real_numel(param), SIGNED[key])
    if not SIGNED[key]:
        flat = flat * flat
    out = from_kernel_order(flat, param)
    if param.is_complex():
        return torch.view_as_complex(out.contiguous()).to(dtype.to_complex() if not dtype.is_complex else dtype)
    return out.to(dtype)


def _real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def _like(x: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    return torch.view_as_complex(x.contiguous()) if param.is_complex() else x


def float_state(state: dict, param: torch.Tensor, centered: bool, dtype=torch.float32) -> dict:
    """One param's state with its 8-bit tensors decoded into torch's meaning (square_avg = v, param's shape);
    other entries as they are."""
    out = dict(state)
    for key in SIGNED:
        if key in state and is_quantized(state[key]):
            out[key] = dequantize_state(state[key], param, key)
    if centered and is_quantized(state.get("square_avg")) and "grad_avg" in out:  # stored: the variance
        ga = _real(out["grad_avg"]).float()
        out["square_avg"] = _like(_real(out["square_avg"]) + ga * ga, param)
    for key in SIGNED:
        if key in state and is_quantized(state[key]):
            out[key] = out[key].to(dtype.to_complex() if param.is_complex() else dtype)
    return out


def q8_state(state: dict, param: torch.Tensor, centered: bool) -> dict:
    """One param's state with its float tensors encoded to 8 bits (centered: square_avg holds the variance)."""
    out = dict(state)
    for key in SIGNED:
        if key in state and not is_quantized(state[key]):
            x = state[key].to(param.device)
            if key == "square_avg" and centered and "grad_avg" in state:
                ga = state["grad_avg"]
                ga = _real(dequantize_state(ga, param, "grad_avg") if is_quantized(ga) else ga.to(param.device))
                ga = ga.float()
                x = _like((_real(x).float() - ga * ga).clamp_min(0.0), param)
            out[key] = quantize_state(x, param, key)
    return out


def zeros_state(param: torch.Tensor, fill: float = 0.0, key: str = "square_avg") -> torch.Tensor:
    """The 8-bit state of `param` holding `fill` everywhere (0: all bytes zero)."""
    n = real_numel(param)
    if fill == 0.0:
        return torch.zeros(q8_nbytes(n), dtype=torch.uint8, device=param.device)
    x = torch.full((n,), float(fill), dtype=torch.float32, device=param.device)
    return encode(x.sqrt() if not SIGNED[key] else x, SIGNED[key])


def is_quantized(state: torch.Tensor) -> bool:
    return isinstance(state, torch.Tensor) and state.dtype == torch.uint8
