"""Both compiled kernels on the GPU: float64 oracle for every variant x dtype layout, agreement, torch parity,
state_dict, AMP, launches, no host sync, streams, second GPU, > 2**31 elements, CuPy arrays, CUDA graphs.

Also run on the CPU as the dry run of `make gpu-check` (see conftest.py): there the kernels run through the
Triton interpreter and the g++ build of the .cu, and the CUDA-only tests are skipped."""

import copy
import zlib

import pytest
import torch

import rmsprop_gpu
from tests.gpu.conftest import DRY_RUN, ON_CUDA
from tests.tolerances import ORACLE, TORCH
from tools.oracle import reference_step

DEVICE = torch.device("cuda") if ON_CUDA else torch.device("cpu")
KERNELS = ["triton", "cupy"]
cuda_only = pytest.mark.skipif(not ON_CUDA, reason="needs CUDA itself (dry run on the CPU)")
# zero-size, one element, sub-chunk, one whole chunk, several chunks with a tail, many chunks
SIZES = [0, 1, 17, 2048, 3 * 2048 + 5, 100_003 if ON_CUDA else 9_000]
VARIANTS = {"plain": {}, "momentum": dict(momentum=0.9), "centered": dict(centered=True),
            "centered_momentum": dict(centered=True, momentum=0.9)}
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
LAYOUTS = [(F32, F32), (F16, F16), (F16, F32), (BF16, BF16), (BF16, F32)]
# every run-time switch at once; kept to two layouts so the GPU run compiles few Triton variants
ALL_FLAGS = dict(weight_decay=0.01, maximize=True, eps_in_sqrt=True, eps=1e-3, lr="tensor", grad_scale=256.0)


def name(dt):
    return str(dt).removeprefix("torch.")


def rand(gen, n, dtype, kind="normal"):
    x = torch.randn(n, generator=gen, dtype=torch.float64) if kind == "normal" else (
        torch.rand(n, generator=gen, dtype=torch.float64) + 0.05)
    return x.to(device=DEVICE, dtype=dtype)


def make_case(seed, pdt, sdt, opts):
    """Fresh random tensors (never zeros) of every awkward size, plus an unaligned view."""
    gen = torch.Generator().manual_seed(seed)
    ps = [rand(gen, n, pdt) for n in SIZES]
    ps.append(rand(gen, 4099, pdt)[1:])  # unaligned start: the kernels' masked path
    gs = [rand(gen, p.numel(), pdt) * opts.get("grad_scale", 1.0) for p in ps]
    vs = [rand(gen, p.numel(), sdt, "uniform") for p in ps]
    bs = [rand(gen, p.numel(), sdt) * 0.3 for p in ps] if opts.get("momentum") else None
    gas = [(v.double().sqrt() * (rand(gen, v.numel(), torch.float64, "uniform") - 0.5)).to(sdt) for v in vs] \
        if opts.get("centered") else None
    steps = [torch.zeros((), device=DEVICE) for _ in ps]
    return ps, gs, vs, bs, gas, steps


def hyper(opts):
    kw = dict(lr=0.01, alpha=0.99, eps=1e-8)
    kw.update({k: v for k, v in opts.items() if k not in ("lr", "grad_scale")})
    if opts.get("lr") == "tensor":
        kw["lr"] = torch.tensor(0.02, device=DEVICE)
    if "grad_scale" in opts:
        kw["grad_scale"] = torch.tensor(opts["grad_scale"], device=DEVICE)
    return kw


def check_against_oracle(before, after, kw):
    p0, g0, v0, b0, a0 = before
    okw = {k: v for k, v in kw.items() if k not in ("grad_scale", "found_inf")}
    for i in range(len(p0)):
        want = reference_step(p0[i], g0[i], v0[i], b0[i] if b0 else None, a0[i] if a0 else None,
                              grad_scale=kw.get("grad_scale"), **okw)
        for label, got, exp in zip(("param", "square_avg", "momentum_buffer", "grad_avg"), after(i), want):
            if got is not None:
                torch.testing.assert_close(got.double(), exp, **ORACLE[name(got.dtype)],
                                           msg=lambda m, lb=label, i=i: f"{lb}[{i}] (numel {p0[i].numel()}): {m}")


