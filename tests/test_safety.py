"""Safety and drop-in completeness (inputs torch accepts, nothing half-written), and the cached step plan."""

import copy

import numpy as np
import pytest
import torch

import rmsprop_gpu
from rmsprop_gpu.backends import BACKENDS as REGISTRY
from tests.matrix import BACKENDS as ALL

KERNELS = ["triton", "cupy"]


def pair(make, backend, **kw):
    """The same params under ours and torch.optim.RMSprop."""
    a, b = make(), make()
    return a, b, rmsprop_gpu.RMSprop(a, backend=backend, **kw), torch.optim.RMSprop(b, **kw)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("layout", ["transposed", "channels_last", "expanded_grad"])
def test_strided_params_and_grads_match_torch(backend, layout):  # B1
    gen = torch.Generator().manual_seed(0)

    def make():
        g = torch.Generator().manual_seed(1)
        if layout == "channels_last":
            return [torch.randn(4, 3, 5, 5, generator=g).to(memory_format=torch.channels_last)]
        return [torch.randn(12, 20, generator=g).t()]

    a, b, ours, ref = pair(make, backend, momentum=0.9, centered=True)
    for _ in range(4):
        if layout == "expanded_grad":
            grad = torch.randn(1, 12, generator=gen).expand(20, 12)
        else:
            grad = torch.randn(a[0].shape, generator=gen)
            grad = grad.to(memory_format=torch.channels_last) if layout == "channels_last" else grad
        a[0].grad, b[0].grad = grad.clone() if layout != "expanded_grad" else grad, grad.clone()
        ours.step()
        ref.step()
        torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", KERNELS)
def test_matching_dense_layouts_need_no_copy(backend):
    p = torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last)
    q = torch.randn(20, 12).t()
    p.grad, q.grad = torch.randn_like(p), torch.randn_like(q)  # empty_like keeps the layout
    opt = rmsprop_gpu.RMSprop([p, q], momentum=0.9, backend=backend)
    opt.step()
    (entry,) = opt._plan.entries
    assert entry.prepared.copy_in == [] and entry.prepared.copy_out == []


@pytest.mark.parametrize("backend", ALL)
def test_step_bumps_the_version_counter(backend):  # B2
    w = torch.randn(10, requires_grad=True)
    opt = rmsprop_gpu.RMSprop([w], backend=backend)
    loss = (w * w).sum()
    w.grad = torch.randn(10)
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def snapshot(opt, params):
    return [p.clone() for p in params], copy.deepcopy(opt.state_dict())


def assert_untouched(opt, params, snap):
    ps, sd = snap
    assert all(torch.equal(a, b) for a, b in zip(params, ps))
    now = opt.state_dict()
    assert now["state"].keys() == sd["state"].keys()
    for k, st in sd["state"].items():
        for key, t in st.items():
            assert torch.equal(now["state"][k][key], t), key


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("bad", ["expanded_param", "meta_lr", "inference_param", "overlap"])
def test_a_bad_last_group_leaves_every_group_untouched(backend, bad):  # B3, B13
    good = [torch.randn(50), torch.randn(7, 3)]
    base = torch.randn(100)
    if bad == "expanded_param":
        last = [torch.randn(1).expand(5)]
    elif bad == "inference_param":
        with torch.inference_mode():
            last = [torch.randn(5)]
    elif bad == "overlap":
        last = [base[:60], base[40:]]
    else:
        last = [torch.randn(5)]
    params = good + last
    opt = rmsprop_gpu.RMSprop([{"params": good}], momentum=0.9, backend=backend)
    for p in good:
        p.grad = torch.randn_like(p)
    opt.step()
    opt.add_param_group({"params": last, **({"lr": torch.tensor(0.1, device="meta")} if bad == "meta_lr" else {})})
    for p in params:
        p.grad = torch.randn(p.shape)
    snap = snapshot(opt, params)
    with pytest.raises((RuntimeError, ValueError)):
        opt.step()
    assert_untouched(opt, params, snap)


