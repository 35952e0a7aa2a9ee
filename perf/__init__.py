"""Benchmarks and checks, run as modules from the repo root (python -m perf.bench, python -m perf.gpu_check, ...;
the Makefile's targets). Not shipped: the wheel holds rmsprop_gpu only."""
