"""Every RMSprop people train with, as a class their tools accept: params first, torch's `lr=`, and the
framework's own keyword names and defaults. Each maps its framework's options onto the options table
(rmsprop_gpu/options.py), so all of them run in the same fused kernels.

    rmsprop_gpu.flavor("sb3")          # stable_baselines3 ... RMSpropTFLike: SB3's optimizer_class takes it
    rmsprop_gpu.flavor("timm")(model.parameters(), lr=0.016, alpha=0.9, eps=1e-3, momentum=0.9)

What each class reproduces (the framework's source as released, named per class) is tested in
tests/test_flavors.py against the released code (timm, SB3) or a float64 transcription of it. Options a class
cannot run are refused with an error naming them, never accepted and ignored. Every class also takes this
package's own keywords (backend, state_bits, in_backward, ...): `**ours`.
"""

from __future__ import annotations

import torch

from .optimizer import FLAVORS, RMSprop


def _lr(cls, lr, framework_lr, framework_name: str, default):
    """torch's `lr=` or the framework's own name for it (not both); `default` None: one of them is required."""
    if lr is not None and framework_lr is not None:
        raise TypeError(f"{cls.__name__}() got both lr and {framework_name}: pass one")
    value = lr if lr is not None else framework_lr if framework_lr is not None else default
    if value is None:
        raise TypeError(f"{cls.__name__}() needs a learning rate: lr= (or {framework_name}=)")
    return value


def _no_locking(cls, use_locking) -> None:
    """TF's and MindSpore's use_locking (a lock on the variables' update) is taken in its place in the argument
    order; True is refused: there is nothing to lock, one launch writes each element once."""
    if use_locking:
        raise ValueError(f"{cls.__name__}(use_locking=True) is not supported: one fused launch writes each element "
                         "once, there is no concurrent update to lock out (pass use_locking=False)")


class TF1RMSprop(RMSprop):
    """TF1's tf.compat.v1.train.RMSPropOptimizer (tensorflow/python/training/rmsprop.py, TF 1.15 / 2.x compat.v1):
    ms starts at 1, ms = decay*ms + (1-decay)*g^2, mom = momentum*mom + lr*g/sqrt(ms + eps), var -= mom; centered
    subtracts mg^2 inside the root."""

    def __init__(self, params, learning_rate=None, decay=0.9, momentum=0.0, epsilon=1e-10, use_locking=False,
                 centered=False, *, lr=None, **ours):
        _no_locking(type(self), use_locking)
        super().__init__(params, lr=_lr(type(self), lr, learning_rate, "learning_rate", None), alpha=decay,
                         eps=epsilon, momentum=momentum, centered=centered, eps_in_sqrt=True, lr_in_momentum=True,
                         initial_accumulator_value=1.0, **ours)


class KerasRMSprop(RMSprop):
    """Keras 3's keras.optimizers.RMSprop (keras/src/optimizers/rmsprop.py): eps inside the root, lr inside the
    momentum buffer, decoupled weight decay (p -= p*wd*lr before the update), velocity starting at 0. Keras'
    clipnorm / clipvalue / EMA / loss_scale_factor / gradient_accumulation_steps are not taken (TypeError): clip
    with torch.nn.utils before step()."""

    def __init__(self, params, learning_rate=None, rho=0.9, momentum=0.0, epsilon=1e-7, centered=False,
                 weight_decay=None, *, lr=None, **ours):
        super().__init__(params, lr=_lr(type(self), lr, learning_rate, "learning_rate", 0.001), alpha=rho,
                         eps=epsilon, momentum=momentum, centered=centered,
                         weight_decay=0.0 if weight_decay is None else weight_decay, decoupled_weight_decay=True,
                         eps_in_sqrt=True, lr_in_momentum=True, **ours)


class OptaxRMSprop(RMSprop):
    """optax.rmsprop (optax/_src/alias.py, 0.2.x): scale_by_rms (or scale_by_stddev when centered) with
    initial_scale, eps placement and bias correction, then -lr, then a momentum trace (nesterov optional)."""

    def __init__(self, params, learning_rate=None, decay=0.9, eps=1e-8, initial_scale=0.0, eps_in_sqrt=True,
                 centered=False, momentum=None, nesterov=False, bias_correction=False, *, lr=None, **ours):
        if nesterov and momentum is None:
            raise ValueError("nesterov=True needs a momentum (optax applies no trace when momentum is None)")
        super().__init__(params, lr=_lr(type(self), lr, learning_rate, "learning_rate", None), alpha=decay, eps=eps,
                         momentum=0.0 if momentum is None else momentum, centered=centered, eps_in_sqrt=eps_in_sqrt,
                         lr_in_momentum=True, nesterov=nesterov, bias_correction=bias_correction,
                         initial_accumulator_value=initial_scale, **ours)


