#include "thread_pool.h"

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

namespace fastattn {
namespace {

// CPUs this process may run on: its affinity mask (taskset, cgroup cpusets,
// os.sched_setaffinity), which also limits XLA's and torch's pools; the
// hardware thread count only where the mask cannot be read.
unsigned allowed_cpus() {
#if defined(__linux__)
  cpu_set_t mask;
  CPU_ZERO(&mask);
  if (sched_getaffinity(0, sizeof(mask), &mask) == 0) {
    const int count = CPU_COUNT(&mask);
    if (count > 0) return unsigned(count);
  }
#endif
  return std::max(1u, std::thread::hardware_concurrency());
}

class WorkerPool {
 public:
  WorkerPool() {
    const unsigned cpus = allowed_cpus();
    for (unsigned t = 1; t < cpus; ++t) {
      workers_.emplace_back([this] { worker_loop(); });
    }
  }

  ~WorkerPool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      shutting_down_ = true;
    }
    wake_.notify_all();
    for (auto& worker : workers_) worker.join();
  }

  int threads() const { return int(workers_.size()) + 1; }

  void run(int64_t count, const std::function<void(int64_t)>& body) {
    if (count <= 0) return;
    if (workers_.empty() || count == 1) {
      for (int64_t i = 0; i < count; ++i) body(i);
      return;
    }
    std::lock_guard<std::mutex> one_job_at_a_time(job_mutex_);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      body_ = &body;
      count_ = count;
      next_.store(0);
      busy_workers_ = int(workers_.size());
      ++generation_;
    }
    wake_.notify_all();
    drain();
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return busy_workers_ == 0; });
    body_ = nullptr;
  }

 private:
  void drain() {
    for (int64_t i = next_.fetch_add(1); i < count_; i = next_.fetch_add(1)) {
      (*body_)(i);
    }
  }

  void worker_loop() {
    uint64_t seen_generation = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] {
          return shutting_down_ || generation_ != seen_generation;
        });
        if (shutting_down_) return;
        seen_generation = generation_;
      }
      drain();
      {
        std::lock_guard<std::mutex> lock(mutex_);
        --busy_workers_;
      }
      done_.notify_one();
    }
  }

  std::vector<std::thread> workers_;
  std::mutex job_mutex_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable done_;
  const std::function<void(int64_t)>* body_ = nullptr;
  int64_t count_ = 0;
  std::atomic<int64_t> next_{0};
  int busy_workers_ = 0;
  uint64_t generation_ = 0;
  bool shutting_down_ = false;
};

WorkerPool& pool() {
  static WorkerPool* instance = new WorkerPool();  // never destroyed: safe at exit
  return *instance;
}

}  // namespace

void parallel_for(int64_t count, const std::function<void(int64_t)>& body) {
  pool().run(count, body);
}

int parallel_threads() { return pool().threads(); }

}  // namespace fastattn
