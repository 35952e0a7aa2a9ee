"""Every tolerance of the suite, in one table, with the reason for each.

ORACLE: one step from identical inputs against the float64 formula. The kernels compute in float32 and
round once on store, so the error is half an ulp of the storage dtype plus a few float32 roundings:
rtol = one ulp of the storage dtype (four float32 ulps for float32); atol covers float32 cancellation:
momentum * buf + g / d has terms up to ~10 (d can be ~0.1) that may cancel to ~0, so the float32 error of
the terms, ~10 * 2**-23 ~ 1e-6, is absolute, not relative to the result. 1e-5 keeps a 10x margin.

TORCH: five steps against torch.optim.RMSprop (float32 copies for 16-bit params; see test_optimizer.py).
float32: torch rounds after each op, the kernels fuse; centered + momentum divides by sqrt(v - ga^2), whose
cancellation amplifies that difference: worst seen 1.8e-5 relative (at |p| ~ 10), so rtol 1e-4.
16-bit: our params are rounded to 16 bits every step, the reference's are not: a few ulps over 5 steps
(worst seen over 25 seeds per option: 41% of this tolerance).

FRAMEWORKS: float32 against the TF1 / Keras / optax formulas in float64 (and against Keras 3 and optax
themselves) over 8 steps: a few float32 roundings per step and the frameworks' own op orders, rtol 2e-5 and
atol 1e-6 (worst seen 6e-6 relative). Centered with bias correction starts from v - ga^2 = 0 exactly, so the
float32 rounding of that difference is divided by sqrt(eps) and carried by momentum: atol 1e-5 (worst 5e-6).

FLAVORS: six steps (lr changing every step) against a framework's released RMSprop run in float64 (timm, SB3)
or a float64 transcription (fastai, Paddle, MindSpore). float64 params on the torch path: the frameworks' own op
orders (TF's v + (1-a)(g^2 - v) against torch's a*v + (1-a)g^2) differ by float64 roundings only. float32 params
in the kernels: as FRAMEWORKS, with eps inside the root as small as 1e-10 for a param whose square average starts
at 1 and falls (worst seen 3e-6 relative). 16-bit params: TORCH's 16-bit tolerances (params only: 16-bit state).

Q8_CODES: 8-bit state (state_bits=8) against the float64 oracle that decodes, steps in float64 and encodes with
the same random bits (codes round stochastically). A code is within one code spacing of the exact new value:
2**-4 relative for square_avg's root (E4M4), 2**-3 for momentum_buffer / grad_avg (E4M3), plus the block's
subnormal codes' absolute spacing (2**-16 of the block maximum covers it); 1% margin for the float32 math. The
kernels' float32 new value and the oracle's float64 one round to different codes only when they straddle a
rounding threshold: at least 99% of the codes are equal.
"""

FRAMEWORKS = dict(rtol=2e-5, atol=1e-6)
Q8_CODES = {"unsigned": 2.0**-4 * 1.01, "signed": 2.0**-3 * 1.01, "same_fraction": 0.99}
FRAMEWORKS_CENTERED_BIAS = dict(rtol=2e-5, atol=1e-5)
FLAVORS = {"float64": dict(rtol=1e-10, atol=1e-12), "float32": dict(rtol=2e-5, atol=1e-6)}

ORACLE = {
    "float64": dict(rtol=1e-12, atol=1e-12),
    "float32": dict(rtol=4 * 2.0**-23, atol=1e-5),
    "float16": dict(rtol=2.0**-10, atol=1e-5),
    "bfloat16": dict(rtol=2.0**-7, atol=1e-5),
}

TORCH = {
    "float64": dict(rtol=1e-12, atol=1e-12),
    "float32": dict(rtol=1e-4, atol=1e-5),
    "float16": dict(rtol=4 * 2.0**-10, atol=2e-3),
    "bfloat16": dict(rtol=4 * 2.0**-7, atol=2e-2),
}