def clone_all(ts):
    return [t.clone() for t in ts] if ts is not None else None


CASES = [(v, lay, "none") for v in VARIANTS for lay in LAYOUTS] + [
    (v, lay, "all") for v in VARIANTS for lay in (LAYOUTS[0], LAYOUTS[4])]


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("variant, layout, flags", CASES,
                         ids=[f"{v}-{name(p)}-{name(s)}-{f}" for v, (p, s), f in CASES])
def test_compiled_kernel_against_float64_oracle(backend, variant, layout, flags):
    opts = {**VARIANTS[variant], **(ALL_FLAGS if flags == "all" else {})}
    ps, gs, vs, bs, gas, steps = make_case(zlib.crc32(f"{backend}{variant}{layout}{flags}".encode()), *layout, opts)
    kw = hyper(opts)
    for _ in range(2):
        before = [clone_all(x) for x in (ps, gs, vs, bs, gas)]
        rmsprop_gpu.rmsprop(ps, gs, vs, gas, bs, steps, backend=backend, **kw)
        check_against_oracle(before, lambda i: (ps[i], vs[i], bs[i] if bs else None, gas[i] if gas else None), kw)
    assert all(float(s) == 2 for s in steps)  # every tensor's counter, the zero-size one included


@pytest.mark.parametrize("layout", [LAYOUTS[0], LAYOUTS[3], LAYOUTS[4]], ids=lambda lay: name(lay[0]))
def test_triton_and_cupy_agree(layout):
    opts = dict(momentum=0.9, centered=True, weight_decay=0.01)
    base = make_case(7, *layout, opts)
    out = {}
    for backend in KERNELS:
        ps, gs, vs, bs, gas, steps = (clone_all(x) for x in base)
        for _ in range(3):
            rmsprop_gpu.rmsprop(ps, gs, vs, gas, bs, steps, backend=backend, lr=0.01, **opts)
        out[backend] = ps + vs + bs + gas
    # both fuse multiply-adds where their compilers choose (Triton fp fusion, NVRTC -fmad=true): a few float32
    # ulps apart, amplified where centered's v - ga^2 cancels; 16-bit: one ulp (a rounding tie may differ)
    tol = dict(rtol=1e-5, atol=1e-6) if layout[0] == F32 else dict(rtol=2.0**-7, atol=1e-5)
    for a, b in zip(out["triton"], out["cupy"]):
        torch.testing.assert_close(a, b, **tol)


def model_params(seed, dtype=F32):
    gen = torch.Generator().manual_seed(seed)
    # 2M elements on the GPU; the CPU rehearsal (Triton's interpreter) keeps a multi-chunk matrix, smaller
    shapes = [(64, 3, 7, 7), (64,), (40, 2048) if DRY_RUN else (1000, 2048), (7,), (3, 5)]
    return [rand(gen, int(torch.tensor(s).prod()), dtype).reshape(s) for s in shapes]


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("opts", [{}, dict(momentum=0.9, centered=True, weight_decay=0.01), dict(maximize=True)],
                         ids=["default", "centered_momentum_wd", "maximize"])
