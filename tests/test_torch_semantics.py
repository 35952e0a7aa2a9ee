"""torch.optim.RMSprop's semantics as a drop-in: the inputs torch accepts (strided layouts, numpy scalars, tensor
hyperparameters, old checkpoints, values beyond float32), its errors, nothing half-written when a step fails,
version counters, step counter dtypes, differentiable groups, and PyTorch's own RMSprop inputs."""

import copy

import numpy as np
import pytest
import torch

import rmsprop_gpu
from tests.matrix import BACKENDS as ALL
from tests.matrix import KERNEL_BACKENDS as KERNELS


def pair(make, backend, **kw):
    """The same params under ours and torch.optim.RMSprop."""
    a, b = make(), make()
    return a, b, rmsprop_gpu.RMSprop(a, backend=backend, **kw), torch.optim.RMSprop(b, **kw)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("layout", ["transposed", "channels_last", "expanded_grad"])
def test_strided_params_and_grads_match_torch(backend, layout):
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
def test_step_bumps_the_version_counter(backend):
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
def test_a_bad_last_group_leaves_every_group_untouched(backend, bad):
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


def test_capturable_one_element_lr_on_the_torch_backend():  # lr of shape [1]
    p = torch.randn(10)
    q = p.clone()
    g = torch.randn(10)
    p.grad, q.grad = g.clone(), g.clone()
    rmsprop_gpu.RMSprop([p], lr=torch.tensor([0.01]), capturable=True, backend="torch").step()
    torch.optim.RMSprop([q], lr=0.01).step()  # torch's capturable needs CUDA: the same step by value
    torch.testing.assert_close(p, q)


@pytest.mark.parametrize("backend", ALL)
def test_numpy_scalars_are_accepted(backend):
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
def test_old_checkpoint_steps_load(backend, old_step):
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


def test_load_pre_hook_runs_before_our_checks():
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
def test_huge_gradient_keeps_training_like_torch(backend):
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
def test_values_beyond_float32_behave_like_torch(backend, name):
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
def test_infinite_lr_is_accepted_as_torch_accepts_it(lr):
    a, b, ours, ref = pair(lambda: [torch.ones(4)], "triton", lr=lr)
    a[0].grad, b[0].grad = torch.randn(4), torch.randn(4)
    b[0].grad.copy_(a[0].grad)
    ours.step()
    ref.step()
    torch.testing.assert_close(a[0], b[0], equal_nan=True)


def test_backend_errors_name_their_source(monkeypatch):
    with pytest.raises(ValueError, match="backend must be a string"):
        rmsprop_gpu.RMSprop([torch.zeros(1, requires_grad=True)], backend=123)
    monkeypatch.setenv("RMSPROP_GPU_BACKEND", "bogus")
    with pytest.raises(ValueError, match="RMSPROP_GPU_BACKEND"):
        rmsprop_gpu.RMSprop([torch.zeros(1, requires_grad=True)])


def test_a_failed_scaler_step_does_not_skip_later_steps():
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
