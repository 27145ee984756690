// Work shared between the calling thread and XLA's intra-op thread pool, for the FFI kernels of this folder.
#pragma once
#include <immintrin.h>
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include "xla/ffi/api/ffi.h"

namespace perceiver_ar {

// Items 0 .. total - 1 are shared out through an atomic counter between this thread and tasks on XLA's intra-op
// thread pool (idle while the custom call runs): whoever is free takes the next item. A task that starts only
// after the call has returned (e.g. one queued behind this very thread) finds no item left and touches nothing.
struct Work {
  std::atomic<int64_t> next{0}, done{0};
  int64_t total = 0;
  std::function<void(int64_t)> item;
};

inline void drain(Work& work) {
  for (int64_t i; (i = work.next.fetch_add(1, std::memory_order_relaxed)) < work.total;) {
    work.item(i);
    work.done.fetch_add(1, std::memory_order_release);
  }
}

// item(i) for every i in [0, total), on this thread and the pool's; returns when all are done.
inline void parallel_for(xla::ffi::ThreadPool& pool, int64_t total, std::function<void(int64_t)> item) {
  auto work = std::make_shared<Work>();
  work->total = total;
  work->item = std::move(item);
  int64_t helpers = std::min<int64_t>(pool.num_threads(), total) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([work] { drain(*work); });
  drain(*work);
  while (work->done.load(std::memory_order_acquire) < work->total) _mm_pause();
}

}  // namespace perceiver_ar
