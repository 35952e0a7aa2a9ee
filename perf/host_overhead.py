"""Host overhead of one optimizer step: the Python in front of the kernel, with the launch stubbed out.

    python -m perf.host_overhead                 # every case, results in perf/results/host_overhead_cpu.*
    python -m perf.host_overhead --smoke         # tiny cases: CI's check that the harness runs end to end

The seam is rmsprop_gpu.backends.launches_stubbed(): inside it the kernel backends (triton, cupy) build and
check the plan, the tables and every launch argument, count the launch, and skip only the launch call itself
(no kernel runs), so CPU tensors stand in for GPU ones. On a GPU the same step adds the launcher (Triton's or
CuPy's) and the table uploads (pinned, non_blocking), which the CPU path does as plain copies.

Per case and backend: the first step (plan built: every check, state, tables), then the median host time of
a step (the least of 5 blocks' medians: a shared machine's noise only ever adds) for
- "warm": grads kept (zero_grad(set_to_none=False));
- "regrad, same addresses": new grad tensors on the old storage each step (set_to_none=True + backward with a
  caching allocator that hands the same blocks back, the usual case on a GPU);
- "regrad, new addresses": new grad tensors on other storage each step (tables rebuilt each step);
- "usual loop": zero_grad(set_to_none=True), then new grads (what backward does): the old grads are freed before
  the step (the plan holds none), the new ones mostly at addresses never seen before (the share that repeats is
  reported); target at most 2x the warm step;
plus launches, table builds and hyper-table uploads per warm step. torch.optim.RMSprop(foreach=True) runs beside,
on the same number of 1-element tensors (its arithmetic is then negligible, so its time is host time).
Target (issue 12): at most 30 us + 0.5 us per tensor, warm.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton backend takes CPU tensors (its kernel never runs)

import torch

import rmsprop_gpu
from perf.models import MODELS
from rmsprop_gpu.backends import BACKENDS, launches_stubbed

BACKEND_NAMES = ("triton", "cupy")
BLOCKS = 5


def cases(smoke: bool) -> dict[str, dict]:
    if smoke:
        return {"resnet50": dict(shapes=MODELS["resnet50"]()[:20]),
                "40 groups x 2 tensors": dict(shapes=[(33,)] * 80, groups=40)}
    return {
        "resnet50": dict(shapes=MODELS["resnet50"]()),
        "resnet50 centered+momentum": dict(shapes=MODELS["resnet50"](), opts=dict(momentum=0.9, centered=True)),
        "resnet50 centered+momentum, ExponentialLR": dict(shapes=MODELS["resnet50"](),
                                                          opts=dict(momentum=0.9, centered=True), scheduler=True),
        "2000 x 256": dict(shapes=[(256,)] * 2000),
        "40 groups x 2 tensors": dict(shapes=[(1000,), (64, 64)] * 40, groups=40),
        "bert-base": dict(shapes=MODELS["bert-base"]()),
        "gpt2-small": dict(shapes=MODELS["gpt2-small"]()),
        "llama-3.2-1b": dict(shapes=MODELS["llama-3.2-1b"]()),
    }


def param_groups(params: list[torch.Tensor], n_groups: int) -> list[dict]:
    """Layer-wise lr decay: consecutive params in n_groups groups, lr decaying by 0.9 per group."""
    per = -(-len(params) // n_groups)
    return [dict(params=params[i * per:(i + 1) * per], lr=1e-3 * 0.9**i) for i in range(n_groups)]


def counters(backend) -> tuple[int, int, int]:
    return backend.launches, backend.tables.builds, backend.tables.hyper_uploads


def measure(case: dict, backend_name: str, steps: int) -> dict:
    shapes = case["shapes"]
    params = [torch.empty(s) for s in shapes]  # never touched: the launch is stubbed
    grads = [[torch.empty(s) for s in shapes] for _ in range(2)]
    for p, g in zip(params, grads[0]):
        p.grad = g
    groups = param_groups(params, case["groups"]) if case.get("groups") else params
    opt = rmsprop_gpu.RMSprop(groups, lr=1e-3, backend=backend_name, **case.get("opts", {}))
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.999) if case.get("scheduler") else None
    b = BACKENDS[backend_name]
    t0 = time.perf_counter()
    opt.step()
    first = time.perf_counter() - t0
    row = {"backend": backend_name, "tensors": len(shapes), "first_step_ms": first * 1e3}

    def warm(before=None):
        """Median host time of a step (the least of BLOCKS blocks' medians: the machine's noise only adds), and
        the counters per step."""
        for _ in range(3):  # warm-up
            if before is not None:
                before()
            opt.step()
        c0 = counters(b)
        medians = []
        for _ in range(BLOCKS):
            times = []
            for _ in range(steps):
                if before is not None:
                    before()
                t = time.perf_counter()
                opt.step()
                times.append(time.perf_counter() - t)
                if sched is not None:  # outside the timed region: the lr it sets is read by our next step
                    sched.step()
            medians.append(statistics.median(times))
        c1 = counters(b)
        per = [(y - x) / (BLOCKS * steps) for x, y in zip(c0, c1)]
        return min(medians) * 1e6, per

    row["warm_us"], (row["launches_per_step"], row["table_builds_per_step"], row["hyper_uploads_per_step"]) = warm()

    def same_addresses():  # new grad objects, the old storage (what a caching allocator usually hands back)
        for p in params:
            p.grad = p.grad.detach()

    row["regrad_same_address_us"], per = warm(same_addresses)
    row["regrad_same_address_table_builds_per_step"] = per[1]
    flip = [0]

    def new_addresses():
        flip[0] ^= 1
        for p, g in zip(params, grads[flip[0]]):
            p.grad = g

    row["regrad_new_address_us"], per = warm(new_addresses)
    row["regrad_new_address_table_builds_per_step"] = per[1]
    seen_ptrs: set = set()
    repeats = [0, 0]

    def usual_loop():  # zero_grad(set_to_none=True), then backward allocates new grads: the old ones are freed
        opt.zero_grad(set_to_none=True)
        for p in params:
            p.grad = torch.empty(p.shape)
            repeats[0] += p.grad.data_ptr() in seen_ptrs
            repeats[1] += 1
            seen_ptrs.add(p.grad.data_ptr())

    row["usual_loop_us"], per = warm(usual_loop)
    row["usual_loop_table_builds_per_step"] = per[1]
    row["usual_loop_repeated_addresses"] = repeats[0] / max(repeats[1], 1)
    row["usual_loop_over_warm"] = row["usual_loop_us"] / row["warm_us"]
    row["warm_us_per_tensor"] = row["warm_us"] / len(shapes)
    row["target_us"] = 30 + 0.5 * len(shapes)
    row["meets_target"] = row["warm_us"] <= row["target_us"]
    return row


def torch_host_us(case: dict, steps: int) -> float:
    """torch.optim.RMSprop(foreach=True) on as many 1-element tensors: its arithmetic is negligible."""
    params = [torch.zeros(1, requires_grad=True) for _ in case["shapes"]]
    for p in params:
        p.grad = torch.ones(1)
    groups = param_groups(params, case["groups"]) if case.get("groups") else params
    opt = torch.optim.RMSprop(groups, lr=1e-3, foreach=True, **case.get("opts", {}))
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.999) if case.get("scheduler") else None
    medians = []
    for _ in range(BLOCKS):
        times = []
        for i in range(steps + 3):
            t = time.perf_counter()
            opt.step()
            if i >= 3:
                times.append(time.perf_counter() - t)
            if sched is not None:
                sched.step()
        medians.append(statistics.median(times))
    return min(medians) * 1e6


def markdown(rows: list[dict]) -> str:
    cols = ("case", "backend", "tensors", "first_step_ms", "warm_us", "warm_us_per_tensor", "target_us",
            "regrad_same_address_us", "regrad_new_address_us", "usual_loop_us", "usual_loop_over_warm",
            "usual_loop_repeated_addresses", "launches_per_step", "table_builds_per_step",
            "hyper_uploads_per_step", "torch_foreach_us")
    out = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    for r in rows:
        out += "| " + " | ".join(f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |\n"
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases_ = list(dict.fromkeys(r["case"] for r in rows))
    fig, ax = plt.subplots(figsize=(12, 5))
    series = [("warm (triton)", "triton", "warm_us"), ("warm (cupy)", "cupy", "warm_us"),
              ("regrad, same addr. (triton)", "triton", "regrad_same_address_us"),
              ("regrad, new addr. (triton)", "triton", "regrad_new_address_us"),
              ("usual loop, set_to_none (triton)", "triton", "usual_loop_us"),
              ("torch.optim foreach (host)", "triton", "torch_foreach_us")]
    width = 0.8 / len(series)
    for k, (label, backend, key) in enumerate(series):
        ys = [next(r[key] for r in rows if r["case"] == c and r["backend"] == backend) for c in cases_]
        ax.bar([i + k * width for i in range(len(cases_))], ys, width, label=label)
    for i, c in enumerate(cases_):
        t = next(r["target_us"] for r in rows if r["case"] == c)
        ax.hlines(t, i - width / 2, i + len(series) * width - width / 2, colors="black", linestyles="dashed",
                  label="target 30 us + 0.5 us/tensor" if i == 0 else None)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases_))], cases_, rotation=15, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("host us per step (median, launch stubbed)")
    ax.set_title(f"rmsprop_gpu host overhead per step, {platform.processor() or platform.machine()} CPU")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny cases, few steps (CI)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per measurement")
    ap.add_argument("--out", default=None, help="output stem (default perf/results/host_overhead_cpu)")
    args = ap.parse_args(argv)
    steps = args.steps or (5 if args.smoke else 40)
    root = Path(__file__).resolve().parent / "results"
    stem = Path(args.out) if args.out else root / ("host_overhead_cpu_smoke" if args.smoke else "host_overhead_cpu")
    rows = []
    all_cases = cases(args.smoke)
    gc.collect()
    gc.disable()  # as timeit does: a collection inside a timed step is noise, not our host cost
    with launches_stubbed():
        for i, (name, case) in enumerate(all_cases.items()):
            torch_us = torch_host_us(case, steps)
            for backend in BACKEND_NAMES:
                row = {"case": name, **measure(case, backend, steps), "torch_foreach_us": torch_us}
                rows.append(row)
                print(f"[{i + 1}/{len(all_cases)}] {name:45s} {backend:6s} warm {row['warm_us']:8.1f} us "
                      f"(target {row['target_us']:.0f}), regrad {row['regrad_same_address_us']:8.1f} / "
                      f"{row['regrad_new_address_us']:8.1f} us, usual loop {row['usual_loop_us']:8.1f} us, "
                      f"{row['launches_per_step']:.0f} launch(es), "
                      f"torch foreach {torch_us:8.1f} us", flush=True)
                gc.collect()
    gc.enable()
    meta = {"date": dt.datetime.now().isoformat(timespec="seconds"), "machine": platform.machine(),
            "processor": platform.processor(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "steps": steps, "launch": "stubbed (rmsprop_gpu.backends.launches_stubbed)"}
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    stem.with_suffix(".md").write_text(f"Host overhead per step, launch stubbed ({meta['date']}, {meta['cpus']} "
                                       f"CPUs, torch {meta['torch']}).\n\n" + markdown(rows))
    plot(rows, stem.with_suffix(".png"))
    print(f"wrote {stem}.json/.md/.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
