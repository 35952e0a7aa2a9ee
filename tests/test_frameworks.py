"""Other frameworks' RMSprop in the same fused kernels: TF1, Keras 3 and optax, each against its formula written
out in float64 (every option combination, every backend) and against the real Keras 3 (torch backend) and optax
(JAX on the CPU)."""

import itertools
import os

os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np
import pytest
import torch

import rmsprop_gpu
from rmsprop_gpu import BackendUnavailableError
from tests.matrix import BACKENDS as ALL
from tests.tolerances import FRAMEWORKS, FRAMEWORKS_CENTERED_BIAS

SHAPES = [(37,), (5, 3), (2049,), (1,)]  # odd sizes; 2049 spans two kernel chunks
STEPS = 8


def grads_for(seed):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES] for _ in range(STEPS)]


def params_for(seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]


# ---------------------------------------------------------------- the formulas, in float64
def tf1_reference(p, grads, lr, decay, momentum, eps, centered):
    p = [x.numpy().copy() for x in p]
    ms = [np.ones_like(x) for x in p]
    mg = [np.zeros_like(x) for x in p]
    mom = [np.zeros_like(x) for x in p]
    for gs in grads:
        for i, g in enumerate(x.numpy() for x in gs):
            ms[i] = ms[i] + (g * g - ms[i]) * (1 - decay)
            if centered:
                mg[i] = mg[i] + (g - mg[i]) * (1 - decay)
                denom = ms[i] - mg[i] ** 2 + eps
            else:
                denom = ms[i] + eps
            mom[i] = mom[i] * momentum + lr * g / np.sqrt(denom)
            p[i] = p[i] - mom[i]
    return p


def keras_reference(p, grads, lr, rho, momentum, eps, centered, wd):
    p = [x.numpy().copy() for x in p]
    v = [np.zeros_like(x) for x in p]
    a = [np.zeros_like(x) for x in p]
    m = [np.zeros_like(x) for x in p]
    for gs in grads:
        for i, g in enumerate(x.numpy() for x in gs):
            if wd:
                p[i] = p[i] - p[i] * wd * lr
            v[i] = rho * v[i] + (1 - rho) * g * g
            if centered:
                a[i] = rho * a[i] + (1 - rho) * g
                denom = v[i] - a[i] ** 2 + eps
            else:
                denom = v[i] + eps
            inc = lr * g / np.sqrt(denom)
            if momentum > 0:
                m[i] = momentum * m[i] + inc
                p[i] = p[i] - m[i]
            else:
                p[i] = p[i] - inc
    return p


def optax_reference(p, grads, lr, decay, eps, initial_scale, eps_in_sqrt, centered, momentum, nesterov, bias):
    p = [x.numpy().copy() for x in p]
    nu = [np.full_like(x, initial_scale) for x in p]
    mu = [np.zeros_like(x) for x in p]
    tr = [np.zeros_like(x) for x in p]
    for t, gs in enumerate(grads, start=1):
        for i, g in enumerate(x.numpy() for x in gs):
            nu[i] = (1 - decay) * g * g + decay * nu[i]
            mu[i] = (1 - decay) * g + decay * mu[i]
            bc = 1 - decay**t if bias else 1.0
            var = nu[i] / bc - ((mu[i] / bc) ** 2 if centered else 0.0)
            u = g / np.sqrt(var + eps) if eps_in_sqrt else g / (np.sqrt(var) + eps)
            u = -lr * u
            if momentum is not None:
                tr[i] = u + momentum * tr[i]
                u = u + momentum * tr[i] if nesterov else tr[i]
            p[i] = p[i] + u
    return p


def run_ours(make, p64, grads):
    ps = [x.float() for x in p64]
    opt = make(ps)
    for gs in grads:
        for p, g in zip(ps, gs):
            p.grad = g.float()
        opt.step()
    return ps, opt


def assert_close(ours, ref, tol=FRAMEWORKS):
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a.double().numpy(), np.asarray(b, dtype=np.float64), **tol)


