"""Kernel contract: one launch per group, cached tables, runtime hyperparameters, both kernels agree,
and the static PTX/SASS checks for sm_80 and sm_90."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from rmsprop_gpu import rmsprop
from rmsprop_gpu.backends import BACKENDS
from rmsprop_gpu.backends._tables import BLOCK, build_tables
from rmsprop_gpu.backends.triton_backend import constexprs

KERNEL_BACKENDS = ["triton", "cupy"]


def mixed_tensors(seed, n=37, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    sizes = [0, 1, 15, 16, 17, 1023, 2048, 2049, 4097] + [int(x) for x in torch.randint(1, 3000, (n - 9,),
                                                                                           generator=gen)]
    ps = [torch.randn(s, generator=gen).to(dtype) for s in sizes]
    gs = [torch.randn(s, generator=gen).to(dtype) for s in sizes]
    vs = [(torch.rand(s, generator=gen) + 0.1).to(dtype) for s in sizes]
    bs = [torch.randn(s, generator=gen).to(dtype) for s in sizes]
    steps = [torch.zeros(()) for _ in sizes]
    return ps, gs, vs, bs, steps


def launches(backend):
    b = BACKENDS[backend]
    if backend == "cupy":  # count the CPU module's kernel calls: what the backend really launched
        return sum(k.calls for m in b._modules.values() for k in m.kernels.values())
    return b.launches


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_37_tensors_one_launch_and_results_match_torch_backend(backend):
    ps, gs, vs, bs, steps = mixed_tensors(1)
    ref = [[t.clone() for t in ts] for ts in (ps, gs, vs, bs, steps)]
    n0 = launches(backend)
    rmsprop(ps, gs, vs, None, bs, steps, lr=0.01, momentum=0.9, backend=backend)
    assert launches(backend) - n0 == 1
    rmsprop(ref[0], ref[1], ref[2], None, ref[3], ref[4], lr=0.01, momentum=0.9, backend="torch")
    for a, b in zip(ps + vs + bs, ref[0] + ref[2] + ref[3]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert all(float(s) == 1 for s in steps)  # device-resident counters advanced inside the launch


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_one_launch_per_dtype_group_and_foreach_false_is_per_tensor(backend):
    a = mixed_tensors(2, n=10)
    b = mixed_tensors(3, n=10, dtype=torch.bfloat16)
    n0 = launches(backend)
    rmsprop(a[0] + b[0], a[1] + b[1], a[2] + b[2], backend=backend)
    assert launches(backend) - n0 == 2
    n0 = launches(backend)
    rmsprop(a[0], a[1], a[2], backend=backend, foreach=False)
    assert launches(backend) - n0 == 10


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_table_cache_reused_and_rebuilt_when_storage_changes(backend):
    cache = BACKENDS[backend].tables
    cache.clear()
    ps, gs, vs, _, steps = mixed_tensors(4, n=12)
    builds = cache.builds
    for _ in range(3):
        rmsprop(ps, gs, vs, state_steps=steps, backend=backend)
    assert cache.builds == builds + 1
    gs = [g.clone() for g in gs]  # grads re-allocated (zero_grad(set_to_none=True) + backward)
    expect_p = [p.clone() for p in ps]
    expect_v = [v.clone() for v in vs]
    rmsprop(expect_p, gs, expect_v, backend="torch")
    rmsprop(ps, gs, vs, state_steps=steps, backend=backend)
    assert cache.builds == builds + 2
    for a, b in zip(ps + vs, expect_p + expect_v):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_hyperparameters_never_select_a_kernel():
    """New lr/alpha/eps/weight_decay/momentum values reuse the compiled kernel: they are not constexpr."""
    from rmsprop_gpu.kernels.rmsprop import _rmsprop_kernel

    fn = getattr(_rmsprop_kernel, "fn", _rmsprop_kernel)
    import inspect

    params = inspect.signature(fn).parameters
    for name in ("lr", "alpha", "one_minus_alpha", "eps", "weight_decay", "momentum"):
        assert name not in params, name  # values travel in the hyper table the kernel reads
    assert "constexpr" not in str(params["hyper_vals"].annotation)
    # the launcher's compile-time switches depend on the variant only, never on values
    from rmsprop_gpu._contract import Hyper
    from rmsprop_gpu.backends._tables import variant_flags

    h1 = Hyper(0.1, 0.9, 1e-8, 0.1, 0.9, True, False, False)
    h2 = Hyper(0.003, 0.99, 1e-3, 0.5, 0.5, True, False, False)
    assert constexprs("float32", "float32", variant_flags([h1], False), True, True) == constexprs(
        "float32", "float32", variant_flags([h2], False), True, True)


@pytest.mark.parametrize("dtype,state", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                         (torch.float16, torch.float16)], ids=str)
def test_triton_and_cuda_kernels_agree(dtype, state):
    gen = torch.Generator().manual_seed(9)
    sizes = [1, 4097, 2048, 333]
    mk = lambda f: [f(s).to(dtype) for s in sizes]  # noqa: E731
    ps = mk(lambda s: torch.randn(s, generator=gen))
    gs = mk(lambda s: torch.randn(s, generator=gen))
    vs = [(torch.rand(s, generator=gen) + 0.1).to(state) for s in sizes]
    bs = [torch.randn(s, generator=gen).to(state) for s in sizes]
    ga = [(torch.rand(s, generator=gen) * 0.2).to(state) for s in sizes]
    out = {}
    for backend in KERNEL_BACKENDS:
        t = [[x.clone() for x in xs] for xs in (ps, gs, vs, bs, ga)]
        for _ in range(3):
            rmsprop(t[0], t[1], t[2], t[4], t[3], lr=0.01, momentum=0.9, centered=True, weight_decay=0.01,
                    backend=backend)
        out[backend] = t
    for a, b in zip(sum(out["triton"], []), sum(out["cupy"], [])):
        torch.testing.assert_close(a.double(), b.double(), rtol=2 * 2.0**-7 if a.dtype != torch.float32 else 1e-5,
                                   atol=1e-5)


def test_tables_for_tensors_beyond_2_31_elements():
    """The block list of a 2**31 + 5 element tensor: int64 chunk starts, last chunk partial."""
    numel = 2**31 + 5
    tensors, blocks = build_tables([(16, 32, 48, 0, 0, 0, numel), (64, 80, 96, 0, 0, 0, 0)])
    n = (numel + BLOCK - 1) // BLOCK
    assert blocks.shape == (n + 1,) and blocks.dtype == np.int64
    chunk = blocks & 0xFFFFFFFF
    assert int(chunk[n - 1]) * BLOCK < numel <= (int(chunk[n - 1]) + 1) * BLOCK
    assert int(chunk[n - 1]) * BLOCK >= 2**31  # beyond int32: the kernels multiply in int64
    assert int(blocks[n] >> 32) == 1 and int(chunk[n]) == 0  # an empty tensor still owns one block
    assert tensors[0, 6] == numel


@pytest.fixture(scope="module")
def static_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # AOT needs the compiled kernel
    res = subprocess.run([sys.executable, "-m", "rmsprop_gpu.kernel_report", "--json", str(out)], env=env,
                         capture_output=True, text=True, timeout=900)
    print(res.stdout)
    assert out.exists(), res.stderr
    return json.loads(out.read_text())["rows"], res


def test_static_report_covers_both_backends_every_variant_both_archs(static_report):
    rows, res = static_report
    assert {(r["backend"], r["arch"]) for r in rows} == {(b, a) for b in ("cupy", "triton")
                                                         for a in ("sm_80", "sm_90")}
    assert len(rows) == 2 * 2 * 4 * 5
    assert res.returncode == 0, res.stderr


from rmsprop_gpu.kernel_report import KNOWN_SPILLS  # noqa: E402  (one known spill, owned by issue 16)


@pytest.mark.parametrize("field", ["spill_bytes", "local_memory_ops"])
def test_no_spills_no_local_memory(static_report, field):
    rows, _ = static_report
    found = {r["kernel"] + " " + r["arch"]: r[field] for r in rows if r[field]}
    assert {k: v for k, v in found.items() if KNOWN_SPILLS.get(k) != v} == {}


def test_128_bit_accesses_and_minimum_bytes_per_element(static_report):
    rows, _ = static_report
    for r in rows:
        name = f'{r["backend"]} {r["kernel"]} {r["arch"]}'
        assert r["vector_bits"] == 128, name
        assert r["load_bytes_per_elem"] == r["min_load_bytes"], name
        assert r["store_bytes_per_elem"] == r["min_store_bytes"], name
        assert r["registers"] and r["registers"] <= 128, name
