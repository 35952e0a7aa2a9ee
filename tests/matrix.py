"""The backend matrix every test runs over, declared once: the torch path, the Triton kernel (through Triton's
interpreter on the CPU) and the CUDA C kernel (compiled by g++ behind the CuPy backend's seam, tools/cuda_cpu)."""

BACKENDS = ["torch", "triton", "cupy"]
KERNEL_BACKENDS = ["triton", "cupy"]
