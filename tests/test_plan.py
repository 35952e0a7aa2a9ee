"""The plan confirms what its launches read: tensors changed behind the same objects, stale caches, no grad kept.

Each change is made to an optimizer whose plan is warm and to one planned from scratch every step; their steps
must agree bit for bit (or both refuse, writing nothing). Every backend: torch, Triton (interpreter), the CUDA C
kernel (g++ build).
"""

import gc
import os
import subprocess
import sys
import textwrap
import weakref

import pytest
import torch

import rmsprop_gpu
from rmsprop_gpu.backends import BACKENDS as REGISTRY
from tests.matrix import BACKENDS as ALL


def make(backend, seed=3, **kw):
    """A warm optimizer over odd-sized params (one square, for transposes) with every state kind."""
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.randn(33, generator=gen), torch.randn(5, 5, generator=gen), torch.randn(6, 4, generator=gen),
          torch.randn(2051, generator=gen)]
    opt = rmsprop_gpu.RMSprop(ps, lr=0.01, momentum=0.9, centered=True, weight_decay=0.01, backend=backend, **kw)
    for _ in range(2):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return opt, ps


def snapshot(opt, ps):
    return [p.detach().clone() for p in ps] + [v.clone() for p in ps for v in opt.state[p].values()]


def _state(opt, ps, i, key):
    return opt.state[ps[i]][key]


# Changes behind the objects the plan saw: (name, fn(opt, ps)). Each keeps the step valid (same values in the
# cached and the fresh optimizer) unless its name says "refused".
def _changes():
    def data_clone(key):
        def f(opt, ps):
            t = _state(opt, ps, 0, key)
            t.data = t.data.clone()
        f.__name__ = f"{key}_data_clone"
        return f

    def set_storage(key):
        def f(opt, ps):
            t = _state(opt, ps, 3, key)
            t.set_(t.detach().clone())
        f.__name__ = f"{key}_set_"
        return f

    def state_to_other_dtype_and_back(opt, ps):  # "move the optimizer state" snippet: new storage each
        for p in ps:
            for v in opt.state[p].values():
                v.data = v.data.to(torch.float64).to(torch.float32)

    def param_data_clone(opt, ps):
        ps[2].data = ps[2].data.clone()

    def param_strides_set_(opt, ps):  # same address, other strides
        p = ps[1]
        p.set_(p.untyped_storage(), p.storage_offset(), (5, 5), (1, 5))

    def param_as_strided_(opt, ps):
        ps[1].as_strided_((5, 5), (1, 5))

    def param_transposed_in_place(opt, ps):
        ps[1].t_()

    def param_data_transposed(opt, ps):
        ps[1].data = ps[1].data.t()

    def grad_transposed_in_place(opt, ps):
        ps[1].grad.t_()

    def grad_strides_set_(opt, ps):
        g = ps[1].grad
        g.set_(g.untyped_storage(), 0, (5, 5), (1, 5))

    def grad_data_clone(opt, ps):
        ps[3].grad.data = ps[3].grad.data.clone()

    def state_tensor_transposed_in_place(opt, ps):
        _state(opt, ps, 1, "square_avg").t_()

    def momentum_reset(opt, ps):  # a new buffer object, as a "reset momentum" snippet makes
        opt.state[ps[0]]["momentum_buffer"] = torch.zeros_like(ps[0])

    def momentum_buffer_deleted(opt, ps):  # a new zero buffer is made at the next step (as for a new param)
        del opt.state[ps[2]]["momentum_buffer"]

    def param_sliced_refused(opt, ps):
        ps[3].data = ps[3].data[:4]

    def param_resized_refused(opt, ps):
        ps[0].resize_(7)

    def state_sliced_refused(opt, ps):
        v = _state(opt, ps, 0, "grad_avg")
        v.data = v.data[:5]

    def grad_dtype_refused(opt, ps):
        ps[0].grad.data = ps[0].grad.data.double()

    return [data_clone(k) for k in ("square_avg", "momentum_buffer", "grad_avg", "step")] + [
        set_storage(k) for k in ("square_avg", "momentum_buffer", "grad_avg", "step")] + [
        state_to_other_dtype_and_back, param_data_clone, param_strides_set_, param_as_strided_,
        param_transposed_in_place, param_data_transposed, grad_transposed_in_place, grad_strides_set_,
        grad_data_clone, state_tensor_transposed_in_place, momentum_reset, momentum_buffer_deleted,
        param_sliced_refused, param_resized_refused, state_sliced_refused, grad_dtype_refused]