def test_parity_with_torch_optim_on_device(backend, opts):
    """5 steps, two groups, against torch.optim.RMSprop in float32 AND in float64: ours must be as close to
    float64 as torch's float32 step is (within 4x). Over millions of random elements a few are ill-conditioned
    (g + weight_decay * p cancels to ~1e-7, then g / (sqrt(v) + eps) magnifies its rounding), so a fixed
    tolerance against torch's float32 would measure the conditioning, not the kernel."""
    ps = model_params(1)
    qs = [p.clone() for p in ps]
    ds = [p.double() for p in ps]
    g2 = dict(lr=0.003, alpha=0.95)
    groups = lambda xs: [{"params": xs[:2]}, {"params": xs[2:], **g2}]
    ours = rmsprop_gpu.RMSprop(groups(ps), lr=0.01, backend=backend, **opts)
    ref = torch.optim.RMSprop(groups(qs), lr=0.01, **opts)
    ref64 = torch.optim.RMSprop(groups(ds), lr=0.01, **opts)
    gen = torch.Generator().manual_seed(2)
    for _ in range(5):
        for p, q, d in zip(ps, qs, ds):
            g = rand(gen, p.numel(), F32).reshape(p.shape)
            p.grad, q.grad, d.grad = g.clone(), g.clone(), g.double()
        for o in (ours, ref, ref64):
            o.step()

    def close(a, b, exact, label):
        err, ref_err = (a.double() - exact).abs().max(), (b.double() - exact).abs().max()
        assert err <= 4 * ref_err + 1e-6, f"{label}: ours {float(err):.3g} from float64, torch {float(ref_err):.3g}"

    for i, (p, q, d) in enumerate(zip(ps, qs, ds)):
        close(p, q, d, f"param {i}")
        for key in ("square_avg", "momentum_buffer", "grad_avg"):
            if key in ref.state[q]:
                close(ours.state[p][key], ref.state[q][key], ref64.state[d][key], f"{key} {i}")
        assert float(ours.state[p]["step"]) == float(ref.state[q]["step"]) == 5


@pytest.mark.parametrize("backend", KERNELS)
def test_state_dict_round_trip_through_torch_on_device(backend):
    opts = dict(lr=0.01, momentum=0.9, centered=True)
    pa = model_params(3)
    pb = [p.clone() for p in pa]
    a = rmsprop_gpu.RMSprop(pa, backend=backend, **opts)
    b = rmsprop_gpu.RMSprop(pb, backend=backend, **opts)
    gen = torch.Generator().manual_seed(4)
    grads = [[rand(gen, p.numel(), F32).reshape(p.shape) for p in pa] for _ in range(6)]

    def step(k, opt_a, opt_b):
        for p, q, g in zip(pa, pb, grads[k]):
            p.grad, q.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()

    for k in range(3):
        step(k, a, b)
    t = torch.optim.RMSprop(pb, **opts)
    t.load_state_dict(copy.deepcopy(b.state_dict()))
    b2 = rmsprop_gpu.RMSprop(pb, backend=backend, **opts)
    b2.load_state_dict(copy.deepcopy(t.state_dict()))
    for k in range(3, 6):
        step(k, a, b2)
    for p, q in zip(pa, pb):
        assert torch.equal(p, q)
    for k, st in a.state_dict()["state"].items():
        for key, x in st.items():
            assert torch.equal(x.cpu(), b2.state_dict()["state"][k][key].cpu()), key


