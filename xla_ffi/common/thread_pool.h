// A fixed pool of worker threads shared by every CPU handler.
//
// Why not XLA's FFI thread pool: asking for it (Ctx<ThreadPool>) raises the
// oldest jaxlib the library can load into, and why not OpenMP: its runtime
// clashes with the one some jaxlib/numpy builds carry. The pool starts on
// first use with one thread per CPU of the process's affinity mask
// (sched_getaffinity; taskset and os.sched_setaffinity limit it), read once; work items are handed out
// through an atomic counter, so uneven items (causal tiles) balance
// themselves.
#pragma once

#include <cstdint>
#include <functional>

namespace fastattn {

// Runs body(i) for every i in [0, count), spread over the pool (the calling
// thread takes part). Blocks until all are done. Calls from several threads
// at once are serialised; body must not call parallel_for itself.
void parallel_for(int64_t count, const std::function<void(int64_t)>& body);

// Number of threads parallel_for uses (workers + caller).
int parallel_threads();

}  // namespace fastattn
