"""The update inside backward: RMSprop(..., in_backward=True).

Each parameter's post-accumulate-grad hook marks its grad ready; ready params are collected in buckets of
about bucket_mb in the order their grads arrive, and a bucket is stepped (one fused launch per param group and
layout in it) as soon as it is full, then its grads are released (set to None). What is left when the backward
pass ends is stepped by a callback queued on the autograd engine. The grads of a whole model are never alive at
once: peak memory drops by up to the size of all gradients.

With DDP a grad is ready for the param hook before it is all-reduced: opt.attach_ddp(ddp_model) replaces the
param hooks by a DDP comm hook that all-reduces each DDP bucket and then steps its params with the reduced
grads (DDP keeps its grad buckets, so there is no memory to save, but the update overlaps the backward). In a
run with more than one rank, a backward without attach_ddp raises. FSDP2 (fully_shard: DTensor params) needs
nothing: it calls a sharded param's post-accumulate-grad hooks after the reduce-scatter, with the reduced shard
as its grad, so each rank updates its own shards as they arrive and frees their grads.

With accumulation_steps=k the update runs on every k-th backward (grads accumulate in between, as usual).
Each bucket runs through a plan cached per bucket (buckets repeat from step to step), which confirms every
tensor as the optimizer's step does, so a bucket step costs what a step of the optimizer costs.

Gradient clipping cannot work here: a global norm needs every grad before any update, and the grads are gone
when backward returns (torch.nn.utils.clip_grad_norm_ would find none and clip nothing). So clipping is refused:
torch.nn.utils.clip_grad_norm_ / clip_grad_value_ raise for params of an in_backward optimizer instead of
returning 0 (SB3's A2C / PPO and the HF Trainer clip by default: use in_backward=False there, or turn their
clipping off, e.g. HF's max_grad_norm=0).
"""

from __future__ import annotations

import functools
import weakref

import torch

from .plan import LRU

# id(param) -> (param, its InBackward), both weakly: torch's clipping refuses the params of a live in_backward
# optimizer
_NO_CLIPPING: dict[int, tuple[weakref.ref, weakref.ref]] = {}


def _owned(p) -> bool:
    refs = _NO_CLIPPING.get(id(p))
    return refs is not None and refs[0]() is p and refs[1]() is not None


def _guard_clipping() -> None:
    """Wrap torch.nn.utils' clip_grad_norm_ / clip_grad_value_ (once per process) so that they raise for params
    whose grads an in_backward optimizer frees during backward, instead of silently clipping nothing."""
    import torch.nn.utils as utils
    import torch.nn.utils.clip_grad as clip_grad

    for name in ("clip_grad_norm_", "clip_grad_norm", "clip_grad_value_"):
        orig = getattr(clip_grad, name, None)
        if orig is None or getattr(orig, "rmsprop_gpu_guard", False):
            continue

        @functools.wraps(orig)
        def guarded(parameters, *args, _orig=orig, _name=name, **kwargs):
            params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
            if _NO_CLIPPING and any(map(_owned, params)):
                raise RuntimeError(
                    f"torch.nn.utils.{_name}: these params belong to an RMSprop(in_backward=True), which updates them "
                    "during backward and frees their grads, so clipping would see no grads and clip nothing. "
                    "Clipping needs every grad before any update: use in_backward=False, or turn clipping off (SB3: "
                    "use in_backward=False; HF Trainer: max_grad_norm=0)")
            return _orig(params, *args, **kwargs)

        guarded.rmsprop_gpu_guard = True
        setattr(clip_grad, name, guarded)
        if getattr(utils, name, None) is orig:
            setattr(utils, name, guarded)


