"""The options table: one row per option of the step, the only place an option's facts are written.

Every other module derives from it: the optimizer's defaults and the state_dict's extension keys, what a plan
treats as structural, the functional API's keywords, the custom op's switch mask, the per-step values (Hyper),
the kernels' flag bits (rmsprop_gpu/abi.py hands them to both kernels) and the combinations refused. Adding an
option: a row here, its math in the two kernels (kernels/rmsprop.py, kernels/rmsprop.cu) and in the torch path
(backends/torch_backend.py); a framework that turns it on names it in flavors.py.

Kinds:
  value   a number per param group, read from the hyper table every step (never compiles a kernel)
  switch  one per launch, a kernel flag bit: selects what is computed (structural: a change re-plans)
  state   decides which state tensors exist and in which format (structural)
  route   how the step runs: backend, one launch per tensor, torch's own differentiable step (structural)
  step    handed to one step (GradScaler's grad_scale / found_inf), not a param group option
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

VALUE, SWITCH, STATE, ROUTE, STEP = "value", "switch", "state", "route", "step"


def _seed(v) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not 0 <= v < 2**32:
        raise ValueError(f"Invalid sr_seed: {v!r} (an integer in [0, 2**32))")
    return int(v)


def _state_bits(v) -> int:
    if isinstance(v, bool) or v not in (8, 32):
        raise ValueError(f"state_bits must be 32 (float state) or 8 (8-bit blockwise state), got {v!r}")
    return int(v)


def _state_dtype(v):
    if v not in (None, torch.float32):
        raise ValueError(f"state_dtype must be None (the param's dtype) or torch.float32, got {v}")
    return v


def _initial_accumulator(v) -> float:
    if not 0.0 <= float(v) < float("inf"):
        raise ValueError(f"Invalid initial_accumulator_value: {v}")
    return float(v)


@dataclass(frozen=True)
class Option:
    name: str
    default: Any
    torch: bool  # torch.optim.RMSprop has it (else an extension: a torch checkpoint lacks it)
    kind: str
    flag: str | None = None  # the kernels' flag constant it sets (bit in FLAG_BITS)
    per_slot: bool = False  # flag set when any slot (param group) of the launch uses it; else launch-wide
    reads_steps: bool = False  # when on, the kernels read each param's step counter (needs state_steps)
    torch_step: bool = True  # torch's own (differentiable) step can run its non-default values
    check: Callable | None = None  # normalizes a value, raises ValueError on a bad one
    doc: str = ""

    def on(self, value) -> bool:
        """Whether this value turns the option's flag on."""
        return value is not None if self.kind == STEP else bool(value)


OPTIONS = (
    # torch.optim.RMSprop's own (its defaults; lr...momentum are validated with torch's messages in _contract)
    Option("lr", 1e-2, True, VALUE),
    Option("alpha", 0.99, True, VALUE),
    Option("eps", 1e-8, True, VALUE),
    Option("weight_decay", 0.0, True, VALUE, "WEIGHT_DECAY", per_slot=True, doc="g += wd * p"),
    Option("momentum", 0.0, True, VALUE, doc="> 0 keeps a momentum_buffer (structural)"),
    Option("centered", False, True, STATE, doc="keeps grad_avg; divides by the variance"),
    Option("capturable", False, True, ROUTE),
    Option("foreach", None, True, ROUTE, doc="False: one launch per tensor (torch's per-tensor loop)"),
    Option("maximize", False, True, VALUE, "MAXIMIZE", per_slot=True),
    Option("differentiable", False, True, ROUTE, doc="runs torch's own step (autograd records it)"),
    # ours
    Option("eps_in_sqrt", False, False, SWITCH, "EPS_IN_SQRT", torch_step=False,
           doc="divide by sqrt(v + eps) (TF1, Keras, optax, the seed formula) instead of sqrt(v) + eps"),
    Option("lr_in_momentum", False, False, SWITCH, "LR_IN_MOMENTUM", torch_step=False,
           doc="buf = m*buf + lr*g/d; p -= buf (TF1, Keras, optax) instead of p -= lr*buf"),
    Option("nesterov", False, False, SWITCH, "NESTEROV", torch_step=False,
           doc="p -= lr*g/d + m*buf (optax's nesterov trace); needs momentum > 0 and lr_in_momentum"),
    Option("decoupled_weight_decay", False, False, SWITCH, "DECOUPLED_WD", torch_step=False,
           doc="p -= p*wd*lr before the update (Keras) instead of g += wd*p"),
    Option("raw_grad_momentum", False, False, SWITCH, "RAW_GRAD_MOMENTUM", torch_step=False,
           doc="buf = m*buf + g; p -= lr*buf/d (fastai: a momentum of raw grads, divided after)"),
    Option("bias_correction", False, False, SWITCH, "BIAS_CORRECTION", reads_steps=True, torch_step=False,
           doc="the averages / (1 - alpha^t) (optax)"),
    Option("stochastic_rounding", False, False, SWITCH, "STOCHASTIC_ROUNDING", reads_steps=True, torch_step=False,
           doc="16-bit stores round stochastically (unbiased) from a stream of (sr_seed, step, tensor, element)"),
    Option("sr_seed", 0, False, VALUE, check=_seed, doc="the stochastic-rounding stream's seed, [0, 2**32)"),
    Option("state_dtype", None, False, STATE, check=_state_dtype,
           doc="torch.float32: float32 state for 16-bit params (default: the param's dtype)"),
    Option("state_bits", 32, False, STATE, torch_step=False, check=_state_bits,
           doc="8: state as 8-bit codes with a scale per block of 16 (rmsprop_gpu/quantize.py)"),
    Option("initial_accumulator_value", 0.0, False, STATE, torch_step=False, check=_initial_accumulator,
           doc="square_avg's start value (TF1: 1.0)"),
    Option("backend", None, False, ROUTE, doc='"auto" (or $RMSPROP_GPU_BACKEND), "triton", "cupy", "torch"'),
    # handed to one step by GradScaler (device scalars)
    Option("grad_scale", None, False, STEP, "GRAD_SCALE", doc="grads are divided by it"),
    Option("found_inf", None, False, STEP, "FOUND_INF", doc="nonzero: the whole step is skipped, counters too"),
)
BY_NAME = {o.name: o for o in OPTIONS}

