"""Each framework's RMSprop as a class (rmsprop_gpu.flavor(name)), built the way its tools build one (params
first, torch's lr= keyword), against the released code: timm's RMSpropTF and SB3's RMSpropTFLike run from their
wheels' source files (tests/released.py), fastai / Paddle / MindSpore as float64 transcriptions of their
released formulas. Every backend: the torch path on float64 params (to float64 rounding), the kernels on float32
and 16-bit params."""

import copy

import numpy as np
import pytest
import torch

import rmsprop_gpu
from rmsprop_gpu import flavor
from tests import released
from tests.matrix import BACKENDS
from tests.tolerances import FLAVORS, TORCH

SHAPES = [(37,), (5, 3), (2049,), (1,)]
STEPS = 6
LRS = [0.01 * 0.8**k for k in range(STEPS)]  # a schedule: lr changes every step


def _data(seed):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES] for _ in range(STEPS)]
    return params, grads


def _run(make, params, grads, dtype):
    """STEPS steps of make(params) with the lr schedule; returns the params and state as float64."""
    ps = [p.to(dtype).clone().requires_grad_() for p in params]
    opt = make(ps)
    for k in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = LRS[k]
        for p, g in zip(ps, grads[k]):
            p.grad = g.to(dtype)
        opt.step()
    state = [{key: v.double() for key, v in opt.state[p].items() if key != "step"} for p in ps]
    return [p.detach().double() for p in ps], state, opt


def _tolerance(backend, dtype):
    if backend == "torch":
        return FLAVORS["float64"]
    return FLAVORS["float32"] if dtype == torch.float32 else TORCH[str(dtype)[6:]]


def _compare(got, want, tol, states=True):
    gp, gs, _ = got
    wp, ws, _ = want
    for a, b in zip(gp, wp):
        torch.testing.assert_close(a, b, **tol)
    if states:
        for a, b in zip(gs, ws):
            assert set(a) == set(b)
            for key in a:
                torch.testing.assert_close(a[key], b[key], **tol, msg=lambda m, k=key: f"{k}: {m}")


def _dtypes(backend):
    return [torch.float64] if backend == "torch" else [torch.float32, torch.float16, torch.bfloat16]


TIMM_CASES = {
    "defaults": dict(),
    "momentum": dict(momentum=0.9),
    "momentum_torch_form": dict(momentum=0.9, lr_in_momentum=False),
    "centered_momentum": dict(centered=True, momentum=0.5, alpha=0.95),
    "l2": dict(weight_decay=0.01),
    "decoupled": dict(weight_decay=0.05, decoupled_decay=True, momentum=0.9),
    "corrected": dict(weight_decay=0.05, decoupled_decay=True, corrected_weight_decay=True),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(TIMM_CASES))
def test_timm_flavor_matches_released_timm(backend, case):
    RMSpropTF = released.timm_optim().RMSpropTF
    kw = dict(lr=0.01, eps=1e-3, **TIMM_CASES[case])
    params, grads = _data(11)
    want = _run(lambda ps: RMSpropTF(ps, **kw), params, grads, torch.float64)
    for dtype in _dtypes(backend):
        got = _run(lambda ps: flavor("timm")(ps, backend=backend, **kw), params, grads, dtype)
        _compare(got, want, _tolerance(backend, dtype), states=dtype.itemsize >= 4)


SB3_CASES = {"defaults": dict(), "momentum": dict(momentum=0.9), "centered": dict(centered=True, momentum=0.5),
             "l2": dict(weight_decay=0.01, eps=1e-5)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(SB3_CASES))
def test_sb3_flavor_matches_released_sb3(backend, case):
    RMSpropTFLike = released.sb3_rmsprop_tf_like().RMSpropTFLike
    kw = dict(lr=7e-3, **SB3_CASES[case])
    params, grads = _data(12)
    want = _run(lambda ps: RMSpropTFLike(ps, **kw), params, grads, torch.float64)
    for dtype in _dtypes(backend):
        got = _run(lambda ps: flavor("sb3")(ps, backend=backend, **kw), params, grads, dtype)
        _compare(got, want, _tolerance(backend, dtype), states=dtype.itemsize >= 4)


class _Transcribed(torch.optim.Optimizer):
    """A float64 transcription of a released RMSprop (one formula per framework, below)."""

    def __init__(self, params, formula, **kw):
        super().__init__(params, dict(lr=kw.pop("lr")))
        self.formula, self.kw = formula, kw

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                self.formula(p, p.grad, self.state[p], group["lr"], **self.kw)