class InBackward:
    def __init__(self, opt, bucket_mb: float, accumulation_steps: int):
        if not bucket_mb > 0:
            raise ValueError(f"bucket_mb must be > 0, got {bucket_mb}")
        if int(accumulation_steps) != accumulation_steps or accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be a positive integer, got {accumulation_steps}")
        self._opt = weakref.ref(opt)  # the params' hooks must not keep the optimizer alive
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.accumulation_steps = int(accumulation_steps)
        self.handles: list = []
        self.hooked: set[int] = set()  # id() of the params with a hook (frozen params get one once they train)
        self.pending: list = []
        self.pending_bytes = 0
        self.flush_queued = False
        self.window: dict[int, torch.Tensor] = {}  # params with grads in this accumulation window, not yet stepped
        self.passes = 0  # backward passes of the current accumulation window done
        self.backwards = 0  # backward passes since the last opt.step()
        self.buckets = 0  # buckets stepped (tests and benchmarks read it)
        self.plans = LRU(4096)  # a plan per bucket part (no tensors held); buckets move when params gain grads
        self.warned = False
        self.ddp = None  # the DDP model whose comm hook drives the updates (attach_ddp)

    def attach(self, params) -> None:
        """Hooks on the params that train now; the others get theirs when they start training (adopt())."""
        _guard_clipping()
        params = list(params)
        for p in params:
            key = id(p)
            _NO_CLIPPING[key] = (weakref.ref(p, lambda _, k=key: _NO_CLIPPING.pop(k, None)), weakref.ref(self))
        if self.ddp is not None:
            return
        ref = self._opt

        def hook(p):
            opt = ref()
            if opt is not None:
                opt._in_backward._ready(p)

        for p in params:
            if p.requires_grad and id(p) not in self.hooked:
                self.handles.append(p.register_post_accumulate_grad_hook(hook))
                self.hooked.add(id(p))

    def adopt(self) -> None:
        """Params frozen when they were added that train now: hooked from now on, and a grad they got without a
        hook joins this accumulation window (it is stepped at the window's end like any other)."""
        opt = self._opt()
        if opt is None or self.ddp is not None:
            return
        late = [p for g in opt.param_groups for p in g["params"] if id(p) not in self.hooked and p.requires_grad]
        if late:
            self.attach(late)
            for p in late:
                if p.grad is not None:
                    self.window[id(p)] = p

    def attach_ddp(self, ddp_model) -> None:
        """Let DDP's buckets drive the updates: all-reduce, then step the bucket's params with the reduced grads."""
        if self.accumulation_steps != 1:
            raise ValueError("with DDP, accumulate with ddp_model.no_sync() instead of accumulation_steps")
        self.detach()
        self.ddp = ddp_model
        ddp_model.register_comm_hook(None, self._ddp_hook)

    def _ddp_hook(self, state, bucket):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def step_bucket(fut):
            opt = self._opt()
            if opt is not None:
                with torch.no_grad():
                    opt._step_params(bucket.parameters(), self, grads=bucket.gradients())
                self.buckets += 1
            return fut.value()

        return allreduce_hook(None, bucket).then(step_bucket)

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.hooked.clear()

    def _ready(self, p: torch.Tensor) -> None:
        dist = torch.distributed
        if (type(p).__name__ != "DTensor"  # FSDP2 calls the hook with the reduce-scattered shard
                and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            raise RuntimeError(
                "in_backward=True in a run with more than one rank: this grad is not all-reduced yet, so each rank "
                "would update with its local grads. With DDP call opt.attach_ddp(ddp_model) before training.")
        if not self.flush_queued:  # the end of this backward pass flushes what is left
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
            self.flush_queued = True
        if self.passes < self.accumulation_steps - 1:  # not the window's last backward: the grads accumulate
            self.window[id(p)] = p
            return
        self.window.pop(id(p), None)
        self.pending.append(p)
        self.pending_bytes += p.numel() * p.element_size()
        if self.pending_bytes >= self.bucket_bytes:
            self.flush()

    def _end_of_backward(self) -> None:
        self.flush_queued = False
        self.backwards += 1
        self.end_of_pass()

    def end_of_pass(self) -> None:
        """A backward pass ended: at the end of an accumulation window every param that got a grad in it is
        stepped (also one that missed the window's last pass), whatever is left in the last bucket included."""
        self.adopt()
        self.passes += 1
        if self.passes >= self.accumulation_steps:
            self.passes = 0
            for p in self.window.values():
                if p.grad is not None:
                    self.pending.append(p)
            self.window.clear()
        self.flush()

    @torch.no_grad()
    def flush(self) -> None:
        if not self.pending:
            return
        params, self.pending, self.pending_bytes = self.pending, [], 0
        opt = self._opt()
        if opt is None:
            return
        opt._step_params(params, self)
        for p in params:
            p.grad = None
        self.buckets += 1

    def step_called(self, opt, closure, grad_scale) -> None:
        """opt.step() with in_backward: nothing to do (say so once), or refuse what cannot have worked. A backward
        pass in which only params without a hook got grads (frozen when added, training now) queued no callback:
        it ends here."""
        if any(id(p) not in self.hooked and p.grad is not None and p.requires_grad
               for g in opt.param_groups for p in g["params"]) and self.ddp is None:
            self.backwards += 1
            self.end_of_pass()
        backwards, self.backwards = self.backwards, 0
        if closure is not None:
            raise RuntimeError("in_backward=True updates during backward: step(closure) cannot re-evaluate the loss")
        if grad_scale is not None:
            raise RuntimeError("in_backward=True cannot work with GradScaler: the update ran during backward, "
                               "before the grads could be unscaled and checked for inf/NaN (and it used scaled "
                               "grads). Use bf16 autocast without a scaler, or in_backward=False.")
        if self.accumulation_steps == 1 and backwards > 1:
            raise RuntimeError(f"{backwards} backward passes since the last step(): with in_backward=True each "
                               f"backward updates the params. For gradient accumulation pass "
                               f"accumulation_steps={backwards} to the optimizer.")
        if not self.warned:
            import warnings

            warnings.warn("rmsprop_gpu.RMSprop(in_backward=True): the update already ran during backward; "
                          "step() does nothing (this is said once)", stacklevel=3)
            self.warned = True
