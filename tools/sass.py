"""What the GPU will execute, read from SASS (nvdisasm output) without a GPU.

`hot_path` follows one kernel's control flow from entry to exit along the path a full, aligned chunk takes: the
one with the most 128-bit global stores and, among those, the fewest instructions, so the rarely taken branches
(IEEE sqrt/division slow-path calls, the unaligned tail loop, the step-counter bump of one thread) are left out.
Back edges are not followed (a loop on the hot path counts once). On that path it measures instructions before
the first 128-bit data load (the prologue: table lookups), instructions after it, and how many bytes are
requested before the first instruction that waits on a loaded value (one "wave" when every data load is issued
before the first wait).

`issue_share` turns instructions per element into the share of the SMs' instruction-issue capacity a kernel needs
to stream its bytes at a given bandwidth: every SM issues at most 4 warp instructions per cycle.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_LABEL = re.compile(r"^\s*([.$\w]+[\w$.]*):\s*$")
_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T\d]+\s+)?([A-Z][A-Z0-9_.]*)\s*(.*?)\s*;")
_TARGET = re.compile(r"`\(([^)]+)\)")
_REG = re.compile(r"(?<![\w.])-?\|?R(\d+)(?:\.(64|128))?")
# Ops with no register destination: every register operand is read.
_NO_DEST = ("ST", "STG", "STS", "STL", "RED", "BRA", "CALL", "EXIT", "RET", "BSSY", "BSYNC", "WARPSYNC", "BAR")


@dataclass
class Instr:
    addr: int
    pred: str | None
    op: str
    operands: str

    @property
    def base(self) -> str:
        return self.op.split(".")[0]

    def global_bytes(self) -> int:
        """Bytes moved per thread by a global load/store (0 for anything else)."""
        if self.base not in ("LDG", "STG", "LD", "ST"):
            return 0
        width = re.search(r"\.(128|64|U8|S8|U16|S16)\b", self.op)
        return {"128": 16, "64": 8, "U8": 1, "S8": 1, "U16": 2, "S16": 2}[width.group(1)] if width else 4

    def regs(self) -> tuple[set[int], set[int]]:
        """(registers written, registers read): the first operand is the destination unless the op has none."""
        parts = self.operands.split(",", 1)
        dest_part, src_part = (parts[0], parts[1] if len(parts) > 1 else "")
        if self.base in _NO_DEST:
            dest_part, src_part = "", self.operands
        width = 4 if ".128" in self.op else 2 if ".64" in self.op else 1

        def expand(text, dest):
            out = set()
            for m in _REG.finditer(text):
                r = int(m.group(1))
                n = {"64": 2, "128": 4}.get(m.group(2) or "", 1)
                stored = self.base in ("STG", "ST") and m.end() == len(text.rstrip())  # a store's data register
                if dest or stored:
                    n = max(n, width)
                out.update(range(r, r + n))
            return out

        return expand(dest_part, True), expand(src_part, False)


@dataclass
class Function:
    name: str
    instrs: list[Instr] = field(default_factory=list)
    labels: dict[str, int] = field(default_factory=dict)


def parse(sass: str) -> dict[str, Function]:
    """{kernel name: Function} from nvdisasm text (internal subroutines stay inside their caller's section)."""
    funcs: dict[str, Function] = {}
    current: Function | None = None
    for line in sass.splitlines():
        m = _LABEL.match(line)
        if m:
            label = m.group(1)
            if label.startswith(".text."):
                current = funcs[label[6:]] = Function(label[6:])
            elif current is not None:
                current.labels[label] = len(current.instrs)
            continue
        m = _INSTR.search(line)
        if m and current is not None:
            pred = m.group(2).strip() if m.group(2) else None
            current.instrs.append(Instr(int(m.group(1), 16), pred, m.group(3), m.group(4)))
    return funcs


def _successors(fn: Function, i: int) -> list[int]:
    ins = fn.instrs[i]
    nxt = [i + 1] if i + 1 < len(fn.instrs) else []
    if ins.base in ("EXIT", "RET"):
        return nxt if ins.pred else []
    if ins.base == "BRA":
        target = fn.labels[_TARGET.search(ins.operands).group(1)]
        conditional = ins.pred is not None or not ins.operands.startswith("`")
        return [target, *nxt] if conditional else [target]
    if ins.base in ("BRX", "JMX", "JMP"):
        raise ValueError(f"indirect branch in {fn.name} at {ins.addr:#x}: not analysed")
    return nxt


def _call_cost(fn: Function, ins: Instr) -> int:
    """A call's cost: the callee's instructions up to its first RET (only slow paths are called)."""
    start = fn.labels[_TARGET.search(ins.operands).group(1)]
    end = next(j for j in range(start, len(fn.instrs)) if fn.instrs[j].base == "RET")
    return end - start + 1


def hot_path(fn: Function) -> list[Instr]:
    """Instructions along the full-chunk path (see the module docstring), in execution order."""
    n = len(fn.instrs)
    best: dict[int, tuple[int, int]] = {}  # instruction index -> (128-bit stores, -instructions) to exit
    choice: dict[int, int | None] = {}
    for i in range(n - 1, -1, -1):
        ins = fn.instrs[i]
        own = (1 if ins.base == "STG" and ins.global_bytes() == 16 else 0,
               -(_call_cost(fn, ins) + 1 if ins.base == "CALL" else 1))
        options = [(best[s], s) for s in _successors(fn, i) if s > i and s in best]  # no back edges
        if ins.base in ("EXIT", "RET"):  # leaves here (a predicated exit may also fall through)
            options.append(((0, 0), None))
        elif not options:
            if _successors(fn, i):  # only back edges or subroutine code: not on a path to exit
                continue
            options = [((0, 0), None)]
        (tail, nxt) = max(options, key=lambda o: o[0])
        best[i] = (own[0] + tail[0], own[1] + tail[1])
        choice[i] = nxt
    path, i = [], 0
    while i is not None:
        path.append(fn.instrs[i])
        i = choice[i]
    return path


@dataclass
class PathStats:
    instructions: int  # on the hot path, per thread per chunk
    prologue: int  # before the first 128-bit data load
    data_loads: int  # 128-bit loads
    data_stores: int  # 128-bit stores
    narrow_global: int  # global loads/stores narrower than 128 bits after the first data load
    calls: int  # slow-path calls on the hot path (should be 0)
    bytes_before_first_wait: int  # 128-bit data bytes requested before the first use of a loaded value
    load_waves: int  # groups of data loads separated by a wait on loaded data (1 = all issued at once)
    opcodes: dict[str, int]


def path_stats(path: list[Instr]) -> PathStats:
    first = next((k for k, ins in enumerate(path) if ins.base in ("LDG", "LD") and ins.global_bytes() == 16),
                 len(path))
    body = path[first:]
    pending: set[int] = set()
    waves, in_wave, bytes_first, waited = 0, False, 0, False
    opcodes: dict[str, int] = {}
    for ins in path:
        opcodes[ins.base] = opcodes.get(ins.base, 0) + 1
    for ins in body:
        dest, src = ins.regs()
        if pending & src:  # waits on a loaded value
            pending.clear()
            waited, in_wave = True, False
        if ins.base in ("LDG", "LD") and ins.global_bytes() == 16:
            if not in_wave:
                waves, in_wave = waves + 1, True
            if not waited:
                bytes_first += 16
            pending |= dest
        else:
            pending -= dest
    return PathStats(
        instructions=len(path), prologue=first,
        data_loads=sum(1 for i in body if i.base in ("LDG", "LD") and i.global_bytes() == 16),
        data_stores=sum(1 for i in body if i.base in ("STG", "ST") and i.global_bytes() == 16),
        narrow_global=sum(1 for i in body if 0 < i.global_bytes() < 16),
        calls=sum(1 for i in path if i.base == "CALL"),
        bytes_before_first_wait=bytes_first, load_waves=waves, opcodes=opcodes,
    )


# ---------------------------------------------------------------- issue capacity and occupancy
@dataclass(frozen=True)
class Card:
    name: str
    sms: int
    clock_hz: float  # boost clock
    copy_bytes_per_s: float  # measured device-to-device copy bandwidth (read + write)


# Hopper SXM cards: 132 SMs at up to 1.98 GHz; copy bandwidth as measured by a large cudaMemcpy (about 90% of
# the HBM peak: 3.35 TB/s H100, 4.8 TB/s H200).
H100 = Card("H100 SXM", 132, 1.98e9, 3.0e12)
H200 = Card("H200 SXM", 132, 1.98e9, 4.3e12)
TARGET_BANDWIDTH = 0.92  # of copy bandwidth (issue 17's goal)
LOADED_LATENCY_S = 700e-9  # DRAM latency under a streaming load (Hopper, order of magnitude)


def bytes_in_flight_needed(card: Card) -> float:
    """Little's law: bytes each SM must have requested and not yet received to stream at copy bandwidth."""
    return card.copy_bytes_per_s * LOADED_LATENCY_S / card.sms


def issue_share(instr_per_elem: float, bytes_per_elem: float, card: Card, fraction: float = TARGET_BANDWIDTH) -> float:
    """Share of the card's issue slots (4 warp instructions per SM per cycle) needed to move `bytes_per_elem`
    per element at `fraction` of copy bandwidth while executing `instr_per_elem` thread instructions each."""
    elems_per_s = fraction * card.copy_bytes_per_s / bytes_per_elem
    return elems_per_s * instr_per_elem / 32 / (card.sms * 4 * card.clock_hz)


def warps_per_sm(registers: int, threads_per_block: int, shared_bytes: int = 0) -> int:
    """Resident warps per SM on sm_80/sm_90: 64K registers (allocated per warp in units of 256), at most 64
    warps and 32 blocks, 228 KiB of shared memory (Hopper; 164 KiB on A100: the report uses Hopper's)."""
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    warps_per_block = threads_per_block // 32
    by_regs = (65536 // per_warp) // warps_per_block
    by_smem = (228 * 1024) // shared_bytes if shared_bytes else 32
    return min(by_regs, 64 // warps_per_block, 32, by_smem) * warps_per_block