def test_capturable_one_element_lr_on_the_torch_backend():  # B3: lr of shape [1]
    p = torch.randn(10)
    q = p.clone()
    g = torch.randn(10)
    p.grad, q.grad = g.clone(), g.clone()
    rmsprop_gpu.RMSprop([p], lr=torch.tensor([0.01]), capturable=True, backend="torch").step()
    torch.optim.RMSprop([q], lr=0.01).step()  # torch's capturable needs CUDA: the same step by value
    torch.testing.assert_close(p, q)


@pytest.mark.parametrize("backend", ALL)
def test_numpy_scalars_are_accepted(backend):  # B4
    kw = dict(lr=np.float32(0.01), momentum=np.linspace(0, 0.9, 4)[-1], centered=np.bool_(True),
              alpha=np.float64(0.9), weight_decay=np.int64(0))
    a, b, ours, ref = pair(lambda: [torch.randn(30, generator=torch.Generator().manual_seed(0))], backend, **kw)
    for _ in range(3):
        g = torch.randn(30)
        a[0].grad, b[0].grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ALL)
def test_tensor_hyperparameters_are_accepted_and_read_every_step(backend):
    """torch takes 1-element tensors for alpha, eps, weight_decay and momentum too; a change made in place (the
    same tensor object) must reach the next step."""
    kw = dict(alpha=torch.tensor(0.9), eps=torch.tensor([1e-6]), weight_decay=torch.tensor(0.01, dtype=torch.float64),
              momentum=torch.tensor(0.5), centered=True)
    a, b, ours, ref = pair(lambda: [torch.randn(30, generator=torch.Generator().manual_seed(0))], backend, **kw)
    ref.param_groups[0].update({k: v.clone() for k, v in kw.items() if isinstance(v, torch.Tensor)})
    for step in range(4):
        if step == 2:
            for group in (ours.param_groups[0], ref.param_groups[0]):
                group["alpha"].fill_(0.5)
                group["momentum"].fill_(0.8)
        g = torch.randn(30)
        a[0].grad, b[0].grad = g.clone(), g.clone()
        ours.step()
        ref.step()
        torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-6)
    for bad in (torch.tensor([0.9, 0.9]), torch.tensor(0.9j)):
        with pytest.raises(ValueError, match="alpha"):
            rmsprop_gpu.RMSprop([a[0]], alpha=bad)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("old_step", [3, torch.tensor(3), torch.tensor(3.0, dtype=torch.float64)], ids=str)
