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
from tests.matrix import KERNEL_BACKENDS
from tools import sass
from tools.kernel_report import (
    FLAG_SETS,
    ISSUE_BUDGET,
    KNOWN_SPILLS,
    OPT_IN_COST,
    compare_opt_in,
    is_opt_in,
    layouts,
    minimum_bytes,
    opt_in_misses,
    problems,
)


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
        return sum(k.calls for k in b._kernels.values())
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
    from rmsprop_gpu.options import launch_flags, make

    h1 = make(0.1, 0.9, 1e-8, 0.1, 0.9, True)
    h2 = make(0.003, 0.99, 1e-3, 0.5, 0.5, True)
    assert constexprs("float32", "float32", launch_flags([h1], False), True, True) == constexprs(
        "float32", "float32", launch_flags([h2], False), True, True)


@pytest.mark.parametrize("dtype,state", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                         (torch.float16, torch.float16)], ids=str)
def test_triton_and_cuda_kernels_agree(dtype, state):
    gen = torch.Generator().manual_seed(9)
    sizes = [1, 4097, 2048, 333]
    mk = lambda f: [f(s).to(dtype) for s in sizes]
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
    res = subprocess.run([sys.executable, "-m", "tools.kernel_report", "--json", str(out)], env=env,
                         capture_output=True, text=True, timeout=900)
    print(res.stdout)
    assert out.exists(), res.stderr
    return json.loads(out.read_text())["rows"], res


def test_static_report_covers_both_backends_every_variant_both_archs(static_report):
    rows, res = static_report
    assert {(r["backend"], r["arch"], r["flag_set"]) for r in rows} == {
        (b, a, f) for b in ("cupy", "triton") for a in ("sm_80", "sm_90") for f in FLAG_SETS}
    q8_sets = sum(1 for flags in FLAG_SETS.values() if any(sd == "uint8" for _, sd in layouts(flags)))
    assert len(rows) == 2 * 2 * (len(FLAG_SETS) * 4 * 5 + q8_sets * 4 * 3)
    assert {r["flag_set"] for r in rows if r["state"] == "uint8"} == {"defaults", "stochastic_rounding"}
    assert res.returncode == 0, res.stderr
    assert problems(rows) == []


@pytest.mark.parametrize("field", ["spill_bytes", "local_memory_ops", "ftz_ops"])
def test_no_spills_no_local_memory_no_flush_to_zero(static_report, field):
    rows, _ = static_report
    found = {r["kernel"] + " " + r["arch"]: r[field] for r in rows if r[field]}
    assert {k: v for k, v in found.items() if field != "spill_bytes" or KNOWN_SPILLS.get(k) != v} == {}


def test_128_bit_accesses_and_minimum_bytes_per_element(static_report):
    rows, _ = static_report
    for r in rows:
        name = f'{r["backend"]} {r["kernel"]} {r["arch"]}'
        # 8-bit state: codes in 128-bit accesses, each block's scale byte in a byte access (1/16 byte per element)
        scales = (1 + r["variant"].endswith("momentum") + r["variant"].startswith("centered")) / 16 * (
            r["state"] == "uint8")
        assert r["vector_bits"] == 128 and (r["narrow_global"] == 0 or scales), name
        assert r["load_bytes_per_elem"] + scales == r["min_load_bytes"], name
        assert r["store_bytes_per_elem"] + scales == r["min_store_bytes"], name


def test_full_chunk_path_one_load_wave_no_slow_path_calls(static_report):
    rows, _ = static_report
    for r in rows:
        name = f'{r["backend"]} {r["kernel"]} {r["arch"]}'
        assert r["slow_calls"] == 0, name
        if r["flag_set"] in OPT_IN_COST or r["state"] == "uint8":
            continue
        assert r["load_waves"] == 1, name
        lo, _ = minimum_bytes(r["params"], r["state"], "momentum" in r["variant"],
                              "centered" in r["variant"])
        assert r["bytes_before_wait"] == lo * r["elems_per_thread"], name  # every data load before any math
        assert r["kib_in_flight_per_sm"] * 1024 >= sass.bytes_in_flight_needed(sass.H200), name


def test_issue_share_within_budget_with_torch_defaults(static_report):
    rows, _ = static_report
    over = {f'{r["backend"]} {r["kernel"]} {r["arch"]}': r["h200_issue_pct"] for r in rows
            if r["flag_set"] == "defaults" and r["state"] != "uint8" and r["h200_issue_pct"] > 100 * ISSUE_BUDGET}
    assert over == {}
    assert all(r["prologue_per_elem"] < r["instr_per_elem"] / 4 for r in rows)