@pytest.mark.parametrize("backend", KERNELS)
def test_grad_scaler_and_autocast(backend):
    """GradScaler hands grad_scale/found_inf to our step (unscale + skip in the launch) under bf16 autocast."""
    def mlp():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8)).to(DEVICE)

    m1, m2 = mlp(), mlp()
    ours = rmsprop_gpu.RMSprop(m1.parameters(), lr=0.01, momentum=0.9, centered=True, backend=backend)
    ref = torch.optim.RMSprop(m2.parameters(), lr=0.01, momentum=0.9, centered=True)
    s1, s2 = (torch.amp.GradScaler(DEVICE.type, init_scale=2.0**12) for _ in range(2))
    x = torch.randn(64, 32, device=DEVICE)
    for it in range(5):
        before = [p.detach().clone() for p in m1.parameters()]
        for m, o, s in ((m1, ours, s1), (m2, ref, s2)):
            o.zero_grad()
            with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
                loss = m(x).float().square().mean() * (float("inf") if it == 2 else 1.0)
            s.scale(loss).backward()
            if o is ref:
                s.unscale_(o)
            s.step(o)
            s.update()
        if it == 2:
            assert all(torch.equal(a, b) for a, b in zip(before, m1.parameters()))
        for a, b in zip(m1.parameters(), m2.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert s1.get_scale() == s2.get_scale()
    assert float(ours.state[m1[0].weight]["step"]) == 4


def warm_optimizer(backend, n=37, **kw):
    gen = torch.Generator().manual_seed(5)
    ps = [rand(gen, int(s), F32) for s in torch.randint(1, 5000, (n,), generator=gen)]
    ps += [rand(gen, 3000, BF16) for _ in range(4)]
    for p in ps:
        p.grad = torch.randn_like(p)
    opt = rmsprop_gpu.RMSprop(ps, lr=0.01, momentum=0.9, backend=backend, **kw)
    opt.step()  # builds state and tables
    return ps, opt


@cuda_only
@pytest.mark.parametrize("backend", KERNELS)
def test_one_kernel_per_layout_and_no_uploads_when_warm(backend):
    from torch.profiler import ProfilerActivity, profile

    ps, opt = warm_optimizer(backend)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        opt.step()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
    kernels = [n for n in names if "rmsprop" in n]
    copies = [n for n in names if "memcpy" in n.lower()]
    assert len(kernels) == 2, names  # 37 fp32 tensors + 4 bf16 tensors: two layouts, two launches
    assert copies == [], names  # warm: no table upload
    assert len(names) == 2, names  # and nothing else: step counters advance inside the kernel


@cuda_only
@pytest.mark.parametrize("backend", KERNELS)
def test_warm_step_makes_no_host_sync(backend):
    ps, opt = warm_optimizer(backend)
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)


@cuda_only
@pytest.mark.parametrize("backend", KERNELS)
def test_launch_follows_the_current_stream(backend):
    """Queue a long sleep then the step on a side stream: the default stream must still see the old values."""
    ps, opt = warm_optimizer(backend)
    torch.cuda.synchronize()
    before = [p.clone() for p in ps]
    ref = [p.clone() for p in ps]
    ref_opt = rmsprop_gpu.RMSprop(ref, lr=0.01, momentum=0.9, backend="torch")
    ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for r, p in zip(ref, ps):
        r.grad = p.grad.clone()
    ref_opt.step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time on this stream only
        opt.step()
    early = [p.clone() for p in ps]  # default stream: runs before the side stream's step
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(early, before)), "the step did not run on the current stream"
    for p, r in zip(ps, ref):
        torch.testing.assert_close(p, r, **TORCH[name(p.dtype)])


@cuda_only
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="one GPU on this machine")
@pytest.mark.parametrize("backend", KERNELS)
def test_tensors_on_the_second_gpu(backend):
    global DEVICE
    saved, DEVICE = DEVICE, torch.device("cuda", 1)
    try:
        ps, gs, vs, bs, gas, steps = make_case(11, F32, F32, dict(momentum=0.9))
        before = [clone_all(x) for x in (ps, gs, vs, bs, None)]
        with torch.cuda.device(0):  # the current device is another one
            rmsprop_gpu.rmsprop(ps, gs, vs, None, bs, steps, lr=0.01, momentum=0.9, backend=backend)
        check_against_oracle(before, lambda i: (ps[i], vs[i], bs[i], None), dict(lr=0.01, momentum=0.9))
    finally:
        DEVICE = saved


@cuda_only
def test_tensor_beyond_2_31_elements():
    n = 2**31 + 4099
    need = 3 * 2 * n + (1 << 30)
    if torch.cuda.mem_get_info()[0] < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB free")
    p = torch.randn(n, device=DEVICE, dtype=BF16)
    g = torch.randn(n, device=DEVICE, dtype=BF16)
    v = torch.rand(n, device=DEVICE, dtype=BF16) + 0.05
    windows = [slice(0, 4096), slice(2**31 - 3000, 2**31 + 3000), slice(n - 5000, n)]
    for backend in KERNELS:
        saved = [(p[w].clone(), g[w].clone(), v[w].clone()) for w in windows]
        rmsprop_gpu.rmsprop([p], [g], [v], lr=0.01, backend=backend)
        for w, (p0, g0, v0) in zip(windows, saved):
            want_p, want_v, _, _ = reference_step(p0, g0, v0, lr=0.01, alpha=0.99, eps=1e-8)
            torch.testing.assert_close(p[w].double(), want_p, **ORACLE["bfloat16"])
            torch.testing.assert_close(v[w].double(), want_v, **ORACLE["bfloat16"])
    del p, g, v
    torch.cuda.empty_cache()