def test_old_checkpoint_steps_load(backend, old_step):  # B5
    p = torch.randn(10)
    p.grad = torch.randn(10)
    opt = rmsprop_gpu.RMSprop([p], backend=backend)
    opt.step()
    sd = opt.state_dict()
    sd["state"][0]["step"] = old_step
    opt.load_state_dict(sd)
    opt.step()
    assert opt.state[p]["step"].dtype == torch.float32 and float(opt.state[p]["step"]) == 4


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("options", [{}, {"bias_correction": True}], ids=["torch_options", "kernel_reads_step"])
def test_step_counters_follow_the_default_dtype_as_torchs(backend, options):
    """torch makes float64 counters under torch.set_default_dtype(torch.float64) (PyTorch's
    test_set_default_dtype_works_with_foreach); ours too, and float64 wherever the kernels read the counter
    (float32 would stop counting at 2**24)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        p = torch.randn(10, dtype=torch.float32)
        q = p.clone()
        p.grad = torch.randn(10, dtype=torch.float32)
        q.grad = p.grad.clone()
        opt = rmsprop_gpu.RMSprop([p], backend=backend, momentum=0.9, **options)
        want = torch.float64
        if not options:
            ref = torch.optim.RMSprop([q], momentum=0.9)
        for _ in range(3):
            opt.step()
            if not options:
                ref.step()
        assert opt.state[p]["step"].dtype == want and float(opt.state[p]["step"]) == 3
        if not options:
            assert ref.state[q]["step"].dtype == want
            torch.testing.assert_close(p, q)
        sd = opt.state_dict()
        sd["state"][0]["step"] = 5
        opt.load_state_dict(sd)
        assert opt.state[p]["step"].dtype == want and float(opt.state[p]["step"]) == 5
    finally:
        torch.set_default_dtype(old)


def test_load_pre_hook_runs_before_our_checks():  # B6
    p = torch.randn(10)
    p.grad = torch.randn(10)
    opt = rmsprop_gpu.RMSprop([p])
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["junk"] = torch.zeros(1)
    calls = []

    def strip(optimizer, state_dict):
        calls.append(1)
        state_dict["state"][0].pop("junk")
        return state_dict

    opt.register_load_state_dict_pre_hook(strip)
    opt.load_state_dict(sd)
    assert calls == [1] and "junk" not in opt.state[p]


@pytest.mark.parametrize("backend", ALL)
def test_huge_gradient_keeps_training_like_torch(backend):  # B8
    a, b, ours, ref = pair(lambda: [torch.ones(3)], backend)
    for g in (torch.tensor([5e19, 1.0, -3e19]), torch.tensor([1.0, 2.0, 3.0])):
        a[0].grad, b[0].grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    assert torch.isfinite(ours.state[a[0]]["square_avg"]).all()
    torch.testing.assert_close(a[0], b[0])


@pytest.mark.parametrize("backend", ALL)
def test_centered_average_beyond_float32_behaves_like_torch(backend):
    """g = 3e38: square_avg overflows to inf and grad_avg^2 would too; torch's addcmul(value=-1) is a fused
    multiply-add, so v - grad_avg^2 stays inf (no inf - inf = NaN) and the param keeps its value."""
    a, b, ours, ref = pair(lambda: [torch.randn(7, generator=torch.Generator().manual_seed(3))], backend,
                           centered=True, momentum=0.5)
    for g in (torch.full((7,), 3e38), torch.randn(7)):
        a[0].grad, b[0].grad = g.clone(), g.clone()
        ours.step()
        ref.step()
        assert not a[0].isnan().any()
        torch.testing.assert_close(a[0], b[0])
        for key in ("square_avg", "grad_avg", "momentum_buffer"):
            torch.testing.assert_close(ours.state[a[0]][key], ref.state[b[0]][key])


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("name", ["lr", "eps", "weight_decay"])
def test_values_beyond_float32_behave_like_torch(backend, name):  # B9
    """torch's float32 step raises for lr and weight_decay beyond float32 (scalar overflow); eps becomes inf."""
    a, b, ours, ref = pair(lambda: [torch.ones(5)], backend, **{name: 1e39})
    g = torch.randn(5)
    a[0].grad, b[0].grad = g.clone(), g.clone()
    if name == "eps":
        ours.step()
        ref.step()
        torch.testing.assert_close(a[0], b[0], equal_nan=True)
        return
    with pytest.raises(RuntimeError, match="overflow"):
        ref.step()
    before = a[0].clone()
    with pytest.raises(RuntimeError, match="overflow"):
        ours.step()
    assert torch.equal(a[0], before)


@pytest.mark.parametrize("lr", [float("inf"), torch.tensor(float("inf"))], ids=["float", "tensor"])
def test_infinite_lr_is_accepted_as_torch_accepts_it(lr):  # B10
    a, b, ours, ref = pair(lambda: [torch.ones(4)], "triton", lr=lr)
    a[0].grad, b[0].grad = torch.randn(4), torch.randn(4)
    b[0].grad.copy_(a[0].grad)
    ours.step()
    ref.step()
    torch.testing.assert_close(a[0], b[0], equal_nan=True)


def test_backend_errors_name_their_source(monkeypatch):  # B11
    with pytest.raises(ValueError, match="backend must be a string"):
        rmsprop_gpu.RMSprop([torch.zeros(1, requires_grad=True)], backend=123)
    monkeypatch.setenv("RMSPROP_GPU_BACKEND", "bogus")
    with pytest.raises(ValueError, match="RMSPROP_GPU_BACKEND"):
        rmsprop_gpu.RMSprop([torch.zeros(1, requires_grad=True)])


def test_a_failed_scaler_step_does_not_skip_later_steps():  # B12
    p = torch.randn(5)
    opt = rmsprop_gpu.RMSprop([p, torch.randn(1).expand(3)])
    opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(1.0)  # as GradScaler.step sets them
    for t in opt.param_groups[0]["params"]:
        t.grad = torch.randn(t.shape)
    with pytest.raises(RuntimeError):
        opt.step()
    assert not hasattr(opt, "found_inf")
    opt.param_groups[0]["params"].pop()
    before = p.clone()
    opt.step()
    assert not torch.equal(p, before)


