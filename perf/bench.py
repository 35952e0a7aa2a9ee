"""Benchmark: fused RMSprop against the classic unfused baselines, on GPU (or labelled CPU).

    python -m perf.bench                 # best device, full suite (GPU) or small sizes (CPU)
    python -m perf.bench --smoke         # tiny sizes: CI's check that the harness runs end to end
    python -m perf.bench --gpu-check     # the focused set `make gpu-check` runs (add --dry-run on the CPU)
    python -m perf.plot perf/results/<run>.json

Providers: torch.optim.RMSprop for-loop (foreach=False) and foreach; a torch.compile'd step (lr as a tensor);
a Chainer/MXNet/TF1-style per-tensor fused CuPy ElementwiseKernel (one launch per parameter); ours through
each usable backend. Every provider's first step is checked on the device against a float64 oracle (on a
sample of elements of every tensor, comparing the update p_new - p_old) before it is timed; a wrong or failing
case is recorded with its error and the run goes on. Each case is written to the data files as it finishes.
Metrics: median and IQR of the step time (CUDA events on GPU, perf_counter on CPU), effective GB/s = minimal
bytes (README: minimum traffic) / time, % of device-to-device copy bandwidth measured in the same run, speedup
vs foreach, kernel launches per step (torch profiler, GPU), wall time per step, CUDA-graph replay time where
the step is capturable. On a CPU the GB/s are not bandwidth figures (caches, interpreters): no % of copy.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import rmsprop_gpu
from perf.models import MODELS, numel
from tools.kernel_report import minimum_bytes
from tools.oracle import reference_step

LR = 1e-3

VARIANTS = {
    "plain": dict(param=torch.float32, state=None, opts={}),
    "momentum": dict(param=torch.float32, state=None, opts=dict(momentum=0.9)),
    "centered": dict(param=torch.float32, state=None, opts=dict(centered=True)),
    "centered_momentum": dict(param=torch.float32, state=None, opts=dict(centered=True, momentum=0.9)),
    "bf16_fp32_state": dict(param=torch.bfloat16, state=torch.float32, opts={}),
    # 8-bit blockwise state (state_bits=8; tensors under 4096 elements keep 32-bit state): ours only
    "centered_momentum_8bit": dict(param=torch.float32, state=torch.uint8, opts=dict(centered=True, momentum=0.9)),
    # the seed's formula p -= lr * g / sqrt(E[g^2] + eps), as TF1, Keras and optax define RMSprop: torch.optim has
    # no such option, so its baselines here are Keras 3 (torch backend) and TF1's per-variable kernel layout
    "seed_formula": dict(param=torch.float32, state=None, opts=dict(eps_in_sqrt=True)),
}
TORCH_OPTIONS = ("momentum", "centered", "weight_decay")  # what torch.optim.RMSprop can run of VARIANTS' opts


def min_bytes_per_elem(variant: str) -> int:
    """Bytes read + written per element by a single pass (DESIGN.md), the same table the static report uses."""
    v = VARIANTS[variant]
    name = lambda dt: str(dt).removeprefix("torch.")
    return sum(minimum_bytes(name(v["param"]), name(v["state"] or v["param"]),
                             v["opts"].get("momentum", 0) > 0, bool(v["opts"].get("centered"))))


# ------------------------------------------------------------------ providers
class Provider:
    """Builds a step function over a fresh set of params for one variant."""

    name = "?"
    capturable = False

    def __init__(self, device):
        self.device = device

    def available(self) -> str | None:
        return None

    def build(self, params, variant):
        raise NotImplementedError


class TorchOptim(Provider):
    def __init__(self, device, foreach, capturable=False):
        super().__init__(device)
        self.foreach = foreach
        self.capturable = capturable
        self.name = ("torch_foreach" if foreach else "torch_forloop") + ("_capturable" if capturable else "")

    def available(self):
        if self.capturable and self.device.type != "cuda":
            return "capturable needs CUDA"
        return None

    def build(self, params, variant):
        v = VARIANTS[variant]
        if v["state"] is not None or set(v["opts"]) - set(TORCH_OPTIONS):  # fp32 state / the seed's formula
            return None
        opt = torch.optim.RMSprop(params, lr=LR, foreach=self.foreach, capturable=self.capturable, **v["opts"])
        return opt.step


class TorchCompile(Provider):
    """torch.compile(opt.step) with lr as a tensor (a float lr would be baked in). Each case starts from
    torch._dynamo.reset(): without it the step recompiles per case and hits dynamo's recompile limit, after
    which rows are silently eager. The first call must have compiled a graph, or the case fails."""

    name = "torch_compile"
    compiler_backend = "inductor"

    def available(self):
        if self.device.type == "cpu":
            return "skipped on CPU unless --compile (compiling takes minutes there)"
        return None

    def build(self, params, variant):
        v = VARIANTS[variant]
        if v["state"] is not None or set(v["opts"]) - set(TORCH_OPTIONS):
            return None
        import torch._dynamo

        torch._dynamo.reset()
        opt = torch.optim.RMSprop(params, lr=torch.tensor(LR, device=self.device), foreach=True, **v["opts"])
        compiled = torch.compile(opt.step, backend=self.compiler_backend)
        state = {"checked": False}

        def step():
            compiled()
            if not state["checked"]:
                from torch._dynamo.utils import counters

                graphs = counters["stats"]["unique_graphs"]
                if not graphs:
                    raise RuntimeError("torch.compile produced no graph: the step ran eagerly")
                state["checked"] = True
                step.compiled_graphs = graphs

        return step


class Ours(Provider):
    def __init__(self, device, backend, dry_run=False):
        super().__init__(device)
        self.backend = backend
        self.name = f"ours_{backend}"
        self.capturable = device.type == "cuda"
        self.dry_run = dry_run

    def available(self):
        info = rmsprop_gpu.available_backends(self.device)[self.backend]
        if self.backend != "torch" and self.device.type == "cpu" and not self.dry_run:
            return "kernel backends only time on a GPU (the CPU runs them through interpreters)"
        return None if info["usable"] else info["reason"]

    def build(self, params, variant):
        v = VARIANTS[variant]
        q8 = v["state"] == torch.uint8
        opt = rmsprop_gpu.RMSprop(params, lr=LR, backend=self.backend, state_dtype=None if q8 else v["state"],
                                  state_bits=8 if q8 else 32, capturable=self.capturable, **v["opts"])
        return opt.step


def per_tensor_step(kernel, params, scalars):
    """One launch of a CuPy ElementwiseKernel (grad, scalars...) -> (param, ms) per parameter: the cuDNN-era
    layout. Arrays are wrapped once (zero-copy views through __cuda_array_interface__), not in the timed step."""
    import cupy

    states = [torch.zeros_like(p) for p in params]
    arrays = [(cupy.asarray(p.grad), cupy.asarray(p), cupy.asarray(s)) for p, s in zip(params, states) if p.numel()]
    values = [np.float32(x) for x in scalars]

    def step():
        for g, p, ms in arrays:
            kernel(g, *values, p, ms)

    step.keepalive = states
    return step


class ChainerStyle(Provider):
    """One fused CuPy ElementwiseKernel launch per parameter: the cuDNN-era fused baseline."""

    name = "chainer_style_cupy"

    def available(self):
        if self.device.type != "cuda":
            return "needs a GPU"
        try:
            import cupy

            cupy.cuda.runtime.getDeviceCount()
        except Exception as e:
            return f"cupy unusable: {e}"
        return None

    def build(self, params, variant):
        v = VARIANTS[variant]
        if v["state"] is not None or v["opts"]:
            return None  # Chainer's kernel covers plain RMSprop (eps outside the root)
        import cupy

        kernel = cupy.ElementwiseKernel(
            "T grad, T lr, T alpha, T eps", "T param, T ms",
            "ms += (1 - alpha) * (grad * grad - ms); param -= lr * grad / (sqrt(ms) + eps);",
            "chainer_rmsprop")
        return per_tensor_step(kernel, params, (LR, 0.99, 1e-8))


class Keras3(Provider):
    """Keras 3's RMSprop on its torch backend (the seed formula): per-variable ops, unfused. Its variables alias
    the benchmark's params (keras.Variable keeps the torch tensor it is given and assigns in place)."""

    name = "keras3_torch"

    def available(self):
        os.environ.setdefault("KERAS_BACKEND", "torch")
        try:
            import keras
        except ImportError:
            return "keras is not installed (pip install 'rmsprop-gpu[frameworks]')"
        if keras.backend.backend() != "torch":
            return f"keras runs on {keras.backend.backend()}, not torch (set KERAS_BACKEND=torch)"
        return None

    def build(self, params, variant):
        if variant != "seed_formula":
            return None
        import keras

        variables = [keras.Variable(p.detach()) for p in params]
        if any(v.value.data_ptr() != p.data_ptr() for v, p in zip(variables, params) if p.numel()):
            raise RuntimeError("keras copied the params: the update could not be checked")
        opt = keras.optimizers.RMSprop(learning_rate=LR, rho=0.99, epsilon=1e-8)
        opt.build(variables)
        grads = [p.grad for p in params]

        def step():
            opt.apply_gradients(zip(grads, variables))

        return step


