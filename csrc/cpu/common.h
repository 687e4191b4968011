// Shared pieces of the CPU kernels: row primitives (vecmath.cpp), a BLAS-backed tile GEMM, dynamic
// task scheduling over at::parallel_for's threads, strided row addressing and output allocation.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <vector>

#include "../dropout_rng.h"

namespace fastattn::cpu {

constexpr float kInf = std::numeric_limits<float>::infinity();

// ---- row primitives on fp32 (vecmath.cpp: compiled for AVX2+FMA and for the baseline ISA) ----

// The row's max, -inf for an empty or fully masked row, NaN when any value is NaN.
float row_max(const float* x, int64_t n);
// x <- exp(x - shift) and returns the sum; exp(-inf) = 0, so masked entries vanish.
float exp_shift_sum(float* x, int64_t n, float shift);
// x <- exp(x - shift).
void exp_shift(float* x, int64_t n, float shift);
void scale_row(float* x, int64_t n, float factor);
float row_sum(const float* x, int64_t n);
float row_dot(const float* a, const float* b, int64_t n);
// ds <- p * (ds - d): the softmax backward of one row given dp in ds and d = sum(p * dp).
void softmax_grad_row(float* ds, const float* p, int64_t n, float d);
// Scalar exp with the same polynomial as the vector rows, for single values.
float exp_scalar(float x);

// ---- GEMM on row-major fp32 tiles ----

// C (m x n, row stride ldc) = alpha * op(A) * op(B) + beta * C, where op(A) is m x k (A stored k x m
// when trans_a) and op(B) is k x n (B stored n x k when trans_b). Runs ATen's CPU BLAS (MKL or
// OpenBLAS) single-threaded when called from a parallel region. beta = 0 ignores C's contents.
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc);

// ---- scheduling ----

// Runs task(t, scratch) for every t in [0, num_tasks) on at::parallel_for's threads. Tasks are
// handed out one at a time from a shared counter (dynamic scheduling: uneven tasks, e.g. causal
// blocks, still balance); each thread gets its own zeroed scratch of scratch_floats floats.
template <typename Task>
void parallel_tasks(int64_t num_tasks, int64_t scratch_floats, const Task& task) {
  if (num_tasks <= 0) return;
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), num_tasks);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    std::vector<float> scratch(static_cast<size_t>(scratch_floats));
    for (int64_t t = next.fetch_add(1); t < num_tasks; t = next.fetch_add(1)) task(t, scratch.data());
  });
}

// ---- tensors ----

// Offsets of the rows of a tensor whose last dim is the row: any sizes and strides (0 included).
class RowOffsets {
 public:
  explicit RowOffsets(const at::Tensor& t);
  int64_t operator()(int64_t row) const {
    int64_t offset = 0;
    for (int64_t d = static_cast<int64_t>(sizes_.size()) - 1; d >= 0; --d) {
      offset += (row % sizes_[d]) * strides_[d];
      row /= sizes_[d];
    }
    return offset;
  }

 private:
  std::vector<int64_t> sizes_, strides_;
};

// An output tensor (contiguous); filled with NaN when FASTATTN_POISON_OUTPUTS=1 (the tests set it)
// so that an element a kernel forgot to write shows.
at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// t as float32 whose last dim is contiguous and whose rows do not overlap (what BLAS needs):
// copies only when the dtype or that layout differs; batch and head strides are kept.
at::Tensor float_rows(const at::Tensor& t);

// The dtypes the CPU kernels read and write (they compute in float32).
void check_dtype(const at::Tensor& t, const char* name);

// Row n of any dtype, element stride `stride`, into float32 (the contiguous case vectorises).
template <typename T>
inline void load_row(float* dst, const T* src, int64_t n, int64_t stride) {
  if (stride == 1) {
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(src[j]);
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(src[j * stride]);
  }
}

// A float32 row into a contiguous row of T (rounding to nearest for the 16-bit types).
template <typename T>
inline void store_row(T* dst, const float* src, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<T>(src[j]);
}

template <typename T>
inline float load_float(const T* p) {
  return static_cast<float>(*p);
}
template <>
inline float load_float<bool>(const bool* p) {
  return *p ? 1.f : 0.f;
}


// The dropout counters address streams and rows below 2^32 and columns below 2^34 (dropout_rng.h).
inline void check_dropout_extent(int64_t streams, int64_t rows, int64_t cols, const char* what) {
  TORCH_CHECK_VALUE(static_cast<uint64_t>(streams) <= kDropoutMaxRows &&
                        static_cast<uint64_t>(rows) <= kDropoutMaxRows && static_cast<uint64_t>(cols) <= kDropoutMaxCols,
                    "fastattn ", what, ": dropout addresses at most 2^32 streams and rows and 2^34 columns, got (",
                    streams, ", ", rows, ", ", cols, ")");
}


// The dropout seed of an op (schema: csrc/fastattn.cpp): a one-element int64 CPU tensor, read here
// on the host; 0 (unused) when there is no dropout. Errors name the argument.
inline int64_t read_seed(const c10::optional<at::Tensor>& seed, double dropout_p) {
  if (!seed.has_value()) {
    TORCH_CHECK_VALUE(dropout_p == 0.0, "fastattn: seed is required when dropout_p > 0, got None");
    return 0;
  }
  TORCH_CHECK_TYPE(seed->scalar_type() == at::kLong, "fastattn: seed must be an int64 tensor, got ", seed->scalar_type());
  TORCH_CHECK_VALUE(seed->numel() == 1, "fastattn: seed must have one element, got shape ", seed->sizes());
  TORCH_CHECK_VALUE(seed->device().is_cpu(), "fastattn: seed must be on the CPU with the inputs, got ", seed->device());
  return *seed->const_data_ptr<int64_t>();
}

}  // namespace fastattn::cpu