def test_differentiable_runs_torchs_reference_step():
    grads = {}
    for cls in (rmsprop_gpu.RMSprop, torch.optim.RMSprop):
        w = torch.ones(5, requires_grad=True)
        p = w.clone()  # differentiable: a non-leaf param whose update autograd records
        opt = cls([p], lr=0.1, momentum=0.5, differentiable=True)
        p.grad = torch.arange(5.0) - 2
        opt.step()
        (p * p).sum().backward()
        grads[cls] = w.grad
    torch.testing.assert_close(grads[rmsprop_gpu.RMSprop], grads[torch.optim.RMSprop])


def test_differentiable_group_with_new_grads_every_step():
    """zero_grad(set_to_none=True) + backward: new grad objects each step take the plan's re-grad path."""
    out = {}
    for cls in (rmsprop_gpu.RMSprop, torch.optim.RMSprop):
        p = torch.ones(5, requires_grad=True).clone()
        opt = cls([p], lr=0.1, momentum=0.5, differentiable=True)
        gen = torch.Generator().manual_seed(0)
        for _ in range(3):
            p.grad = torch.randn(5, generator=gen)
            opt.step()
        out[cls] = p.detach()
    torch.testing.assert_close(out[rmsprop_gpu.RMSprop], out[torch.optim.RMSprop])


def test_functional_accepts_torchs_keywords_and_which_backend():
    p, g, v = torch.randn(5), torch.randn(5), torch.rand(5)
    rmsprop_gpu.rmsprop([p], [g], [v], lr=0.01, differentiable=False, has_complex=False, foreach=True,
                        capturable=False)
    choices = rmsprop_gpu.which_backend([torch.randn(3), torch.randn(2, 2, dtype=torch.float64), torch.randn(1)])
    assert [c.backend for c in choices] == ["torch", "torch"]
    assert [(c.param_dtype, c.params) for c in choices] == [("float32", 2), ("float64", 1)]
    assert str(choices[1]) == "1 float64 param(s) on cpu (state float64): torch"


# ---------------------------------------------------------------- PyTorch's own RMSprop inputs
def torch_inputs():
    from torch.testing._internal.common_optimizers import optim_inputs_func_rmsprop

    return [(i.desc, i.kwargs) for i in optim_inputs_func_rmsprop("cpu", torch.float32)]


@pytest.mark.parametrize("backend", ALL)
def test_pytorch_rmsprop_inputs_match_torch(backend):
    for desc, kwargs in torch_inputs():
        a, b, ours, ref = pair(lambda: [torch.randn(6, 5, generator=torch.Generator().manual_seed(2)),
                                        torch.randn(5, generator=torch.Generator().manual_seed(3))],
                               backend, **kwargs)
        gen = torch.Generator().manual_seed(4)
        for _ in range(3):
            for x, y in zip(a, b):
                g = torch.randn(x.shape, generator=gen)
                x.grad, y.grad = g.clone(), g.clone()
            ours.step()
            ref.step()
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=lambda m, d=desc: f"{d}: {m}")


def test_pytorch_rmsprop_error_inputs_raise_the_same_errors():
    import warnings

    from torch.testing._internal.common_optimizers import OptimizerErrorEnum, optim_error_inputs_func_rmsprop

    for e in optim_error_inputs_func_rmsprop("cpu", torch.float32):
        inp = e.optimizer_error_input
        params = inp.params if inp.params is not None else [torch.randn(2, requires_grad=True)]
        if e.error_on != OptimizerErrorEnum.CONSTRUCTION_ERROR:
            continue
        if issubclass(e.error_type, Warning):
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                rmsprop_gpu.RMSprop(params, **inp.kwargs)
            assert any(issubclass(x.category, e.error_type) for x in w)
            continue
        with pytest.raises(e.error_type, match=e.error_regex):
            rmsprop_gpu.RMSprop(params, **inp.kwargs)


