"""Every tolerance of the suite, in one table, with the reason for each.

ORACLE: one step from identical inputs against the float64 formula. The kernels compute in float32 and
round once on store, so the error is half an ulp of the storage dtype plus a few float32 roundings:
rtol = one ulp of the storage dtype (four float32 ulps for float32); atol covers float32 cancellation:
momentum * buf + g / d has terms up to ~10 (d can be ~0.1) that may cancel to ~0, so the float32 error of
the terms, ~10 * 2**-23 ~ 1e-6, is absolute, not relative to the result. 1e-5 keeps a 10x margin.

TORCH: several steps against torch.optim.RMSprop run in the same dtype. torch rounds after every op in
16-bit (we round once), so 16-bit results drift apart by a few ulps over the steps.
"""

ORACLE = {
    "float64": dict(rtol=1e-12, atol=1e-12),
    "float32": dict(rtol=4 * 2.0**-23, atol=1e-5),
    "float16": dict(rtol=2.0**-10, atol=1e-5),
    "bfloat16": dict(rtol=2.0**-7, atol=1e-5),
}

TORCH = {
    "float64": dict(rtol=1e-12, atol=1e-12),
    "float32": dict(rtol=1e-5, atol=1e-5),
    "float16": dict(rtol=4 * 2.0**-10, atol=2e-3),
    "bfloat16": dict(rtol=4 * 2.0**-7, atol=2e-2),
}
