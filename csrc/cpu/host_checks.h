// Checks of metadata *values* that the CPU launchers can afford (the data is in host memory).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace skiplayers::cpu {

// cu_seqlens must start at 0, never decrease and end at the number of packed rows.
inline void check_cu_seqlens(const at::Tensor& cu, int64_t rows, const char* op, const char* name) {
  const int32_t* c = cu.data_ptr<int32_t>();
  const int64_t n = cu.size(0);
  TORCH_CHECK(c[0] == 0, op, ": ", name, "[0] must be 0, got ", c[0]);
  for (int64_t i = 1; i < n; ++i)
    TORCH_CHECK(c[i] >= c[i - 1], op, ": ", name, " must be non-decreasing, got ", c[i - 1], " then ", c[i]);
  TORCH_CHECK(c[n - 1] == rows, op, ": ", name, " ends at ", c[n - 1], " but there are ", rows, " rows");
}

// Every cache length must lie in [0, capacity].
inline void check_cache_lengths(const at::Tensor& lens, int64_t capacity, const char* op) {
  const int32_t* l = lens.data_ptr<int32_t>();
  for (int64_t b = 0; b < lens.size(0); ++b)
    TORCH_CHECK(l[b] >= 0 && l[b] <= capacity, op, ": cache_seqlens[", b, "] = ", l[b], " is outside [0, ",
                capacity, "]");
}

}  // namespace skiplayers::cpu