# ---------------------------------------------------------------- the step plan
@pytest.mark.parametrize("backend", KERNELS)
def test_warm_plan_builds_nothing_and_changes_rebuild(backend):
    ps = [torch.randn(100), torch.randn(7, 3)]
    for p in ps:
        p.grad = torch.randn_like(p)
    opt = rmsprop_gpu.RMSprop(ps, backend=backend)
    tables = REGISTRY[backend].tables
    opt.step()
    plan, builds = opt._plan, tables.builds
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.9)
    for _ in range(3):
        opt.step()
        sched.step()
    assert opt._plan is plan and tables.builds == builds  # lr changes are values, not structure
    ps[0].grad = torch.randn(100)  # re-allocated grad: same plan, new table
    opt.step()
    assert opt._plan is plan
    builds = tables.builds
    ps[1].data = torch.randn(7, 3)  # .data swap, same layout: the tables are re-pointed at the new storage
    opt.step()
    assert opt._plan is plan and tables.builds == builds + 1
    ps[1].data = torch.randn(3, 7).t()  # another layout at a new address: planned again with every check
    opt.step()
    assert opt._plan is not plan
    plan = opt._plan
    opt.param_groups[0]["momentum"] = 0.5  # structural edit
    opt.step()
    assert opt._plan is not plan and "momentum_buffer" in opt.state[ps[0]]
    plan = opt._plan
    opt.load_state_dict(opt.state_dict())
    opt.step()
    assert opt._plan is not plan


@pytest.mark.parametrize("backend", ALL)
def test_fast_path_equals_a_fresh_plan(backend):
    gen = torch.Generator().manual_seed(0)
    ps = [torch.randn(300, generator=gen), torch.randn(5, 9, generator=gen).t()]
    qs = [p.clone() for p in ps]
    kw = dict(lr=0.01, momentum=0.9, centered=True, backend=backend)
    a, b = rmsprop_gpu.RMSprop(ps, **kw), rmsprop_gpu.RMSprop(qs, **kw)
    for _ in range(4):
        for p, q in zip(ps, qs):
            g = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = g, g.clone()
        a.step()
        b._plan = None  # forces the full build every step
        b.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, qs))


# ---------------------------------------------------------------- one launch across param groups
def _layerwise_groups(n_groups, seed, **extra):
    """n_groups param groups of 2 odd-sized tensors each (layer-wise lr decay); every third without weight decay,
    every fifth maximizing, one group with an inf param and no weight decay."""
    gen = torch.Generator().manual_seed(seed)
    groups = []
    for i in range(n_groups):
        ps = [torch.randn(17 + i, generator=gen), torch.randn(3, 5 + i % 4, generator=gen).t()]
        groups.append(dict(params=ps, lr=0.01 * 0.9**i, weight_decay=0.0 if i % 3 == 0 else 0.01 * (1 + i % 4),
                           maximize=i % 5 == 4, alpha=0.9 + 0.002 * (i % 7), **extra))
    groups[3]["params"][0][2] = float("inf")  # wd=0 in this group: torch keeps inf (0 * inf would give NaN)
    return groups


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("variant", [{}, dict(momentum=0.9, centered=True)], ids=["plain", "centered_momentum"])
def test_forty_param_groups_are_one_launch_and_match_torch(backend, variant):
    def clone_groups(groups):
        return [dict(g, params=[p.clone() for p in g["params"]]) for g in groups]

    base = _layerwise_groups(40, 0, **variant)
    ours_groups, ref_groups = clone_groups(base), clone_groups(base)
    ours = rmsprop_gpu.RMSprop(ours_groups, backend=backend)
    ref = torch.optim.RMSprop(ref_groups, foreach=False)
    sched_a = torch.optim.lr_scheduler.ExponentialLR(ours, 0.95)
    sched_b = torch.optim.lr_scheduler.ExponentialLR(ref, 0.95)
    gen = torch.Generator().manual_seed(1)
    b = REGISTRY[backend]
    for _ in range(3):
        for ga, gb in zip(ours.param_groups, ref.param_groups):
            for p, q in zip(ga["params"], gb["params"]):
                p.grad = torch.randn(p.shape, generator=gen)
                q.grad = p.grad.clone()
        n0 = b.launches
        ours.step()
        ref.step()
        assert b.launches - n0 == 1  # 40 param groups, one layout: one launch
        sched_a.step()
        sched_b.step()
    for ga, gb in zip(ours.param_groups, ref.param_groups):
        for p, q in zip(ga["params"], gb["params"]):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, equal_nan=True)
            for key, t in ours.state[p].items():
                torch.testing.assert_close(t, ref.state[q][key], rtol=1e-4, atol=1e-5, equal_nan=True)
    assert torch.isinf(ours.param_groups[3]["params"][0][2])  # not NaN: no weight decay term in that slot


