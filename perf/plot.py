"""Plots from a benchmark data file (separate from measuring): GB/s vs size with the copy line, and speedup vs
torch foreach per workload.   python -m perf.plot perf/results/bench_cuda.json"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def plot(path: Path) -> list[Path]:
    """The plots of one data file; none (said in one line) where matplotlib is not installed, as on the GPU
    image: the data files are what matter there, plotted later with this script."""
    try:
        import matplotlib
    except ImportError:
        print(f"# no plots: matplotlib is not installed (later: python -m perf.plot {path})", file=sys.stderr)
        return []

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(Path(path).read_text())
    rows, env = [r for r in data["rows"] if r.get("gbps")], data["environment"]  # failed cases have no time
    title = f"RMSprop step, {env['gpu'] if 'none' not in env['gpu'] else 'CPU (not a GPU result)'}"
    out = []
    singles = [r for r in rows if r["kind"] == "single"]
    if singles:
        variants = sorted({r["variant"] for r in singles})
        ncol = min(3, len(variants))
        nrow = (len(variants) + ncol - 1) // ncol
        fig, axes = plt.subplots(nrow, ncol, figsize=(5.5 * ncol, 4 * nrow), squeeze=False)
        for ax in axes.flat[len(variants):]:
            ax.set_visible(False)
        for ax, variant in zip(axes.flat, variants):
            for prov in sorted({r["provider"] for r in singles}):
                pts = sorted((r["elements"], r["gbps"]) for r in singles if r["provider"] == prov
                             and r["variant"] == variant)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=prov)
            ax.axhline(data["copy_gbps"], color="k", linestyle="--", label="copy (100%)")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("elements (one tensor)")
            ax.set_ylabel("effective GB/s (minimal bytes / time)")
            ax.set_title(variant)
            ax.legend(fontsize=7)
        fig.suptitle(title)
        fig.tight_layout()
        p = Path(path).with_name(Path(path).stem + "_gbps.png")
        fig.savefig(p, dpi=110)
        out.append(p)
    multi = [r for r in rows if r["kind"] in ("model", "grid") and r.get("speedup_vs_foreach")]
    if multi:
        labels = sorted({(r["workload"], r["variant"]) for r in multi})
        provs = sorted({r["provider"] for r in multi})
        fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(labels) * len(provs) / 3), 4))
        width = 0.8 / len(provs)
        for i, prov in enumerate(provs):
            ys = [next((r["speedup_vs_foreach"] for r in multi if (r["workload"], r["variant"]) == lab
                        and r["provider"] == prov), 0) for lab in labels]
            ax.bar([k + i * width for k in range(len(labels))], ys, width, label=prov)
        ax.axhline(1.0, color="k", linewidth=0.8)
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(labels))])
        ax.set_xticklabels([f"{w}\n{v}" for w, v in labels], fontsize=7, rotation=45, ha="right")
        ax.set_ylabel("speedup vs torch foreach")
        ax.set_title(title)
        ax.legend(fontsize=7)
        fig.tight_layout()
        p = Path(path).with_name(Path(path).stem + "_speedup.png")
        fig.savefig(p, dpi=110)
        out.append(p)
    return out


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        for p in plot(Path(arg)):
            print(p)
