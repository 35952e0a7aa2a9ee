"""8-bit blockwise state (state_bits=8) against 32-bit state: bytes, training, and the error of one step.

    python -m perf.state_bits [--steps 200] [--seeds 3] [--backend torch] [--out perf/results/state_bits_cpu]

1. State bytes per parameter: measured on the trained MLP's optimizer, and computed for real models' parameter
   shapes (perf/models.py) with the 4096-element threshold, for each variant (v; v + momentum; v + momentum +
   grad_avg).
2. Training: scikit-learn's digits (shipped inside the package), an MLP 64-256-256-10 (the two large weights get
   8-bit state, the last layer and the biases keep 32-bit), full-batch cross-entropy, RMSprop lr=1e-4 for `steps`
   steps, per variant and seed, state_bits 32 vs 8. Goal: final train loss within 2%.
3. One step's error against the float64 oracle, from the state the 32-bit run reached: the new state (8-bit:
   decoded) and the update, relative to the oracle's, for 32-bit and 8-bit state.
Writes <out>.json, <out>.md and <out>.png and prints the tables.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

import rmsprop_gpu  # noqa: E402
from perf.models import MODELS  # noqa: E402
from perf.stochastic_rounding import digits, digits_run_args  # noqa: E402
from rmsprop_gpu import quantize  # noqa: E402

VARIANTS = {"plain": dict(), "momentum": dict(momentum=0.9), "centered + momentum": dict(momentum=0.9, centered=True)}


def model_bytes_per_param(shapes, n_state: int, bits: int) -> float:
    numel = [torch.Size(s).numel() for s in shapes]
    if bits == 32:
        return 4.0 * n_state
    per = sum(quantize.q8_nbytes(n) if n >= quantize.Q8_MIN_NUMEL else 4 * n for n in numel)
    return n_state * per / sum(numel)


def make_model(seed: int):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 256),
                               torch.nn.Tanh(), torch.nn.Linear(256, 10))


def train(variant: dict, bits: int, seed: int, steps: int, lr: float, backend: str, data) -> dict:
    (xtr, ytr), (xte, yte) = data
    model = make_model(seed)
    opt = rmsprop_gpu.RMSprop(model.parameters(), lr=lr, backend=backend, state_bits=bits, **variant)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(xtr), ytr)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = torch.nn.functional.cross_entropy(model(xtr), ytr).item()
        acc = (model(xte).argmax(1) == yte).float().mean().item()
    params = list(model.parameters())
    state_bytes = sum(t.numel() * t.element_size() for p in params for k, t in opt.state[p].items() if k != "step")
    return {"losses": losses, "final_train_loss": final, "test_accuracy": acc, "model": model, "opt": opt,
            "state_bytes_per_param": state_bytes / sum(p.numel() for p in params)}


def one_step_error(run: dict, variant: dict, lr: float, data) -> dict:
    """From the 32-bit run's state and weights: one step with 32-bit state, one with that state encoded to 8 bits,
    against the float64 oracle of the 32-bit state. Relative errors of the large weights' update and new state."""
    (xtr, ytr), _ = data
    model, opt = run["model"], run["opt"]
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(xtr), ytr).backward()
    out = {"update_32": [], "update_8": [], "square_avg_32": [], "square_avg_8": []}
    hyper = dict(lr=lr, alpha=0.99, eps=1e-8, momentum=variant.get("momentum", 0.0),
                 centered=variant.get("centered", False))
    for p in model.parameters():
        if p.numel() < quantize.Q8_MIN_NUMEL:
            continue
        st = opt.state[p]
        keys = ["square_avg"] + ["momentum_buffer"] * (hyper["momentum"] > 0) + ["grad_avg"] * hyper["centered"]
        # the float64 oracle
        p64, g64 = p.detach().double().clone(), p.grad.double()
        s64 = {k: st[k].double().clone() for k in keys}
        rmsprop_gpu.rmsprop([p64], [g64], [s64["square_avg"]], [s64["grad_avg"]] if "grad_avg" in s64 else None,
                            [s64["momentum_buffer"]] if "momentum_buffer" in s64 else None, backend="torch", **hyper)
        for bits in (32, 8):
            q = p.detach().clone()
            s = {k: st[k].clone() for k in keys}
            if bits == 8:
                s = quantize.q8_state(s, p, hyper["centered"])
            rmsprop_gpu.rmsprop([q], [p.grad], [s["square_avg"]], [s["grad_avg"]] if "grad_avg" in s else None,
                                [s["momentum_buffer"]] if "momentum_buffer" in s else None, [st["step"].clone()],
                                backend="torch", **hyper)
            want_upd = p64 - p.detach().double()
            got_upd = q.double() - p.detach().double()
            out[f"update_{bits}"].append(((got_upd - want_upd).norm() / want_upd.norm()).item())
            v = quantize.float_state(s, p, hyper["centered"])["square_avg"]  # torch's meaning (v)
            out[f"square_avg_{bits}"].append(((v.double() - s64["square_avg"]).norm()
                                              / s64["square_avg"].norm()).item())
    return {k: max(v) for k, v in out.items()}


