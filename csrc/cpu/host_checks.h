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

// Sequence b's slots [0, lens[b] + added[b]) (added: nullptr for none) must fit its block table row,
// and every page the op touches must be a page of the pool: the pages of slots [0, lens[b]) when
// reading (added == nullptr), the pages of the new slots [lens[b], lens[b] + added[b]) when
// appending. `block_table` is contiguous int32 [B, max_pages].
inline void check_paged_slots(const at::Tensor& block_table, const int32_t* lens, const int32_t* added,
                              int64_t num_pages, int64_t page_size, const char* op) {
  const int64_t batch = block_table.size(0), max_pages = block_table.size(1), capacity = max_pages * page_size;
  const int32_t* table = block_table.data_ptr<int32_t>();
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t n = added ? added[b] : 0;
    if (added) {
      TORCH_CHECK(lens[b] >= 0 && lens[b] + n <= capacity, op, ": sequence ", b, " holds ", lens[b],
                  " slots and appends ", n, ", but its block table holds ", capacity, " slots");
    } else {
      TORCH_CHECK(lens[b] >= 0 && lens[b] <= capacity, op, ": cache_seqlens[", b, "] = ", lens[b],
                  " is outside [0, ", capacity, "]");
    }
    const int64_t from = added ? lens[b] : 0, to = lens[b] + n;  // the slots the op touches
    const int64_t end_page = from < to ? (to + page_size - 1) / page_size : 0;
    for (int64_t i = from / page_size; i < end_page; ++i) {
      const int32_t page = table[b * max_pages + i];
      TORCH_CHECK(page >= 0 && page < num_pages, op, ": block_table[", b, ", ", i, "] = ", page,
                  " is not a page of the pool (num_pages ", num_pages, ")");
    }
  }
}

}  // namespace skiplayers::cpu
