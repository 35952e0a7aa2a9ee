// Lets g++ compile kernels/rmsprop.cu for the CPU: CUDA qualifiers become nothing, the built-in index
// variables are thread-local globals that the launcher sets while it loops over the grid.
// Enough for elementwise kernels: no shared memory, barriers or warp intrinsics.
#pragma once
#include <cmath>
#include <cstring>

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 { unsigned x = 1, y = 1, z = 1; };
static thread_local dim3 blockIdx, threadIdx, blockDim, gridDim;

struct alignas(16) uint4 { unsigned x, y, z, w; };

inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }  // IEEE on x86-64 (SSE)
inline float __fdiv_rn(float a, float b) { return a / b; }

// The GPU converts half precision with cvt instructions; here the compiler's _Float16 (round to nearest even).
inline float rmsprop_host_f16_to_f32(unsigned short b) { _Float16 h; std::memcpy(&h, &b, 2); return (float)h; }
inline unsigned short rmsprop_host_f32_to_f16(float x) {
  _Float16 h = (_Float16)x;
  unsigned short b;
  std::memcpy(&b, &h, 2);
  return b;
}