CHANGES = _changes()


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("change", CHANGES, ids=[c.__name__ for c in CHANGES])
def test_a_change_behind_the_plan_is_seen(backend, change):
    (cached, ps_a), (fresh, ps_b) = make(backend), make(backend)
    change(cached, ps_a)
    change(fresh, ps_b)
    for step in range(2):
        gen = torch.Generator().manual_seed(10 + step)
        for a, b in zip(ps_a, ps_b):
            g = torch.randn(a.shape, generator=gen)
            if a.grad is not None and a.grad.shape == a.shape and step == 0:
                a.grad.copy_(g)  # keep the grad objects (and their layouts) the change made
                b.grad.copy_(g)
            else:
                a.grad, b.grad = g, g.clone()
        fresh._plan = None  # planned from scratch, with every check
        if "refused" in change.__name__:
            before = snapshot(cached, ps_a)
            with pytest.raises((ValueError, RuntimeError)):
                cached.step()
            with pytest.raises((ValueError, RuntimeError)):
                fresh.step()
            after = snapshot(cached, ps_a)
            assert all(torch.equal(x, y) for x, y in zip(before, after)), "a refused step wrote something"
            return
        cached.step()
        fresh.step()
    for a, b in zip(ps_a, ps_b):
        assert torch.equal(a, b)
        assert a.stride() == b.stride()
        for k, v in cached.state[a].items():
            assert torch.equal(v, fresh.state[b][k]), k