@cuda_only
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cupy_arrays_through_the_functional_api(dtype):
    import cupy

    rs = cupy.random.RandomState(3)
    sizes = [1, 2049, 3 * 2048 + 5]
    ps = [rs.standard_normal(n).astype(dtype) for n in sizes]
    gs = [rs.standard_normal(n).astype(dtype) for n in sizes]
    vs = [(rs.random_sample(n) + 0.05).astype(dtype) for n in sizes]
    bs = [rs.standard_normal(n).astype(dtype) for n in sizes]
    to_t = lambda a: torch.from_numpy(cupy.asnumpy(a))
    before = [[to_t(a) for a in xs] for xs in (ps, gs, vs, bs)]
    rmsprop_gpu.rmsprop(ps, gs, vs, None, bs, lr=0.01, momentum=0.9)  # auto: CuPy arrays go to the CuPy kernel
    cupy.cuda.get_current_stream().synchronize()
    for i in range(len(sizes)):
        want = reference_step(before[0][i], before[1][i], before[2][i], before[3][i], lr=0.01, alpha=0.99, eps=1e-8,
                              momentum=0.9)
        for got, exp in zip((ps[i], vs[i], bs[i]), (want[0], want[1], want[2])):
            torch.testing.assert_close(to_t(got).double(), exp, **ORACLE[dtype])


def graph_pair(backend, **kw):
    """Two identical capturable optimizers over identical params and static grads."""
    gen = torch.Generator().manual_seed(8)
    ps = [rand(gen, n, F32) for n in (1, 2049, 100_003, 7)]
    qs = [p.clone() for p in ps]
    for p, q in zip(ps, qs):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    mk = lambda params: rmsprop_gpu.RMSprop(params, lr=torch.tensor(0.01, device=DEVICE), capturable=True,
                                            backend=backend, **kw)
    return ps, qs, mk(ps), mk(qs)


@cuda_only
@pytest.mark.parametrize("backend", KERNELS)
def test_cuda_graph_replay_with_static_grads(backend):
    ps, qs, opt, ref = graph_pair(backend, momentum=0.9, centered=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            opt.step()
            ref.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for _ in range(4):
        graph.replay()
        ref.step()
    torch.cuda.synchronize()
    assert all(torch.equal(p, q) for p, q in zip(ps, qs))
    for o in (opt, ref):  # a new lr in the same tensor: the graph reads it on the device
        o.param_groups[0]["lr"].fill_(0.001)
    # other optimizers, with many groups and other layouts, step in between replays
    others = [torch.randn(100, device=DEVICE, dtype=dt) for dt in (F32, BF16) for _ in range(40)]
    for t in others:
        t.grad = torch.randn_like(t)
    other = rmsprop_gpu.RMSprop([{"params": [t], "lr": 0.001 * (i + 1)} for i, t in enumerate(others)],
                                backend=backend)
    for _ in range(3):
        other.step()
        graph.replay()
        ref.step()
        torch.optim.RMSprop(others[:3]).step()
    torch.cuda.synchronize()
    assert all(torch.equal(p, q) for p, q in zip(ps, qs))
    # capture records the step without running it: 3 warm-up steps, then 4 + 3 replays
    assert float(opt.state[ps[0]]["step"]) == float(ref.state[qs[0]]["step"]) == 3 + 4 + 3


def twin_capturable_mlps(backend):
    """Two identical MLPs on the device, each with a capturable optimizer (tensor lr on the device)."""
    def mlp():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)).to(DEVICE)

    models = mlp(), mlp()
    return models, [rmsprop_gpu.RMSprop(m.parameters(), lr=torch.tensor(1e-3, device=DEVICE), momentum=0.9,
                                        capturable=True, backend=backend) for m in models]


