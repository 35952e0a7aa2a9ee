"""Every backend x option x dtype against the float64 oracle, one step at a time, params AND states."""

import zlib

import pytest
import torch

from rmsprop_gpu import rmsprop
from tests.matrix import BACKENDS
from tests.tolerances import ORACLE
from tools.oracle import reference_step

LAYOUTS = [  # (param dtype, state dtype)
    (torch.float32, torch.float32), (torch.float16, torch.float16), (torch.float16, torch.float32),
    (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
]
OPTIONS = {
    "default": {},
    "weight_decay": dict(weight_decay=0.1),
    "momentum": dict(momentum=0.9),
    "centered": dict(centered=True),
    "centered_momentum": dict(centered=True, momentum=0.9),
    "maximize": dict(maximize=True),
    "eps_in_sqrt": dict(eps_in_sqrt=True, eps=0.05),
    "eps_in_sqrt_centered": dict(eps_in_sqrt=True, eps=0.05, centered=True),
    "all": dict(weight_decay=0.05, momentum=0.8, centered=True, maximize=True, alpha=0.9, eps=1e-3),
    "tensor_lr": dict(lr="tensor", momentum=0.5),
    "grad_scale": dict(grad_scale=1024.0, weight_decay=0.01),
}


def make_tensors(gen, pdt, sdt, opts, grad_mult=1.0):
    """Fresh random params, grads and states of awkward sizes and layouts (never zeros)."""

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    shapes = [(0,), (1,), (1023,), (4097,), (2, 2049)]
    base = [rnd(*s) for s in shapes]
    p_big = rnd(33, 70)
    p_off = rnd(1000)
    params = [b.to(pdt) for b in base]
    params.append(p_big.to(pdt)[:, ::2])  # 2-D non-contiguous view
    params.append(p_off.to(pdt)[1:])  # unaligned view: the kernels' slow path
    grads = [(rnd(*p.shape) * grad_mult).to(pdt) for p in params]

    def state_like(p, fill):
        return fill(p.shape).to(sdt)

    vs = [state_like(p, lambda s: torch.rand(*s, generator=gen, dtype=torch.float64) + 0.05) for p in params]
    bufs = [state_like(p, lambda s: rnd(*s) * 0.3) for p in params] if opts.get("momentum", 0) > 0 else None
    gas = None
    if opts.get("centered"):
        gas = [(v.double().sqrt() * (torch.rand(v.shape, generator=gen, dtype=torch.float64) * 1.8 - 0.9)).to(sdt)
               for v in vs]
    steps = [torch.zeros((), dtype=torch.float32) for _ in params]
    return params, grads, vs, bufs, gas, steps


def hyper(opts):
    kw = dict(lr=0.01, alpha=0.99, eps=1e-8)
    kw.update({k: v for k, v in opts.items() if k not in ("lr", "grad_scale")})
    if opts.get("lr") == "tensor":
        kw["lr"] = torch.tensor(0.02)
    if "grad_scale" in opts:
        kw["grad_scale"] = torch.tensor(opts["grad_scale"])
    return kw


def assert_step_matches_oracle(before, after, kw, dtype_of):
    p0, g0, v0, b0, a0 = before
    p1, v1, b1, a1 = after
    okw = {k: v for k, v in kw.items() if k not in ("grad_scale", "found_inf")}
    for i in range(len(p0)):
        exp = reference_step(p0[i], g0[i], v0[i], b0[i] if b0 else None, a0[i] if a0 else None,
                             grad_scale=kw.get("grad_scale"), found_inf=kw.get("found_inf"), **okw)
        for name, got, want in (("param", p1[i], exp[0]), ("square_avg", v1[i], exp[1]),
                                ("momentum_buffer", b1[i] if b1 else None, exp[2]),
                                ("grad_avg", a1[i] if a1 else None, exp[3])):
            if got is None:
                continue
            tol = ORACLE[dtype_of(got)]
            torch.testing.assert_close(got.double(), want, **tol, msg=lambda m, n=name, i=i: f"{n}[{i}]: {m}")


@pytest.mark.parametrize("opt_name", list(OPTIONS))
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lt: f"{str(lt[0])[6:]}-{str(lt[1])[6:]}")
@pytest.mark.parametrize("backend", BACKENDS)
def test_five_steps_against_float64_oracle(backend, layout, opt_name):
    opts = OPTIONS[opt_name]
    gen = torch.Generator().manual_seed(zlib.crc32(f"{backend}{opt_name}{layout}".encode()))
    pdt, sdt = layout
    mult = opts.get("grad_scale", 1.0)
    params, grads, vs, bufs, gas, steps = make_tensors(gen, pdt, sdt, opts, mult)
    kw = hyper(opts)
    for step in range(5):
        if step:
            for g in grads:
                g.copy_(torch.randn(g.shape, generator=gen, dtype=torch.float64) * mult)
        before = ([p.clone() for p in params], [g.clone() for g in grads], [v.clone() for v in vs],
                  [b.clone() for b in bufs] if bufs else None, [a.clone() for a in gas] if gas else None)
        rmsprop(params, grads, vs, gas, bufs, steps, backend=backend, **kw)
        assert_step_matches_oracle(before, (params, vs, bufs, gas), kw, lambda t: str(t.dtype)[6:])
    assert all(float(s) == 5 for s in steps)


