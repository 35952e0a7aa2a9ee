// CPU launchers for kernels/rmsprop.cu: loop over the grid, one "thread" at a time. By default one launcher per
// layout that reads its option flags at run time (RUNTIME_FLAGS: one build covers every combination); with
// -DRMSPROP_STATIC_ENTRY='RMSPROP_CPU_LAUNCHER_FLAGS(name, P, S, MOM, CEN, FLAGS)' just that compile-time
// instantiation, as the GPU loader builds it.
#include "shim.h"
#include RMSPROP_CU_PATH

#define RMSPROP_CPU_LAUNCHER_FLAGS(NAME, P, S, MOM, CEN, FLAGS)                        \
  extern "C" void launch_##NAME(unsigned grid, unsigned block, RMSPROP_PARAMS) {        \
    gridDim.x = grid;                                                                    \
    blockDim.x = block;                                                                  \
    for (unsigned b = 0; b < grid; ++b) {                                                \
      blockIdx.x = b;                                                                    \
      for (unsigned t = 0; t < block; ++t) {                                             \
        threadIdx.x = t;                                                                 \
        rmsprop_block<P, S, MOM, CEN, FLAGS>(RMSPROP_ARGS);                              \
      }                                                                                  \
    }                                                                                    \
  }
#define RMSPROP_CPU_LAUNCHER(NAME, P, S, MOM, CEN) RMSPROP_CPU_LAUNCHER_FLAGS(NAME, P, S, MOM, CEN, RUNTIME_FLAGS)

#ifdef RMSPROP_STATIC_ENTRY
RMSPROP_STATIC_ENTRY
#else
RMSPROP_ENTRY_POINTS(RMSPROP_CPU_LAUNCHER)
#endif
