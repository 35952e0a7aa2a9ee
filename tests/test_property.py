"""Property-based: random options, sizes and dtypes, every backend against the float64 oracle."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rmsprop_gpu import rmsprop
from tests.matrix import BACKENDS
from tests.tolerances import ORACLE
from tools.oracle import reference_step

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@settings(max_examples=40, deadline=None)
@given(
    backend=st.sampled_from(BACKENDS),
    dtype=st.sampled_from(list(DTYPES)),
    f32_state=st.booleans(),
    sizes=st.lists(st.integers(0, 5000), min_size=1, max_size=4),
    lr=st.floats(1e-4, 0.1), alpha=st.floats(0.5, 0.999), eps=st.floats(1e-8, 1e-2),
    weight_decay=st.sampled_from([0.0, 1e-4, 0.1]), momentum=st.sampled_from([0.0, 0.5, 0.95]),
    centered=st.booleans(), maximize=st.booleans(), eps_in_sqrt=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_options_against_oracle(backend, dtype, f32_state, sizes, lr, alpha, eps, weight_decay, momentum,
                                       centered, maximize, eps_in_sqrt, seed):
    pdt = DTYPES[dtype]
    sdt = torch.float32 if (f32_state and dtype != "float32") else pdt
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.randn(n, generator=gen).to(pdt) for n in sizes]
    gs = [torch.randn(n, generator=gen).to(pdt) for n in sizes]
    vs = [(torch.rand(n, generator=gen) + 0.05).to(sdt) for n in sizes]
    bs = [torch.randn(n, generator=gen).to(sdt) for n in sizes] if momentum else None
    gas = [(v.float().sqrt() * (torch.rand(v.shape, generator=gen) - 0.5)).to(sdt) for v in vs] if centered else None
    before = [[t.clone() for t in ts] if ts else None for ts in (ps, gs, vs, bs, gas)]
    hp = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum, centered=centered,
              maximize=maximize, eps_in_sqrt=eps_in_sqrt)
    rmsprop(ps, gs, vs, gas, bs, backend=backend, **hp)
    for i in range(len(ps)):
        exp = reference_step(*(x[i] if x else None for x in before), **hp)
        for got, want in zip((ps[i], vs[i], bs[i] if bs else None, gas[i] if gas else None), exp):
            if got is not None:
                torch.testing.assert_close(got.double(), want, **ORACLE[str(got.dtype)[6:]])
