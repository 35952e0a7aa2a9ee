"""Static report of both kernels, no GPU needed: registers, spills, load/store width, bytes per element.

CUDA C: NVRTC (cuda-bindings) compiles kernels/rmsprop.cu to PTX and, with ptxas -v, to SASS for sm_80/sm_90.
Triton: triton.compile ahead of time for the same targets; ptxas -v (shipped with Triton) on its PTX.
Bytes per element are counted from the fast path's 128-bit global loads and stores in the PTX and compared
with the minimum (every input read once, every output written once).

    python -m rmsprop_gpu.kernel_report [--arch 80 90] [--json out.json] [--markdown out.md]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from .backends._tables import BLOCK

ARCHS = (80, 90)
LAYOUTS = {"plain": (False, False), "momentum": (True, False), "centered": (False, True),
           "centered_momentum": (True, True)}
DTYPES = (("float32", "float32"), ("float16", "float16"), ("float16", "float32"),
          ("bfloat16", "bfloat16"), ("bfloat16", "float32"))
SIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
CUDA_THREADS = 256  # kernels/rmsprop.cu: 8 elements per thread per chunk
# Spills the report accepts, by "kernel arch" (owned by the kernel-budget issue, 16). ptxas keeps few registers
# live across the calls to the IEEE sqrt/division slow paths (-ftz=false, -prec-div/-prec-sqrt, as torch
# computes) and stores what else is live to the stack; which variants do so has moved with every change of the
# source (ptxas's choice is not monotone). Today: none. Any spill not listed here fails the report.
KNOWN_SPILLS: dict[str, int] = {}

_VEC_LD = re.compile(r"\bld\.global(?:\.\w+)*\.v(\d)\.(?:b|u|f|s)(\d+)")
_VEC_ST = re.compile(r"\bst\.global(?:\.\w+)*\.v(\d)\.(?:b|u|f|s)(\d+)")
_LOCAL = re.compile(r"\b(?:ld|st)\.local\b")


def minimum_bytes(param_dtype: str, state_dtype: str, momentum: bool, centered: bool) -> tuple[int, int]:
    """(loaded, stored) bytes per element when each input is read and each output written exactly once."""
    n_state = 1 + momentum + centered
    return 2 * SIZE[param_dtype] + n_state * SIZE[state_dtype], SIZE[param_dtype] + n_state * SIZE[state_dtype]


def ptx_traffic(ptx: str, elems_per_thread: int) -> dict:
    """Vector width and per-element bytes of the vectorized (fast) path of one kernel's PTX."""
    loads = [int(n) * int(b) // 8 for n, b in _VEC_LD.findall(ptx)]
    stores = [int(n) * int(b) // 8 for n, b in _VEC_ST.findall(ptx)]
    return {
        "vector_bits": 8 * max(loads + stores, default=0),
        "load_bytes_per_elem": sum(loads) / elems_per_thread,
        "store_bytes_per_elem": sum(stores) / elems_per_thread,
        "local_memory_ops": len(_LOCAL.findall(ptx)),
    }


def parse_ptxas(log: str) -> dict[str, dict]:
    """{function: {registers, spill_bytes}} from ptxas -v output."""
    out, current = {}, None
    for line in log.splitlines():
        m = re.search(r"Function properties for (\w+)|Compiling entry function '(\w+)'", line)
        if m:
            current = m.group(1) or m.group(2)
            out.setdefault(current, {"registers": None, "spill_bytes": 0})
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current:
            out[current]["spill_bytes"] = int(m.group(1)) + int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m and current:
            out[current]["registers"] = int(m.group(1))
    return out


def _split_entries(ptx: str) -> dict[str, str]:
    parts = re.split(r"(?=^\.visible \.entry |^\.entry )", ptx, flags=re.M)
    out = {}
    for part in parts:
        m = re.match(r"(?:\.visible )?\.entry (\w+)", part)
        if m:
            out[m.group(1)] = part
    return out


# ---------------------------------------------------------------- CUDA C through NVRTC
def _nvrtc(source: str, opts: list[str]) -> tuple[object, str]:
    from cuda.bindings import nvrtc

    err, prog = nvrtc.nvrtcCreateProgram(source.encode(), b"rmsprop.cu", 0, [], [])
    (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), [o.encode() for o in opts])
    _, n = nvrtc.nvrtcGetProgramLogSize(prog)
    log = b" " * n
    nvrtc.nvrtcGetProgramLog(prog, log)
    log = log.decode(errors="replace").rstrip("\x00")
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise RuntimeError(f"NVRTC failed ({err}) with {opts}:\n{log}")
    return prog, log


def nvrtc_version() -> str:
    from cuda.bindings import nvrtc

    _, major, minor = nvrtc.nvrtcVersion()
    return f"{major}.{minor}"


def cuda_report(archs=ARCHS) -> list[dict]:
    from cuda.bindings import nvrtc

    from .backends.cupy_backend import NVRTC_OPTIONS, kernel_name, kernel_source

    source = kernel_source()
    rows = []
    for arch in archs:
        prog, _ = _nvrtc(source, [f"--gpu-architecture=compute_{arch}", *NVRTC_OPTIONS])
        _, n = nvrtc.nvrtcGetPTXSize(prog)
        ptx = b" " * n
        nvrtc.nvrtcGetPTX(prog, ptx)
        entries = _split_entries(ptx.decode(errors="replace"))
        _, log = _nvrtc(source, [f"--gpu-architecture=sm_{arch}", *NVRTC_OPTIONS, "--ptxas-options=-v"])
        sass = parse_ptxas(log)
        for layout, (mom, cen) in LAYOUTS.items():
            for pd, sd in DTYPES:
                name = kernel_name(pd, sd, mom, cen)
                rows.append(_row("cupy", name, arch, pd, sd, layout, mom, cen, entries[name], sass[name],
                                 BLOCK // CUDA_THREADS))
    return rows


def _row(backend, name, arch, pd, sd, layout, mom, cen, ptx, sass, elems_per_thread) -> dict:
    lo, st = minimum_bytes(pd, sd, mom, cen)
    return {"backend": backend, "kernel": name, "arch": f"sm_{arch}", "params": pd, "state": sd,
            "variant": layout, **sass, **ptx_traffic(ptx, elems_per_thread),
            "min_load_bytes": lo, "min_store_bytes": st}


# ---------------------------------------------------------------- Triton ahead of time
def _ptxas(arch: int) -> str:
    """The ptxas Triton itself uses for this arch (it ships two; the PTX version must match)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(arch).path


def triton_report(archs=ARCHS, flags: int = 0) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: ahead-of-time compilation needs the compiled kernel")
    import triton
    from triton.backends.compiler import GPUTarget

    from .backends.triton_backend import NUM_WARPS, constexprs
    from .kernels.rmsprop import _rmsprop_kernel

    sig = {"tensors": "*i64", "blocks": "*i64", "hyper_ptrs": "*i64", "hyper_vals": "*fp32",
           "grad_scale_ptr": "*fp32", "found_inf_ptr": "*fp32"}
    pointer_args = [i for i, t in enumerate(sig.values()) if t.startswith("*")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            for layout, (mom, cen) in LAYOUTS.items():
                for pd, sd in DTYPES:
                    cx = constexprs(pd, sd, flags, mom, cen)
                    src = triton.compiler.ASTSource(
                        fn=_rmsprop_kernel, signature={**sig, **{k: "constexpr" for k in cx}}, constexprs=cx,
                        attrs={(i,): [["tt.divisibility", 16]] for i in pointer_args},
                    )
                    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                              options={"num_warps": NUM_WARPS, "enable_fp_fusion": True})
                    ptx = compiled.asm["ptx"]
                    path = Path(tmp) / "k.ptx"
                    path.write_text(ptx)
                    target = re.search(r"^\.target (\w+)", ptx, re.M).group(1)  # sm_90a on Hopper
                    res = subprocess.run([_ptxas(arch), f"-arch={target}", "-v", str(path), "-o", str(path) + ".o"],
                                         capture_output=True, text=True, check=True)
                    sass = next(iter(parse_ptxas(res.stdout + res.stderr).values()))
                    name = f"_rmsprop_kernel[{pd}/{sd}/{layout}]"
                    rows.append(_row("triton", name, arch, pd, sd, layout, mom, cen, ptx, sass,
                                     BLOCK // (32 * NUM_WARPS)))
    return rows


# ---------------------------------------------------------------- output
COLUMNS = ("backend", "arch", "variant", "params", "state", "registers", "spill_bytes", "local_memory_ops",
           "vector_bits", "load_bytes_per_elem", "min_load_bytes", "store_bytes_per_elem", "min_store_bytes")


def markdown(rows: list[dict]) -> str:
    head = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    return head + "".join("| " + " | ".join(str(r[c]) for c in COLUMNS) + " |\n" for r in rows)


def _triton_warps() -> int:
    from .backends.triton_backend import NUM_WARPS

    return NUM_WARPS


def versions() -> dict:
    out = {"python": sys.version.split()[0]}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        pass
    with contextlib.suppress(Exception):  # cuda-bindings missing
        out["nvrtc"] = nvrtc_version()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    ap.add_argument("--backend", choices=["cupy", "triton", "both"], default="both")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args(argv)
    rows = []
    if args.backend in ("cupy", "both"):
        rows += cuda_report(args.arch)
    if args.backend in ("triton", "both"):
        rows += triton_report(args.arch)
    table = markdown(rows)
    print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"versions": versions(), "rows": rows}, indent=1))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(
            f"Static kernel report (no GPU needed; `python -m rmsprop_gpu.kernel_report`). Versions: {versions()}.\n"
            f"Bytes per element are counted from the 128-bit global loads/stores of the fast path "
            f"(per thread: {BLOCK // CUDA_THREADS} elements in CUDA C, {BLOCK // 32 // _triton_warps()} in Triton); "
            f"min_* is one read of every input and one write of "
            f"every output.\n\n" + table
        )
    bad = [r for r in rows if (r["spill_bytes"] and KNOWN_SPILLS.get(f"{r['kernel']} {r['arch']}") != r["spill_bytes"])
           or r["local_memory_ops"] or r["vector_bits"] != 128
           or r["load_bytes_per_elem"] != r["min_load_bytes"] or r["store_bytes_per_elem"] != r["min_store_bytes"]]
    for r in bad:
        print(f"NOT AT THE MINIMUM: {r['backend']} {r['kernel']} {r['arch']}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
