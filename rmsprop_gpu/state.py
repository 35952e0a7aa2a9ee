"""State and step-counter policy: which state a param gets, in which dtype and format, where its step counter
lives, and how a loaded state_dict (ours, torch's, an older one, 8-bit or float) becomes this optimizer's state.

The optimizer (optimizer.py) asks this module and nothing else; the kernels' reading of step counters is the
options table's fact (options.reads_steps).
"""

from __future__ import annotations

import torch

from . import options, quantize
from ._contract import STATE_KEYS

_SIXTEEN_BIT = (torch.float16, torch.bfloat16)


def needed_keys(group) -> list[str]:
    """The state tensors a param of this group keeps: square_avg, and momentum_buffer / grad_avg when asked."""
    return ["square_avg"] + ["momentum_buffer"] * bool(group["momentum"] > 0) + ["grad_avg"] * bool(group["centered"])


def state_dtype(p: torch.Tensor, group) -> torch.dtype:
    """The param's dtype (as torch), or float32 for 16-bit params when the group asks (state_dtype)."""
    sd = group.get("state_dtype")
    return sd if (sd is not None and p.dtype in _SIXTEEN_BIT) else p.dtype


def quantized(p: torch.Tensor, group) -> bool:
    """Whether p's new state is 8-bit: state_bits=8 and p large enough (refused for params it cannot take)."""
    if group.get("state_bits", 32) != 8:
        return False
    quantize.check_quantizable_dtype(p)
    return quantize.quantizable(p)


def step_dtype(p: torch.Tensor, group) -> torch.dtype:
    """torch's: float64 under torch.set_default_dtype(torch.float64), else float32 (the kernel advances a float32
    counter itself; the host a float64 one). float64 where the kernels read the counter (options.reads_steps):
    their random streams are keyed by it, and float32 stops counting at 2**24."""
    if torch.get_default_dtype() == torch.float64 or options.reads_steps(group, quantized(p, group)):
        return torch.float64
    return torch.float32


def step_device(p: torch.Tensor, group) -> torch.device:
    """On the param's device for CUDA params or capturable groups (the kernel advances it, no host sync), else
    on the CPU as torch keeps it."""
    return p.device if (group["capturable"] or p.device.type == "cuda") else torch.device("cpu")


def new_entries(p: torch.Tensor, group, state: dict, needed: list[str]) -> dict:
    """The entries p's state lacks (a step counter, state tensors), new; {} when it has them all."""
    added = {}
    if "step" not in state:
        added["step"] = torch.zeros((), dtype=step_dtype(p, group), device=step_device(p, group))
    for key in needed:
        if key in state:
            continue
        fill = group.get("initial_accumulator_value", 0.0) if key == "square_avg" else 0.0
        if quantized(p, group):
            added[key] = quantize.zeros_state(p, fill, key)
            continue
        added[key] = torch.zeros_like(p, dtype=state_dtype(p, group), memory_format=torch.preserve_format)
        if fill:  # TF1, timm, SB3, MindSpore: 1; optax: initial_scale
            added[key].fill_(fill)
    return added


def check_loaded(saved_state: dict, groups: list, saved_groups: list) -> None:
    """Refuse, before anything is loaded, state that does not fit the params: unknown ids or keys, shapes, 8-bit
    state of the wrong size or for params 8-bit state cannot take, non-scalar steps."""
    params_by_id = {pid: p for g, s in zip(groups, saved_groups) for pid, p in zip(s["params"], g["params"])}
    group_by_id = {pid: s for s in saved_groups for pid in s["params"]}
    for pid, st in saved_state.items():
        p = params_by_id.get(pid)
        if p is None:
            raise ValueError(f"loaded state dict has state for unknown param id {pid}")
        if any(key in st for key in STATE_KEYS):
            quantized(p, group_by_id[pid])  # refuses params 8-bit state cannot take
        unknown = set(st) - {"step", *STATE_KEYS}
        if unknown:
            raise ValueError(f"loaded state for param {pid} has unknown keys {sorted(unknown)}")
        for key in STATE_KEYS:
            if key not in st:
                continue
            if quantize.is_quantized(st[key]):  # 8-bit state: flat codes and scales
                need = quantize.q8_nbytes(quantize.real_numel(p))
                if tuple(st[key].shape) != (need,):
                    raise ValueError(f"loaded {key} of param {pid} is 8-bit state of shape "
                                     f"{tuple(st[key].shape)}; the param needs ({need},)")
            elif tuple(st[key].shape) != tuple(p.shape):
                raise ValueError(f"loaded {key} of param {pid} has shape {tuple(st[key].shape)}, "
                                 f"the param {tuple(p.shape)}")
        if "step" in st and torch.is_tensor(st["step"]) and st["step"].numel() != 1:
            raise ValueError(f"loaded step of param {pid} is not a scalar")


def adopt_loaded(live_state, saved_state: dict, groups: list, saved_groups: list) -> None:
    """After torch's load_state_dict: each param's state in the format its group asks (8-bit encoded or decoded,
    float32 state kept for 16-bit params), step counters of the dtype and device a new step would make (old
    checkpoints' numbers and int tensors included)."""
    for g, s in zip(groups, saved_groups):
        for pid, p in zip(s["params"], g["params"]):
            st = saved_state.get(pid, {})
            live = live_state.get(p)
            if live is None:
                continue
            saved = {k: st[k] for k in STATE_KEYS if k in st}
            if quantized(p, g):  # 8-bit: the saved bytes (torch cast them to the param's dtype), or
                saved = quantize.q8_state(saved, p, g["centered"])  # float state encoded
            elif any(map(quantize.is_quantized, saved.values())):  # 8-bit saved, float kept: decoded
                saved = quantize.float_state(saved, p, g["centered"], state_dtype(p, g))
            for key, x in saved.items():
                if quantize.is_quantized(x) or state_dtype(p, g) != p.dtype or x is not st[key]:
                    live[key] = x.to(device=p.device, dtype=x.dtype if quantize.is_quantized(x) else
                                     state_dtype(p, g), copy=x is st[key])
            if "step" in live:
                step, dtype, device = live["step"], step_dtype(p, g), step_device(p, g)
                if not torch.is_tensor(step):
                    live["step"] = torch.tensor(float(step), dtype=dtype, device=device)
                elif step.dtype != dtype or step.device != device:
                    live["step"] = step.to(device=device, dtype=dtype).reshape(())


def float_state_dict(optimizer) -> dict:
    """optimizer.state_dict() with every 8-bit state tensor decoded to float32 in its param's shape (and layout),
    so that torch.optim.RMSprop (or this class with state_bits=32) loads it. The way back needs no helper:
    RMSprop(..., state_bits=8).load_state_dict(sd) encodes float state."""
    sd = optimizer.state_dict()
    params = {pid: p for g, s in zip(optimizer.param_groups, sd["param_groups"])
              for pid, p in zip(s["params"], g["params"])}
    state = {}
    centered = {pid: s["centered"] for s in sd["param_groups"] for pid in s["params"]}
    for pid, st in sd["state"].items():
        state[pid] = quantize.float_state(st, params[pid], centered[pid])
    # no state_bits: whoever loads it keeps its own (an 8-bit optimizer encodes the float state again)
    return {"state": state, "param_groups": [{k: v for k, v in s.items() if k != "state_bits"}
                                             for s in sd["param_groups"]]}
