"""Benchmark: fused RMSprop against the classic unfused baselines, on GPU (or labelled CPU).

    python perf/bench.py                 # best device, full suite (GPU) or small sizes (CPU)
    python perf/bench.py --smoke         # tiny sizes: CI's check that the harness runs end to end
    python perf/plot.py perf/results/<run>.json

Providers: torch.optim.RMSprop for-loop (foreach=False) and foreach; a torch.compile'd step (lr as a tensor);
a Chainer/MXNet/TF1-style per-tensor fused CuPy ElementwiseKernel (one launch per parameter); ours through
each usable backend. Every provider is checked against a float64 one-step oracle before it is timed.
Metrics: median and IQR of the step time (CUDA events on GPU, perf_counter on CPU), effective GB/s = minimal
bytes (DESIGN.md) / time, % of device-to-device copy bandwidth measured in the same run, speedup vs foreach,
kernel launches per step (torch profiler, GPU), and CUDA-graph replay time where the step is capturable.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import MODELS, numel  # noqa: E402

import rmsprop_gpu  # noqa: E402
from rmsprop_gpu.kernel_report import minimum_bytes  # noqa: E402

VARIANTS = {
    "plain": dict(param=torch.float32, state=None, opts={}),
    "momentum": dict(param=torch.float32, state=None, opts=dict(momentum=0.9)),
    "centered": dict(param=torch.float32, state=None, opts=dict(centered=True)),
    "centered_momentum": dict(param=torch.float32, state=None, opts=dict(centered=True, momentum=0.9)),
    "bf16_fp32_state": dict(param=torch.bfloat16, state=torch.float32, opts={}),
}


def min_bytes_per_elem(variant: str) -> int:
    """Bytes read + written per element by a single pass (DESIGN.md), the same table the static report uses."""
    v = VARIANTS[variant]
    name = lambda dt: str(dt).removeprefix("torch.")  # noqa: E731
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
    def __init__(self, device, foreach):
        super().__init__(device)
        self.foreach = foreach
        self.name = "torch_foreach" if foreach else "torch_forloop"

    def build(self, params, variant):
        v = VARIANTS[variant]
        if v["state"] is not None:  # torch keeps state in the param dtype: use fp32 master copies
            return None
        opt = torch.optim.RMSprop(params, lr=1e-3, foreach=self.foreach, **v["opts"])
        return opt.step


class TorchCompile(Provider):
    name = "torch_compile"

    def available(self):
        if self.device.type == "cpu":
            return "skipped on CPU unless --compile (compiling takes minutes there)"
        return None

    def build(self, params, variant):
        v = VARIANTS[variant]
        if v["state"] is not None:
            return None
        opt = torch.optim.RMSprop(params, lr=torch.tensor(1e-3, device=self.device), foreach=True, **v["opts"])
        return torch.compile(opt.step)


class Ours(Provider):
    def __init__(self, device, backend):
        super().__init__(device)
        self.backend = backend
        self.name = f"ours_{backend}"
        self.capturable = device.type == "cuda"

    def available(self):
        info = rmsprop_gpu.available_backends(self.device)[self.backend]
        if self.backend != "torch" and self.device.type == "cpu":
            return "kernel backends only time on a GPU (the CPU runs them through interpreters)"
        return None if info["usable"] else info["reason"]

    def build(self, params, variant):
        v = VARIANTS[variant]
        opt = rmsprop_gpu.RMSprop(params, lr=1e-3, backend=self.backend, state_dtype=v["state"],
                                  capturable=self.capturable, **v["opts"])
        return opt.step


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
        states = [torch.zeros_like(p) for p in params]

        def step():
            for p, s in zip(params, states):
                if p.numel():
                    kernel(cupy.asarray(p.grad), 1e-3, 0.99, 1e-8, cupy.asarray(p), cupy.asarray(s))

        return step


def providers(device, with_compile: bool):
    out = [TorchOptim(device, False), TorchOptim(device, True), TorchCompile(device), ChainerStyle(device)]
    out += [Ours(device, b) for b in ("triton", "cupy", "torch")]
    if with_compile and device.type == "cpu":
        out[2].available = lambda: None
    return out


# ------------------------------------------------------------------ timing
def make_params(shapes, variant, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    dtype = VARIANTS[variant]["param"]
    ps = []
    for s in shapes:
        p = torch.randn(s, generator=gen).to(device=device, dtype=dtype)
        p.grad = torch.randn(s, generator=gen).to(device=device, dtype=dtype)
        ps.append(p)
    return ps


def check_correct(step, shapes, variant, device) -> float:
    """One step from fresh random data against the float64 oracle (our torch backend in float64)."""
    ps = make_params(shapes, variant, device, seed=1)
    ref = [p.detach().double().cpu().requires_grad_(False) for p in ps]
    for r, p in zip(ref, ps):
        r.grad = p.grad.double().cpu()
    rmsprop_gpu.RMSprop(ref, lr=1e-3, backend="torch", **VARIANTS[variant]["opts"]).step()
    step_fn = step(ps)
    step_fn()
    return max(((p.double().cpu() - r).abs().max().item() if p.numel() else 0.0) for p, r in zip(ps, ref))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, device, reps: int, warmup: int = 3) -> list[float]:
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
def workloads(device, smoke: bool, models: list[str]):
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


def run(args) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    env = environment(device)
    models = args.models if args.models is not None else (
        list(MODELS) if device.type == "cuda" and not args.smoke else (["resnet50"] if not args.smoke else []))
    reps = args.reps or (50 if device.type == "cuda" else (3 if args.smoke else 10))
    copy_gbs = copy_bandwidth(device, (1 << 30) if device.type == "cuda" else (1 << 26), reps)
    print(f"# device {device} ({env['gpu']}): copy bandwidth {copy_gbs:.1f} GB/s (read + write)")
    provs = providers(device, args.compile)
    skipped = {p.name: p.available() for p in provs if p.available()}
    for name, why in skipped.items():
        print(f"# skipping {name}: {why}")
    provs = [p for p in provs if p.name not in skipped]
    rows = []
    jobs = [(w, v, p) for w in workloads(device, args.smoke, models) for v in args.variants for p in provs]
    try:
        from tqdm import tqdm

        jobs_iter = tqdm(jobs, desc="benchmark", unit="case", file=sys.stderr)
    except ImportError:
        jobs_iter = jobs
    for (kind, label, shapes), variant, prov in jobs_iter:
        n = numel(shapes)
        if n * min_bytes_per_elem(variant) > args.max_bytes:
            continue

        def build(ps, prov=prov, variant=variant):
            return prov.build(ps, variant)

        probe = build(make_params(shapes[:1], variant, "cpu" if device.type == "cpu" else device))
        if probe is None:
            continue
        err = check_correct(build, shapes, variant, device)
        tol = 1e-2 if VARIANTS[variant]["param"] == torch.bfloat16 else 1e-4
        if not err <= tol:
            raise SystemExit(f"{prov.name} {variant} {label}: wrong result (max error {err:.3g}), not timing it")
        ps = make_params(shapes, variant, device)
        step = build(ps)
        times = time_fn(step, device, reps)
        med = statistics.median(times)
        q = statistics.quantiles(times, n=4) if len(times) >= 4 else [min(times), med, max(times)]
        gbs = n * min_bytes_per_elem(variant) / med / 1e9
        row = dict(kind=kind, workload=label, tensors=len(shapes), elements=n, variant=variant, provider=prov.name,
                   median_s=med, q1_s=q[0], q3_s=q[-1], gbps=gbs, pct_copy=100 * gbs / copy_gbs,
                   wall_s=wall_per_step(step, device, max(3, reps // 5)), launches=count_launches(step, device),
                   graph_s=None, max_error=err)
        if prov.capturable:
            try:
                row["graph_s"] = graph_replay(step, device, reps)
            except Exception as e:  # record, do not hide: capture failures are findings
                row["graph_error"] = f"{type(e).__name__}: {e}"
        rows.append(row)
    base = {(r["workload"], r["variant"]): r["median_s"] for r in rows if r["provider"] == "torch_foreach"}
    for r in rows:
        b = base.get((r["workload"], r["variant"]))
        r["speedup_vs_foreach"] = b / r["median_s"] if b else None
    return {"environment": env, "copy_gbps": copy_gbs, "skipped": skipped, "rows": rows}


def markdown(result: dict) -> str:
    env = result["environment"]
    head = (f"{env['date']} | {env['device']} ({env['gpu']}) | torch {env['torch']} | triton {env['triton']} | "
            f"cupy {env['cupy']} | copy {result['copy_gbps']:.1f} GB/s\n\n")
    cols = ["workload", "variant", "provider", "median_s", "gbps", "pct_copy", "speedup_vs_foreach", "launches",
            "graph_s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in result["rows"]:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append(f"{v:.3g}" if isinstance(v, float) else ("-" if v is None else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: a quick end-to-end check")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--models", nargs="*", choices=list(MODELS))
    ap.add_argument("--reps", type=int)
    ap.add_argument("--compile", action="store_true", help="include torch.compile on the CPU too")
    ap.add_argument("--max-bytes", type=float, default=40e9, help="skip workloads moving more than this per step")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args(argv)
    result = run(args)
    dev = result["environment"]["device"].split(":")[0]
    stem = args.out / ("cpu" if dev == "cpu" else "") / f"bench_{dev}{'_smoke' if args.smoke else ''}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    with stem.with_suffix(".csv").open("w", newline="") as f:
        keys = sorted({k for r in result["rows"] for k in r})
        w = csv.DictWriter(f, fieldnames=["gpu", "torch", "date", *keys])
        w.writeheader()
        for r in result["rows"]:
            env = result["environment"]
            w.writerow({"gpu": env["gpu"], "torch": env["torch"], "date": env["date"], **r})
    table = markdown(result)
    stem.with_suffix(".md").write_text(table)
    print(table)
    from plot import plot

    for path in plot(stem.with_suffix(".json")):
        print(f"# wrote {path}")
    print(f"# wrote {stem}.json, .csv, .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
