// Dynamic scheduling of uneven tasks over ATen's intra-op thread pool.
//
// at::parallel_for hands each thread one contiguous chunk, which balances badly when task costs
// differ (causal attention: late query tiles see more keys). Here each thread pulls the next task
// index from a shared counter; callers order tasks heaviest first.
#pragma once

#include <ATen/Parallel.h>

#include <atomic>
#include <cstdint>

namespace skiplayers::cpu {

template <typename Fn>
void run_tasks(int64_t num_tasks, const Fn& fn) {
  if (num_tasks <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), num_tasks);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t t = next.fetch_add(1); t < num_tasks; t = next.fetch_add(1)) fn(t);
  });
}

}  // namespace skiplayers::cpu