@pytest.mark.parametrize("backend", KERNELS)
def test_hyper_table_uploads_only_when_values_change(backend):
    groups = _layerwise_groups(6, 2)
    for g in groups:
        for p in g["params"]:
            p.grad = torch.randn_like(p)
    opt = rmsprop_gpu.RMSprop(groups, backend=backend)
    tables = REGISTRY[backend].tables
    opt.step()
    builds, uploads = tables.builds, tables.hyper_uploads
    for _ in range(3):
        opt.step()
    assert (tables.builds, tables.hyper_uploads) == (builds, uploads)  # warm: nothing built, nothing uploaded
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.9)
    for _ in range(3):
        opt.step()
        sched.step()
    opt.step()
    assert (tables.builds, tables.hyper_uploads) == (builds, uploads + 3)  # one small upload per lr change
    opt.param_groups[4]["weight_decay"] = 0.0  # a value, not structure: same plan, same tables
    plan = opt._plan
    opt.step()
    assert opt._plan is plan and tables.builds == builds


@pytest.mark.parametrize("backend", KERNELS)
def test_groups_of_different_layouts_do_not_share_a_launch(backend):
    gen = torch.Generator().manual_seed(3)
    groups = [dict(params=[torch.randn(40, generator=gen)], lr=0.01),
              dict(params=[torch.randn(40, generator=gen)], lr=0.02, momentum=0.9),
              dict(params=[torch.randn(40, generator=gen)], lr=0.03, eps_in_sqrt=True),
              dict(params=[torch.randn(40, generator=gen).to(torch.bfloat16)], lr=0.04),
              dict(params=[torch.randn(40, generator=gen), torch.randn(40, generator=gen)], lr=0.05, foreach=False),
              dict(params=[torch.randn(40, generator=gen)], lr=0.06)]
    for g in groups:
        for p in g["params"]:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
    opt = rmsprop_gpu.RMSprop(groups, backend=backend)
    n0 = REGISTRY[backend].launches
    opt.step()
    # groups 0 and 5 share one launch; momentum, eps_in_sqrt, bf16 each their own; foreach=False one per tensor
    assert REGISTRY[backend].launches - n0 == 6


