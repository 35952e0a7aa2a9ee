// CPU launchers for every entry point of kernels/rmsprop.cu: loop over the grid, one "thread" at a time.
#include "shim.h"
#include RMSPROP_CU_PATH

#define RMSPROP_CPU_LAUNCHER(NAME, P, S, MOM, CEN)                                      \
  extern "C" void launch_##NAME(unsigned grid, unsigned block, RMSPROP_PARAMS) {        \
    gridDim.x = grid;                                                                    \
    blockDim.x = block;                                                                  \
    for (unsigned b = 0; b < grid; ++b) {                                                \
      blockIdx.x = b;                                                                    \
      for (unsigned t = 0; t < block; ++t) {                                             \
        threadIdx.x = t;                                                                 \
        NAME(RMSPROP_ARGS);                                                              \
      }                                                                                  \
    }                                                                                    \
  }
RMSPROP_ENTRY_POINTS(RMSPROP_CPU_LAUNCHER)
