"""rmsprop_gpu.RMSprop as a drop-in for torch.optim.RMSprop: parity, API, state_dict, bad input."""

import copy
import zlib

import pytest
import torch

import rmsprop_gpu
from tests.matrix import BACKENDS
from tests.tolerances import TORCH

OPTIONS = {
    "default": {},
    "weight_decay": dict(weight_decay=0.1),
    "momentum": dict(momentum=0.9),
    "centered": dict(centered=True),
    "centered_momentum": dict(centered=True, momentum=0.9),
    "maximize": dict(maximize=True),
    "all": dict(weight_decay=0.05, momentum=0.8, centered=True, maximize=True, alpha=0.9, eps=1e-6),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SHAPES = [(0,), (1,), (1023,), (4097,)]


def make_params(dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in SHAPES]
    base = torch.randn(9, 40, generator=gen, dtype=torch.float64).to(dtype)
    ps.append(base.t()[:, ::3])  # 2-D non-contiguous view
    return ps


@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
@pytest.mark.parametrize("opt_name", list(OPTIONS))
@pytest.mark.parametrize("backend, dtype", [(b, d) for b in BACKENDS for d in DTYPES
                                            if d != torch.float64 or b == "torch"],  # kernels refuse float64
                         ids=lambda x: str(x).removeprefix("torch."))
def test_parity_with_torch_optim(backend, dtype, opt_name, lr_kind):
    """5 steps, two param groups, params and every state tensor against torch.optim.RMSprop.

    For fp16/bf16 the reference is torch.optim.RMSprop on float32 copies of the same values: torch run in
    16-bit rounds after every op (and its eps=1e-8 is 0 in fp16, so it divides by zero wherever v
    underflows), while we compute in float32 and round once, as the float64 oracle tests check exactly.
    Ours keeps float32 state here (state_dtype): 16-bit state loses precision wherever v is subnormal, an
    effect of the storage, not of the kernel (the oracle tests cover 16-bit state step by step).
    """
    opts = OPTIONS[opt_name]
    ref_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    seed = zlib.crc32(f"{backend}{dtype}{opt_name}{lr_kind}".encode())
    ps_o = make_params(dtype, seed)
    ps_t = [p.to(ref_dtype, copy=True) for p in ps_o]
    lr = (lambda: torch.tensor(0.01)) if lr_kind == "tensor" else (lambda: 0.01)
    g2 = dict(lr=0.003, alpha=0.95)  # two param groups with different hyperparameters
    ref = torch.optim.RMSprop([{"params": ps_t[:3]}, {"params": ps_t[3:], **g2}], lr=lr(), **opts)
    ours = rmsprop_gpu.RMSprop([{"params": ps_o[:3]}, {"params": ps_o[3:], **g2}], lr=lr(), backend=backend,
                               state_dtype=torch.float32 if ref_dtype != dtype else None, **opts)
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(5):
        for a, b in zip(ps_o, ps_t):
            g = torch.randn(a.shape, generator=gen, dtype=torch.float64).to(dtype)
            a.grad, b.grad = g.clone(), g.to(ref_dtype, copy=True)
        ref.step()
        ours.step()
    tol = TORCH[str(dtype)[6:]]
    for a, b in zip(ps_o, ps_t):
        torch.testing.assert_close(a.double(), b.double(), **tol)
    sa, sb = ours.state_dict()["state"], ref.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].keys() == sb[k].keys()
        for key in sa[k]:
            x, y = sa[k][key], sb[k][key]
            assert x.dtype == (torch.float32 if key == "step" else ref_dtype), key
            torch.testing.assert_close(x.double(), y.double(), **tol, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_default_state_layout_is_torchs(dtype):
    p, q = torch.randn(10, dtype=dtype), torch.randn(10, dtype=dtype)
    p.grad, q.grad = torch.randn_like(p), torch.randn_like(q)
    ours, ref = rmsprop_gpu.RMSprop([p], momentum=0.9, centered=True), torch.optim.RMSprop([q], momentum=0.9,
                                                                                           centered=True)
    ours.step()
    ref.step()
    a, b = ours.state_dict()["state"][0], ref.state_dict()["state"][0]
    assert {k: (v.dtype, v.shape) for k, v in a.items()} == {k: (v.dtype, v.shape) for k, v in b.items()}


@pytest.mark.parametrize("backend", ["triton", "cupy"])
def test_float64_refused_by_kernels(backend):
    p = torch.randn(10, dtype=torch.float64)
    p.grad = torch.randn_like(p)
    opt = rmsprop_gpu.RMSprop([p], backend=backend)
    before = p.clone()
    with pytest.raises(rmsprop_gpu.BackendUnavailableError, match="float64"):
        opt.step()
    assert torch.equal(p, before) and len(opt.state) == 0


def test_defaults_and_signature_match_torch():
    import inspect

    ours = inspect.signature(rmsprop_gpu.RMSprop.__init__).parameters
    theirs = inspect.signature(torch.optim.RMSprop.__init__).parameters
    for name, par in theirs.items():
        assert name in ours
        assert ours[name].default == par.default, name
        assert ours[name].kind == par.kind, name
    assert list(ours)[: len(theirs)] == list(theirs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-1.0), "Invalid learning rate"), (dict(lr=float("nan")), "Invalid learning rate"),
    (dict(eps=-1e-8), "Invalid epsilon"), (dict(momentum=-0.1), "Invalid momentum"),
    (dict(weight_decay=-1.0), "Invalid weight_decay"), (dict(alpha=-0.5), "Invalid alpha"),
    (dict(alpha=float("nan")), "Invalid alpha"), (dict(lr=torch.tensor([0.1, 0.2])), "Tensor lr must be 1-element"),
])
def test_invalid_hyperparameters_as_torch(kwargs, match):
    for cls in (rmsprop_gpu.RMSprop, torch.optim.RMSprop):
        with pytest.raises(ValueError, match=match):
            cls([torch.zeros(3, requires_grad=True)], **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(state_dtype=torch.float16), "state_dtype"), (dict(backend="nope"), "Unknown backend"),
    (dict(backend=123), "backend must be a string"),
    (dict(differentiable=True, eps_in_sqrt=True), "eps_in_sqrt"),
])
def test_invalid_extensions(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rmsprop_gpu.RMSprop([torch.zeros(3, requires_grad=True)], **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_round_trip_through_torch(backend):
    """ours -> torch.optim.RMSprop -> ours in the middle of training continues exactly as uninterrupted."""
    torch.manual_seed(0)
    opts = dict(momentum=0.9, centered=True, weight_decay=0.01)
    ps_a = make_params(torch.float32, 1)
    ps_b = [p.clone() for p in ps_a]
    a = rmsprop_gpu.RMSprop(ps_a, lr=0.01, backend=backend, **opts)
    b = rmsprop_gpu.RMSprop(ps_b, lr=0.01, backend=backend, **opts)
    gen = torch.Generator().manual_seed(5)
    grads = [[torch.randn(p.shape, generator=gen) for p in ps_a] for _ in range(6)]
    for k in range(3):
        for p, q, g in zip(ps_a, ps_b, grads[k]):
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
    t = torch.optim.RMSprop(ps_b, lr=0.01, **opts)
    t.load_state_dict(copy.deepcopy(b.state_dict()))
    b2 = rmsprop_gpu.RMSprop(ps_b, lr=0.01, backend=backend, **opts)
    b2.load_state_dict(copy.deepcopy(t.state_dict()))
    for k in range(3, 6):
        for p, q, g in zip(ps_a, ps_b, grads[k]):
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b2.step()
    for p, q in zip(ps_a, ps_b):
        assert torch.equal(p, q)
    sa, sb = a.state_dict(), b2.state_dict()
    for k in sa["state"]:
        for key in sa["state"][k]:
            assert torch.equal(sa["state"][k][key].cpu(), sb["state"][k][key].cpu()), key
    assert sa["param_groups"] == sb["param_groups"]


def test_float32_state_for_bf16_params_survives_state_dict():
    p = torch.randn(100, dtype=torch.bfloat16)
    p.grad = torch.randn_like(p)
    opt = rmsprop_gpu.RMSprop([p], state_dtype=torch.float32, momentum=0.9)
    opt.step()
    st = opt.state[p]
    assert st["square_avg"].dtype == torch.float32 and st["momentum_buffer"].dtype == torch.float32
    sd = copy.deepcopy(opt.state_dict())
    opt2 = rmsprop_gpu.RMSprop([p], state_dtype=torch.float32, momentum=0.9)
    opt2.load_state_dict(sd)
    assert torch.equal(opt2.state[p]["square_avg"], sd["state"][0]["square_avg"])  # not rounded through bf16


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_raise_and_leave_everything_untouched(backend):
    ps = [torch.randn(50), torch.randn(7, 3), torch.randn(4097)]
    opt = rmsprop_gpu.RMSprop(ps, momentum=0.9, centered=True, backend=backend)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()  # state exists now

    def snapshot():
        return [p.clone() for p in ps], copy.deepcopy(opt.state_dict())

    def unchanged(snap):
        ps0, sd0 = snap
        sd1 = opt.state_dict()
        assert all(torch.equal(a, b) for a, b in zip(ps, ps0))
        for k, st in sd0["state"].items():
            for key, t in st.items():
                assert torch.equal(sd1["state"][k][key], t)

    # through the optimizer: a sparse grad on the first param; the others must not be updated either
    snap = snapshot()
    ps[0].grad = torch.randn(50).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    unchanged(snap)
    ps[0].grad = torch.randn(50)
    # torch refuses to assign grads of another shape or dtype, so those go through the functional API
    st = [opt.state[p] for p in ps]
    good = [p.grad for p in ps]
    cases = [
        ("shape", [good[0], good[1], torch.randn(4096)], [s["square_avg"] for s in st]),
        ("dtype", [good[0], good[1].double(), good[2]], [s["square_avg"] for s in st]),
        ("dtype", good, [st[0]["square_avg"], st[1]["square_avg"].double(), st[2]["square_avg"]]),
        ("shape", good, [st[0]["square_avg"], st[1]["square_avg"].flatten(), st[2]["square_avg"]]),
        ("on meta", [good[0], good[1], torch.randn(4097, device="meta")], [s["square_avg"] for s in st]),
        ("None", [good[0], None, good[2]], [s["square_avg"] for s in st]),
    ]
    for match, grads, vs in cases:
        snap = snapshot()
        with pytest.raises(ValueError, match=match):
            rmsprop_gpu.rmsprop(ps, grads, vs, [s["grad_avg"] for s in st], [s["momentum_buffer"] for s in st],
                                [s["step"] for s in st], momentum=0.9, centered=True, backend=backend)
        unchanged(snap)
    with pytest.raises(ValueError, match="momentum buffer"):
        rmsprop_gpu.rmsprop(ps, good, [s["square_avg"] for s in st], [s["grad_avg"] for s in st], None,
                            momentum=0.9, centered=True, backend=backend)
    # a new param with a bad grad: no state is created for anyone
    q = torch.randn(5)
    opt.add_param_group({"params": [q]})
    q.grad = torch.randn(5).to_sparse()
    n_state = len(opt.state)
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert len(opt.state) == n_state
    unchanged(snap)


def test_nan_and_inf_grads_behave_like_torch():
    p1 = torch.randn(10)
    p2 = p1.clone()
    g = torch.randn(10)
    g[3], g[7] = float("nan"), float("inf")
    p1.grad, p2.grad = g.clone(), g.clone()
    torch.optim.RMSprop([p1]).step()
    rmsprop_gpu.RMSprop([p2], backend="triton").step()
    torch.testing.assert_close(p1, p2, equal_nan=True)


def test_complex_params_follow_torch():
    gen = torch.Generator().manual_seed(0)
    p1 = torch.randn(33, dtype=torch.complex64, generator=gen)
    p2 = p1.clone()
    o1 = torch.optim.RMSprop([p1], momentum=0.9, centered=True)
    o2 = rmsprop_gpu.RMSprop([p2], momentum=0.9, centered=True, backend="triton")
    for _ in range(3):
        g = torch.randn(33, dtype=torch.complex64, generator=gen)
        p1.grad, p2.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
    torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-5)
    assert o2.state[p2]["square_avg"].dtype == torch.complex64


def test_closure_scheduler_param_groups_and_params_without_grad():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    frozen = torch.nn.Parameter(torch.randn(4))
    ref_model = copy.deepcopy(model)
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    ours = rmsprop_gpu.RMSprop(model.parameters(), lr=0.01, backend="triton")
    ours.add_param_group({"params": [frozen], "lr": 0.5})
    ref = torch.optim.RMSprop(ref_model.parameters(), lr=0.01)
    s1 = torch.optim.lr_scheduler.StepLR(ours, step_size=2, gamma=0.5)
    s2 = torch.optim.lr_scheduler.StepLR(ref, step_size=2, gamma=0.5)
    for _ in range(5):
        def closure(m=model, o=ours):
            o.zero_grad()
            loss = torch.nn.functional.mse_loss(m(x), y)
            loss.backward()
            return loss

        def ref_closure(m=ref_model, o=ref):
            o.zero_grad()
            loss = torch.nn.functional.mse_loss(m(x), y)
            loss.backward()
            return loss

        loss = ours.step(closure)
        ref_loss = ref.step(ref_closure)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        s1.step()
        s2.step()
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert frozen not in ours.state  # no grad, no state, not touched
    assert ours.param_groups[0]["lr"] == ref.param_groups[0]["lr"]