def main(argv=None) -> int:
    args = digits_run_args(argv, __doc__.splitlines()[0], steps=200, lr=1e-4, smoke_steps=10,
                           out_name="state_bits_cpu")
    data = digits()
    results = {}
    for vname, variant in VARIANTS.items():
        n_state = 1 + ("momentum" in variant) + bool(variant.get("centered"))
        entry = {"models_bytes_per_param": {
            m: {bits: round(model_bytes_per_param(fn(), n_state, bits), 4) for bits in (32, 8)}
            for m, fn in MODELS.items()}}
        for bits in (32, 8):
            runs = [train(variant, bits, s, args.steps, args.lr, args.backend, data) for s in range(args.seeds)]
            entry[bits] = {
                "final_train_loss": [r["final_train_loss"] for r in runs],
                "test_accuracy": [r["test_accuracy"] for r in runs],
                "state_bytes_per_param": runs[0]["state_bytes_per_param"],
                "mean_curve": [sum(r["losses"][i] for r in runs) / len(runs) for i in range(args.steps)],
            }
            if bits == 32:
                entry["one_step_error"] = one_step_error(runs[0], variant, args.lr, data)
        m32 = sum(entry[32]["final_train_loss"]) / args.seeds
        m8 = sum(entry[8]["final_train_loss"]) / args.seeds
        entry["final_loss_ratio"] = m8 / m32
        results[vname] = entry
        print(f"{vname:20s} final train loss 32-bit {m32:.4f}, 8-bit {m8:.4f} ({100 * (m8 / m32 - 1):+.2f}%); "
              f"state bytes/param {entry[32]['state_bytes_per_param']:.3f} -> {entry[8]['state_bytes_per_param']:.3f}"
              f"; one-step update error 32-bit {entry['one_step_error']['update_32']:.1e}, "
              f"8-bit {entry['one_step_error']['update_8']:.1e}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    summary = {"steps": args.steps, "seeds": args.seeds, "lr": args.lr, "backend": args.backend,
               "variants": {k: {str(b): v for b, v in e.items()} for k, e in results.items()}}
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    lines = [f"8-bit vs 32-bit RMSprop state (`python -m perf.state_bits`): scikit-learn digits, MLP 64-256-256-10, "
             f"lr={args.lr}, {args.steps} full-batch steps, {args.seeds} seeds, backend {args.backend}. 8-bit state: "
             "codes + one scale byte per 16 elements (1.0625 bytes per element and state tensor); tensors under "
             f"{quantize.Q8_MIN_NUMEL} elements keep 32-bit state.", "",
             "## Training", "",
             "| variant | final train loss 32-bit | 8-bit | 8-bit / 32-bit | test acc 32-bit | 8-bit | "
             "state bytes/param (MLP) 32-bit | 8-bit |", "|---|---|---|---|---|---|---|---|"]
    for vname, e in results.items():
        f32, f8 = e[32]["final_train_loss"], e[8]["final_train_loss"]
        a32, a8 = e[32]["test_accuracy"], e[8]["test_accuracy"]
        lines.append(f"| {vname} | {sum(f32) / len(f32):.4f} | {sum(f8) / len(f8):.4f} | {e['final_loss_ratio']:.4f} "
                     f"| {sum(a32) / len(a32):.3f} | {sum(a8) / len(a8):.3f} | {e[32]['state_bytes_per_param']:.3f} "
                     f"| {e[8]['state_bytes_per_param']:.3f} |")
    lines += ["", "## State bytes per parameter of real models (computed from their shapes)", "",
              "| variant | " + " | ".join(MODELS) + " |", "|---|" + "---|" * len(MODELS)]
    for vname, e in results.items():
        lines.append(f"| {vname} | " + " | ".join(
            f"{e['models_bytes_per_param'][m][32]:.0f} -> {e['models_bytes_per_param'][m][8]:.3f}" for m in MODELS)
            + " |")
    lines += ["", "## One step against the float64 oracle (large weights; relative L2 error, worst tensor)", "",
              "| variant | update, 32-bit state | update, 8-bit state | square_avg, 32-bit | square_avg, 8-bit |",
              "|---|---|---|---|---|"]
    for vname, e in results.items():
        o = e["one_step_error"]
        lines.append(f"| {vname} | {o['update_32']:.1e} | {o['update_8']:.1e} | {o['square_avg_32']:.1e} "
                     f"| {o['square_avg_8']:.1e} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.2))
        colors = dict(zip(VARIANTS, ("tab:blue", "tab:orange", "tab:green")))
        for vname, e in results.items():
            steps = range(1, args.steps + 1)
            ax.plot(steps, e[32]["mean_curve"], color=colors[vname], linewidth=3, alpha=0.45, label=f"{vname} 32-bit")
            ax.plot(steps, e[8]["mean_curve"], color=colors[vname], linestyle="--", label=f"{vname} 8-bit")
        ax.set_xlabel("step")
        ax.set_ylabel("train loss (mean over seeds)")
        ax.set_yscale("log")
        ax.set_title("digits MLP: 8-bit vs 32-bit state")
        ax.legend(fontsize=8)
        names = list(MODELS)
        width = 0.13
        for k, (vname, e) in enumerate(results.items()):
            for j, bits in enumerate((32, 8)):
                xs = [i + (2 * k + j - 2.5) * width for i in range(len(names))]
                bx.bar(xs, [e["models_bytes_per_param"][m][bits] for m in names], width, color=colors[vname],
                       alpha=0.4 if bits == 32 else 1.0, label=f"{vname} {bits}-bit")
        bx.set_xticks(range(len(names)), names, fontsize=8)
        bx.set_ylabel("optimizer state bytes per parameter")
        bx.set_title("state memory of real models")
        bx.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(args.out.with_suffix(".png"), dpi=110)
    except ImportError:
        print("matplotlib missing: no plot")
    return 0


if __name__ == "__main__":
    sys.exit(main())