class TF1PerVariable(Provider):
    """TF1's layout: one fused ApplyRMSProp kernel per variable (ms += (g*g - ms) * (1 - rho);
    var -= lr * g * rsqrt(ms + eps)), as a CuPy ElementwiseKernel launched once per parameter. ms starts at 0
    here (TF1 starts it at 1) so that the first step is the seed formula the oracle checks."""

    name = "tf1_per_variable_cupy"
    available = ChainerStyle.available

    def build(self, params, variant):
        if variant != "seed_formula":
            return None
        import cupy

        kernel = cupy.ElementwiseKernel(
            "T grad, T lr, T rho, T eps", "T var, T ms",
            "ms += (grad * grad - ms) * (1 - rho); var -= lr * grad * rsqrt(ms + eps);", "tf1_apply_rmsprop")
        return per_tensor_step(kernel, params, (LR, 0.99, 1e-8))


def providers(device, with_compile: bool, gpu_check: bool = False, dry_run: bool = False):
    """In the order their cases run: ours and torch's eager steps first, torch.compile (slow to build) last."""
    ours = [Ours(device, b, dry_run) for b in (("triton", "cupy") if gpu_check else ("triton", "cupy", "torch"))]
    out = ours + [TorchOptim(device, True), TorchOptim(device, False)]
    if gpu_check:
        out.append(TorchOptim(device, True, capturable=True))
    comp = TorchCompile(device)
    out += [ChainerStyle(device), TF1PerVariable(device)] + ([] if gpu_check else [Keras3(device)]) + [comp]
    if (with_compile or dry_run) and device.type == "cpu":
        comp.available = lambda: None
        comp.compiler_backend = "aot_eager" if dry_run else "inductor"  # the dry run proves the path, fast
    return out


