"""The main job: train a small model with rmsprop_gpu on the best device, self-check every usable backend
against the float64 oracle, then a quick benchmark against the baselines: a short summary on screen (with a
warning when the machine is too busy for timings to mean anything), the whole table and plots in demo_out/.

On a machine without a GPU it says so and uses the CPU; the Triton kernel then runs through Triton's
interpreter for the self-check (correct, not fast)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before rmsprop_gpu loads the Triton kernel

import rmsprop_gpu
from perf import bench


def self_check(device) -> bool:
    ok = True
    gen = torch.Generator().manual_seed(0)
    sizes = [1, 1023, 4097, 3 * 2048]
    for name, info in rmsprop_gpu.available_backends(device).items():
        if not info["usable"]:
            print(f"  {name:7s} not usable here: {info['reason']}")
            continue
        for opts in ({}, dict(momentum=0.9, centered=True, weight_decay=0.01)):
            ps = [torch.randn(n, generator=gen).to(device) for n in sizes]
            gs = [torch.randn(n, generator=gen).to(device) for n in sizes]
            ref = [p.double().cpu() for p in ps]
            for r, g in zip(ref, gs):
                r.grad = g.double().cpu()
            for p, g in zip(ps, gs):
                p.grad = g
            rmsprop_gpu.RMSprop(ref, backend="torch", **opts).step()
            opt = rmsprop_gpu.RMSprop(ps, backend=name, **opts)
            opt.step()
            err = max((p.double().cpu() - r).abs().max().item() for p, r in zip(ps, ref))
            good = err < 1e-5
            ok &= good
            print(f"  {name:7s} {str(opts or 'default'):55s} max |error| vs float64 = {err:.2e}  "
                  f"{'OK' if good else 'FAILED'}")
    return ok


def train(device):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 1)).to(device)
    opt = rmsprop_gpu.RMSprop(model.parameters(), lr=3e-3, momentum=0.9)
    x = torch.randn(512, 32, device=device)
    y = (x[:, :1] * 2 - x[:, 1:2]).sin()
    first = None
    for _ in range(200):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    backend = rmsprop_gpu.which_backend(model.parameters())[0].backend
    print(f"  trained a 2-layer MLP for 200 steps on {device} with backend '{backend}': "
          f"loss {first:.4f} -> {loss.item():.4f}")
    return loss.item() < first


def main() -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        print("No GPU found: running on the CPU (kernel backends through their interpreters for the self-check).")
    else:
        print(f"GPU: {torch.cuda.get_device_name()}")
    print("1. training")
    trained = train(device)
    print("2. self-check of every usable backend against the float64 oracle")
    ok = self_check(device)
    print("3. quick benchmark against the baselines (the whole table: demo_out/; plots beside it)")
    out = Path.cwd() / "demo_out"
    bench.main(["--summary", "--out", str(out), "--stem", f"bench_{device}"]
               + (["--smoke"] if device == "cpu" else ["--models", "resnet50", "gpt2-small", "--reps", "20"]))
    print("demo:", "all checks passed" if ok and trained else "SOME CHECKS FAILED")
    return 0 if ok and trained else 1


if __name__ == "__main__":
    sys.exit(main())