class TimmRMSpropTF(RMSprop):
    """timm's timm.optim.RMSpropTF (timm/optim/rmsprop_tf.py, timm 1.0.x): square_avg starts at 1, eps inside the
    root, lr_in_momentum on by default (off: torch's momentum form), weight decay coupled or decoupled
    (decoupled_decay: p *= 1 - lr*wd; corrected_weight_decay: lr**2 / max_lr instead of lr, max_lr the lr at
    construction). caution=True (a per-tensor mean of the sign agreement: a second pass) is refused."""

    def __init__(self, params, lr=1e-2, alpha=0.9, eps=1e-10, weight_decay=0, momentum=0.0, centered=False,
                 decoupled_decay=False, corrected_weight_decay=False, lr_in_momentum=True, caution=False,
                 foreach=None, **ours):
        if caution:
            raise ValueError("caution=True is not supported: its mask is scaled by a per-tensor mean, which the "
                             "one-pass kernels cannot compute (use timm's RMSpropTF for it)")
        max_lr = float(lr.detach()) if isinstance(lr, torch.Tensor) else float(lr)
        if corrected_weight_decay and not decoupled_decay:
            corrected_weight_decay = False  # timm applies it only to decoupled decay
        if corrected_weight_decay and max_lr <= 0:
            raise ValueError(f"Corrected weight decay requires a positive max lr, got {max_lr}")
        super().__init__(params, lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
                         centered=centered, foreach=foreach, eps_in_sqrt=True, lr_in_momentum=lr_in_momentum,
                         decoupled_weight_decay=decoupled_decay, initial_accumulator_value=1.0, **ours)
        # timm's own param group keys (state_dict round trip; a group added later takes the defaults)
        self.defaults.update(corrected_weight_decay=bool(corrected_weight_decay), max_lr_snapshot=max_lr)
        for group in self.param_groups:
            group.setdefault("corrected_weight_decay", bool(corrected_weight_decay))
            group.setdefault("max_lr_snapshot", max_lr)

    def _weight_decay(self, group):
        """corrected_weight_decay: p -= p*wd*lr**2/max_lr, i.e. the kernels' decoupled decay with wd*lr/max_lr
        (a value computed every step on the host; a tensor lr is read there)."""
        wd = group["weight_decay"]
        if not (wd and group.get("corrected_weight_decay")):
            return wd
        lr = group["lr"]
        return wd * (float(lr.detach()) if isinstance(lr, torch.Tensor) else float(lr)) / group["max_lr_snapshot"]


class SB3RMSpropTFLike(RMSprop):
    """Stable-Baselines3's RMSpropTFLike (stable_baselines3/common/sb2_compat/rmsprop_tf_like.py, SB3 2.x):
    square_avg starts at 1, eps inside the root, torch's momentum form (buf = m*buf + g/d; p -= lr*buf)."""

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0, centered=False, **ours):
        super().__init__(params, lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
                         centered=centered, eps_in_sqrt=True, initial_accumulator_value=1.0, **ours)


class FastaiRMSProp(RMSprop):
    """fastai's fastai.optimizer.RMSProp (fastai/optimizer.py, fastai 2.8): sqr_avg = sqr_mom*sqr_avg +
    (1-sqr_mom)*g^2; with mom, a momentum of raw grads (grad_avg = mom*grad_avg + g, no dampening) divided after:
    p -= lr * grad_avg / (sqrt(sqr_avg) + eps); weight decay decoupled (p *= 1 - lr*wd) unless decouple_wd=False
    (L2: g += wd*p). In a Learner: opt_func=partial(OptimWrapper, opt=FastaiRMSProp); its param groups keep
    torch's names (momentum, alpha, weight_decay), which OptimWrapper maps to mom, sqr_mom, wd. A momentum
    scheduled later (fit_one_cycle's moms) runs in fastai's form; fastai's own RMSProp built with mom=0 has no
    momentum callback and ignores it (build this class with the mom you schedule from)."""

    def __init__(self, params, lr=None, mom=0.0, sqr_mom=0.99, eps=1e-8, wd=0.0, decouple_wd=True, **ours):
        super().__init__(params, lr=_lr(type(self), lr, None, "lr", None), alpha=sqr_mom, eps=eps, momentum=mom,
                         weight_decay=wd, decoupled_weight_decay=bool(decouple_wd), raw_grad_momentum=True, **ours)


