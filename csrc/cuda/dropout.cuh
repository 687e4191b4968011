// fastattn::dropout_mask on the GPU: the keep mask (bool, true = kept) the kernels draw for a
// contiguous (streams, rows, cols) shape, element (s, r, c) drawn at Philox stream s, row r, column c
// (csrc/dropout_rng.h). Defined in dropout.cu; tests use it to reproduce a kernel's dropout with the
// reference implementation.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace fastattn {
namespace cuda {

cudaError_t launch_dropout_mask(bool* mask, int64_t streams, int64_t rows, int64_t cols, double p, const int64_t* seed,
                                cudaStream_t stream);

}  // namespace cuda
}  // namespace fastattn