# ---------------------------------------------------------------- every option combination, every backend
@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("momentum,centered", list(itertools.product([0.0, 0.9], [False, True])))
def test_tf1_formula(backend, momentum, centered):
    p, grads = params_for(1), grads_for(2)
    ours, _ = run_ours(lambda ps: rmsprop_gpu.RMSprop.tf1(ps, 0.01, momentum=momentum, centered=centered,
                                                          backend=backend), p, grads)
    assert_close(ours, tf1_reference(p, grads, 0.01, 0.9, momentum, 1e-10, centered))


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("momentum,centered,wd", list(itertools.product([0.0, 0.9], [False, True], [None, 0.05])))
def test_keras_formula(backend, momentum, centered, wd):
    p, grads = params_for(3), grads_for(4)
    ours, _ = run_ours(lambda ps: rmsprop_gpu.RMSprop.keras(ps, momentum=momentum, centered=centered,
                                                            weight_decay=wd, backend=backend), p, grads)
    assert_close(ours, keras_reference(p, grads, 0.001, 0.9, momentum, 1e-7, centered, wd or 0.0))


OPTAX_CASES = [dict(eps_in_sqrt=e, centered=c, momentum=m, nesterov=n, initial_scale=s)
               for e, c, (m, n), s in itertools.product([True, False], [False, True],
                                                         [(None, False), (0.9, False), (0.9, True)], [0.0, 0.1])]


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("case", OPTAX_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_optax_formula(backend, case):
    p, grads = params_for(5), grads_for(6)
    ours, _ = run_ours(lambda ps: rmsprop_gpu.RMSprop.optax(ps, 0.01, backend=backend, **case), p, grads)
    assert_close(ours, optax_reference(p, grads, 0.01, 0.9, 1e-8, case["initial_scale"], case["eps_in_sqrt"],
                                       case["centered"], case["momentum"], case["nesterov"], False))


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("momentum", [None, 0.9])
def test_optax_bias_correction(backend, centered, momentum):
    """Centered with bias correction starts at v - ga^2 = 0 exactly (step 1: both are g^2): the update is then
    g / sqrt(rounding + eps), so eps must dominate float32 rounding for any comparison to mean something."""
    p, grads = params_for(7), grads_for(8)
    ours, opt = run_ours(lambda ps: rmsprop_gpu.RMSprop.optax(ps, 0.01, centered=centered, momentum=momentum,
                                                              bias_correction=True, eps=0.1, backend=backend),
                         p, grads)
    assert all(float(s["step"]) == STEPS for s in opt.state.values())  # advanced once per step, after the read
    assert_close(ours, optax_reference(p, grads, 0.01, 0.9, 0.1, 0.0, True, centered, momentum, False, True),
                 FRAMEWORKS_CENTERED_BIAS if centered else FRAMEWORKS)


@pytest.mark.parametrize("backend", ["triton", "cupy"])
def test_bias_correction_needs_step_counters_the_kernel_can_read(backend):
    p, v = [torch.randn(10)], [torch.zeros(10)]
    with pytest.raises(BackendUnavailableError, match="bias correction"):
        rmsprop_gpu.rmsprop(p, [torch.randn(10)], v, state_steps=[torch.zeros((), dtype=torch.float16)],
                            bias_correction=True, backend=backend)


def test_what_does_not_fit_is_refused():
    p = [torch.randn(3, requires_grad=True)]
    with pytest.raises(ValueError, match="nesterov"):
        rmsprop_gpu.RMSprop.optax(p, 0.01, nesterov=True)
    with pytest.raises(ValueError, match="nesterov"):
        rmsprop_gpu.RMSprop(p, momentum=0.9, nesterov=True)  # torch-style momentum has no such trace
    with pytest.raises(ValueError, match="initial_accumulator_value"):
        rmsprop_gpu.RMSprop(p, initial_accumulator_value=-1.0)
    with pytest.raises(ValueError, match="differentiable"):
        rmsprop_gpu.RMSprop(p, differentiable=True, lr_in_momentum=True)


def test_state_dict_round_trip_keeps_the_semantics():
    p, grads = params_for(9), grads_for(10)
    ref, _ = run_ours(lambda ps: rmsprop_gpu.RMSprop.tf1(ps, 0.01, momentum=0.9, centered=True), p, grads)
    half = grads[: STEPS // 2]
    ps, opt = run_ours(lambda ps: rmsprop_gpu.RMSprop.tf1(ps, 0.01, momentum=0.9, centered=True), p, half)
    sd = opt.state_dict()
    assert sd["param_groups"][0]["lr_in_momentum"] and sd["param_groups"][0]["initial_accumulator_value"] == 1.0
    resumed = rmsprop_gpu.RMSprop(ps, lr=0.5)  # the loaded groups bring every switch and value back
    resumed.load_state_dict(sd)
    for gs in grads[STEPS // 2:]:
        for q, g in zip(ps, gs):
            q.grad = g.float()
        resumed.step()
    assert all(torch.equal(a, b) for a, b in zip(ps, ref))


# ---------------------------------------------------------------- the real libraries
@pytest.mark.parametrize("momentum,centered,wd", [(0.0, False, None), (0.9, True, 0.05), (0.9, False, None)])
def test_keras3_itself(momentum, centered, wd):
    import keras

    assert keras.backend.backend() == "torch"
    p, grads = params_for(11), grads_for(12)
    variables = [keras.Variable(x.float().numpy()) for x in p]
    kopt = keras.optimizers.RMSprop(learning_rate=0.001, rho=0.9, momentum=momentum, epsilon=1e-7,
                                    centered=centered, weight_decay=wd)
    for gs in grads:
        kopt.apply_gradients(zip([g.float() for g in gs], variables))
    ours, _ = run_ours(lambda ps: rmsprop_gpu.RMSprop.keras(ps, momentum=momentum, centered=centered,
                                                            weight_decay=wd), p, grads)
    assert_close(ours, [keras.ops.convert_to_numpy(v) for v in variables])


@pytest.mark.parametrize("kwargs", [dict(), dict(centered=True, momentum=0.9), dict(momentum=0.9, nesterov=True),
                                    dict(eps_in_sqrt=False, initial_scale=0.1),
                                    dict(bias_correction=True, eps=0.1, centered=True), dict(bias_correction=True)],
                         ids=lambda k: "-".join(f"{a}={b}" for a, b in k.items()) or "default")
def test_optax_itself(kwargs):
    import jax.numpy as jnp
    import optax

    p, grads = params_for(13), grads_for(14)
    tx = optax.rmsprop(0.01, **kwargs)
    params = [jnp.asarray(x.float().numpy()) for x in p]
    state = tx.init(params)
    for gs in grads:
        updates, state = tx.update([jnp.asarray(g.float().numpy()) for g in gs], state, params)
        params = optax.apply_updates(params, updates)
    ours, _ = run_ours(lambda ps: rmsprop_gpu.RMSprop.optax(ps, 0.01, **kwargs), p, grads)
    assert_close(ours, params, FRAMEWORKS_CENTERED_BIAS if kwargs.get("bias_correction") else FRAMEWORKS)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("framework", ["tf1", "keras", "optax"])
def test_16_bit_params(backend, dtype, framework):
    """16-bit params with float32 state: rounded to 16 bits once per step, within tests/tolerances.py's TORCH."""
    from tests.tolerances import TORCH

    p, grads = params_for(15), grads_for(16)
    make = {"tf1": lambda ps: rmsprop_gpu.RMSprop.tf1(ps, 0.01, momentum=0.9, centered=True, backend=backend,
                                                      state_dtype=torch.float32),
            "keras": lambda ps: rmsprop_gpu.RMSprop.keras(ps, momentum=0.9, centered=True, weight_decay=0.05,
                                                          backend=backend, state_dtype=torch.float32),
            "optax": lambda ps: rmsprop_gpu.RMSprop.optax(ps, 0.01, momentum=0.9, nesterov=True, centered=True,
                                                          bias_correction=True, eps=0.1, backend=backend,
                                                          state_dtype=torch.float32)}[framework]
    ps = [x.to(dtype) for x in p]
    opt = make(ps)
    for gs in grads:
        for q, g in zip(ps, gs):
            q.grad = g.to(dtype)
        opt.step()
    # the float64 reference starts from the same 16-bit values and grads
    p16 = [x.to(dtype).double() for x in p]
    g16 = [[g.to(dtype).double() for g in gs] for gs in grads]
    expected = {"tf1": lambda: tf1_reference(p16, g16, 0.01, 0.9, 0.9, 1e-10, True),
                "keras": lambda: keras_reference(p16, g16, 0.001, 0.9, 0.9, 1e-7, True, 0.05),
                "optax": lambda: optax_reference(p16, g16, 0.01, 0.9, 0.1, 0.0, True, True, 0.9, True, True)}
    assert_close([q.float() for q in ps], expected[framework](), TORCH[str(dtype).removeprefix("torch.")])
