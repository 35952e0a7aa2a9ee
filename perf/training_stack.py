"""Training-stack measurements: memory of the update inside backward, launches per step, compiles over 100 steps.

    python -m perf.training_stack            # results in perf/results/training_stack_cpu.{json,md,png}
    python -m perf.training_stack --smoke    # small model, few steps (CI)

1. Peak memory of training steps (zero_grad(set_to_none=True), the default) with torch.optim.RMSprop (foreach),
   ours, and ours with in_backward=True: a model of 16 Linear(2048, 2048) layers (268 MB of fp32 params), each
   mode in its own process; on the CPU the peak is the process's maximum resident set (ru_maxrss, with a fixed
   glibc mmap threshold so freed tensors leave it) above what it held before training; on a GPU
   torch.cuda.max_memory_allocated. Ours must be no higher than torch.optim's: no grad outlives step().
2. Launches per step: the fused launches of a normal step (one per param group and layout) against the buckets
   of in_backward (bucket_mb=25).
3. torch.compile over 100 steps of a fullgraph training step with an lr schedule on a tensor lr: frames
   compiled (CompileCounter) and dynamo's unique graphs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import warnings
from pathlib import Path

import torch

import rmsprop_gpu

ROOT = Path(__file__).resolve().parents[1]


def model(layers: int, width: int, device) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)]).to(device)


MODES = {"torch": "torch.optim.RMSprop (foreach)", "off": "rmsprop_gpu.RMSprop", "on": "rmsprop_gpu, in_backward"}


def peak_memory(mode: str, layers: int, width: int, steps: int) -> dict:
    """Run in a fresh process: a few training steps, then the peak memory above the pre-training level."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    m = model(layers, width, device)
    in_backward = mode == "on"
    if mode == "torch":
        opt = torch.optim.RMSprop(m.parameters(), lr=1e-4, momentum=0.9, foreach=True)
    else:
        opt = rmsprop_gpu.RMSprop(m.parameters(), lr=1e-4, momentum=0.9, in_backward=in_backward)
    x = torch.randn(8, width, device=device)
    # state exists before the measured steps (its memory is the same in both modes)
    for p in m.parameters():
        opt.state[p].update(step=torch.zeros(()), square_avg=torch.zeros_like(p), momentum_buffer=torch.zeros_like(p))
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for _ in range(steps):
        m(x).square().mean().backward()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step()
        opt.zero_grad()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    params = sum(p.numel() * p.element_size() for p in m.parameters())
    buckets = opt._in_backward.buckets / steps if in_backward else None
    return {"mode": MODES[mode], "in_backward": in_backward, "device": str(device), "param_bytes": params,
            "peak_above_start": peak, "buckets_per_step": buckets}


def launches_per_step(layers: int, width: int) -> int:
    m = model(layers, width, "cpu")
    opt = rmsprop_gpu.RMSprop(m.parameters(), lr=1e-4, momentum=0.9)
    m(torch.randn(2, width)).square().mean().backward()
    opt.step()
    return len(opt._plan.entries)


def compile_counts(steps: int) -> dict:
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    m = model(3, 64, "cpu")
    opt = rmsprop_gpu.RMSprop(m.parameters(), lr=torch.tensor(1e-3), momentum=0.9)
    x = torch.randn(8, 64)

    def train():
        loss = m(x).square().mean()
        loss.backward()
        opt.step()
        return loss.detach()

    counter = CompileCounterWithBackend("aot_eager")
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled = torch.compile(train, backend=counter, fullgraph=True)
        for i in range(steps):
            compiled()
            opt.zero_grad()
            opt.param_groups[0]["lr"].fill_(1e-3 * 0.99**i)  # an exponential schedule on the tensor lr
    return {"steps": steps, "frames_compiled": counter.frame_count,
            "unique_graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--child", choices=list(MODES), help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    layers, width, steps = (4, 256, 2) if args.smoke else (16, 2048, 3)
    if args.child:
        print(json.dumps(peak_memory(args.child, layers, width, steps)))
        return 0
    rows = []
    for mode in MODES:
        cmd = [sys.executable, "-m", "perf.training_stack", "--child", mode] + (["--smoke"] if args.smoke else [])
        # a fixed mmap threshold: glibc then returns every large freed block to the OS at once, so the resident
        # set follows the live tensors (its default raises the threshold and keeps freed grads resident)
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env, cwd=ROOT).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f"{MODES[mode]}: peak {rows[-1]['peak_above_start'] / 2**20:.0f} MiB above the start "
              f"(params {rows[-1]['param_bytes'] / 2**20:.0f} MiB)", flush=True)
    result = {"env": {"machine": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__},
              "model": f"{layers} x Linear({width}, {width}), fp32, momentum", "memory": rows,
              "launches_per_normal_step": launches_per_step(layers, width),
              "compile": compile_counts(20 if args.smoke else 100)}
    print(json.dumps(result["compile"]))
    root = Path(__file__).resolve().parent / "results"
    stem = Path(args.out) if args.out else root / ("training_stack_cpu_smoke" if args.smoke else "training_stack_cpu")
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    ref, off, on = rows
    md = (f"# Training stack ({result['model']}; {result['env']})\n\n"
          "Training steps with zero_grad(set_to_none=True) (the default).\n\n"
          "| | peak memory above start | buckets (launches) per step |\n|---|---|---|\n"
          f"| torch.optim.RMSprop (foreach) | {ref['peak_above_start'] / 2**20:.0f} MiB | - |\n"
          f"| normal step | {off['peak_above_start'] / 2**20:.0f} MiB | {result['launches_per_normal_step']} |\n"
          f"| in_backward=True, bucket_mb=25 | {on['peak_above_start'] / 2**20:.0f} MiB | "
          f"{on['buckets_per_step']:.0f} |\n\n"
          f"Params: {off['param_bytes'] / 2**20:.0f} MiB. torch.compile, fullgraph training step, "
          f"{result['compile']['steps']} steps with an lr schedule on a tensor lr: "
          f"{result['compile']['frames_compiled']} frames compiled, "
          f"{result['compile']['unique_graphs']} unique graphs, {result['compile']['graph_breaks']} graph breaks.\n")
    stem.with_suffix(".md").write_text(md)
    print(f"wrote {stem}.json/.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
