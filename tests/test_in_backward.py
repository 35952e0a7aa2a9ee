"""RMSprop(in_backward=True): the update runs inside loss.backward(), bucket by bucket, and grads are released."""

import warnings

import pytest
import torch

import rmsprop_gpu
from tests.matrix import BACKENDS as ALL


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Tanh(), torch.nn.Linear(64, 33), torch.nn.Tanh(),
                               torch.nn.Linear(33, 1))


def groups(model):
    ps = list(model.parameters())
    return [dict(params=ps[:2], lr=0.02), dict(params=ps[2:], lr=0.01, weight_decay=0.01)]


def train(model, opt, steps, seed=1, backwards_per_step=1):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for _ in range(backwards_per_step):
            x, y = torch.randn(16, 8, generator=gen), torch.randn(16, 1, generator=gen)
            torch.nn.functional.mse_loss(model(x), y).backward()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("backend", ALL)
def test_in_backward_equals_a_normal_step(backend):
    m1, m2 = mlp(), mlp()
    kw = dict(momentum=0.9, centered=True, backend=backend)
    ours = rmsprop_gpu.RMSprop(groups(m1), in_backward=True, bucket_mb=0.005, **kw)
    ref = rmsprop_gpu.RMSprop(groups(m2), **kw)
    train(m1, ours, 4)
    train(m2, ref, 4)
    assert ours._in_backward.buckets >= 2 * 4  # several buckets per backward
    for p, q in zip(m1.parameters(), m2.parameters()):
        if backend == "torch":  # the same foreach ops per element: the same bits
            assert torch.equal(p, q)
        else:
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        assert p.grad is None  # released during backward
        for k, v in ours.state[p].items():
            torch.testing.assert_close(v, ref.state[q][k], rtol=1e-6, atol=1e-7)


def test_grads_are_released_during_backward():
    model = mlp()
    opt = rmsprop_gpu.RMSprop(model.parameters(), in_backward=True, bucket_mb=0.001)
    seen = []
    last = list(model.parameters())[0]  # its grad arrives last (the first layer)
    last.register_post_accumulate_grad_hook(lambda p: seen.append([q.grad is None for q in model.parameters()]))
    torch.nn.functional.mse_loss(model(torch.randn(4, 8)), torch.randn(4, 1)).backward()
    assert seen and any(seen[0][2:])  # when the first layer's grad arrives, later layers' grads are gone
    assert opt._in_backward.buckets >= 2


def test_accumulation_steps():
    m1, m2 = mlp(), mlp()
    ours = rmsprop_gpu.RMSprop(m1.parameters(), in_backward=True, accumulation_steps=3, bucket_mb=0.005)
    ref = rmsprop_gpu.RMSprop(m2.parameters())
    train(m1, ours, 3, backwards_per_step=3)
    train(m2, ref, 3, backwards_per_step=3)
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))


def test_what_cannot_work_is_refused():
    model = mlp()
    opt = rmsprop_gpu.RMSprop(model.parameters(), in_backward=True)
    with pytest.raises(RuntimeError, match="closure"):
        opt.step(lambda: 0.0)
    for _ in range(2):
        torch.nn.functional.mse_loss(model(torch.randn(4, 8)), torch.randn(4, 1)).backward()
    with pytest.raises(RuntimeError, match="accumulation_steps=2"):
        opt.step()
    torch.nn.functional.mse_loss(model(torch.randn(4, 8)), torch.randn(4, 1)).backward()
    opt.grad_scale, opt.found_inf = torch.tensor(2.0), torch.tensor(0.0)  # what GradScaler.step hands over
    with pytest.raises(RuntimeError, match="GradScaler"):
        opt.step()
    with pytest.warns(UserWarning, match="does nothing"):
        opt.step()
    with pytest.raises(ValueError, match="differentiable"):
        rmsprop_gpu.RMSprop(model.parameters(), in_backward=True, differentiable=True)
    with pytest.raises(ValueError, match="bucket_mb"):
        rmsprop_gpu.RMSprop(model.parameters(), in_backward=True, bucket_mb=0)
    with pytest.raises(ValueError, match="accumulation_steps"):
        rmsprop_gpu.RMSprop(model.parameters(), in_backward=True, accumulation_steps=0)


def test_state_dict_and_frozen_params():
    model = mlp()
    frozen = list(model.parameters())[0]
    frozen.requires_grad_(False)
    before = frozen.clone()
    opt = rmsprop_gpu.RMSprop(model.parameters(), in_backward=True, momentum=0.9)
    train(model, opt, 2)
    assert torch.equal(frozen, before) and frozen not in opt.state
    sd = opt.state_dict()
    ref = torch.optim.RMSprop(model.parameters(), momentum=0.9)
    ref.load_state_dict(sd)  # loads into torch's optimizer
    assert all(float(s["step"]) == 2 for s in opt.state.values())


def test_distributed_training_without_ddp_hook_is_refused(monkeypatch):
    """A grad reaches the param hook before DDP's all-reduce: without attach_ddp the backward raises (not silently
    wrong). tests/dist_worker.py runs attach_ddp and FSDP2 with in_backward on 2 ranks."""
    model = mlp()
    opt = rmsprop_gpu.RMSprop(model.parameters(), in_backward=True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    with pytest.raises(RuntimeError, match="attach_ddp"):
        torch.nn.functional.mse_loss(model(torch.randn(4, 8)), torch.randn(4, 1)).backward()
    assert opt.state == {} or all(float(s["step"]) == 0 for s in opt.state.values())
    with pytest.raises(RuntimeError, match="in_backward=True"):
        rmsprop_gpu.RMSprop(mlp().parameters()).attach_ddp(None)