# ------------------------------------------------------------------ timing
def make_params(shapes, variant, device, seed=0):
    """Fresh random params and grads, generated on the device (the CPU would take minutes for 1.2B)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = VARIANTS[variant]["param"]
    ps = []
    for s in shapes:
        p = torch.randn(s, generator=gen, device=device, dtype=dtype)
        p.grad = torch.randn(s, generator=gen, device=device, dtype=dtype)
        ps.append(p)
    return ps


SAMPLE = 4096  # elements checked per tensor: the update is elementwise, so a sample checks it exactly
# relative error of the first step's update (p_new - p_old) against the oracle's, both rounded to the param
# dtype: float32 rounding of p (~1e-7 |p|) against an update of ~lr / sqrt(1 - alpha) = 0.01; 16-bit params
# differ only where a rounding tie goes the other way. A step that never updates scores 1.0.
UPDATE_TOL = {torch.float32: 1e-3, torch.bfloat16: 0.05, torch.float16: 0.05}


def sample_before(params, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for p in params:
        n = p.numel()
        idx = torch.randint(0, n, (min(n, SAMPLE),), generator=gen).to(p.device) if n else None
        flat = p.detach().reshape(-1)
        out.append(None if idx is None else (idx, flat[idx].double(), p.grad.reshape(-1)[idx].double()))
    return out


def update_error(params, samples, variant) -> float:
    """After one step from zero state: worst relative error of the sampled update against the float64 oracle."""
    opts = VARIANTS[variant]["opts"]
    worst = 0.0
    for p, smp in zip(params, samples):
        if smp is None:
            continue
        idx, p0, g = smp
        zero = torch.zeros_like(p0)
        want = reference_step(p0, g, zero, zero if opts.get("momentum") else None,
                              zero if opts.get("centered") else None, lr=LR, alpha=0.99, eps=1e-8, **opts)[0]
        want_upd = want.to(p.dtype).double() - p0
        got_upd = p.detach().reshape(-1)[idx].double() - p0
        err = float((got_upd - want_upd).norm() / want_upd.norm().clamp_min(1e-30))
        worst = max(worst, err) if err == err else float("inf")
    return worst


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, device, reps: int, warmup: int = 3) -> list[float]:
    """Per-step times: CUDA events on a GPU; on the CPU, the quietest (lowest median) of 3 blocks of reps
    steps, because on a shared CPU other processes only ever add time."""
    if device.type != "cuda":
        for _ in range(warmup):
            fn()
        blocks = [_cpu_times(fn, reps) for _ in range(3)]
        return min(blocks, key=statistics.median)
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1e-3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def _cpu_times(fn, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def wall_per_step(fn, device, reps: int) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / reps


def count_launches(fn, device) -> int | None:
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync(device)
    return sum(1 for e in prof.events() if e.device_type.name == "CUDA")


def graph_replay(fn, device, reps: int) -> float | None:
    if device.type != "cuda":
        return None
    s = torch.cuda.Stream(device)
    s.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return statistics.median(time_fn(g.replay, device, reps))


def copy_bandwidth(device, nbytes: int, reps: int) -> float:
    a = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    b = torch.empty_like(a)
    t = statistics.median(time_fn(lambda: b.copy_(a), device, reps))
    return 2 * nbytes / t / 1e9  # read + write


# ------------------------------------------------------------------ workloads
def workloads(device, smoke: bool, models: list[str], gpu_check: bool = False):
    if gpu_check:  # `make gpu-check`: one large tensor and two real models (tiny stand-ins on the CPU)
        if device.type == "cuda":
            return [("single", "2^26", [(2**26,)]), ("model", "resnet50", MODELS["resnet50"]()),
                    ("model", "llama-3.2-1b", MODELS["llama-3.2-1b"]())]
        return [("single", "2^12", [(2**12,)]), ("model", "resnet50[:12]", MODELS["resnet50"]()[:12])]
    if device.type == "cuda" and not smoke:
        singles = [2**k for k in range(10, 29, 2)]
        grids = [(n, e) for n in (100, 500, 1000) for e in (1024, 65536)]
    else:
        singles = [2**k for k in ((10, 14) if smoke else (10, 14, 18, 20))]
        grids = [(100, 1024)] if smoke else [(100, 1024), (500, 1024)]
    out = [("single", f"2^{s.bit_length() - 1}", [(s,)]) for s in singles]
    out += [("grid", f"{n}x{e}", [(e,)] * n) for n, e in grids]
    for m in models:
        out.append(("model", m, MODELS[m]()))
    return out


def environment(device) -> dict:
    env = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "device": str(device),
           "python": platform.python_version(), "torch": torch.__version__, "rmsprop_gpu": rmsprop_gpu.__version__,
           "host": platform.node(), "cpu": platform.processor() or platform.machine()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        try:
            import subprocess

            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True).stdout.strip()
        except OSError:
            pass
    else:
        env["gpu"] = "none: CPU run, not a GPU result"
    for mod in ("triton", "cupy"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:
            env[mod] = None
    return env


def run_case(kind, label, shapes, variant, prov, device, reps) -> dict:
    """Build, check the first step against the oracle, then time one provider on one workload."""
    n = numel(shapes)
    row = dict(kind=kind, workload=label, tensors=len(shapes), elements=n, variant=variant, provider=prov.name)
    ps = make_params(shapes, variant, device)
    t0 = time.perf_counter()
    step = prov.build(ps, variant)
    if step is None:
        return None
    samples = sample_before(ps)
    step()  # the first step: compiles and builds state; checked before anything is timed
    sync(device)
    row["first_step_s"] = time.perf_counter() - t0
    row["max_error"] = update_error(ps, samples, variant)
    if hasattr(step, "compiled_graphs"):
        row["compiled_graphs"] = step.compiled_graphs
    if not row["max_error"] <= UPDATE_TOL[VARIANTS[variant]["param"]]:
        row["error"] = f"wrong result: update error {row['max_error']:.3g} against the float64 oracle; not timed"
        return row
    times = time_fn(step, device, reps)
    med = statistics.median(times)
    q = statistics.quantiles(times, n=4) if len(times) >= 4 else [min(times), med, max(times)]
    gbs = n * min_bytes_per_elem(variant) / med / 1e9
    row.update(median_s=med, q1_s=q[0], q3_s=q[-1], gbps=gbs,
               wall_s=wall_per_step(step, device, max(3, reps // 5)), launches=count_launches(step, device),
               graph_s=None)
    if prov.capturable:
        try:
            row["graph_s"] = graph_replay(step, device, reps)
        except Exception as e:  # record, do not hide: capture failures are findings
            row["graph_error"] = f"{type(e).__name__}: {e}"
    return row


def run(args, on_row=None) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.dry_run:
        assert device.type == "cpu", "--dry-run is the CPU rehearsal of --gpu-check"
        os.environ["TRITON_INTERPRET"] = "1"  # read when the Triton kernel is first imported (at its first launch)
        from tools.cuda_cpu.cpu_module import cpu_module_factory  # the .cu built by g++ behind CuPy's seam

        rmsprop_gpu.backends.BACKENDS["cupy"].use_module_factory(cpu_module_factory, device_types=("cpu",))
    env = environment(device)
    models = args.models if args.models is not None else (
        list(MODELS) if device.type == "cuda" and not args.smoke else (["resnet50"] if not args.smoke else []))
    reps = args.reps or (50 if device.type == "cuda" else (3 if args.smoke or args.dry_run else 15))
    copy_gbs = copy_bandwidth(device, (1 << 30) if device.type == "cuda" else (1 << 26), reps)
    note = "" if device.type == "cuda" else " (CPU: caches and interpreters, not a bandwidth figure)"
    print(f"# device {device} ({env['gpu']}): copy {copy_gbs:.1f} GB/s (read + write){note}", flush=True)
    provs = providers(device, args.compile, args.gpu_check, args.dry_run)
    skipped = {p.name: p.available() for p in provs if p.available()}
    for name, why in skipped.items():
        print(f"# skipping {name}: {why}")
    provs = [p for p in provs if p.name not in skipped]
    variants = args.variants or (["plain", "centered_momentum", "bf16_fp32_state", "centered_momentum_8bit"]
                                 if args.gpu_check
                                 else list(VARIANTS))
    result = {"environment": env, "copy_gbps": copy_gbs, "skipped": skipped, "rows": [],
              "load_per_core": [_load_per_core()]}
    # eager providers over every workload first, torch.compile (minutes to build) after them
    jobs = [(w, v, p) for slow in (False, True) for w in workloads(device, args.smoke, models, args.gpu_check)
            for v in variants for p in provs if isinstance(p, TorchCompile) == slow]
    try:
        from tqdm import tqdm

        jobs_iter = tqdm(jobs, desc="benchmark", unit="case", file=sys.stderr)
    except ImportError:
        jobs_iter = jobs
    for (kind, label, shapes), variant, prov in jobs_iter:
        if numel(shapes) * min_bytes_per_elem(variant) > args.max_bytes:
            continue
        if args.deadline and time.time() > args.deadline:
            result["rows"].append(dict(kind=kind, workload=label, variant=variant, provider=prov.name,
                                       error="not run: the time budget was spent"))
            continue
        try:
            row = run_case(kind, label, shapes, variant, prov, device, reps)
        except Exception as e:  # one failing case must not lose the run
            row = dict(kind=kind, workload=label, variant=variant, provider=prov.name,
                       error=f"{type(e).__name__}: {str(e)[:500]}")
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if row is None:
            continue
        result["rows"].append(row)
        add_speedups(result)
        if on_row:
            on_row(result)
    result["load_per_core"].append(_load_per_core())
    return result


def _load_per_core() -> float:
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:  # no load average on this platform
        return 0.0


def add_speedups(result: dict) -> None:
    base = {(r["workload"], r["variant"]): r["median_s"] for r in result["rows"]
            if r["provider"] == "torch_foreach" and r.get("median_s")}
    copy_gbs = result["copy_gbps"] if result["environment"]["device"].startswith("cuda") else None
    for r in result["rows"]:
        b = base.get((r["workload"], r["variant"]))
        r["speedup_vs_foreach"] = b / r["median_s"] if b and r.get("median_s") else None
        r["pct_copy"] = 100 * r["gbps"] / copy_gbs if copy_gbs and r.get("gbps") else None


def markdown(result: dict) -> str:
    env = result["environment"]
    head = (f"{env['date']} | {env['device']} ({env['gpu']}) | torch {env['torch']} | triton {env['triton']} | "
            f"cupy {env['cupy']} | copy {result['copy_gbps']:.1f} GB/s\n\n")
    cols = ["workload", "variant", "provider", "median_s", "q1_s", "q3_s", "wall_s", "gbps", "pct_copy",
            "speedup_vs_foreach", "launches", "graph_s", "error"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in result["rows"]:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append(f"{v:.3g}" if isinstance(v, float) else ("-" if v is None else str(v)[:120]))
        lines.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def busy_warning(result: dict) -> str | None:
    """Why this run's timings may mean little: the machine was loaded (load average per core at the start or
    the end of the run) or repeated timings of one case spread widely (interquartile range over the median)."""
    load = max(result.get("load_per_core") or [0.0])
    timed = [r for r in result["rows"] if r.get("median_s")]
    spread = statistics.median([(r["q3_s"] - r["q1_s"]) / r["median_s"] for r in timed]) if timed else 0.0
    why = []
    if load > 0.5:
        why.append(f"load average {load:.2f} per core")
    if spread > 0.25:
        why.append(f"repeated timings spread by {100 * spread:.0f}% of the median (interquartile range)")
    return ("WARNING: the machine is busy (" + "; ".join(why) + "): the speedups below may be off by 2x or more; "
            "rerun on an idle machine") if why else None


def summary(result: dict, max_rows: int = 8) -> str:
    """A few rows for a first look: per workload and variant, our fastest backend against torch's foreach
    RMSprop (the usual baseline) and torch.compile when it ran; the whole table is in the files."""
    env = result["environment"]
    rows = [r for r in result["rows"] if r.get("median_s")]
    by_case: dict = {}
    for r in rows:
        by_case.setdefault((r["workload"], r["variant"]), {})[r["provider"]] = r
    lines = [f"{env['device']} ({env['gpu']}), torch {env['torch']}, {env['date']}",
             "legend: time = median seconds per optimizer step; speedup = torch foreach's time / ours "
             "(> 1: ours is faster); ours = the fastest rmsprop_gpu backend of the row",
             f"{'workload':24s} {'variant':22s} {'ours':14s} {'time':>9s} {'foreach':>9s} {'speedup':>8s}"
             f" {'vs compile':>10s}"]
    cases = [(key, provs) for key, provs in by_case.items()
             if "torch_foreach" in provs and any(name.startswith("ours_") for name in provs)]
    for (workload, variant), provs in cases[:max_rows]:
        best = min((r for name, r in provs.items() if name.startswith("ours_")), key=lambda r: r["median_s"])
        base, comp = provs["torch_foreach"], provs.get("torch_compile")
        vs_compile = f"{comp['median_s'] / best['median_s']:.2f}x" if comp else "-"
        lines.append(f"{workload[:24]:24s} {variant[:22]:22s} {best['provider'][5:]:14s} {best['median_s']:9.2e} "
                     f"{base['median_s']:9.2e} {base['median_s'] / best['median_s']:7.2f}x {vs_compile:>10s}")
    if len(cases) > max_rows:
        lines.append(f"... {len(cases) - max_rows} more rows in the full table")
    warning = busy_warning(result)
    if warning:
        lines.insert(1, warning)
    return "\n".join(lines) + "\n"


def write_results(result: dict, stem: Path) -> None:
    """JSON, CSV and markdown of everything measured so far (rewritten after every case)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    tmp = stem.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(stem.with_suffix(".json"))
    env = result["environment"]
    with stem.with_suffix(".csv").open("w", newline="") as f:
        keys = sorted({k for r in result["rows"] for k in r})
        w = csv.DictWriter(f, fieldnames=["gpu", "torch", "date", *keys])
        w.writeheader()
        for r in result["rows"]:
            w.writerow({"gpu": env["gpu"], "torch": env["torch"], "date": env["date"], **r})
    stem.with_suffix(".md").write_text(markdown(result))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: a quick end-to-end check")
    ap.add_argument("--gpu-check", action="store_true",
                    help="the focused set of make gpu-check: 2**26, ResNet-50, Llama-3.2-1B; 3 variants")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU rehearsal of --gpu-check: kernels through the interpreter and the g++ build")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS))
    ap.add_argument("--models", nargs="*", choices=list(MODELS))
    ap.add_argument("--reps", type=int)
    ap.add_argument("--compile", action="store_true", help="include torch.compile on the CPU too")
    ap.add_argument("--max-bytes", type=float, default=40e9, help="skip workloads moving more than this per step")
    ap.add_argument("--deadline", type=float, help="unix time after which no new case starts")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--stem", help="file name stem of the results (default bench_<device>[_smoke])")
    ap.add_argument("--summary", action="store_true", help="print a short summary instead of the whole table")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    stem = args.out / ("cpu" if device.type == "cpu" and not args.stem else "") / (
        args.stem or f"bench_{device.type}{'_smoke' if args.smoke else ''}")
    result = run(args, on_row=lambda res: write_results(res, stem))
    write_results(result, stem)
    if args.summary:
        print(summary(result))  # the warning, if any, is in it
    else:
        print(markdown(result))
        warning = busy_warning(result)
        if warning:
            print(warning)
    from perf.plot import plot

    for path in plot(stem.with_suffix(".json")):
        print(f"# wrote {path}")
    print(f"# wrote {stem}.json, .csv, .md")
    failed = [r for r in result["rows"] if r.get("error") and not r["error"].startswith("not run")]
    for r in failed:
        print(f"# FAILED {r['provider']} {r['variant']} {r['workload']}: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
