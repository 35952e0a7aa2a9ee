"""The interface every backend implements. The frontend never branches on a backend's name."""

from __future__ import annotations

import torch

from .._contract import Group, Hyper


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that cannot run here; the message says what is missing."""


class Backend:
    name: str = "?"
    # Host-overhead seam (rmsprop_gpu.backends.launches_stubbed): a kernel backend does everything but the
    # launch itself, and accepts CPU tensors, so perf/host_overhead.py times only our Python.
    launch_stubbed: bool = False
    # True: one launch takes tensors of several param groups, each with its own hyperparameters (a slot)
    shares_launches: bool = False

    def unavailable_reason(self, device: torch.device) -> str | None:
        """None when this backend can run on `device`, else why not (what is missing)."""
        raise NotImplementedError

    def unsupported_reason(self, group: Group, hyper: Hyper) -> str | None:
        """None when this backend handles the group's dtypes, arrays and options, else why not."""
        return None

    def prepare(self, group: Group, hyper: Hyper, owned: bool = False, previous=None):
        """Everything a launch needs that does not change from step to step (tables, temporaries), and every
        check this backend adds. Writes nothing the caller owns and keeps none of the group's tensors (each run
        is given them). owned=True: the caller keeps what this returns alive (a step plan), so nothing is cached
        here."""
        return None

    def repoint(self, prepared, group: Group, moved: dict):
        """The prepared launch for the group's tensors after some moved: same shapes, dtypes and strides, new
        addresses. moved: Group list name ("grads", "square_avgs", ...) -> the new addresses of that list."""
        return self.prepare(group, None, owned=True, previous=prepared)

    def run(self, prepared, group: Group, hypers: list[Hyper]) -> None:
        """Update params and state of the group in place (and advance its step counters); hypers[k] applies to
        the tensors in slot k (group.slots)."""
        raise NotImplementedError

    def step(self, group: Group, hyper: Hyper) -> None:
        self.run(self.prepare(group, hyper), group, [hyper])

    def describe(self) -> dict:
        """Extra facts for available_backends() (versions, compile time...)."""
        return {}


def advance_steps(steps, found_inf) -> None:
    """Add 1 to each step counter unless found_inf is set (skipped steps are not counted)."""
    if not steps:
        return
    if found_inf is None:
        torch._foreach_add_(steps, 1.0)
        return
    for s in steps:  # no host read: 1 - (found_inf != 0), moved to the counter's device
        s.add_((found_inf == 0).to(device=s.device, dtype=s.dtype))
