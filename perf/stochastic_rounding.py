"""Pure-bf16 training with and without stochastic rounding, against float32: a small real task.

    python -m perf.stochastic_rounding [--steps 1500] [--seeds 3] [--backend torch] [--out perf/results/...]

Data: scikit-learn's digits (1797 8x8 images, shipped inside the package), standardized, 75/25 split. Model: an
MLP 64-128-10, full-batch cross-entropy, RMSprop(lr=3e-4) for `steps` steps. Runs per seed:
- fp32: float32 params and state (the reference);
- bf16 nearest: bf16 params and state, every store rounded to nearest (updates below half a bf16 spacing are lost);
- bf16 stochastic: the same with stochastic_rounding=True (unbiased stores);
- bf16 + fp32 state: bf16 params, float32 state, round to nearest (state_dtype=torch.float32).
Writes <out>.json, <out>.md and <out>.png (train loss per step, mean over seeds) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

import rmsprop_gpu  # noqa: E402

RUNS = {
    "fp32": dict(dtype=torch.float32),
    "bf16 nearest": dict(dtype=torch.bfloat16),
    "bf16 stochastic": dict(dtype=torch.bfloat16, stochastic_rounding=True),
    "bf16 + fp32 state": dict(dtype=torch.bfloat16, state_dtype=torch.float32),
}


def digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    y = torch.tensor(y, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    cut = int(0.75 * len(x))
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


def train(run: dict, seed: int, steps: int, lr: float, backend: str, data) -> dict:
    (xtr, ytr), (xte, yte) = data
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 10))
    model = model.to(run["dtype"])
    opts = {k: v for k, v in run.items() if k != "dtype"}
    opt = rmsprop_gpu.RMSprop(model.parameters(), lr=lr, backend=backend, sr_seed=seed, **opts)
    x, xt = xtr.to(run["dtype"]), xte.to(run["dtype"])
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x).float(), ytr)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = torch.nn.functional.cross_entropy(model(x).float(), ytr).item()
        acc = (model(xt).float().argmax(1) == yte).float().mean().item()
    return {"losses": losses, "final_train_loss": final, "test_accuracy": acc}


def digits_run_args(argv, description: str, steps: int, lr: float, smoke_steps: int, out_name: str):
    """The command line of a digits training run (this script's, perf/state_bits.py's)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--lr", type=float, default=lr)
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--smoke", action="store_true", help="a few steps, one seed (CI)")
    ap.add_argument("--out", type=Path, default=ROOT / "perf" / "results" / out_name)
    args = ap.parse_args(argv)
    if args.smoke:
        args.steps, args.seeds = smoke_steps, 1
    return args


def main(argv=None) -> int:
    args = digits_run_args(argv, __doc__.splitlines()[0], steps=1500, lr=3e-4, smoke_steps=20,
                           out_name="stochastic_rounding_cpu")
    data = digits()
    results = {}
    for name, run in RUNS.items():
        per_seed = [train(run, s, args.steps, args.lr, args.backend, data) for s in range(args.seeds)]
        curve = [sum(r["losses"][i] for r in per_seed) / len(per_seed) for i in range(args.steps)]
        finals = [r["final_train_loss"] for r in per_seed]
        results[name] = {"final_train_loss": finals, "test_accuracy": [r["test_accuracy"] for r in per_seed],
                         "mean_curve": curve}
        print(f"{name:18s} final train loss {sum(finals) / len(finals):.4f} "
              f"({', '.join(f'{f:.4f}' for f in finals)}), test accuracy "
              f"{sum(results[name]['test_accuracy']) / len(per_seed):.3f}", flush=True)
    ref = sum(results["fp32"]["final_train_loss"]) / args.seeds
    rne = sum(results["bf16 nearest"]["final_train_loss"]) / args.seeds
    sr = sum(results["bf16 stochastic"]["final_train_loss"]) / args.seeds
    closed = (rne - sr) / (rne - ref) if rne != ref else float("nan")
    summary = {"steps": args.steps, "seeds": args.seeds, "lr": args.lr, "backend": args.backend,
               "gap_closed_by_stochastic_rounding": closed, "runs": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    lines = [f"Pure-bf16 training, scikit-learn digits, MLP 64-128-10, RMSprop lr={args.lr}, {args.steps} full-batch "
             f"steps, {args.seeds} seeds, backend {args.backend} (`python -m perf.stochastic_rounding`).", "",
             "| run | final train loss (mean) | per seed | test accuracy (mean) |", "|---|---|---|---|"]
    for name, r in results.items():
        f, a = r["final_train_loss"], r["test_accuracy"]
        lines.append(f"| {name} | {sum(f) / len(f):.4f} | {', '.join(f'{x:.4f}' for x in f)} | {sum(a) / len(a):.3f} |")
    lines += ["", f"Stochastic rounding closes {100 * closed:.0f}% of the bf16-nearest to fp32 gap in final train "
                  "loss."]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(lines[-1])
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.2))
        styles = {"fp32": dict(color="black", linestyle="--", linewidth=2.2, zorder=3),
                  "bf16 stochastic": dict(color="tab:green", linewidth=3, alpha=0.7)}
        for name, r in results.items():  # fp32 dashed on top: bf16 with stochastic rounding lies under it
            ax.plot(range(1, args.steps + 1), r["mean_curve"], label=name, **styles.get(name, {}))
        ax.set_xlabel("step")
        ax.set_ylabel("train loss (mean over seeds)")
        ax.set_yscale("log")
        ax.set_title("bf16 training: round-to-nearest vs stochastic rounding (digits MLP)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.out.with_suffix(".png"), dpi=110)
    except ImportError:
        print("matplotlib missing: no plot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
