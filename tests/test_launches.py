"""Launches and their plans: a warm plan builds nothing, changes rebuild it, one launch across param groups (40
groups of layer-wise lr decay), the hyper table uploads only on change, the functional plan, the CPU cache
batches, and random multi-group configurations against torch."""

import pytest
import torch

import rmsprop_gpu
from rmsprop_gpu.backends import BACKENDS as REGISTRY
from tests.matrix import BACKENDS as ALL
from tests.matrix import KERNEL_BACKENDS as KERNELS


def assert_matches_torch(ours, ref):
    """Every param and state tensor of `ours` against torch.optim.RMSprop's `ref` (the same param groups), the
    same state keys, within float32 rounding (inf and NaN where torch has them)."""
    for ga, gb in zip(ours.param_groups, ref.param_groups):
        for p, q in zip(ga["params"], gb["params"]):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, equal_nan=True)
            assert set(ours.state[p]) == set(ref.state[q])
            for key, t in ref.state[q].items():
                torch.testing.assert_close(ours.state[p][key], t, rtol=1e-4, atol=1e-5, equal_nan=True)


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
    assert_matches_torch(ours, ref)
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
    assert_matches_torch(ours, ref)
