"""RMSprop: a drop-in for torch.optim.RMSprop that runs one fused launch per tensor group."""

from __future__ import annotations

import contextlib
import functools
from itertools import chain
from operator import is_, itemgetter

import torch
from torch.optim import Optimizer
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

try:
    from torch._C._profiler import _RecordFunctionFast as _record_function
except ImportError:  # pragma: no cover - older torch
    from torch.autograd.profiler import record_function as _record_function

from . import backends, options
from . import state as state_policy
from ._contract import check_float32_range, validate_hyperparameters
from .functional import run_planned
from .in_backward import InBackward
from .plan import Plan, StepPlan, check_groups, per_call_views, structure

# values a step reads besides lr (compared by identity: a tensor lr must not be compared by value on the host);
# a change of anything structural re-plans first
_lr_of = itemgetter("lr")
_hyper_values = itemgetter(*(o.name for o in options.OPTIONS if o.kind == options.VALUE and o.name != "lr"))


# every framework's RMSprop class by name, filled by rmsprop_gpu/flavors.py (rmsprop_gpu.flavor(name))
FLAVORS: dict[str, type] = {}


def _with_step_hooks(step):
    """What torch.optim.Optimizer wraps every step() in (Optimizer.profile_hook_step): the global and the
    optimizer's own pre- and post-hooks, the profiler's record of the step and _optimizer_step_code; the record
    through the profiler's fast path (~0.3 us, record_function ~6 us: 5% of a warm step)."""

    @functools.wraps(step)
    def wrapper(*args, **kwargs):
        self = args[0]
        with contextlib.nullcontext() if torch.compiler.is_compiling() else _record_function(
                f"Optimizer.step#{type(self).__name__}.step"):
            for pre_hook in chain(_global_optimizer_pre_hooks.values(), self._optimizer_step_pre_hooks.values()):
                result = pre_hook(self, args, kwargs)
                if result is not None:
                    if isinstance(result, tuple) and len(result) == 2:
                        args, kwargs = result
                    else:
                        raise RuntimeError(f"{step} must return None or a tuple of (new_args, new_kwargs), but got "
                                           f"{result}.")
            out = step(*args, **kwargs)
            self._optimizer_step_code()
            for post_hook in chain(self._optimizer_step_post_hooks.values(), _global_optimizer_post_hooks.values()):
                post_hook(self, args, kwargs)
            return out

    wrapper.hooked = True  # torch's Optimizer then does not wrap it again
    return wrapper