@pytest.mark.parametrize("backend", ALL)
def test_a_swapped_state_storage_is_never_written_after_free(backend):
    """In a subprocess: the old storage is freed and its memory reused; a stale table would corrupt the heap
    (the process dies) or the values (compared with a fresh plan). A crash is a failure."""
    code = textwrap.dedent(f"""
        import os, sys
        os.environ["TRITON_INTERPRET"] = "1"
        sys.path.insert(0, {os.getcwd()!r})
        import torch, rmsprop_gpu
        from rmsprop_gpu.backends import BACKENDS
        from tools.cuda_cpu.cpu_module import cpu_module_factory
        BACKENDS["cupy"].use_module_factory(cpu_module_factory, device_types=("cpu",))
        from tests.test_plan import make
        (a, pa), (b, pb) = make({backend!r}), make({backend!r})
        for opt, ps in ((a, pa), (b, pb)):
            for p in ps:
                for k in ("square_avg", "momentum_buffer", "grad_avg"):
                    t = opt.state[p][k]
                    t.data = t.data.to(torch.float64).to(torch.float32)  # the old storage is freed here
        junk = [torch.full((2051,), 7.0) for _ in range(64)]  # reuse the freed memory
        for step in range(3):
            g = torch.Generator().manual_seed(step)
            for x, y in zip(pa, pb):
                x.grad = torch.randn(x.shape, generator=g)
                y.grad = x.grad.clone()
            b._plan = None
            a.step()
            b.step()
        assert all(torch.equal(x, y) for x, y in zip(pa, pb))
        assert all(torch.equal(j, torch.full((2051,), 7.0)) for j in junk), "freed memory was written"
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), (r.returncode, r.stdout[-2000:], r.stderr[-2000:])


@pytest.mark.parametrize("backend", ALL)
def test_a_device_lr_swapped_behind_its_object_is_read_at_its_new_address(backend):
    def run(swap):
        gen = torch.Generator().manual_seed(0)
        ps = [torch.randn(40, generator=gen)]
        opt = rmsprop_gpu.RMSprop(ps, lr=torch.tensor(0.01), capturable=True, backend=backend)
        for step in range(3):
            ps[0].grad = torch.randn(40, generator=gen)
            if step == 2:
                if swap:
                    opt.param_groups[0]["lr"].data = torch.tensor(0.5)
                else:
                    opt.param_groups[0]["lr"] = torch.tensor(0.5)
            opt.step()
        return ps[0]

    assert torch.equal(run(swap=True), run(swap=False))


# ---------------------------------------------------------------- nothing keeps a grad alive
def _variants():
    return [dict(), dict(momentum=0.9, centered=True), dict(foreach=False), dict(state_bits=8),
            dict(stochastic_rounding=True, dtype=torch.bfloat16), dict(layout="transposed"),
            dict(groups=3)]


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("variant", _variants(), ids=str)
def test_no_grad_outlives_step_and_zero_grad(backend, variant):
    variant = dict(variant)
    dtype = variant.pop("dtype", torch.float32)
    layout = variant.pop("layout", None)
    n_groups = variant.pop("groups", 1)
    gen = torch.Generator().manual_seed(0)
    ps = [torch.randn(70, 70, generator=gen).to(dtype) for _ in range(3)]
    if layout == "transposed":  # grads of another layout than their params: they go through temporaries
        ps = [p.t() for p in ps]
    params = [dict(params=ps[i::n_groups], lr=0.01 * (i + 1)) for i in range(n_groups)]
    opt = rmsprop_gpu.RMSprop(params, backend=backend, **variant)
    refs = []
    for _ in range(3):
        for p in ps:
            g = torch.randn(p.shape[::-1] if layout else p.shape, generator=gen).to(dtype)
            p.grad = g.t() if layout else g
            refs.append(weakref.ref(p.grad))
            del g
        opt.step()
        opt.zero_grad(set_to_none=True)
        gc.collect()
        assert all(r() is None for r in refs), "a grad is alive after step() + zero_grad(set_to_none=True)"


@pytest.mark.parametrize("backend", ALL)
def test_no_grad_outlives_in_backward_or_the_compiled_op(backend):
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    refs = []
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda p: refs.append(weakref.ref(p.grad)))
    opt = rmsprop_gpu.RMSprop(model.parameters(), momentum=0.9, backend=backend, in_backward=True, bucket_mb=1e-4)
    model(torch.randn(4, 8)).sum().backward()
    gc.collect()
    assert refs and all(r() is None for r in refs)

    model2 = torch.nn.Linear(8, 3)
    opt2 = rmsprop_gpu.RMSprop(model2.parameters(), momentum=0.9, backend=backend)
    step = torch.compile(opt2.step, backend="aot_eager", fullgraph=True)
    refs.clear()
    for _ in range(3):
        model2(torch.randn(4, 8)).sum().backward()
        refs += [weakref.ref(p.grad) for p in model2.parameters()]
        step()
        opt2.zero_grad(set_to_none=True)
    gc.collect()
    assert all(r() is None for r in refs)
    del opt


def test_the_op_cache_holds_no_tensors_and_reuses_its_plan_under_aot_eager():
    from rmsprop_gpu import ops

    torch._dynamo.reset()
    model = torch.nn.Linear(8, 3)
    opt = rmsprop_gpu.RMSprop(model.parameters(), momentum=0.9, backend="triton")
    step = torch.compile(opt.step, backend="aot_eager", fullgraph=True)
    tables = REGISTRY["triton"].tables
    for i in range(4):
        model(torch.randn(4, 8)).sum().backward()
        step()
        if i == 1:
            n_plans, builds = len(ops._PLANS), tables.builds
    assert len(ops._PLANS) == n_plans  # the same plan, re-pointed at each call's copies
    assert tables.builds - builds <= 2  # at most one table upload per call, no plan rebuilt
    held = [t for plan in ops._PLANS._entries.values() for t in reachable_tensors(plan)]
    assert held and not any(t.is_floating_point() and t.shape in ((3, 8), (3,)) for t in held), (
        "a plan holds a param, grad or state")


def reachable_tensors(root) -> list:
    """Tensors reachable from root through containers and plain objects (not modules, classes, functions or the
    backends' registry)."""
    from types import FunctionType, ModuleType

    from rmsprop_gpu.backends.base import Backend

    seen, out, todo = set(), [], [root]
    while todo:
        x = todo.pop()
        if id(x) in seen or isinstance(x, (ModuleType, type, FunctionType, Backend)):
            continue
        seen.add(id(x))
        if isinstance(x, torch.Tensor):
            out.append(x)
            continue
        todo += gc.get_referents(x)
    return out


@pytest.mark.parametrize("backend", ALL)
def test_a_momentum_reset_between_compiled_steps_is_seen(backend):
    torch._dynamo.reset()

    def run(compiled):
        torch.manual_seed(0)
        model = torch.nn.Linear(6, 2)
        opt = rmsprop_gpu.RMSprop(model.parameters(), momentum=0.9, centered=True, backend=backend)
        step = torch.compile(opt.step, backend="eager", fullgraph=True) if compiled else opt.step
        for i in range(4):
            model(torch.randn(3, 6)).sum().backward()
            step()
            if i == 1:
                for p in model.parameters():
                    opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
                    opt.state[p]["grad_avg"].data = torch.zeros_like(p)
        return [p.detach() for p in model.parameters()]

    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ALL)
def test_in_backward_bucket_plans_see_replaced_and_deleted_state(backend):
    def run(in_backward):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 1))
        opt = rmsprop_gpu.RMSprop(model.parameters(), momentum=0.9, centered=True, backend=backend,
                                  in_backward=in_backward)
        gen = torch.Generator().manual_seed(1)
        ps = list(model.parameters())
        for i in range(4):
            model(torch.randn(3, 5, generator=gen)).pow(2).sum().backward()
            if not in_backward:
                opt.step()
            opt.zero_grad()
            if i == 1:
                opt.state[ps[0]]["momentum_buffer"] = torch.zeros_like(ps[0])
                del opt.state[ps[1]]["grad_avg"]
                opt.state[ps[2]]["square_avg"].data = opt.state[ps[2]]["square_avg"].data.clone()
        return [p.detach() for p in ps]

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for a, b in zip(run(True), run(False)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ALL)
def test_a_failed_plan_call_changes_nothing(backend):
    shapes = [(33,), (6, 4)]
    ps, vs = [torch.randn(s) for s in shapes], [torch.rand(s) for s in shapes]
    grads = [torch.randn(s) for s in shapes]
    plan = rmsprop_gpu.RMSpropPlan(ps, grads, vs, backend=backend)
    plan(lr=0.01)
    before = [t.clone() for t in ps + vs]
    with pytest.raises(ValueError):
        plan(grads=[torch.randn(33), torch.randn(4, 6)], lr=0.01)  # a grad of the wrong shape
    assert all(torch.equal(x, y) for x, y in zip(before, ps + vs))
    plan(lr=0.01)  # the plan's own grads again: runs
    ref_p, ref_v = [t.clone() for t in before[:2]], [t.clone() for t in before[2:]]
    rmsprop_gpu.rmsprop(ref_p, grads, ref_v, lr=0.01, backend=backend)
    assert all(torch.equal(x, y) for x, y in zip(ps + vs, ref_p + ref_v))


