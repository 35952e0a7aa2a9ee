"""torch.compile sees the step: rmsprop_gpu::rmsprop_ custom op, fullgraph=True, no recompile on lr changes.

Under tracing, dynamo presents every optimizer's param groups as capturable=True (as for torch's own), so the
eager references here are capturable too: the torch path's capturable branch takes lr as a tensor."""

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

import rmsprop_gpu
import rmsprop_gpu.ops
from tests.matrix import BACKENDS as ALL


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _lists(seed, momentum=True, centered=True):
    g = torch.Generator().manual_seed(seed)
    shapes = [(37,), (5, 3), (1,)]
    ps = [torch.randn(s, generator=g) for s in shapes]
    return (ps, [torch.randn(s, generator=g) for s in shapes], [torch.rand(s, generator=g) for s in shapes],
            [torch.randn(s, generator=g) for s in shapes] if centered else [],
            [torch.randn(s, generator=g) for s in shapes] if momentum else [], [torch.zeros(()) for _ in shapes])


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("momentum,centered", [(False, False), (True, True)])
def test_opcheck(backend, momentum, centered):
    args = (*_lists(0, momentum, centered), 0.01, None, 0.99, 1e-8, 0.01, 0.9 if momentum else 0.0, centered,
            False, False, backend, None, None)
    torch.library.opcheck(torch.ops.rmsprop_gpu.rmsprop_.default, args)


def _params(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(37, generator=g), torch.randn(5, 3, generator=g).t(), torch.randn(1, generator=g)]


@pytest.mark.parametrize("backend", ALL)
def test_compiled_opt_step_fullgraph_equals_eager_and_never_recompiles_on_lr(backend):
    a, b = _params(0), _params(0)
    kw = dict(momentum=0.9, centered=True, weight_decay=0.01, backend=backend)
    ours = rmsprop_gpu.RMSprop(a, lr=torch.tensor(0.01), **kw)
    ref = rmsprop_gpu.RMSprop(b, lr=torch.tensor(0.01), capturable=True, **kw)
    counter = CompileCounterWithBackend("aot_eager")
    step = torch.compile(ours.step, fullgraph=True, backend=counter)
    gen = torch.Generator().manual_seed(1)
    for i in range(5):
        for p, q in zip(a, b):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        step()
        ref.step()
        for o in (ours, ref):  # a scheduler on a tensor lr: fill_, read by the op at run time
            o.param_groups[0]["lr"].fill_(0.01 * 0.8 ** (i + 1))
    assert counter.frame_count <= 2  # the first step creates the state; lr changes never recompile
    for p, q in zip(a, b):
        assert torch.equal(p, q)
        for k, v in ours.state[p].items():
            assert torch.equal(v, ref.state[q][k]), k


@pytest.mark.parametrize("backend,compiler", [("torch", "aot_eager"), ("triton", "aot_eager"),
                                              ("cupy", "aot_eager"), ("torch", "inductor")])
def test_compiled_training_step_fullgraph(backend, compiler):
    """Forward, backward and our step in one graph (fullgraph=True): the fused step runs inside it."""

    def mlp():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    models = mlp(), mlp()
    opts = [rmsprop_gpu.RMSprop(m.parameters(), lr=torch.tensor(0.01), momentum=0.9, capturable=True,
                                backend=backend) for m in models]
    x, y = torch.randn(32, 8), torch.randn(32, 1)

    def train(model, opt):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    if not hasattr(torch._dynamo.config, "trace_autograd_ops"):  # the support floor's torch (2.5) has not
        pytest.skip(f"torch {torch.__version__} cannot trace backward() into a fullgraph (trace_autograd_ops)")
    counter = CompileCounterWithBackend(compiler)
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled = torch.compile(train, backend=counter, fullgraph=True)
        for i in range(4):
            compiled(models[0], opts[0])
            train(models[1], opts[1])
            for o in opts:
                o.zero_grad()
                o.param_groups[0]["lr"].fill_(0.01 * 0.9 ** (i + 1))
    assert counter.frame_count <= 2
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)  # the compiled forward/backward may round apart
    assert float(opts[0].state[next(models[0].parameters())]["step"]) == 4