def _mutations():
    """Changes a cached plan must notice: (name, fn(opt, params, gen))."""

    def new_tensor(shape, gen):
        return torch.randn(shape, generator=gen)

    def p_data(opt, ps, gen):
        ps[0].data = new_tensor(ps[0].shape, gen)

    def p_data_shape(opt, ps, gen):
        ps[1].data = new_tensor((4, 6), gen)
        ps[1].grad = new_tensor((4, 6), gen)
        for k in ("square_avg", "momentum_buffer"):
            opt.state[ps[1]][k] = torch.rand(4, 6, generator=gen)

    def grad_transposed(opt, ps, gen):
        ps[1].grad = new_tensor(ps[1].shape[::-1], gen).t()

    def grads_reallocated(opt, ps, gen):  # zero_grad(set_to_none=True) + backward: only the grad column moves
        for p in ps:
            if p.grad is not None:
                p.grad = new_tensor(p.shape, gen)

    def grad_data(opt, ps, gen):
        ps[0].grad.data = new_tensor(ps[0].shape, gen)

    def grad_set_to_none(opt, ps, gen):
        ps[2].grad = None

    def idle_gains_grad(opt, ps, gen):
        ps[3].grad = new_tensor(ps[3].shape, gen)

    def state_tensor_replaced(opt, ps, gen):
        opt.state[ps[0]]["square_avg"] = torch.rand(ps[0].shape, generator=gen)

    def state_dict_replaced(opt, ps, gen):
        opt.state[ps[0]] = {k: v.clone() + 0.5 for k, v in opt.state[ps[0]].items()}

    def state_deleted(opt, ps, gen):
        del opt.state[ps[2]]

    def params_entry_swapped(opt, ps, gen):
        q = new_tensor(ps[0].shape, gen)
        q.grad = new_tensor(q.shape, gen)
        opt.param_groups[0]["params"][0] = q
        ps[0] = q

    def group_option_edited(opt, ps, gen):
        opt.param_groups[0]["centered"] = True

    def lr_becomes_tensor(opt, ps, gen):
        opt.param_groups[0]["lr"] = torch.tensor(0.02)

    def group_added(opt, ps, gen):
        q = new_tensor((5,), gen)
        q.grad = new_tensor((5,), gen)
        opt.add_param_group(dict(params=[q], lr=0.03))
        ps.append(q)

    return [(f.__name__, f) for f in (p_data, p_data_shape, grads_reallocated, grad_transposed, grad_data,
                                      grad_set_to_none, idle_gains_grad, state_tensor_replaced, state_dict_replaced,
                                      state_deleted, params_entry_swapped, group_option_edited, lr_becomes_tensor,
                                      group_added)]


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("name,mutate", _mutations(), ids=[n for n, _ in _mutations()])
def test_a_cached_plan_is_never_stale(backend, name, mutate):
    """After each change, the cached plan's step equals a step planned from scratch, bit for bit."""

    def setup():
        gen = torch.Generator().manual_seed(7)
        ps = [torch.randn(33, generator=gen), torch.randn(6, 4, generator=gen), torch.randn(10, generator=gen),
              torch.randn(3, generator=gen)]
        for p in ps[:3]:
            p.grad = torch.randn(p.shape, generator=gen)
        opt = rmsprop_gpu.RMSprop(ps, lr=0.01, momentum=0.9, backend=backend)
        for _ in range(2):
            opt.step()
        return opt, ps

    (cached, ps_a), (fresh, ps_b) = setup(), setup()
    mutate(cached, ps_a, torch.Generator().manual_seed(8))
    mutate(fresh, ps_b, torch.Generator().manual_seed(8))
    for _ in range(2):
        cached.step()
        fresh._plan = None
        fresh.step()
    for a, b in zip(ps_a, ps_b):
        assert torch.equal(a, b), name
        assert cached.state.get(a, {}).keys() == fresh.state.get(b, {}).keys()
        for k, v in cached.state.get(a, {}).items():
            assert torch.equal(v, fresh.state[b][k]), (name, k)


# ---------------------------------------------------------------- the functional plan
@pytest.mark.parametrize("backend", ALL)
def test_functional_plan_equals_rmsprop_and_follows_changes(backend):
    gen = torch.Generator().manual_seed(11)
    shapes = [(33,), (6, 4), (2049,), (1,)]

    def state():
        g = torch.Generator().manual_seed(12)
        ps = [torch.randn(s, generator=g) for s in shapes]
        return ps, [torch.rand(s, generator=g) for s in shapes], [torch.randn(s, generator=g) for s in shapes], [
            torch.zeros(()) for _ in shapes]

    a, b = state(), state()
    plan = rmsprop_gpu.RMSpropPlan(a[0], [torch.zeros(s) for s in shapes], a[1], None, a[2], a[3], momentum=0.9,
                                   backend=backend)
    for step in range(6):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        if step == 3:  # a grad of another layout: planned again with every check
            grads[1] = torch.randn(4, 6, generator=gen).t()
        if step == 4:  # a param's storage swapped: seen through its address
            fresh = torch.randn(33, generator=gen)
            a[0][0].data, b[0][0].data = fresh.clone(), fresh.clone()
        lr = 0.01 * 0.9**step
        plan(grads=grads, lr=lr, momentum=0.9, weight_decay=0.01)
        rmsprop_gpu.rmsprop(b[0], [g.clone() for g in grads], b[1], None, b[2], b[3], lr=lr, momentum=0.9,
                            weight_decay=0.01, backend=backend)
    for x, y in zip(a[0] + a[1] + a[2] + a[3], b[0] + b[1] + b[2] + b[3]):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend", KERNELS)