def test_loading_a_float_state_dict_keeps_8_bit_state():
    ps = [torch.randn(5000)]
    ps[0].grad = torch.randn(5000)
    opt = rmsprop_gpu.RMSprop(ps, state_bits=8, momentum=0.9)
    opt.step()
    sd = rmsprop_gpu.float_state_dict(opt)
    torch.optim.RMSprop([torch.randn(5000)], momentum=0.9).load_state_dict(sd)  # torch loads it
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["state_bits"] == 8
    assert opt.state[ps[0]]["square_avg"].dtype == torch.uint8


# ---------------------------------------------------------------- in_backward is exact
def _mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 4), torch.nn.Tanh(),
                               torch.nn.Linear(4, 1))


def _train(model, opt, in_backward, steps, k=1, freeze=None, unfreeze_at=None, skip=None):
    """k backward passes per step; `skip(step, pass)` -> a param index that gets no grad in that pass."""
    import warnings

    gen = torch.Generator().manual_seed(5)
    ps = list(model.parameters())
    if freeze is not None:
        ps[freeze].requires_grad_(False)
    for step in range(steps):
        if step == unfreeze_at:
            ps[freeze].requires_grad_(True)
        for k_pass in range(k):
            x = torch.randn(3, 6, generator=gen)
            skipped = None if skip is None else skip(step, k_pass)
            if skipped is not None:
                ps[skipped].requires_grad_(False)  # it misses this backward
            model(x).pow(2).sum().backward()
            if skipped is not None:
                ps[skipped].requires_grad_(True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in ps]


@pytest.mark.parametrize("backend", ALL)
def test_in_backward_updates_a_param_unfrozen_after_construction(backend):
    kw = dict(lr=0.01, momentum=0.9, backend=backend)
    m1, m2 = _mlp(), _mlp()
    got = _train(m1, rmsprop_gpu.RMSprop(m1.parameters(), in_backward=True, **kw), True, 4, freeze=0, unfreeze_at=2)
    want = _train(m2, rmsprop_gpu.RMSprop(m2.parameters(), **kw), False, 4, freeze=0, unfreeze_at=2)
    assert not torch.equal(got[0], _mlp().state_dict()["0.weight"])  # it trained
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ALL)
def test_in_backward_updates_when_only_late_params_train(backend):
    """Every param frozen at construction: no hook fires, step() ends the pass and steps them."""
    kw = dict(lr=0.01, backend=backend)
    m1, m2 = _mlp(), _mlp()
    for m in (m1, m2):
        m.requires_grad_(False)
    o1 = rmsprop_gpu.RMSprop(m1.parameters(), in_backward=True, **kw)
    o2 = rmsprop_gpu.RMSprop(m2.parameters(), **kw)
    for m in (m1, m2):
        m.requires_grad_(True)
    got, want = _train(m1, o1, True, 3), _train(m2, o2, False, 3)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ALL)