class RMSprop(Optimizer):
    """torch.optim.RMSprop's arguments, defaults, validation, state keys and state_dict, fused.

    Keyword-only extensions (**ours): the options table's (rmsprop_gpu/options.py; README "Options"): eps inside
    the root, float32 state for 16-bit params, the backend, stochastic rounding and its seed, 8-bit state (codes
    with a scale per block of 16 elements, rmsprop_gpu/quantize.py; rmsprop_gpu.float_state_dict(opt) gives a
    state_dict torch.optim.RMSprop loads), the start value of square_avg and the other frameworks' switches (the
    classes of rmsprop_gpu/flavors.py set them).
      in_backward: update during loss.backward() (rmsprop_gpu/in_backward.py): params are stepped in buckets of
                   about bucket_mb as their grads arrive, and their grads released; step() then does nothing.
                   accumulation_steps=k updates on every k-th backward.
    foreach=False keeps torch's meaning of a per-tensor loop: one launch per tensor instead of per group.
    Step counters of CUDA params live on the GPU (as with torch's fused optimizers) so the kernel advances
    them without a host sync; a state_dict still loads into torch.optim.RMSprop and back.
    """

    _plan = None  # the step plan (rmsprop_gpu.plan), rebuilt when something it depends on changes
    _in_backward = None  # rmsprop_gpu.in_backward.InBackward when in_backward=True
    _step_supports_amp_scaling = True  # GradScaler hands grad_scale/found_inf to step(): unscale+skip in-kernel

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0, centered=False,
                 capturable=False, foreach=None, maximize=False, differentiable=False, *, in_backward=False,
                 bucket_mb=25, accumulation_steps=1, **ours):
        validate_hyperparameters(lr, alpha, eps, weight_decay, momentum)
        ours = options.accept(ours, options.EXTENSIONS, f"{type(self).__name__}()")
        defaults = {**options.GROUP_DEFAULTS, "lr": lr, "alpha": alpha, "eps": eps, "weight_decay": weight_decay,
                    "momentum": momentum, "centered": centered, "capturable": capturable, "foreach": foreach,
                    "maximize": maximize, "differentiable": differentiable, **ours}
        options.refuse_combinations(defaults)
        if in_backward and differentiable:
            raise ValueError("in_backward=True cannot be differentiable: the update runs inside backward")
        backends.requested_name(defaults["backend"])  # unknown names fail here, not at the first step
        self._in_backward = InBackward(self, bucket_mb, accumulation_steps) if in_backward else None
        super().__init__(params, defaults)

    # ---- other frameworks' RMSprop, in their own argument names and defaults: the classes of flavors.py, which
    # registers them in FLAVORS (flavors imports this module, never the reverse)
    @classmethod
    def keras(cls, params, *args, **kwargs) -> RMSprop:
        """Keras 3's RMSprop: rmsprop_gpu.KerasRMSprop (learning_rate, rho, ...)."""
        return FLAVORS["keras"](params, *args, **kwargs)

    @classmethod
    def tf1(cls, params, learning_rate, decay=0.9, momentum=0.0, epsilon=1e-10, centered=False, **ours) -> RMSprop:
        """TF1's RMSPropOptimizer: rmsprop_gpu.TF1RMSprop (this classmethod's positional order predates it: no
        use_locking)."""
        return FLAVORS["tf1"](params, learning_rate, decay=decay, momentum=momentum, epsilon=epsilon,
                              centered=centered, **ours)

    @classmethod
    def optax(cls, params, *args, **kwargs) -> RMSprop:
        """optax.rmsprop: rmsprop_gpu.OptaxRMSprop (learning_rate, decay, ...)."""
        return FLAVORS["optax"](params, *args, **kwargs)

    def __setstate__(self, state):
        super().__setstate__(state)
        self._plan = None
        for group in self.param_groups:  # a pickle from an older version: the options it lacks take defaults
            for key, default in options.GROUP_DEFAULTS.items():
                group.setdefault(key, default)

    def _gather(self, group, pending: dict, params=None, grads=None):
        """Params with grads (of the group, or these of it; grads by id(param) when given, else p.grad) and their
        state; new state goes to `pending`, committed only once all checks pass."""
        out = {k: [] for k in ("params", "grads", "square_avgs", "grad_avgs", "momentum_buffers", "steps", "dicts",
                               "index")}
        needed = state_policy.needed_keys(group)
        idle = []
        for i, p in enumerate(group["params"] if params is None else params):
            grad = p.grad if grads is None else grads[id(p)]
            if grad is None:
                idle.append(p)
                continue
            if grad.is_sparse:
                raise RuntimeError("RMSprop does not support sparse gradients")
            state = self.state.get(p, {})
            added = state_policy.new_entries(p, group, state, needed)
            if added:  # a copy with the new entries: the live state stays untouched until the commit
                state = pending[p] = {**state, **added}
            out["params"].append(p)
            out["index"].append(i)  # its position in the group (params=None) or in `params`
            out["dicts"].append(state)
            out["grads"].append(grad)
            out["square_avgs"].append(state["square_avg"])
            out["steps"].append(state["step"])
            if group["momentum"] > 0:
                out["momentum_buffers"].append(state["momentum_buffer"])
            if group["centered"]:
                out["grad_avgs"].append(state["grad_avg"])
        out["idle"] = idle
        return out

    @_with_step_hooks
    @torch.no_grad()
    def step(self, closure=None):
        """One fused RMSprop step for every param group; returns closure's loss when given. Under torch.compile
        the step is traced (no graph break) into one rmsprop_gpu::rmsprop_ custom op per param group."""
        if torch.compiler.is_compiling() and self._in_backward is None:
            return self._traced_step(closure)
        return self._eager_step(closure)  # in_backward: also under torch.compile (a graph break), as eager

    def _traced_step(self, closure=None):
        """What torch.compile traces: state created as in eager, then the custom op (rmsprop_gpu.ops) per param
        group. Every check runs inside the op at run time, per group (a failing group leaves earlier groups
        stepped: atomicity across groups is the eager path's)."""
        from . import ops  # noqa: F401  (registers torch.ops.rmsprop_gpu)

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        first = 0  # the position of the group's first param among all the optimizer's params
        for group in self.param_groups:
            pending: dict = {}
            t = self._gather(group, pending)
            stream_ids, first = [first + i for i in t["index"]], first + len(group["params"])
            for p, state in pending.items():
                self.state[p] = state
            if not t["params"]:
                continue
            if group["differentiable"]:
                raise RuntimeError("differentiable=True groups are not supported under torch.compile")
            lr = group["lr"]
            torch.ops.rmsprop_gpu.rmsprop_(
                t["params"], t["grads"], t["square_avgs"], t["grad_avgs"], t["momentum_buffers"], t["steps"],
                0.0 if isinstance(lr, torch.Tensor) else float(lr), lr if isinstance(lr, torch.Tensor) else None,
                float(group["alpha"]), float(group["eps"]), float(self._weight_decay(group)), float(group["momentum"]),
                bool(group["centered"]), bool(group["maximize"]), bool(group["capturable"]), group["backend"] or "",
                grad_scale, found_inf, options.switch_bits(group), int(group["sr_seed"]), stream_ids)
        return loss

    @torch._disable_dynamo  # eager only (step() never calls it while compiling); lazy: dynamo loads on first call
    def _eager_step(self, closure=None):
        if self._in_backward is not None:
            grad_scale = self.__dict__.pop("grad_scale", None)
            self.__dict__.pop("found_inf", None)
            self._in_backward.step_called(self, closure, grad_scale)
            return None
        health_check = getattr(self, "_accelerator_graph_capture_health_check", None) or getattr(
            self, "_cuda_graph_capture_health_check", None)
        if health_check is not None:
            health_check()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        try:
            plan = self.__dict__.get("_plan")
            lists = None if plan is None else plan.refresh(self.param_groups, self.state)
            if lists is None:
                self._plan = None  # a failed build leaves no plan behind
                plan, lists = self._build_plan()
                self._plan = plan
            self._run(plan, lists, grad_scale, found_inf)
        except BaseException:
            # GradScaler deletes these after a step that returns; after one that raises, they must not linger
            # and silently skip every later plain step
            self.__dict__.pop("grad_scale", None)
            self.__dict__.pop("found_inf", None)
            raise
        return loss

    def _stream_ids(self, params) -> list[int]:
        """Each param's random stream (stochastic rounding, 8-bit codes): its position among all the optimizer's
        params (its state_dict id), so the same whatever launch, bucket or compiled graph updates it."""
        pos = {id(p): k for k, p in enumerate(p for g in self.param_groups for p in g["params"])}
        return [pos[id(p)] for p in params]

    def _hyper(self, group, grad_scale=None, found_inf=None):
        return options.make(group["lr"], group["alpha"], group["eps"], self._weight_decay(group), group["momentum"],
                            group["centered"], group["maximize"], group["capturable"], grad_scale, found_inf,
                            group["sr_seed"], options.switch_bits(group))

    def _weight_decay(self, group):
        """The weight decay value a step uses (a flavour may derive it from others: timm's corrected decay)."""
        return group["weight_decay"]

    def _build_plan(self) -> tuple[StepPlan, dict]:
        """Every check of every group, then tables; new state is committed only when all of it passed. Returns the
        plan and this step's tensor lists."""
        pending: dict = {}
        sp = StepPlan()
        checked, gathered = [], []
        lists: dict = {"params": [], "grads": [], "square_avgs": [], "steps": []}
        first = 0  # the position of the group's first param among all the optimizer's params
        for gi, group in enumerate(self.param_groups):
            t = self._gather(group, pending)
            stream_ids, first = [first + i for i in t["index"]], first + len(group["params"])
            names = ()
            if group["differentiable"]:
                options.refuse_combinations(group)  # torch's own step runs none of our switches
                sp.reference.append(gi)
            elif t["params"]:
                validate_hyperparameters(group["lr"], group["alpha"], group["eps"], group["weight_decay"],
                                         group["momentum"], read_tensor_lr=not group["capturable"])
                names = ("square_avgs", "steps", *(("momentum_buffers",) if group["momentum"] > 0 else ()),
                         *(("grad_avgs",) if group["centered"] else ()))
                offsets = {n: len(lists.setdefault(n, [])) for n in ("params", "grads", *names)}
                checked += check_groups(
                    t["params"], t["grads"], t["square_avgs"], t["grad_avgs"], t["momentum_buffers"], t["steps"],
                    self._hyper(group), foreach=group["foreach"], backend=group["backend"], group_index=gi,
                    stream_ids=stream_ids, offsets=offsets)
                for n in ("params", "grads", *names):
                    lists[n] += t[n]
            if per_call_views(t["params"]):
                sp.cacheable = False  # the kernels see per-call views of these: check every step
            gathered.append((t, names))
        for gi, (group, (t, names)) in enumerate(zip(self.param_groups, gathered)):  # watched from now on
            if gi in sp.reference:
                sp.watch(group, [], [], [], ())
            else:
                sp.watch(group, t["params"], t["idle"], t["dicts"], names)
        sp.locate()
        if checked:  # one launch per layout across param groups, confirmed each step against tensors()
            flat, _ = sp.tensors()
            sp.plan = Plan(checked, lists, flat, sp.where)
        for p, state in pending.items():  # every check and table passed: commit new state
            self.state[p] = state
        sp.seal(self.state)
        return sp, lists

    def _run(self, plan: StepPlan, lists: dict, grad_scale, found_inf) -> None:
        amp = grad_scale is not None or found_inf is not None
        groups = self.param_groups
        values = list(map(_hyper_values, groups))
        lrs = list(map(_lr_of, groups))
        if amp or values != plan.last_values or not all(map(is_, lrs, plan.last_lrs)):
            # else the same values as last step: checked, and reused
            if plan.reference and amp:
                raise RuntimeError("differentiable=True groups cannot take GradScaler's grad_scale/found_inf")
            hypers = {}
            for e in plan.plan.entries if plan.plan is not None else ():  # every value checked before a write
                for gi in e.group_indices:
                    h = hypers.get(gi) or hypers.setdefault(gi, self._hyper(groups[gi], grad_scale, found_inf))
                    if e.group.param_dtype != "float64":
                        check_float32_range(h)
            # tensor alpha/eps/weight_decay/momentum: read every step (an in-place change keeps the same object)
            fresh = amp or any(isinstance(v, torch.Tensor) for vs in values for v in vs)
            plan.last_values, plan.last_lrs, plan.last_hypers = (None, (), None) if fresh else (values, lrs, hypers)
        else:
            hypers = plan.last_hypers
        if plan.plan is not None:
            plan.plan.run(lists, hypers)
        for gi in plan.reference:
            _reference_step(self, groups[gi])

    def add_param_group(self, param_group) -> None:
        super().add_param_group(param_group)
        self._plan = None
        if self.__dict__.get("_in_backward") is not None:
            self._in_backward.attach(self.param_groups[-1]["params"])

    def attach_ddp(self, ddp_model) -> None:
        """in_backward=True under DistributedDataParallel: DDP's comm hook all-reduces each bucket, then steps
        its params with the reduced grads (rmsprop_gpu/in_backward.py)."""
        if self._in_backward is None:
            raise RuntimeError("attach_ddp is for in_backward=True (a normal step() already sees reduced grads)")
        self._in_backward.attach_ddp(ddp_model)

    def _step_params(self, params: list, ib: InBackward, grads=None) -> None:
        """Step these params now (in_backward's bucket), each with its param group's options and values; grads:
        the grads to use (DDP's reduced bucket views), else p.grad."""
        ids = {id(p) for p in params}
        given = None if grads is None else {id(p): g for p, g in zip(params, grads)}
        # the optimizer has stepped: what torch's LR schedulers check before their step() (else they warn that
        # lr_scheduler.step() came before optimizer.step(), which in_backward never needs)
        self._opt_called = True
        for gi, group in enumerate(self.param_groups):
            part = [p for p in group["params"] if id(p) in ids and (given is not None or p.grad is not None)]
            if not part:
                continue
            pending: dict = {}
            t = self._gather(group, pending, part, given)
            self.state.update(pending)
            lists = {"params": t["params"], "grads": t["grads"], "square_avgs": t["square_avgs"],
                     "momentum_buffers": t["momentum_buffers"] or None, "grad_avgs": t["grad_avgs"] or None,
                     "steps": t["steps"]}
            key = (gi, tuple(map(id, t["params"])), structure(group))  # the plan confirms every tensor anyway
            hyper = self._hyper(group)
            validate_hyperparameters(group["lr"], group["alpha"], group["eps"], group["weight_decay"],
                                     group["momentum"], read_tensor_lr=not group["capturable"])
            plan = None if per_call_views(t["params"]) else ib.plans.get(key)
            ib.plans.put(key, run_planned(plan, lists, hyper, group["foreach"], group["backend"],
                                          self._stream_ids(t["params"])))

    def load_state_dict(self, state_dict) -> None:
        """torch's load_state_dict after torch's pre-hooks, refusing state that does not fit the params before
        anything is loaded; float32 state kept; steps of old checkpoints (numbers, int tensors) made float32."""
        state_dict = state_dict.copy()
        for hook in self._optimizer_load_state_dict_pre_hooks.values():  # run here: the checks see their result
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        groups = self.param_groups
        saved_groups = state_dict["param_groups"]
        if len(groups) != len(saved_groups) or any(
            len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved_groups)
        ):
            raise ValueError("loaded state dict has a different number of parameter groups or parameters")
        # a checkpoint without this class's own options (torch.optim.RMSprop's) keeps the ones this optimizer
        # was built with (state_bits, backend, ...) instead of their defaults
        saved_groups = state_dict["param_groups"] = [
            {**{k: g[k] for k in options.EXTENSIONS if k in g}, **s} for g, s in zip(groups, saved_groups)]
        state_policy.check_loaded(state_dict["state"], groups, saved_groups)
        hooks = self._optimizer_load_state_dict_pre_hooks
        self._optimizer_load_state_dict_pre_hooks = type(hooks)()  # already run above
        try:
            super().load_state_dict(state_dict)
        finally:
            self._optimizer_load_state_dict_pre_hooks = hooks
        self._plan = None
        state_policy.adopt_loaded(self.state, state_dict["state"], self.param_groups, saved_groups)


def _reference_step(opt: RMSprop, group) -> None:
    """A differentiable=True group: torch's own single-tensor RMSprop, grad enabled, on this optimizer's state
    (same state keys and state_dict), so code written for torch.optim.RMSprop(differentiable=True) runs."""
    from torch.optim.rmsprop import rmsprop as torch_rmsprop

    pending: dict = {}
    t = opt._gather(group, pending)
    opt.state.update(pending)
    if not t["params"]:
        return
    with torch.enable_grad():
        torch_rmsprop(t["params"], t["grads"], t["square_avgs"], t["grad_avgs"], t["momentum_buffers"],
                      t["steps"], foreach=False, maximize=bool(group["maximize"]), differentiable=True,
                      capturable=bool(group["capturable"]), has_complex=any(p.is_complex() for p in t["params"]),
                      lr=group["lr"], alpha=group["alpha"], eps=group["eps"],
                      weight_decay=group["weight_decay"], momentum=group["momentum"],
                      centered=bool(group["centered"]))