def test_functional_plan_reuses_its_tables(backend):
    shapes = [(100,), (7, 3)]
    ps, vs = [torch.randn(s) for s in shapes], [torch.rand(s) for s in shapes]
    grads = [torch.randn(s) for s in shapes]
    plan = rmsprop_gpu.RMSpropPlan(ps, grads, vs, backend=backend)
    tables = REGISTRY[backend].tables
    plan(lr=0.01)
    builds = tables.builds
    for _ in range(3):
        plan(grads=[g.detach() for g in grads], lr=0.01)  # new grad objects on the same storage
    assert tables.builds == builds
    plan(grads=[g.clone() for g in grads], lr=0.01)  # new storage: the grad column re-pointed, one upload
    assert tables.builds == builds + 1
    with pytest.raises(ValueError, match="structural"):
        plan(lr=0.01, momentum=0.9)


@pytest.mark.parametrize("variant", [dict(weight_decay=0.01), dict(momentum=0.9, centered=True)], ids=str)
def test_cpu_cache_batches_match_torch_bit_for_bit(monkeypatch, variant):
    """The torch path's cache-sized batches (here 1000 elements) split tensors into flat views: same ops, so
    the same bits as torch.optim.RMSprop(foreach=True); non-contiguous tensors go whole."""
    from rmsprop_gpu.backends import torch_backend

    monkeypatch.setattr(torch_backend, "CPU_BATCH", 1000)
    gen = torch.Generator().manual_seed(21)
    shapes = [(2500,), (3, 700), (999,), (1,), (0,), (1001,)]

    def make():
        g = torch.Generator().manual_seed(22)
        ps = [torch.randn(s, generator=g) for s in shapes] + [torch.randn(40, 30, generator=g).t()]
        return ps

    a, b = make(), make()
    ours = rmsprop_gpu.RMSprop(a, lr=0.01, backend="torch", **variant)
    ref = torch.optim.RMSprop(b, lr=0.01, foreach=True, **variant)
    for _ in range(3):
        for p, q in zip(a, b):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        ours.step()
        ref.step()
    assert len(torch_backend.cache_batches(ours._plan.entries[0].bind(ours._plan.tensors()[1]))) > 3  # batched
    for p, q in zip(a, b):
        assert torch.equal(p, q)
        for k, v in ours.state[p].items():
            assert torch.equal(v, ref.state[q][k]), k


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("seed", range(4))
def test_random_multi_group_configurations_match_torch(backend, seed):
    """Adversarial mixes in one optimizer (so in one launch where layouts agree): per-group lr (0 included),
    weight decay, maximize, alpha and eps; grads of any scale with inf and NaN; odd sizes; states compared."""
    import random

    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    common = dict(momentum=rng.choice([0, 0.9]), centered=rng.choice([False, True]))
    groups_a, groups_b = [], []
    for _ in range(rng.randint(2, 5)):
        ps = [torch.randn(rng.randint(1, 3000), generator=gen) for _ in range(rng.randint(1, 3))]
        kw = dict(lr=rng.choice([0.0, 1e-3, 0.1]), weight_decay=rng.choice([0.0, 0.1]),
                  maximize=rng.choice([False, True]), alpha=rng.choice([0.9, 0.99]), eps=rng.choice([1e-8, 1e-3]),
                  **common)
        groups_a.append(dict(params=[p.clone() for p in ps], **kw))
        groups_b.append(dict(params=[p.clone() for p in ps], **kw))
    ours = rmsprop_gpu.RMSprop(groups_a, backend=backend)
    ref = torch.optim.RMSprop(groups_b, foreach=False)
    for _ in range(3):
        for ga, gb in zip(groups_a, groups_b):
            for p, q in zip(ga["params"], gb["params"]):
                g = torch.randn(p.shape, generator=gen) * rng.choice([1.0, 1e-3, 1e3])
                if rng.random() < 0.2:
                    g[0] = rng.choice([float("inf"), float("nan")])
                p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    for ga, gb in zip(ours.param_groups, ref.param_groups):
        for p, q in zip(ga["params"], gb["params"]):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, equal_nan=True)
            for k, v in ref.state[q].items():
                torch.testing.assert_close(ours.state[p][k], v, rtol=1e-4, atol=1e-5, equal_nan=True)