# A hand-written nvdisasm excerpt: table load, a guarded slow-path call, a tail loop, two 128-bit loads, a use,
# one more load after it (a second wave) and two stores.
SASS_SAMPLE = """
        .section        .text.k,"ax",@progbits
.text.k:
        /*0000*/                   LDG.E.64 R2, desc[UR4][R0.64] ;
        /*0010*/                   ISETP.NE.AND P0, PT, R2, RZ, PT ;
        /*0020*/              @!P0 BRA `(.L_x_tail) ;
        /*0030*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0040*/                   LDG.E.128 R8, desc[UR4][R2.64+0x10] ;
        /*0050*/                   FCHK P1, R4, R8 ;
        /*0060*/              @!P1 BRA `(.L_x_fast) ;
        /*0070*/                   CALL.REL.NOINC `($__internal_0_slowpath) ;
.L_x_fast:
        /*0080*/                   FADD R12, R5, R9 ;
        /*0090*/                   LDG.E.128 R16, desc[UR4][R2.64+0x20] ;
        /*00a0*/                   STG.E.128 desc[UR4][R2.64], R4 ;
        /*00b0*/                   STG.E.128 desc[UR4][R2.64+0x10], R16 ;
        /*00c0*/                   EXIT ;
.L_x_tail:
        /*00d0*/                   LDG.E R4, desc[UR4][R2.64] ;
        /*00e0*/                   STG.E desc[UR4][R2.64], R4 ;
        /*00f0*/              @P0 BRA `(.L_x_tail) ;
        /*0100*/                   EXIT ;
$__internal_0_slowpath:
        /*0110*/                   FADD R4, R4, R8 ;
        /*0120*/                   FADD R4, R4, R8 ;
        /*0130*/                   RET.REL.NODEC R10 `(k) ;
"""


def test_sass_hot_path_skips_slow_paths_and_counts_waves():
    (fn,) = sass.parse(SASS_SAMPLE).values()
    path = sass.hot_path(fn)
    assert [i.addr for i in path] == [0x0, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x80, 0x90, 0xA0, 0xB0, 0xC0]
    st = sass.path_stats(path)
    assert (st.instructions, st.prologue, st.data_loads, st.data_stores, st.calls) == (12, 3, 3, 2, 0)
    assert st.load_waves == 2 and st.bytes_before_first_wait == 32  # FCHK reads R4 and R8 before the third load
    assert st.narrow_global == 0


def test_issue_share_and_occupancy_model():
    # 51 instructions per element at 10 bytes per element: 60% of an H200 (the figure the kernel-budget issue quotes)
    assert abs(sass.issue_share(51, 10, sass.H200) - 0.603) < 0.005
    assert sass.warps_per_sm(128, 128) == 16 and sass.warps_per_sm(64, 128) == 32 and sass.warps_per_sm(32, 256) == 64
    assert sass.warps_per_sm(200, 128) == 8


def test_report_flags_what_misses_the_budget(static_report):
    rows, _ = static_report
    row = next(r for r in rows if r["flag_set"] == "defaults")
    for change, words in [({"spill_bytes": 8}, "spills"), ({"load_waves": 2}, "load waves"),
                          ({"narrow_global": 1}, "narrower"), ({"h200_issue_pct": 46.0}, "issue slots"),
                          ({"ftz_ops": 1}, "flush-to-zero"), ({"slow_calls": 1}, "slow-path")]:
        (problem,) = problems([{**row, **change}])
        assert words in problem


def test_report_measures_the_opt_in_budget(static_report):
    """8-bit state and stochastic rounding have their own budget (issue 27): reported with each miss, the report
    does not fail on it."""
    rows, _ = static_report
    opt = [r for r in rows if is_opt_in(r)]
    assert {r["state"] for r in opt} >= {"uint8", "float16", "bfloat16"} and all(r["slack"] > 0 for r in opt)
    row = opt[0]
    assert opt_in_misses([{**row, "h200_issue_pct": 80.0, "slack": 1.2, "spill_bytes": 0}]) == []
    for change, words in [({"h200_issue_pct": 80.1}, "issue slots"), ({"slack": 1.19}, "slack"),
                          ({"spill_bytes": 8}, "spilled")]:
        (miss,) = opt_in_misses([{**row, "h200_issue_pct": 50.0, "slack": 2.0, "spill_bytes": 0, **change}])
        assert words in miss
    assert opt_in_misses([{**rows[0], "flag_set": "defaults", "state": "float32", "h200_issue_pct": 99.0}]) == []
    before = [{**r, "h200_issue_pct": 90.0, "toolchain": "nvrtc 13.0"} for r in opt if r["backend"] == "cupy"]
    after = [{**r, "h200_issue_pct": 50.0, "toolchain": "nvrtc 13.0"} for r in opt if r["backend"] == "cupy"]
    table = compare_opt_in(before, after)
    assert table.count("\n") == 2 + len({(r["flag_set"], r["variant"], r["params"], r["state"]) for r in after
                                          if r["arch"] == "sm_90"})
    assert "90.0 -> 50.0" in table and "**" not in table  # nothing over the budget: nothing in bold