@cuda_only
@pytest.mark.parametrize("backend", KERNELS)
def test_cuda_graph_of_the_whole_training_step(backend):
    """The README's pattern: forward, backward and step captured together; grads zeroed in place."""
    models, opts = twin_capturable_mlps(backend)
    static_x, static_y = torch.randn(128, 32, device=DEVICE), torch.randn(128, 1, device=DEVICE)

    def train_step(model, opt, x, y):
        opt.zero_grad(set_to_none=False)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            for m, o in zip(models, opts):
                train_step(m, o, static_x, static_y)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = train_step(models[0], opts[0], static_x, static_y)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        x, y = torch.randn(128, 32, generator=gen).to(DEVICE), torch.randn(128, 1, generator=gen).to(DEVICE)
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        loss = train_step(models[1], opts[1], x, y)
        torch.testing.assert_close(static_loss, loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@cuda_only
@pytest.mark.parametrize("backend", KERNELS)
def test_capturing_a_cold_optimizer_says_warm_up(backend):
    p = torch.randn(1000, device=DEVICE)
    p.grad = torch.randn_like(p)
    opt = rmsprop_gpu.RMSprop([p], lr=torch.tensor(0.01, device=DEVICE), capturable=True, backend=backend)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="warm"), torch.cuda.graph(graph):
        opt.step()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_stochastic_rounding_on_device_matches_the_specified_stream(dtype):
    """Both compiled kernels round with the stream tests/test_rounding.py specifies (bit for bit on values whose
    float32 math is exact), unaligned tail included, and the rounding is unbiased on the device."""
    from tests.test_rounding import exact_case, reference_round

    dt = getattr(torch, dtype)
    case = [t.to(DEVICE) for t in exact_case(1, 3 * 2048 + 5, dt)]
    for backend in KERNELS:
        p, g, v, buf = (t.clone() for t in case)
        st = torch.full((), 4.0, device=DEVICE)
        rmsprop_gpu.rmsprop([p], [g], [v], None, [buf], [st], lr=2**-6, alpha=1.0, eps=0.0, momentum=0.5,
                            backend=backend, stochastic_rounding=True, sr_seed=123)
        p0, g0, v0, b0 = (t.double().cpu().numpy() for t in case)
        b_new = (0.5 * b0 + g0 / v0**0.5).astype("float32")
        p_new = (p0 - 2**-6 * b_new.astype("float64")).astype("float32")
        assert float(st) == 5.0
        assert (buf.double().cpu().numpy() == reference_round(b_new, dtype, 123, 4, 0, 2)).all(), backend
        assert (p.double().cpu().numpy() == reference_round(p_new, dtype, 123, 4, 0, 0)).all(), backend
        n = 1 << 16
        q = torch.ones(n, dtype=dt, device=DEVICE)
        steps = [torch.zeros((), device=DEVICE)]
        rmsprop_gpu.rmsprop([q], [torch.ones_like(q)], [torch.ones_like(q)], state_steps=steps, lr=2**-10,
                            alpha=1.0, eps=0.0, backend=backend, stochastic_rounding=True, sr_seed=9)
        spacing = 2.0**-8 if dtype == "bfloat16" else 2.0**-11
        assert abs(q.double().mean().item() - (1 - 2**-10)) < 5 * spacing * 0.5 / n**0.5, backend