def fastai_formula(p, g, st, lr, mom, sqr_mom, eps, wd, decouple_wd):
    # fastai/optimizer.py RMSProp: [weight_decay | l2_reg], [average_grad (dampening False)], average_sqr_grad
    # (dampening True), rms_prop_step
    if wd:
        if decouple_wd:
            p.mul_(1 - lr * wd)
        else:
            g = g + wd * p
    if mom:
        st["momentum_buffer"] = st.get("momentum_buffer", torch.zeros_like(p)) * mom + g
    st["square_avg"] = st.get("square_avg", torch.zeros_like(p)) * sqr_mom + (1 - sqr_mom) * g * g
    p.sub_(lr * (st["momentum_buffer"] if mom else g) / (st["square_avg"].sqrt() + eps))


def test_fastai_transcription_follows_the_released_source():
    """The lines of fastai/optimizer.py the transcription above follows, as released."""
    src = released.fastai_optimizer_source()
    for line in ("if do_wd and wd!=0: p.data.mul_(1 - lr*wd)", "if do_wd and wd!=0: p.grad.data.add_(p.data, alpha=wd)",
                 "grad_avg.mul_(mom).add_(p.grad.data, alpha=damp)", "def average_grad(p, mom, dampening=False",
                 "sqr_avg.mul_(sqr_mom).addcmul_(p.grad.data, p.grad.data, value=damp)",
                 "def average_sqr_grad(p, sqr_mom, dampening=True", "denom = sqr_avg.sqrt().add_(eps)",
                 "p.data.addcdiv_((grad_avg if grad_avg is not None else p.grad), denom, value=-lr)",
                 "cbs += ([average_sqr_grad] if mom==0. else [average_grad, average_sqr_grad])"):
        assert line in src, line


FASTAI_CASES = {"defaults": dict(), "momentum": dict(mom=0.9), "momentum_decoupled_wd": dict(mom=0.8, wd=0.05),
                "l2": dict(mom=0.9, wd=0.01, decouple_wd=False), "sqr_mom": dict(sqr_mom=0.9, eps=1e-5)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(FASTAI_CASES))
def test_fastai_flavor_matches_fastai_formula(backend, case):
    kw = {**dict(lr=0.01, mom=0.0, sqr_mom=0.99, eps=1e-8, wd=0.0, decouple_wd=True), **FASTAI_CASES[case]}
    params, grads = _data(13)
    want = _run(lambda ps: _Transcribed(ps, fastai_formula, **kw), params, grads, torch.float64)
    for dtype in _dtypes(backend):
        got = _run(lambda ps: flavor("fastai")(ps, backend=backend, **kw), params, grads, dtype)
        _compare(got, want, _tolerance(backend, dtype), states=dtype.itemsize >= 4)


def tf_like_formula(p, g, st, lr, rho, eps, momentum, centered, wd, ms_init):
    # Paddle (phi rmsprop kernel) / MindSpore (ApplyRMSProp, ApplyCenteredRMSProp): L2 weight decay on the grad,
    # ms = rho*ms + (1-rho)*g^2, moment = momentum*moment + lr*g/sqrt(ms [- mg^2] + eps), p -= moment
    if wd:
        g = g + wd * p
    ms = st["square_avg"] = st.get("square_avg", torch.full_like(p, ms_init)) * rho + (1 - rho) * g * g
    var = ms
    if centered:
        mg = st["grad_avg"] = st.get("grad_avg", torch.zeros_like(p)) * rho + (1 - rho) * g
        var = ms - mg * mg
    step = lr * g / (var + eps).sqrt()
    if momentum:
        step = st["momentum_buffer"] = st.get("momentum_buffer", torch.zeros_like(p)) * momentum + step
    p.sub_(step)


