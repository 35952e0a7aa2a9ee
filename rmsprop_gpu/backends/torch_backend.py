"""Pure-torch multi-tensor RMSprop: the CPU path, the fallback, and (run in float64) the test oracle.

Math runs in float32 for 16-bit storage (float64 for float64) and is cast once on store, like the kernels.
On the CPU, large groups run in cache-sized batches of flat views: every op of the step reads data that the
previous op left in the L3 cache, instead of streaming each tensor from memory once per op (torch's foreach
makes 5 to 9 such passes). Same ops, same rounding, element for element; 1.2-1.7x on this project's CPU
for tensors of 2**20 elements and more (perf/bench.py's CPU mode).
"""

from __future__ import annotations

import torch

from .._contract import Group, Hyper
from ..quantize import decode, encode, from_kernel_order, kernel_order
from .base import Backend, advance_steps

CPU_BATCH = 1 << 19  # elements per batch: 4-5 fp32 arrays of it (8-10 MB) stay in a 32 MB L3 cache
_TORCH_DTYPES = {"float64": torch.float64, "float32": torch.float32,
                 "float16": torch.float16, "bfloat16": torch.bfloat16}


M32 = 0xFFFFFFFF
SR_CHUNK = 1 << 22  # elements per stochastic-rounding pass (int64 temporaries)


def mix32(x):
    """The kernels' "lowbias32" hash (kernels/rmsprop.cu: mix32) on Python ints or int64 tensors of uint32s."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def stream_key(seed: int, step: int, stream: int) -> int:
    """The random stream of one tensor (its stream id) at one step (kernels: stream_key). Past 2**32 steps
    (float64 counters) the step's high half gives other streams: never a repeat."""
    key = mix32(seed ^ mix32((step + 0x9E3779B9 * (stream + 1)) & M32))
    return mix32(key ^ (step >> 32)) if step >> 32 else key