@cuda_only
@pytest.mark.parametrize("backend", KERNELS)
def test_compiled_training_step_reduce_overhead(backend):
    """fullgraph=True and CUDA graphs (mode="reduce-overhead"): our custom op is captured inside the graph."""
    import torch._dynamo

    torch._dynamo.reset()

    models, opts = twin_capturable_mlps(backend)
    x, y = torch.randn(128, 32, device=DEVICE), torch.randn(128, 1, device=DEVICE)

    def train(model, opt):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled = torch.compile(train, fullgraph=True, mode="reduce-overhead")
        for i in range(6):
            compiled(models[0], opts[0])
            train(models[1], opts[1])
            for o in opts:
                o.zero_grad(set_to_none=False)
                o.param_groups[0]["lr"].fill_(1e-3 * 0.9 ** (i + 1))
    torch.cuda.synchronize()
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("pdt", [F32, F16, BF16], ids=name)
def test_8_bit_state_on_device_against_the_quantizing_oracle(variant, pdt):
    """state_bits=8 layouts, compiled: one step against the float64 oracle that decodes and encodes the same way
    (tests/test_state_bits.py on the CPU), several chunks with a tail; Triton and CUDA C write the same codes but
    where their float32 math (each compiler's FMA contraction) straddles a code boundary."""
    import numpy as np

    from rmsprop_gpu import quantize
    from tests.tolerances import Q8_CODES
    from tools.oracle import q8_decode, q8_encode, stream_r16

    opts = VARIANTS[variant]
    gen = torch.Generator().manual_seed(zlib.crc32(f"q8{variant}{pdt}".encode()))
    n = 3 * 2048 + 21 if not ON_CUDA else 100_003
    p = rand(gen, n, pdt)
    g = rand(gen, n, pdt)
    a0 = torch.randn(n, generator=gen, dtype=torch.float64) * 0.1
    v0 = a0 * a0 + torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
    states = {"square_avg": quantize.encode(v0.sqrt().float(), False).to(DEVICE),
              "momentum_buffer": quantize.encode(torch.randn(n, generator=gen), True).to(DEVICE),
              "grad_avg": quantize.encode(a0.float(), True).to(DEVICE)}
    keys = ["square_avg"] + ["momentum_buffer"] * ("momentum" in opts) + ["grad_avg"] * bool(opts.get("centered"))
    dec = {k: torch.from_numpy(q8_decode(states[k].cpu().numpy(), n, k != "square_avg")) for k in keys}
    kw = dict(lr=0.01, alpha=0.9, eps=1e-6, weight_decay=0.01, **opts)
    v = dec["square_avg"] ** 2 + (dec["grad_avg"] ** 2 if "grad_avg" in dec else 0)  # centered: the variance
    want = reference_step(p.cpu(), g.cpu(), v, dec.get("momentum_buffer"), dec.get("grad_avg"), clamp_var=True, **kw)
    kept = (want[1] - want[3] ** 2).clamp_min(0.0) if "grad_avg" in dec else want[1]
    out = {}
    for backend in KERNELS:
        q, s = p.clone(), {k: states[k].clone() for k in keys}
        steps = [torch.full((), 3.0, device=DEVICE)]
        rmsprop_gpu.rmsprop([q], [g], [s["square_avg"]], [s["grad_avg"]] if "grad_avg" in s else None,
                            [s["momentum_buffer"]] if "momentum_buffer" in s else None, steps, backend=backend,
                            sr_seed=17, **kw)
        assert float(steps[0]) == 4.0
        torch.testing.assert_close(q.double().cpu(), want[0], **ORACLE[name(pdt)])
        for output, (k, exp) in enumerate(zip(("square_avg", "momentum_buffer", "grad_avg"),
                                              (kept.sqrt(), want[2], want[3])), start=1):
            if k in s:  # codes round stochastically with the stream of (seed 17, step 3, row 0)
                codes = q8_encode(exp.float().numpy(), k != "square_avg", stream_r16(17, 3, 0, n, output))
                assert (s[k].cpu().numpy() == codes).mean() >= Q8_CODES["same_fraction"], (backend, k)
        out[backend] = [q] + [s[k] for k in keys]
    for a, b in zip(out["triton"][1:], out["cupy"][1:]):
        assert (a == b).float().mean().item() >= Q8_CODES["same_fraction"]
    assert np.isfinite(out["triton"][0].float().cpu().numpy()).all()
