"""Hardware counters of both kernels on a GPU (Nsight Compute), to check the static report's model against the card.

    python3 -m perf.hw_counters [--json out.json]    # runs itself under `ncu` when ncu is installed

For each layout it launches (2**24 elements, torch's defaults) it reads from ncu: warp instructions executed
(-> thread instructions per element, the static report's `instr_per_elem`), issue-slot activity, and DRAM
throughput and bytes. Without ncu (not part of the GPU image unless the CUDA toolkit is) it says so and exits 0:
the GPU check records that and goes on.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
N = 2**24
CASES = [("float32", "float32", False, False), ("bfloat16", "bfloat16", False, False),
         ("bfloat16", "float32", True, True), ("float32", "float32", True, True)]
METRICS = ("smsp__inst_executed.sum", "smsp__issue_active.avg.pct_of_peak_sustained_active",
           "dram__throughput.avg.pct_of_peak_sustained_elapsed", "dram__bytes_read.sum", "dram__bytes_write.sum",
           "gpu__time_duration.sum")


def find_ncu() -> str | None:
    for path in (shutil.which("ncu"), "/usr/local/cuda/bin/ncu", "/opt/nvidia/nsight-compute/ncu"):
        if path and os.path.exists(path):
            return path
    return None


def child() -> None:
    """The launches ncu profiles: one warm-up and one measured step per backend and layout."""
    import torch

    import rmsprop_gpu

    for backend in ("triton", "cupy"):
        for pd, sd, mom, cen in CASES:
            p = torch.randn(N, device="cuda").to(getattr(torch, pd))
            opt = rmsprop_gpu.RMSprop([p], lr=1e-3, momentum=0.9 if mom else 0.0, centered=cen, backend=backend,
                                      state_dtype=torch.float32 if sd != pd else None)
            p.grad = torch.randn_like(p)
            opt.step()
            torch.cuda.synchronize()
            print(f"CASE {backend} {pd}/{sd} {'m' if mom else ''}{'c' if cen else ''}", flush=True)


def parse(text: str) -> list[dict]:
    """ncu --csv rows -> one dict per profiled kernel launch, with the metrics as floats."""
    start = text.find('"ID"')
    if start < 0:
        return []
    launches: dict[str, dict] = {}
    for row in csv.DictReader(io.StringIO(text[start:])):
        rec = launches.setdefault(row["ID"], {"kernel": row["Kernel Name"]})
        value = row["Metric Value"].replace(",", "")
        try:
            rec[row["Metric Name"]] = float(value)
        except ValueError:
            rec[row["Metric Name"]] = value
    out = []
    for rec in launches.values():
        if "rmsprop" not in rec["kernel"] or "smsp__inst_executed.sum" not in rec:
            continue
        rec["instr_per_elem"] = round(rec["smsp__inst_executed.sum"] * 32 / N, 1)
        out.append(rec)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child()
        return 0
    ncu = find_ncu()
    if ncu is None:
        result = {"ncu": "not found (Nsight Compute is not installed on this machine): no hardware counters"}
    else:
        cmd = [ncu, "--csv", "--metrics", ",".join(METRICS), "--kernel-name", "regex:rmsprop",
               "--launch-skip", "0", sys.executable, "-m", "perf.hw_counters", "--child"]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
        result = {"ncu": ncu, "returncode": res.returncode, "launches": parse(res.stdout),
                  "stderr_tail": res.stderr[-2000:]}
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