def stream_bits(key: int, start: int, n: int, output: int, device) -> torch.Tensor:
    """16 random bits (int64) for elements start..start+n of output o (0 p, 1 square_avg, 2 momentum_buffer,
    3 grad_avg): the low or high half of mix32(key ^ (i * 2 + o // 2)), the low half for even o."""
    idx = torch.arange(start, start + n, device=device, dtype=torch.int64)
    return (mix32(key ^ ((idx * 2 + output // 2) & M32)) >> (16 * (output % 2))) & 0xFFFF


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, key: int, output: int) -> torch.Tensor:
    """float32 x (flat, in memory order) -> dtype (float16 / bfloat16), rounded stochastically exactly as the
    kernels do (kernels/rmsprop.cu: from_float_sr): element i's output o (0 p, 1 square_avg, 2 momentum_buffer,
    3 grad_avg) takes 16 bits of mix32(key ^ (i * 2 + o // 2)), the low half for even o."""
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    for lo in range(0, x.numel(), SR_CHUNK):
        xs = x[lo:lo + SR_CHUNK]
        r16 = stream_bits(key, lo, xs.numel(), output, x.device)
        bits = xs.view(torch.int32).to(torch.int64) & M32
        if dtype == torch.bfloat16:
            y = torch.where((bits & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, ((bits + r16) >> 16) & 0xFFFF)
            y = y.to(torch.int32).to(torch.int16).view(torch.bfloat16)
        else:
            mag, sign = bits & 0x7FFFFFFF, bits & 0x80000000
            e = mag >> 23
            drop = torch.where(e >= 113, 13, 126 - e.clamp(max=126)).clamp(max=23)
            noise = ((r16 << 16) & M32) >> (32 - drop)
            keep = (M32 << drop) & M32
            big = (sign | ((mag + noise) & keep)).to(torch.int32).view(torch.float32)  # exact in float16
            up = mag.to(torch.int32).view(torch.float32) * 16777216.0 > r16.to(torch.float32) * 2.0**-16
            tiny = torch.where(up, 2.0**-24, 0.0).to(torch.float32)
            tiny = torch.where(sign != 0, -tiny, tiny)
            y = torch.where(mag >= 0x7F800000, xs, torch.where(e >= 103, big, tiny)).to(dtype)
        out[lo:lo + SR_CHUNK] = y
    return out


def _compute_copies(ts: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """ts itself when it already has the compute dtype (a group's lists are homogeneous), else float copies."""
    if not ts or ts[0].dtype == dtype:
        return ts
    return [t.to(dtype) for t in ts]


def cache_batches(group: Group, batch: int | None = None) -> list[Group]:
    """The group as batches of about `batch` (CPU_BATCH) elements: contiguous tensors cut into flat views, others
    whole. Batches carry no step counters (the caller advances them once per tensor)."""
    batch = batch or CPU_BATCH
    if group.device.type != "cpu" or group.state_dtype == "uint8" or sum(p.numel() for p in group.params) <= batch:
        return [group]
    lists = (group.params, group.grads, group.square_avgs, group.momentum_buffers, group.grad_avgs)

    def empty() -> Group:
        return Group(group.device, group.param_dtype, group.state_dtype, [], [], [],
                     None if group.momentum_buffers is None else [], None if group.grad_avgs is None else [])

    out, cur, size = [], empty(), 0
    for i in range(len(group)):
        ts = [None if xs is None else xs[i] for xs in lists]
        n = ts[0].numel()
        flat = all(t is None or t.is_contiguous() for t in ts)
        for start in range(0, n, batch) if flat else (0,):
            pieces = [t if (t is None or not flat) else t.view(-1)[start:start + batch] for t in ts]
            for dst, piece in zip((cur.params, cur.grads, cur.square_avgs, cur.momentum_buffers, cur.grad_avgs),
                                  pieces):
                if dst is not None:
                    dst.append(piece)
            size += pieces[0].numel()
            if size >= batch:
                out.append(cur)
                cur, size = empty(), 0
    if len(cur):
        out.append(cur)
    return out


class TorchBackend(Backend):
    name = "torch"

    def unavailable_reason(self, device):
        return None

    def unsupported_reason(self, group, hyper):
        if any(not isinstance(t, torch.Tensor) for t in group.params):
            return "the torch backend takes torch tensors, not CuPy arrays"
        return None

    def run(self, prepared, group: Group, hypers: list[Hyper]) -> None:
        found_inf = hypers[0].found_inf
        if found_inf is not None and bool(found_inf.item() != 0):  # reference path: a host read is fine here
            return
        if group.state_dtype == "uint8":
            for g, h in group.by_slot(hypers):
                self._run_quantized(g, h)
        elif len(hypers) == 1 and not group.read_steps:
            for batch in cache_batches(group):  # views of this call's tensors: none kept after the step
                self._math(batch, hypers[0])
        else:  # one hyper per slot; bias correction and SR read each tensor's step, so whole tensors
            for g, h in group.by_slot(hypers):
                for batch in (cache_batches(g) if not g.read_steps else [g]):
                    self._math(batch, h)
        advance_steps(group.steps, None)

    def _run_quantized(self, group: Group, hyper: Hyper) -> None:
        """8-bit state (rmsprop_gpu/quantize.py), one tensor at a time: decode to float32 in the kernels' element
        order, the same float32 math (var clamped at 0: quantized v and grad_avg can cross), encode with the
        stochastic-rounding stream of (sr_seed, step, row)."""
        for row in range(len(group)):
            p, stream = group.params[row], group.streams[row] if group.streams else row
            flat_p, flat_g = kernel_order(p, p), kernel_order(group.grads[row], p)
            n = flat_p.numel()
            qs = (group.square_avgs[row], None if group.momentum_buffers is None else group.momentum_buffers[row],
                  None if group.grad_avgs is None else group.grad_avgs[row])
            v, b, a = (None if q is None else decode(q, n, signed) for q, signed in zip(qs, (False, True, True)))
            v = v * v  # the stored root, squared: v, or centered the variance v - ga^2 (quantize.py)
            if a is not None:
                v = v + a * a
            one = Group(group.device, group.param_dtype, "float32", [flat_p], [flat_g], [v],
                        None if b is None else [b], None if a is None else [a],
                        None if group.steps is None else [group.steps[row]], streams=[stream],
                        read_steps=group.read_steps)
            self._math(one, hyper, clamp_var=True)
            if flat_p.untyped_storage().data_ptr() != p.untyped_storage().data_ptr():  # p went through a copy
                p.copy_(from_kernel_order(flat_p, p))
            key = stream_key(hyper.sr_seed, int(group.steps[row]), stream)  # a host read: the reference path
            kept = v if a is None else (v - a * a).clamp_min_(0.0)
            for out_id, (q, x, signed) in enumerate(zip(qs, (kept.sqrt(), b, a), (False, True, True)), start=1):
                if q is not None:  # codes round stochastically: an average's small steps survive in expectation
                    encode(x, signed, out=q, r16=stream_bits(key, 0, n, out_id, x.device))

    def _math(self, group: Group, hyper: Hyper, clamp_var: bool = False) -> None:
        cdt = torch.float64 if group.param_dtype == "float64" else torch.float32
        params, grads, vs = group.params, group.grads, group.square_avgs
        P = _compute_copies(params, cdt)
        V = _compute_copies(vs, cdt)
        G = _compute_copies(grads, cdt)
        B = _compute_copies(group.momentum_buffers, cdt) if group.momentum_buffers is not None else None
        A = _compute_copies(group.grad_avgs, cdt) if group.grad_avgs is not None else None

        lr = hyper.lr
        if isinstance(lr, torch.Tensor):
            lr = lr.to(device=group.device, dtype=cdt) if hyper.capturable else float(lr)
        if hyper.grad_scale is not None:
            G = torch._foreach_div(G, hyper.grad_scale.to(device=group.device, dtype=cdt))
        if hyper.maximize:
            G = torch._foreach_neg(G)
        if hyper.weight_decay != 0:
            if hyper.decoupled_weight_decay:  # Keras: p - p * wd * lr, before the update
                decay = torch._foreach_mul(P, hyper.weight_decay)
                torch._foreach_mul_(decay, lr)
                torch._foreach_sub_(P, decay)
            else:
                G = torch._foreach_add(G, P, alpha=hyper.weight_decay)
        alpha = hyper.alpha
        torch._foreach_mul_(V, alpha)
        torch._foreach_addcmul_(V, G, G, value=1 - alpha)
        var = V
        if hyper.bias_correction:  # optax: both averages / (1 - alpha^t), t the step after this one
            bc = [1 - alpha ** (s.to(device=group.device, dtype=cdt).reshape(()) + 1) for s in group.steps]
            var = [v / b for v, b in zip(V, bc)]
        if A is not None:
            torch._foreach_lerp_(A, G, 1 - alpha)
            avg = [a / b for a, b in zip(A, bc)] if hyper.bias_correction else A
            var = torch._foreach_addcmul(var, avg, avg, value=-1)
            if hyper.bias_correction or clamp_var:  # v - ga^2 < 0 by rounding at step 1, or by quantization
                torch._foreach_clamp_min_(var, 0.0)
        if var is not V:  # var is already a temporary: sqrt in place
            denom = var
            if hyper.eps_in_sqrt:
                torch._foreach_add_(denom, hyper.eps)
            torch._foreach_sqrt_(denom)
        elif hyper.eps_in_sqrt:  # out of place first: V itself is state and must not change
            denom = torch._foreach_add(var, hyper.eps)
            torch._foreach_sqrt_(denom)
        else:
            denom = torch._foreach_sqrt(var)
        if not hyper.eps_in_sqrt:
            torch._foreach_add_(denom, hyper.eps)

        if B is not None and hyper.raw_grad_momentum:  # fastai: a momentum of raw grads, divided after
            torch._foreach_mul_(B, hyper.momentum)
            torch._foreach_add_(B, G)
            if isinstance(lr, torch.Tensor):
                torch._foreach_sub_(P, torch._foreach_mul(torch._foreach_div(B, denom), lr))
            else:
                torch._foreach_addcdiv_(P, B, denom, value=-lr)
        elif B is not None and hyper.lr_in_momentum:  # TF1 / Keras / optax: the buffer accumulates lr * g / d
            step = torch._foreach_div(G, denom)
            torch._foreach_mul_(step, lr)
            torch._foreach_mul_(B, hyper.momentum)
            torch._foreach_add_(B, step)
            if hyper.nesterov:  # optax: lr * g / d + momentum * buf
                torch._foreach_add_(step, torch._foreach_mul(B, hyper.momentum))
                torch._foreach_sub_(P, step)
            else:
                torch._foreach_sub_(P, B)
        elif B is not None:
            torch._foreach_mul_(B, hyper.momentum)
            torch._foreach_addcdiv_(B, G, denom)
            if isinstance(lr, torch.Tensor):
                torch._foreach_sub_(P, torch._foreach_mul(B, lr))
            else:
                torch._foreach_add_(P, B, alpha=-lr)
        elif isinstance(lr, torch.Tensor):
            torch._foreach_sub_(P, torch._foreach_mul(torch._foreach_div(G, denom), lr))
        else:
            torch._foreach_addcdiv_(P, G, denom, value=-lr)  # p - lr * (g / d), as torch: no update temporary

        outputs = ((params, P), (vs, V), (group.momentum_buffers, B), (group.grad_avgs, A))
        for out_id, (dst, src) in enumerate(outputs):
            if src is None or src is dst:
                continue
            if hyper.stochastic_rounding and dst[0].dtype in (torch.float16, torch.bfloat16):
                for row, (d, x, s) in enumerate(zip(dst, src, group.steps)):
                    stream = group.streams[row] if group.streams else row
                    key = stream_key(hyper.sr_seed, int(s), stream)  # a host read: the reference path
                    # elements numbered as the kernels walk d (memory order; logical order when d is not dense)
                    d.copy_(from_kernel_order(stochastic_round(kernel_order(x, d), d.dtype, key, out_id), d))
            else:  # 16-bit storage: round the float32 results once
                torch._foreach_copy_(dst, src)
