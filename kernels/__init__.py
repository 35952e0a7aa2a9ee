"""Kernel sources: rmsprop.py (Triton) and rmsprop.cu (CUDA C for CuPy). Shipped as rmsprop_gpu.kernels."""