@pytest.mark.parametrize("options", [
    {},
    {"maximize": True, "weight_decay": 0.1, "lr": torch.tensor(0.01), "grad_scale": torch.tensor(4.0),
     "found_inf": torch.tensor(0.0)},
    {"eps_in_sqrt": True, "lr_in_momentum": True, "nesterov": True, "decoupled_weight_decay": True,
     "weight_decay": 0.1, "bias_correction": True},
], ids=["defaults", "torch_all", "frameworks"])
def test_compile_time_flags_build_matches_the_run_time_flags_build(options):
    """The GPU loader builds one entry point per (layout, flags) with the flags as template constants; the CPU
    tests run the run-time-flags instantiation of the same source. For the entry points a step really uses, both
    builds (g++) give bit-identical params and states, on full chunks and an unaligned tail."""
    from tools.cuda_cpu.cpu_module import static_kernel

    cupy = BACKENDS["cupy"]

    def run():
        gen = torch.Generator().manual_seed(7)
        ps = [torch.randn(n, generator=gen).bfloat16() for n in (5000, 2048, 77)]
        state = [[torch.rand(n, generator=gen) * scale + 0.1 for n in (5000, 2048, 77)] for scale in (1, 0.01, 1)]
        steps = [torch.zeros(()) for _ in ps]
        for _ in range(3):
            gs = [torch.randn(p.shape, generator=gen).bfloat16() for p in ps]
            rmsprop(ps, gs, state[0], state[1], state[2], steps, momentum=0.9, centered=True, backend="cupy",
                    **{"lr": 0.01, **options})
        return ps, state

    cupy._kernels.clear()
    runtime = run()
    specs = {spec for _, spec in cupy._kernels}
    assert specs and all(spec.flags for spec in specs) == bool(options)
    for key in list(cupy._kernels):
        cupy._kernels[key] = static_kernel(key[1])
    static = run()
    assert all(k.calls == 3 for k in cupy._kernels.values())
    cupy._kernels.clear()
    for a, b in zip(runtime[0] + sum(runtime[1], []), static[0] + sum(static[1], [])):
        assert not a.isnan().any()  # small grad_avgs: v - ga^2 > 0, the comparison is of numbers
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("capability", [80, 90])
def test_the_run_time_loader_builds_one_entry_point_per_layout_and_flags(capability):
    """What CupyBackend loads on a GPU: kernels/rmsprop.cu plus one RMSPROP_KERNEL line, through CuPy's own NVRTC
    binding with NVRTC_OPTIONS, as a cubin for the device's arch holding exactly that entry point."""
    from rmsprop_gpu.abi import FLAGS
    from rmsprop_gpu.backends.cupy_backend import KernelSpec, compile_cubin, nvrtc_arch_option

    spec = KernelSpec("bfloat16", "float32", True, True,
                      FLAGS["GRAD_SCALE"] | FLAGS["FOUND_INF"] | FLAGS["STOCHASTIC_ROUNDING"])
    cubin = compile_cubin(capability, spec)
    assert cubin[:4] == b"\x7fELF" and spec.name.encode() in cubin
    assert KernelSpec("float32", "float32", False, False, 0).name.encode() not in cubin
    assert nvrtc_arch_option(90, (80, 90)) == "-arch=sm_90"
    assert nvrtc_arch_option(120, (80, 90)) == "-arch=compute_90"  # newer device: PTX the driver compiles


def test_compiled_entry_points_are_cached_on_disk(tmp_path, monkeypatch):
    """A second build of the same entry point is read back from $RMSPROP_GPU_CACHE_DIR (NVRTC is not called); a
    different entry point is another file; "0" disables the cache; an unwritable folder only skips caching."""
    from cupy_backends.cuda.libs import nvrtc

    from rmsprop_gpu.backends import cupy_backend as cb

    monkeypatch.setenv(cb.CACHE_ENV, str(tmp_path))
    spec = cb.KernelSpec("float16", "float16", False, False, 0)
    first = cb.compile_cubin(90, spec)
    assert len(list(tmp_path.iterdir())) == 1
    calls = []
    real = nvrtc.compileProgram
    monkeypatch.setattr(nvrtc, "compileProgram", lambda *a: calls.append(a) or real(*a))
    assert cb.compile_cubin(90, spec) == first and calls == []
    cb.compile_cubin(90, spec._replace(flags=1024))  # stochastic rounding
    assert len(calls) == 1 and len(list(tmp_path.iterdir())) == 2
    monkeypatch.setenv(cb.CACHE_ENV, "0")
    assert cb.compile_cubin(90, spec) == first and len(calls) == 2
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setenv(cb.CACHE_ENV, str(blocked / "sub"))
    assert cb.compile_cubin(90, spec) == first and len(calls) == 3
