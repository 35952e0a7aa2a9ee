"""The training stack, on the CPU, each through our optimizer: AMP GradScaler, capturable without host reads,
torch.compile, DDP / FSDP2 / ZeroRedundancyOptimizer (2 gloo processes), checkpoints."""

import copy
import io

import pytest
import torch

import rmsprop_gpu
from rmsprop_gpu.backends import BACKENDS
from tests.matrix import BACKENDS as ALL

KERNELS = ["triton", "cupy"]


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def snapshot(model, opt):
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())


def assert_same(a, b):
    (pa, sa), (pb, sb) = a, b
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))
    for k in sa["state"]:
        for key in sa["state"][k]:
            assert torch.equal(sa["state"][k][key], sb["state"][k][key]), key


# ------------------------------------------------------------------ AMP
@pytest.mark.parametrize("backend", ALL)
def test_grad_scaler_unscales_and_skips_inside_the_step(backend):
    m1, m2 = mlp(), mlp()
    ours = rmsprop_gpu.RMSprop(m1.parameters(), lr=0.01, momentum=0.9, centered=True, backend=backend)
    ref = torch.optim.RMSprop(m2.parameters(), lr=0.01, momentum=0.9, centered=True)
    assert ours._step_supports_amp_scaling
    s1, s2 = torch.amp.GradScaler("cpu", init_scale=2.0**12), torch.amp.GradScaler("cpu", init_scale=2.0**12)
    x = torch.randn(32, 8)
    for it in range(5):
        before = snapshot(m1, ours)
        for m, o, s in ((m1, ours, s1), (m2, ref, s2)):
            o.zero_grad()
            loss = m(x).square().mean() * (float("inf") if it == 2 else 1.0)
            s.scale(loss).backward()
            if o is ref:
                s.unscale_(o)  # the reference unscales in a separate pass; ours inside the kernel
            s.step(o)
            s.update()
        if it == 2:
            assert_same(before, snapshot(m1, ours))  # inf grads: nothing written, step not counted
        for a, b in zip(m1.parameters(), m2.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert s1.get_scale() == s2.get_scale() == 2.0**11
    assert float(ours.state[m1[0].weight]["step"]) == 4


# ------------------------------------------------------------------ capturable: no host reads in step()
class NoHostReads:
    """Any device-to-host read (item, bool, float, int, tolist, numpy) inside the block raises."""

    NAMES = ("item", "__bool__", "__float__", "__int__", "tolist", "numpy")

    def __enter__(self):
        self.saved = {n: getattr(torch.Tensor, n) for n in self.NAMES}

        def refuse(self_, *a, _n="?", **k):
            raise AssertionError("host read in a capturable step")

        for n in self.NAMES:
            setattr(torch.Tensor, n, lambda *a, _n=n, **k: refuse(*a, _n=_n, **k))
        return self

    def __exit__(self, *exc):
        for n, f in self.saved.items():
            setattr(torch.Tensor, n, f)
        return False


@pytest.mark.parametrize("backend", KERNELS)
def test_capturable_step_makes_no_host_read(backend, monkeypatch):
    model = mlp()
    opt = rmsprop_gpu.RMSprop(model.parameters(), lr=torch.tensor(0.01), momentum=0.9, centered=True,
                              capturable=True, backend=backend)
    model(torch.randn(4, 8)).sum().backward()
    opt.step()  # first step: state and tables built (outside any capture, as with torch)
    if backend == "triton":  # the interpreter itself reads tensors on the host: record the launch instead
        calls = []
        monkeypatch.setattr(BACKENDS["triton"], "_kernel", type("K", (), {
            "__getitem__": lambda self, grid: (lambda *a, **k: calls.append((grid, a, k)))})())
    opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(0.0)  # as GradScaler hands them over
    with NoHostReads():
        opt.step()
    if backend == "triton":
        assert len(calls) == 1
        args = calls[0][1]
        hyper_ptrs = args[2]  # the hyper table: slot 0's lr address, read by the kernel (no host read)
        assert int(hyper_ptrs[0, 0]) == opt.param_groups[0]["lr"].data_ptr()
    for st in opt.state.values():
        assert st["step"].device == model[0].weight.device


def test_capturable_keeps_step_and_lr_on_the_device_like_torch():
    p = torch.randn(10)
    p.grad = torch.randn(10)
    opt = rmsprop_gpu.RMSprop([p], capturable=True, backend="triton")
    opt.step()
    assert opt.state[p]["step"].device == p.device and opt.state[p]["step"].dtype == torch.float32


# ------------------------------------------------------------------ torch.compile
@pytest.mark.parametrize("backend", ALL)
def test_compiled_training_step_calls_our_optimizer(backend):
    """Without fullgraph: torch's zero_grad and backward break the graph, our step is traced into its custom op
    (tests/test_compile.py has the fullgraph cases)."""
    import torch._dynamo

    torch._dynamo.reset()
    m1, m2 = mlp(), mlp()
    ours = rmsprop_gpu.RMSprop(m1.parameters(), lr=0.01, momentum=0.9, backend=backend)
    ref = torch.optim.RMSprop(m2.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(16, 8)

    def train_step(m, o):
        o.zero_grad()
        loss = m(x).square().mean()
        loss.backward()
        o.step()
        return loss

    compiled = torch.compile(train_step, backend="aot_eager")
    n0 = BACKENDS[backend].__dict__.get("launches", 0)
    for _ in range(3):
        compiled(m1, ours)
        train_step(m2, ref)
    if backend != "torch":
        assert BACKENDS[backend].launches - n0 == 3  # our kernel ran once per step
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ distributed (2 gloo processes on the CPU)
@pytest.mark.parametrize("mode, backend", [("ddp", "torch"), ("ddp", "triton"), ("fsdp2", "torch"),
                                           ("fsdp2", "cupy"), ("fsdp2", "triton"), ("zero", "cupy"),
                                           ("ddp_in_backward", "torch"), ("ddp_in_backward", "cupy"),
                                           ("fsdp2_in_backward", "torch"), ("fsdp2_in_backward", "triton")])
def test_distributed_training_equals_single_process(mode, backend, tmp_path):
    from tests.dist_worker import launch, single_process

    out = tmp_path / "params.pt"
    launch(mode, backend, str(out))
    got = torch.load(out)
    ref = single_process("torch")
    for a, b in zip(got, ref):
        # DDP averages two half-batch gradients where the reference takes one full-batch mean: rounding only
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ checkpoints
def train(model, opt, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(8, 8, generator=gen)).square().mean().backward()
        opt.step()


@pytest.mark.parametrize("backend", ALL)
def test_torch_save_load_resume_is_bit_identical(backend):
    kw = dict(lr=0.01, momentum=0.9, centered=True, backend=backend)
    m1 = mlp()
    o1 = rmsprop_gpu.RMSprop(m1.parameters(), **kw)
    train(m1, o1, 3, seed=1)
    buf = io.BytesIO()
    torch.save({"model": m1.state_dict(), "optim": o1.state_dict()}, buf)
    train(m1, o1, 3, seed=2)  # uninterrupted
    buf.seek(0)
    ck = torch.load(buf)
    m2 = mlp(seed=5)
    m2.load_state_dict(ck["model"])
    o2 = rmsprop_gpu.RMSprop(m2.parameters(), **kw)
    o2.load_state_dict(ck["optim"])
    train(m2, o2, 3, seed=2)  # resumed
    assert_same(snapshot(m1, o1), snapshot(m2, o2))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_distributed_checkpoint_round_trip(backend, tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    kw = dict(lr=0.01, momentum=0.9, backend=backend)
    m1 = mlp()
    o1 = rmsprop_gpu.RMSprop(m1.parameters(), **kw)
    train(m1, o1, 3, seed=1)
    msd, osd = get_state_dict(m1, o1)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp_path / "ckpt"))
    train(m1, o1, 2, seed=2)
    m2 = mlp(seed=7)
    o2 = rmsprop_gpu.RMSprop(m2.parameters(), **kw)
    msd2, osd2 = get_state_dict(m2, o2)
    state = {"model": msd2, "optim": osd2}
    dcp.load(state, checkpoint_id=str(tmp_path / "ckpt"))
    set_state_dict(m2, o2, model_state_dict=state["model"], optim_state_dict=state["optim"])
    train(m2, o2, 2, seed=2)
    assert_same(snapshot(m1, o1), snapshot(m2, o2))


def test_bad_state_dict_is_refused_and_nothing_is_half_loaded():
    m = mlp()
    opt = rmsprop_gpu.RMSprop(m.parameters(), momentum=0.9)
    train(m, opt, 2, seed=1)
    good = copy.deepcopy(opt.state_dict())
    before = snapshot(m, opt)
    bad_shape = copy.deepcopy(good)
    bad_shape["state"][3]["square_avg"] = torch.zeros(5)  # the last tensor: the first three would load first
    bad_key = copy.deepcopy(good)
    bad_key["state"][2]["exp_avg"] = torch.zeros(1)
    bad_count = copy.deepcopy(good)
    bad_count["param_groups"][0]["params"] = bad_count["param_groups"][0]["params"][:-1]
    for sd, match in ((bad_shape, "shape"), (bad_key, "unknown keys"), (bad_count, "number of param")):
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(sd)
        assert_same(before, snapshot(m, opt))
