// Splitting one custom call's work over XLA:CPU's intra-op thread pool (the XLA FFI ThreadPool context).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace jaxserve {

// Runs fn(begin, end) over [0, n) in `parts` contiguous ranges on the calling thread and up to threads - 1
// of the pool's, and returns when all have run. Ranges are claimed from a counter (more parts than threads
// balance uneven work), and the state lives as long as its last reference: a pool task may start only after
// the caller has finished every range (then it does nothing).
template <typename Fn>
void parallel_for(xla::ffi::ThreadPool& pool, int64_t n, int64_t threads, int64_t parts, const Fn& fn) {
  parts = std::max<int64_t>(1, std::min<int64_t>(parts, n));
  threads = std::max<int64_t>(1, std::min<int64_t>({threads, parts, int64_t(pool.num_threads())}));
  if (threads == 1) {
    if (n > 0) fn(0, n);
    return;
  }
  struct State {
    const Fn* fn;
    int64_t n, parts, per_part;
    std::atomic<int64_t> next{0}, done{0};
    void run() {
      for (int64_t part; (part = next.fetch_add(1, std::memory_order_relaxed)) < parts;) {
        const int64_t begin = part * per_part, end = std::min(begin + per_part, n);
        if (begin < end) (*fn)(begin, end);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  auto state = std::make_shared<State>();
  state->fn = &fn;
  state->n = n;
  state->parts = parts;
  state->per_part = (n + parts - 1) / parts;
  for (int64_t t = 1; t < threads; ++t) pool.Schedule([state] { state->run(); });
  state->run();
  while (state->done.load(std::memory_order_acquire) < state->parts) std::this_thread::yield();
}

}  // namespace jaxserve
