"""The float64 oracle, written out from the update equations (DESIGN.md), element by element in torch."""

import torch


def reference_step(p, g, v, buf=None, ga=None, *, lr, alpha, eps, weight_decay=0.0, momentum=0.0,
                   centered=False, maximize=False, eps_in_sqrt=False, grad_scale=None, found_inf=None):
    """New (p, v, buf, ga) in float64 for one step; inputs are not modified."""
    p, g, v = p.double(), g.double(), v.double()
    buf = buf.double() if buf is not None else None
    ga = ga.double() if ga is not None else None
    if found_inf is not None and float(found_inf) != 0:
        return p, v, buf, ga
    if grad_scale is not None:
        g = g / float(grad_scale)
    lr = float(lr)
    g = -g if maximize else g
    g = g + weight_decay * p
    v = alpha * v + (1 - alpha) * g * g
    var = v
    if centered:
        ga = ga + (1 - alpha) * (g - ga)
        var = v - ga * ga
    d = torch.sqrt(var + eps) if eps_in_sqrt else torch.sqrt(var) + eps
    if momentum > 0:
        buf = momentum * buf + g / d
        p = p - lr * buf
    else:
        p = p - lr * g / d
    return p, v, buf, ga
