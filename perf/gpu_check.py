"""One prepared command for a lent GPU: environment, the GPU test suite, a focused benchmark, and the static
kernel report with the machine's own Triton. `make gpu-check` runs it there; `make gpu-check-cpu` rehearses it
on the CPU (kernels through the Triton interpreter and the g++ build of the .cu, tiny sizes).

    python3 -m perf.gpu_check             # GPU machine: the machine's python3 and packages, no downloads
    python3 -m perf.gpu_check --dry-run   # CPU rehearsal of every stage (CI runs it)

Results go to $OUT when set (the device tool brings that folder back), else perf/results/gpu/ (dry run:
perf/results/cpu/gpu_check/). Every stage runs in its own process under its own timeout; a stage that fails or
times out is recorded and the next one runs. summary.json is rewritten after every stage and the benchmark
rewrites its data after every case, so a run cut short keeps what it measured. At most 8 files are written
(the device tool brings back 8): summary.json, gpu_check.log, bench.{json,csv,md}, bench_gbps.png,
bench_speedup.png, static_report.json (hardware counters, when ncu is installed, go into summary.json).
Budget: about 6 minutes on an H100.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# seconds per stage on the GPU; the dry run on a 2-core CPU gets DRY_RUN_FACTOR times as long
STAGES = {"install": 60, "environment": 30, "tests": 150, "bench": 120, "static_report": 120, "hw_counters": 45}
DRY_RUN_FACTOR = 4


def environment() -> dict:
    """What the run depends on: GPU, driver, CUDA, library versions, compilers the JIT needs, free memory."""
    import torch

    env = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "host": platform.node(),
           "python": sys.version.split()[0], "executable": sys.executable, "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    for mod in ("triton", "cupy", "numpy", "rmsprop_gpu", "pytest", "hypothesis", "matplotlib"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as e:  # report, never stop: a missing package is a finding
            env[mod] = f"unavailable ({type(e).__name__}: {e})"
    if torch.cuda.is_available():
        env["gpus"] = []
        for i in range(torch.cuda.device_count()):
            pr = torch.cuda.get_device_properties(i)
            free, total = torch.cuda.mem_get_info(i)
            env["gpus"].append({"name": pr.name, "capability": f"{pr.major}.{pr.minor}",
                                "multiprocessors": pr.multi_processor_count,
                                "l2_bytes": getattr(pr, "L2_cache_size", None),
                                "memory_free_gib": round(free / 2**30, 1), "memory_total_gib": round(total / 2**30, 1)})
        try:
            import cupy

            env["cupy_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
            env["cupy_driver"] = cupy.cuda.runtime.driverGetVersion()
        except Exception as e:
            env["cupy_runtime"] = f"unavailable ({type(e).__name__}: {e})"
    smi = shutil.which("nvidia-smi")
    if smi:
        q = "name,driver_version,memory.total,memory.used,clocks.sm,clocks.mem,clocks.max.sm,power.draw,temperature.gpu"
        res = subprocess.run([smi, f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True, text=True)
        env["nvidia_smi"] = res.stdout.strip() or res.stderr.strip()
    env["compilers"] = {}
    for tool in ("cc", "gcc", "g++", "nvcc", "ptxas", "cuobjdump", "nvdisasm", "ncu"):
        path = shutil.which(tool)
        version = None
        if path:
            res = subprocess.run([path, "--version"], capture_output=True, text=True)
            version = (res.stdout or res.stderr).strip().splitlines()[-1:] or None
        env["compilers"][tool] = {"path": path, "version": version[0] if version else None}
    try:
        import rmsprop_gpu

        env["backends"] = rmsprop_gpu.available_backends()
    except Exception as e:
        env["backends"] = f"unavailable ({type(e).__name__}: {e})"
    res = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    env["commit"] = res.stdout.strip() or None
    return env


class Runner:
    def __init__(self, out: Path, dry_run: bool):
        self.out, self.dry_run = out, dry_run
        self.log = out / "gpu_check.log"
        self.summary = {"started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                        "dry_run": dry_run, "out": str(out), "stages": []}
        self.work = Path(tempfile.mkdtemp(prefix="gpu_check_"))  # files that need not come back
        # TORCHINDUCTOR_COMPILE_THREADS=1: torch 2.11's inductor compile-worker pool once hung 300 s at exit
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", TORCHINDUCTOR_COMPILE_THREADS="1")
        self.env.pop("TRITON_INTERPRET", None)  # only the dry run interprets, and it says so itself
        if dry_run:
            self.env["RMSPROP_GPU_CHECK_DEVICE"] = "cpu"

    def write(self) -> None:
        tmp = self.out / "summary.json.tmp"
        tmp.write_text(json.dumps(self.summary, indent=1, default=str))
        tmp.replace(self.out / "summary.json")

    def stage(self, name: str, cmd: list[str], after=None) -> dict:
        limit = STAGES[name] * (DRY_RUN_FACTOR if self.dry_run else 1)
        rec = {"stage": name, "command": " ".join(cmd), "timeout_s": limit}
        t0 = time.time()
        print(f"== {name} (at most {limit} s): {rec['command']}", flush=True)
        with self.log.open("a") as log:
            log.write(f"\n===== {name}: {rec['command']}\n")
            log.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=limit)
                rec["status"] = "ok" if rc == 0 else "failed"
            except subprocess.TimeoutExpired:
                # SIGINT first: pytest and the benchmark then write what they have (junit xml, data files)
                os.killpg(proc.pid, signal.SIGINT)
                try:
                    rc = proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    rc = proc.wait()
                rec["status"] = "timeout"
        rec.update(returncode=rc, seconds=round(time.time() - t0, 1))
        if after is not None:
            try:
                rec.update(after())
            except Exception as e:
                rec["after_error"] = f"{type(e).__name__}: {e}"
        self.summary["stages"].append(rec)
        self.write()
        print(f"   {rec['status']} in {rec['seconds']} s", flush=True)
        return rec


def install(work: Path) -> int:
    """The package for the later stages, with no network and whatever build tools the image has: an editable
    install when pip can build one (setuptools >= 77), else a staged copy of what the wheel holds (rmsprop_gpu
    with kernels/ inside) put on PYTHONPATH. Says in one line what it found and did; writes the PYTHONPATH to use
    (empty for the editable install) to work/pythonpath."""
    found = {}
    for mod in ("setuptools", "wheel", "pip", "cuda.bindings"):
        try:
            found[mod] = __import__(mod, fromlist=["__version__"]).__version__
        except Exception:
            found[mod] = "missing"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", "."],
                         cwd=ROOT, capture_output=True, text=True)
    (work / "pythonpath").write_text("")
    have = ", ".join(f"{k} {v}" for k, v in found.items())
    if res.returncode == 0:
        print(f"install: editable ({have})")
        return 0
    staged = work / "site"
    shutil.rmtree(staged, ignore_errors=True)
    shutil.copytree(ROOT / "rmsprop_gpu", staged / "rmsprop_gpu", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "kernels", staged / "rmsprop_gpu" / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    (work / "pythonpath").write_text(str(staged))
    last = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["?"]
    print(f"install: pip could not build an editable install (it needs setuptools >= 77; found {have}: {last[0]}); "
          f"running from a staged copy of the package instead: {staged}")
    return 0


def junit_summary(path: Path) -> dict:
    if not path.exists():
        return {"tests": "no junit file (pytest did not finish)"}
    root = ET.parse(path).getroot()
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    problems = []
    for case in root.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        kids = {c.tag: c for c in case}
        if "failure" in kids or "error" in kids:
            key = "failed" if "failure" in kids else "errors"
            counts[key] += 1
            node = kids.get("failure", kids.get("error"))
            problems.append({"test": name, "message": (node.get("message") or "")[:600]})
        elif "skipped" in kids:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return {"tests": counts, "problems": problems}


def bench_summary(path: Path) -> dict:
    if not path.exists():
        return {"bench": "no data file"}
    data = json.loads(path.read_text())
    rows = data["rows"]
    return {"bench": {"copy_gbps": data["copy_gbps"], "cases": len(rows),
                      "failed": [f"{r['provider']} {r['variant']} {r['workload']}: {r['error']}"
                                 for r in rows if r.get("error")]}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="rehearse every stage on the CPU")
    ap.add_argument("--out", type=Path, help="results folder (default $OUT, else perf/results/gpu/)")
    ap.add_argument("--environment-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--install-into", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--skip", nargs="*", default=[], choices=list(STAGES), help="stages to leave out")
    args = ap.parse_args(argv)
    if args.environment_only:
        print(json.dumps(environment(), indent=1, default=str))
        return 0
    if args.install_into:
        return install(args.install_into)
    default = ROOT / "perf" / "results" / ("cpu/gpu_check" if args.dry_run else "gpu")
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else default)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("summary.json", "gpu_check.log", "bench.json", "bench.csv", "bench.md", "bench_gbps.png",
                 "bench_speedup.png", "static_report.json"):
        (out / name).unlink(missing_ok=True)
    r = Runner(out, args.dry_run)
    py = sys.executable
    t_start = time.time()

    if "install" not in args.skip:
        if args.dry_run:  # make's venv already holds an editable install; prove the import instead
            r.stage("install", [py, "-c", "import rmsprop_gpu.kernels, rmsprop_gpu; print(rmsprop_gpu.__file__)"])
        else:  # no network on the GPU machine: its own packages, no build isolation, no dependencies
            r.stage("install", [py, "-m", "perf.gpu_check", "--install-into", str(r.work)])
            staged = (r.work / "pythonpath").read_text() if (r.work / "pythonpath").exists() else ""
            if staged:
                r.env["PYTHONPATH"] = os.pathsep.join([staged, r.env.get("PYTHONPATH", "")]).rstrip(os.pathsep)

    if "environment" not in args.skip:
        env_file = r.work / "environment.json"

        def env_after():
            return {"environment": json.loads(env_file.read_text())} if env_file.exists() else {}

        r.stage("environment", ["bash", "-c", f"{py} -m perf.gpu_check --environment-only > {env_file}"], env_after)

    if "tests" not in args.skip:
        junit = r.work / "tests.xml"
        r.stage("tests", [py, "-m", "pytest", "tests/gpu", "--confcutdir=tests/gpu", "-q", "-rfEs", "-p",
                          "no:cacheprovider", f"--junitxml={junit}", "-W", "ignore::DeprecationWarning"],
                lambda: junit_summary(junit))

    if "bench" not in args.skip:
        limit = STAGES["bench"] * (DRY_RUN_FACTOR if args.dry_run else 1)
        deadline = time.time() + limit - 25  # no new case in the last 25 s: room to write and plot
        cmd = [py, "-m", "perf.bench", "--gpu-check", "--out", str(out), "--stem", "bench", "--deadline", str(deadline)]
        if args.dry_run:
            cmd += ["--dry-run", "--device", "cpu"]
        r.stage("bench", cmd, lambda: bench_summary(out / "bench.json"))
        if (out / "bench.json").exists() and not (out / "bench_gbps.png").exists():  # cut short before plotting
            from perf.plot import plot

            plot(out / "bench.json")

    if "static_report" not in args.skip:  # the machine's Triton (3.6 on the GPU image) beside the committed one
        r.stage("static_report", [py, "-m", "tools.kernel_report", "--flag-sets", "defaults",
                                  "--json", str(out / "static_report.json")])

    if "hw_counters" not in args.skip and not args.dry_run:  # ncu, when installed: the static model on the card
        counters = r.work / "hw_counters.json"
        r.stage("hw_counters", [py, "-m", "perf.hw_counters", "--json", str(counters)],
                lambda: {"hw_counters": json.loads(counters.read_text())} if counters.exists() else {})

    r.summary["seconds"] = round(time.time() - t_start, 1)
    r.write()
    print("\n== gpu check summary")
    for st in r.summary["stages"]:
        extra = st.get("tests") or (st.get("bench", {}).get("cases") if isinstance(st.get("bench"), dict) else "")
        print(f"  {st['stage']:14s} {st['status']:8s} {st['seconds']:7.1f} s  {extra if extra else ''}")
        for p in st.get("problems", [])[:20]:
            print(f"      FAILED {p['test']}: {p['message'][:200]}")
        for f in (st.get("bench", {}).get("failed", []) if isinstance(st.get("bench"), dict) else [])[:20]:
            print(f"      FAILED {f[:200]}")
    print(f"  results in {out} ({r.summary['seconds']} s)")
    shutil.rmtree(r.work, ignore_errors=True)
    return 0 if all(st["status"] == "ok" for st in r.summary["stages"]) else 1


if __name__ == "__main__":
    sys.exit(main())