def test_in_backward_accumulation_windows_are_exact_per_param(backend):
    """accumulation_steps=3: a param that misses some backward passes of a window (the last one included) is
    stepped at the window's end with what it accumulated, as a normal step() after 3 backwards does."""
    kw = dict(lr=0.01, momentum=0.9, centered=True, backend=backend)
    skip = lambda step, k_pass: {(0, 2): 0, (1, 0): 2, (2, 1): 4}.get((step, k_pass))
    m1, m2 = _mlp(), _mlp()
    o1 = rmsprop_gpu.RMSprop(m1.parameters(), in_backward=True, accumulation_steps=3, bucket_mb=1e-4, **kw)
    got = _train_accumulating(m1, o1, skip)
    want = _train_accumulating(m2, rmsprop_gpu.RMSprop(m2.parameters(), **kw), skip, step_every=3)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def _train_accumulating(model, opt, skip, step_every=None):
    """9 backward passes; with step_every, a normal step() + zero_grad() after every step_every passes."""
    gen = torch.Generator().manual_seed(5)
    ps = list(model.parameters())
    for i in range(9):
        skipped = skip(i // 3, i % 3)
        if skipped is not None:
            ps[skipped].requires_grad_(False)
        model(torch.randn(3, 6, generator=gen)).pow(2).sum().backward()
        if skipped is not None:
            ps[skipped].requires_grad_(True)
        if step_every and (i + 1) % step_every == 0:
            opt.step()
            opt.zero_grad()
    return [p.detach().clone() for p in ps]


@pytest.mark.parametrize("backend", ALL)
def test_a_compiled_step_of_an_in_backward_optimizer_is_the_eager_step(backend):
    """torch.compile(opt.step) must not update again what backward updated."""
    import warnings

    torch._dynamo.reset()
    kw = dict(lr=0.01, momentum=0.9, backend=backend)
    m1, m2 = _mlp(), _mlp()
    o1 = rmsprop_gpu.RMSprop(m1.parameters(), in_backward=True, **kw)
    o2 = rmsprop_gpu.RMSprop(m2.parameters(), **kw)
    step = torch.compile(o1.step, backend="eager")
    gen = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):
            x = torch.randn(3, 6, generator=gen)
            m1(x).sum().backward()
            m2(x).sum().backward()
            step()
            o2.step()
            o2.zero_grad()
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    with pytest.raises(RuntimeError, match="closure"):
        torch.compile(o1.step, backend="eager")(lambda: m1(x).sum())


@pytest.mark.parametrize("backend", ALL)
def test_extra_state_entries_are_kept_and_do_not_confuse_the_plan(backend):
    """Libraries add their own keys to optimizer state; the plan confirms whatever is there."""
    (a, pa), (b, pb) = make(backend), make(backend)
    a.state[pa[0]]["ema"] = torch.zeros(3)
    a.state[pa[1]]["note"] = 1.5
    for step in range(3):
        gen = torch.Generator().manual_seed(step)
        for x, y in zip(pa, pb):
            x.grad = torch.randn(x.shape, generator=gen)
            y.grad = x.grad.clone()
        a.step()
        b.step()
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))
    assert a.state[pa[1]]["note"] == 1.5


@pytest.mark.parametrize("backend", ALL)
def test_a_step_whose_tables_fail_commits_no_state(backend, monkeypatch):
    """New state is committed only after every check and every table of the plan (a table upload can refuse,
    e.g. while a CUDA graph is captured)."""
    b = REGISTRY[backend]

    def refuse(*args, **kwargs):
        raise RuntimeError("no tables today")

    monkeypatch.setattr(b, "prepare", refuse)
    p = torch.randn(10)
    p.grad = torch.randn(10)
    opt = rmsprop_gpu.RMSprop([p], momentum=0.9, backend=backend)
    with pytest.raises(RuntimeError, match="no tables today"):
        opt.step()
    assert len(opt.state) == 0 and opt._plan is None