def test_float64_torch_backend_against_oracle():
    gen = torch.Generator().manual_seed(7)
    opts = OPTIONS["all"]
    params, grads, vs, bufs, gas, steps = make_tensors(gen, torch.float64, torch.float64, opts)
    kw = hyper(opts)
    before = ([p.clone() for p in params], [g.clone() for g in grads], [v.clone() for v in vs],
              [b.clone() for b in bufs], [a.clone() for a in gas])
    rmsprop(params, grads, vs, gas, bufs, steps, backend="torch", **kw)
    assert_step_matches_oracle(before, (params, vs, bufs, gas), kw, lambda t: "float64")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", [LAYOUTS[0], LAYOUTS[3]], ids=["float32", "bfloat16"])
def test_found_inf_leaves_everything_bit_identical(backend, layout):
    gen = torch.Generator().manual_seed(3)
    opts = dict(momentum=0.9, centered=True)
    params, grads, vs, bufs, gas, steps = make_tensors(gen, *layout, opts)
    snap = [t.clone() for t in params + vs + bufs + gas + steps]
    rmsprop(params, grads, vs, gas, bufs, steps, backend=backend, lr=0.01, momentum=0.9, centered=True,
            grad_scale=torch.tensor(8.0), found_inf=torch.tensor(1.0))
    for a, b in zip(params + vs + bufs + gas + steps, snap):
        assert torch.equal(a, b)
    rmsprop(params, grads, vs, gas, bufs, steps, backend=backend, lr=0.01, momentum=0.9, centered=True,
            grad_scale=torch.tensor(8.0), found_inf=torch.tensor(0.0))
    assert not torch.equal(params[3], snap[3]) and float(steps[0]) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scale_equals_unscaling_first(backend):
    gen = torch.Generator().manual_seed(11)
    a = make_tensors(gen, torch.float32, torch.float32, dict(momentum=0.9))
    b = tuple([t.clone() for t in ts] if ts is not None else None for ts in a)
    scale = 4096.0
    rmsprop(a[0], [g * scale for g in a[1]], a[2], None, a[3], a[5], backend=backend, lr=0.01, momentum=0.9,
            grad_scale=torch.tensor(scale))
    rmsprop(b[0], b[1], b[2], None, b[3], b[5], backend=backend, lr=0.01, momentum=0.9)
    for x, y in zip(a[0] + a[2] + a[3], b[0] + b[2] + b[3]):
        assert torch.equal(x, y)  # a power-of-two scale unscales exactly