# the kernels' flag bits (a launch's FLAGS): every flagged option's, plus one a launch decides by itself. The
# bits are part of the kernel ABI (rmsprop_gpu/abi.py) and of compiled-kernel names (the static report): append.
FLAG_BITS = {name: 1 << i for i, name in enumerate((
    "MAXIMIZE", "WEIGHT_DECAY", "EPS_IN_SQRT", "LR_ON_DEVICE", "GRAD_SCALE", "FOUND_INF", "LR_IN_MOMENTUM",
    "NESTEROV", "DECOUPLED_WD", "BIAS_CORRECTION", "STOCHASTIC_ROUNDING", "RAW_GRAD_MOMENTUM"))}
LR_ON_DEVICE = FLAG_BITS["LR_ON_DEVICE"]  # lr is a tensor on the params' device: the kernels read it there
assert {o.flag for o in OPTIONS if o.flag} | {"LR_ON_DEVICE"} == set(FLAG_BITS)

SWITCHES = tuple(o.name for o in OPTIONS if o.kind == SWITCH)
EXTENSIONS = tuple(o.name for o in OPTIONS if not o.torch and o.kind != STEP)  # ours, kept in param groups
GROUP_DEFAULTS = {o.name: o.default for o in OPTIONS if o.kind != STEP}  # a param group's defaults
# what the functional API takes besides torch's keywords: ours that a step reads (state is the caller's tensors)
FUNCTIONAL = tuple(o.name for o in OPTIONS if not o.torch and o.kind in (SWITCH, VALUE))
# options that change what a step launches or allocates (momentum > 0 and the lr's kind are added by the plan)
STRUCTURAL = tuple(o.name for o in OPTIONS if o.kind in (SWITCH, STATE, ROUTE))


class Hyper(NamedTuple):
    """The values and switches of one step (a NamedTuple: immutable, cheap to make every step). The switch fields
    are SWITCHES, in the table's order; make() builds one from keywords."""

    lr: float | torch.Tensor
    alpha: float
    eps: float
    weight_decay: float
    momentum: float
    centered: bool
    maximize: bool
    capturable: bool = False
    grad_scale: Any = None
    found_inf: Any = None
    sr_seed: int = 0
    switches: int = 0  # the flag bits of the switches that are on (one per launch)

    def __getattr__(self, name):  # hyper.nesterov etc.: a switch by its name
        o = BY_NAME.get(name)
        if o is None or o.kind != SWITCH:
            raise AttributeError(name)
        return bool(self.switches & FLAG_BITS[o.flag])


def _scalar(v) -> float:
    return float(v.detach()) if isinstance(v, torch.Tensor) else float(v)


def switch_bits(values) -> int:
    """The flag bits of the switches on in `values` (a mapping of option names)."""
    bits = 0
    for name in SWITCHES:
        if values.get(name):
            bits |= FLAG_BITS[BY_NAME[name].flag]
    return bits


def switches_of(bits: int) -> dict:
    return {name: bool(bits & FLAG_BITS[BY_NAME[name].flag]) for name in SWITCHES}