class PaddleRMSProp(RMSprop):
    """PaddlePaddle's paddle.optimizer.RMSProp (python/paddle/optimizer/rmsprop.py and the rmsprop kernel, Paddle
    2.5+): mean_square and moment start at 0, mean_square = rho*ms + (1-rho)*g^2, moment = momentum*moment +
    lr*g/sqrt(ms + eps), p -= moment; centered subtracts mean_grad^2 inside the root; a float weight_decay is
    L2 (g += wd*p). grad_clip is refused: clip with torch.nn.utils before step()."""

    def __init__(self, params, learning_rate=None, rho=0.95, epsilon=1e-6, momentum=0.0, centered=False,
                 weight_decay=None, grad_clip=None, *, lr=None, **ours):
        if grad_clip is not None:
            raise ValueError("grad_clip is not supported: clip with torch.nn.utils.clip_grad_norm_ before step()")
        if weight_decay is not None and not isinstance(weight_decay, (int, float)):
            raise ValueError("weight_decay must be a float (Paddle's L2Decay coefficient); regularizer objects "
                             "are Paddle's")
        super().__init__(params, lr=_lr(type(self), lr, learning_rate, "learning_rate", None), alpha=rho,
                         eps=epsilon, momentum=momentum, centered=centered, weight_decay=weight_decay or 0.0,
                         eps_in_sqrt=True, lr_in_momentum=True, **ours)


class MindSporeRMSProp(RMSprop):
    """MindSpore's mindspore.nn.RMSProp (mindspore/nn/optim/rmsprop.py, MindSpore 2.2-2.5, ApplyRMSProp /
    ApplyCenteredRMSProp): mean_square starts at 1, moment at 0, ms = decay*ms + (1-decay)*g^2, moment =
    momentum*moment + lr*g/sqrt(ms + eps), p -= moment; weight decay is L2 (g += wd*p) on every param given (pass
    param groups with weight_decay=0 for the norms MindSpore's default filter skips). loss_scale != 1 is refused
    (use torch.amp.GradScaler, which this class takes)."""

    def __init__(self, params, learning_rate=None, decay=0.9, momentum=0.0, epsilon=1e-10, use_locking=False,
                 centered=False, loss_scale=1.0, weight_decay=0.0, *, lr=None, **ours):
        _no_locking(type(self), use_locking)
        if loss_scale != 1.0:
            raise ValueError("loss_scale != 1.0 is not supported: use torch.amp.GradScaler (its grad_scale is "
                             "applied in the kernels)")
        super().__init__(params, lr=_lr(type(self), lr, learning_rate, "learning_rate", 0.1), alpha=decay,
                         eps=epsilon, momentum=momentum, centered=centered, weight_decay=weight_decay,
                         eps_in_sqrt=True, lr_in_momentum=True, initial_accumulator_value=1.0, **ours)


FLAVORS.update(torch=RMSprop, tf1=TF1RMSprop, keras=KerasRMSprop, optax=OptaxRMSprop, timm=TimmRMSpropTF,
               sb3=SB3RMSpropTFLike, fastai=FastaiRMSProp, paddle=PaddleRMSProp, mindspore=MindSporeRMSProp)


def flavor(name: str) -> type[RMSprop]:
    """The RMSprop class of a framework: one of FLAVORS' names."""
    try:
        return FLAVORS[name.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown flavor {name!r}: one of {', '.join(FLAVORS)}") from None


def register_timm(name: str = "rmsproptfgpu") -> None:
    """Register TimmRMSpropTF in timm's optimizer registry, so create_optimizer_v2(model, name) builds it (with
    timm's weight-decay param groups and its argument handling)."""
    from timm.optim import OptimInfo
    from timm.optim._optim_factory import default_registry

    default_registry.register(OptimInfo(name=name, opt_class=TimmRMSpropTF, description="rmsprop-gpu's fused "
                                        "RMSpropTF", has_momentum=True, defaults={"alpha": 0.9}))