PORT_CASES = {
    "paddle": (dict(rho=0.95, epsilon=1e-6, momentum=0.9, weight_decay=0.01),
               dict(rho=0.95, eps=1e-6, momentum=0.9, centered=False, wd=0.01, ms_init=0.0)),
    "paddle_centered": (dict(rho=0.9, epsilon=1e-4, momentum=0.5, centered=True),
                        dict(rho=0.9, eps=1e-4, momentum=0.5, centered=True, wd=0.0, ms_init=0.0)),
    "mindspore": (dict(decay=0.9, epsilon=1e-10, momentum=0.9, weight_decay=0.01),
                  dict(rho=0.9, eps=1e-10, momentum=0.9, centered=False, wd=0.01, ms_init=1.0)),
    "mindspore_centered": (dict(decay=0.8, epsilon=1e-6, centered=True),
                           dict(rho=0.8, eps=1e-6, momentum=0.0, centered=True, wd=0.0, ms_init=1.0)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(PORT_CASES))
def test_paddle_and_mindspore_flavors_match_their_formulas(backend, case):
    ours, theirs = PORT_CASES[case]
    params, grads = _data(14)
    want = _run(lambda ps: _Transcribed(ps, tf_like_formula, lr=0.01, **theirs), params, grads, torch.float64)
    for dtype in _dtypes(backend):
        got = _run(lambda ps: flavor(case.split("_")[0])(ps, lr=0.01, backend=backend, **ours), params, grads,
                   dtype)
        _compare(got, want, _tolerance(backend, dtype), states=dtype.itemsize >= 4)


@pytest.mark.parametrize("name", list(rmsprop_gpu.FLAVORS))
def test_every_flavor_is_a_class_taking_params_and_torchs_lr(name):
    """What SB3's optimizer_class, HF's optimizer_cls_and_kwargs, timm's registry and Lightning do: a class,
    called with params (or param groups) first and lr= (plus the framework's own keywords)."""
    cls = flavor(name)
    assert isinstance(cls, type) and issubclass(cls, rmsprop_gpu.RMSprop) and issubclass(cls, torch.optim.Optimizer)
    assert getattr(rmsprop_gpu, cls.__name__) is cls
    w, b = torch.randn(4, 3, requires_grad=True), torch.randn(3, requires_grad=True)
    opt = cls([{"params": [w], "weight_decay": 0.0}, {"params": [b]}], lr=3e-3)
    assert [g["lr"] for g in opt.param_groups] == [3e-3, 3e-3]
    (w.sum() + b.sum()).backward()
    before = w.detach().clone()
    opt.step()
    assert not torch.equal(before, w.detach())
    sd = copy.deepcopy(opt.state_dict())  # round trip into a fresh instance: the same next step
    w2, b2 = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    opt2 = cls([{"params": [w2], "weight_decay": 0.0}, {"params": [b2]}], lr=1.0)
    opt2.load_state_dict(sd)
    for o, (x, y) in ((opt, (w, b)), (opt2, (w2, b2))):
        x.grad, y.grad = torch.ones_like(x), torch.ones_like(y)
        o.step()
    assert torch.equal(w, w2) and torch.equal(b, b2)


def test_sb3_optimizer_class_and_kwargs():
    """SB3's A2C builds its optimizer as optimizer_class(params, lr=lr_schedule(1), **optimizer_kwargs)."""
    policy = torch.nn.Linear(4, 2)
    opt = flavor("sb3")(policy.parameters(), lr=7e-4, **dict(alpha=0.99, eps=1e-5, weight_decay=0))
    assert opt.param_groups[0]["eps_in_sqrt"] and opt.defaults["initial_accumulator_value"] == 1.0


def test_flavors_refuse_what_they_cannot_run():
    p = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(ValueError, match="caution"):
        flavor("timm")(p, caution=True)
    with pytest.raises(ValueError, match="grad_clip"):
        flavor("paddle")(p, lr=0.1, grad_clip=object())
    with pytest.raises(ValueError, match="loss_scale"):
        flavor("mindspore")(p, loss_scale=1024.0)
    with pytest.raises(TypeError, match="both lr and learning_rate"):
        flavor("keras")(p, 0.1, lr=0.1)
    with pytest.raises(TypeError, match="learning rate"):
        flavor("tf1")(p)
    with pytest.raises(TypeError, match="clipnorm"):
        flavor("keras")(p, clipnorm=1.0)
    with pytest.raises(ValueError, match="use_locking"):
        flavor("tf1")(p, 0.1, 0.9, 0.0, 1e-10, True)  # TF1's positional order: use_locking before centered
    assert flavor("mindspore")(p, 0.1, 0.9, 0.0, 1e-10, False, True).defaults["centered"]
    with pytest.raises(ValueError, match="unknown flavor"):
        flavor("caffe")
    with pytest.raises(ValueError, match="raw_grad_momentum"):
        rmsprop_gpu.RMSprop(p, momentum=0.9, raw_grad_momentum=True, lr_in_momentum=True)


@pytest.mark.parametrize("opt", [dict(stochastic_rounding=True), dict(state_bits=8)], ids=["sr", "8bit"])
def test_raw_grad_momentum_is_bit_identical_across_backends_with_16_bit_params(opt):
    """fastai's switch with 16-bit params, stochastic rounding and 8-bit state: the Triton kernel and the CUDA C
    kernel store the same bits; the torch path too with stochastic rounding (its 8-bit path rounds the float32
    temporaries in another order, as for every switch: within a code of the kernels')."""
    gen = torch.Generator().manual_seed(5)
    p0 = torch.randn(5000, generator=gen).bfloat16()
    grads = [torch.randn(5000, generator=gen).bfloat16() for _ in range(3)]
    out = {}
    for backend in BACKENDS:
        p = p0.clone()
        o = flavor("fastai")([p], lr=0.01, mom=0.9, wd=0.01, backend=backend, **opt)
        for g in grads:
            p.grad = g.clone()
            o.step()
        out[backend] = (p.view(torch.int16), *(o.state[p][k] for k in ("square_avg", "momentum_buffer")))
    for a, b in zip(out["triton"], out["cupy"]):
        assert torch.equal(a, b)
    if "state_bits" not in opt:
        for a, b in zip(out["torch"], out["triton"]):
            assert torch.equal(a, b)
    else:
        torch.testing.assert_close(out["torch"][0].view(torch.bfloat16), out["triton"][0].view(torch.bfloat16),
                                   **TORCH["bfloat16"])


def test_raw_grad_momentum_differs_from_torchs_momentum():
    """fastai's momentum of raw grads is another update than torch's (divided before accumulating)."""
    params, grads = _data(15)
    a = _run(lambda ps: flavor("fastai")(ps, lr=0.01, mom=0.9, backend="torch"), params, grads, torch.float64)[0]
    b = _run(lambda ps: rmsprop_gpu.RMSprop(ps, lr=0.01, momentum=0.9, backend="torch"), params, grads,
             torch.float64)[0]
    assert max(float((x - y).abs().max()) for x, y in zip(a, b)) > 1e-3


def test_classmethods_still_build_the_flavors():
    p = [torch.zeros(3, requires_grad=True)]
    assert type(rmsprop_gpu.RMSprop.keras(p, 0.01)) is rmsprop_gpu.KerasRMSprop
    assert type(rmsprop_gpu.RMSprop.tf1(p, 0.01, momentum=0.9)) is rmsprop_gpu.TF1RMSprop
    assert type(rmsprop_gpu.RMSprop.optax(p, learning_rate=0.01)) is rmsprop_gpu.OptaxRMSprop
    assert np.isclose(rmsprop_gpu.RMSprop.tf1(p, 0.01).defaults["initial_accumulator_value"], 1.0)


@pytest.mark.parametrize("clip", ["clip_grad_norm_", "clip_grad_value_"])
def test_in_backward_refuses_clipping_instead_of_clipping_nothing(clip):
    """in_backward frees each grad during backward: torch's clipping after backward would see none and return 0
    (SB3's A2C and the HF Trainer would train unclipped without a word). It raises instead; other params clip
    as before, and so do these once their in_backward optimizer is gone."""
    import gc

    model, other = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    opt = flavor("sb3")(model.parameters(), lr=7e-4, in_backward=True)
    model(torch.randn(2, 4)).sum().backward()
    fn = getattr(torch.nn.utils, clip)
    with pytest.raises(RuntimeError, match="in_backward"):
        fn(model.parameters(), 0.5)
    other(torch.randn(2, 4)).sum().backward()
    fn(other.parameters(), 0.5)  # not an in_backward optimizer's: clipped as usual
    del opt
    gc.collect()
    model(torch.randn(2, 4)).sum().backward()
    fn(model.parameters(), 0.5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["timm", "sb3"])
def test_resume_from_the_frameworks_own_checkpoint(name, backend):
    """A state_dict saved by timm's RMSpropTF or SB3's RMSpropTFLike (SB3 keeps step as a Python int) loads into
    our class, which then continues that run: the same params as the framework continuing it."""
    theirs = (released.timm_optim().RMSpropTF if name == "timm" else released.sb3_rmsprop_tf_like().RMSpropTFLike)
    kw = (dict(lr=0.01, momentum=0.9, eps=1e-3, weight_decay=0.01, decoupled_decay=True) if name == "timm"
          else dict(lr=0.01, momentum=0.9, centered=True, eps=1e-5))
    params, grads = _data(16)
    dtype = torch.float64 if backend == "torch" else torch.float32
    a = [p.to(dtype) for p in params]
    oa = theirs(a, **kw)
    for k in range(3):
        for p, g in zip(a, grads[k]):
            p.grad = g.to(dtype)
        oa.step()
    b = [p.clone() for p in a]
    ob = flavor(name)(b, backend=backend, **kw)
    ob.load_state_dict(copy.deepcopy(oa.state_dict()))
    for k in range(3, STEPS):
        for opt, ps in ((oa, a), (ob, b)):
            for p, g in zip(ps, grads[k]):
                p.grad = g.to(dtype)
            opt.step()
    for x, y in zip(b, a):
        torch.testing.assert_close(x.double(), y.double(), **_tolerance(backend, dtype))