def make(lr, alpha, eps, weight_decay, momentum, centered=False, maximize=False, capturable=False, grad_scale=None,
         found_inf=None, sr_seed=0, switches: int = 0, **named) -> Hyper:
    """Normalized run-time values (Python floats and bools; numpy scalars and 1-element tensors read; a 0-dim lr
    tensor). Switches as bits, or by name in `named` (checked: an unknown keyword is a TypeError)."""
    if named:
        switches |= switch_bits(accept(named, SWITCHES, "a step"))
    if isinstance(lr, torch.Tensor):
        lr = lr.reshape(()) if lr.dim() else lr  # a view: a scheduler's in-place update stays visible
    else:
        lr = float(lr)
    return Hyper(lr, _scalar(alpha), _scalar(eps), _scalar(weight_decay), _scalar(momentum), bool(centered),
                 bool(maximize), bool(capturable), grad_scale, found_inf, _seed(sr_seed), switches)


def accept(values: dict, allowed, where: str) -> dict:
    """`values` checked against the table: every name one of `allowed` (else a TypeError, as for an unknown
    keyword), every value through its option's check."""
    out = {}
    for name, v in values.items():
        if name not in allowed:
            raise TypeError(f"{where} got an unexpected keyword argument {name!r}")
        o = BY_NAME[name]
        out[name] = o.check(v) if o.check is not None else bool(v) if o.kind == SWITCH else v
    return out


def refuse_combinations(values) -> None:
    """The combinations no step can run, before anything is allocated or written. values: a param group (option
    name -> value) or one step's Hyper; what it lacks takes the default."""
    if isinstance(values, dict):
        get = lambda name: values.get(name, BY_NAME[name].default)  # noqa: E731
    else:
        get = lambda name: getattr(values, name, BY_NAME[name].default)  # noqa: E731
    if get("nesterov") and not (get("momentum") > 0 and get("lr_in_momentum")):
        raise ValueError("nesterov=True needs momentum > 0 and lr_in_momentum=True (optax's trace)")
    if get("raw_grad_momentum") and get("lr_in_momentum"):
        raise ValueError("raw_grad_momentum=True (fastai) and lr_in_momentum=True (TF1) are two forms of the momentum "
                         "buffer: choose one")
    if get("differentiable"):
        bad = [f"{o.name}={get(o.name)!r}" for o in OPTIONS if not o.torch_step and get(o.name) != o.default]
        if bad:
            raise ValueError(f"differentiable=True runs torch's own step, which has no {', '.join(bad)}")


def refuse_for_tensors(hyper: Hyper, dtypes: list[tuple[str, str]], has_steps: bool) -> None:
    """What a step's tensors refuse: options whose kernels read step counters need them; stochastic rounding
    needs something 16-bit to round. dtypes: (param dtype, state dtype) of each tensor group."""
    for o in OPTIONS:
        if o.reads_steps and getattr(hyper, o.name) and not has_steps:
            raise ValueError(f"{o.name}=True needs state_steps (the kernels read each param's step count)")
    if not has_steps and any(sd == "uint8" for _, sd in dtypes):
        raise ValueError("8-bit state needs state_steps (each param's step count seeds the stochastic rounding of "
                         "its codes)")
    if hyper.stochastic_rounding and not any(d in ("float16", "bfloat16") for pair in dtypes for d in pair):
        raise ValueError("stochastic_rounding=True rounds 16-bit (float16 / bfloat16) params or state; this param "
                         "group has none")


def reads_steps(values, eight_bit: bool) -> bool:
    """Whether the kernels read a param's step counter (float64, on the param's device; the host advances it
    after the launch): options with reads_steps, and 8-bit state's stochastic codes. float64 counts every step
    exactly (float32 stops at 2**24, and the random streams would repeat from there)."""
    bits = values.switches if isinstance(values, Hyper) else switch_bits(values)  # a Hyper or a param group
    return eight_bit or bool(bits & READS_STEPS_BITS)


READS_STEPS_BITS = sum(FLAG_BITS[o.flag] for o in OPTIONS if o.reads_steps)


def launch_flags(hypers: list[Hyper], lr_on_device: bool) -> int:
    """A launch's FLAGS. Its slots share the switches, the lr's kind and GradScaler's scalars (the plan's launch
    key); per-slot options (maximize, weight decay: values in the hyper table) are on when any slot uses them."""
    h = hypers[0]
    flags = h.switches | (LR_ON_DEVICE if lr_on_device else 0)
    for o in _FLAGGED_VALUES:
        if any(o.on(getattr(x, o.name)) for x in (hypers if o.per_slot else hypers[:1])):
            flags |= FLAG_BITS[o.flag]
    return flags


_FLAGGED_VALUES = tuple(o for o in OPTIONS if o.flag and o.kind != SWITCH)
