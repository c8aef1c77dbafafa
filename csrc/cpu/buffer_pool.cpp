// The reused output buffers of buffer_pool.h.
#include "buffer_pool.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <utility>
#include <vector>

#include "huge_pages.h"

namespace exgramed {
namespace {

struct Block {
  void* ptr;
  size_t bytes;
};

class Pool {
 public:
  // An idle block of exactly `bytes`, or a new one (2 MiB aligned, huge pages advised once).
  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = idle_.rbegin(); it != idle_.rend(); ++it) {  // the most recently freed first
        if (it->bytes == bytes) {
          void* p = it->ptr;
          idle_bytes_ -= bytes;
          idle_.erase(std::next(it).base());
          return p;
        }
      }
    }
    const size_t padded = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    void* p = nullptr;
    TORCH_CHECK_WITH(OutOfMemoryError, posix_memalign(&p, kHugePage, padded) == 0 && p != nullptr,
                     "exgramed: failed to allocate ", bytes, " bytes");
    advise_huge_pages(p, padded);
    return p;
  }

  // Back to the pool; beyond kPoolMaxIdle idle blocks or kPoolMaxIdleBytes the oldest are freed
  // (a block larger than kPoolMaxIdleBytes at once).
  void give(void* p, size_t bytes) {
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      idle_.push_back({p, bytes});
      idle_bytes_ += bytes;
      while (!idle_.empty() && (static_cast<int>(idle_.size()) > kPoolMaxIdle || idle_bytes_ > kPoolMaxIdleBytes)) {
        drop.push_back(idle_.front().ptr);
        idle_bytes_ -= idle_.front().bytes;
        idle_.pop_front();
      }
    }
    for (void* q : drop) std::free(q);  // outside the lock (munmap)
  }

  std::pair<size_t, size_t> idle() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {idle_.size(), idle_bytes_};
  }

 private:
  std::mutex mutex_;
  std::deque<Block> idle_;
  size_t idle_bytes_ = 0;
};

// Never destroyed: tensors (and so deleters) can outlive static destruction at exit.
Pool& pool() {
  static Pool* p = new Pool();
  return *p;
}

bool pool_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("EXGRAMED_BUFFER_POOL");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return on;
}

}  // namespace

at::Tensor empty_reused(at::IntArrayRef sizes, const at::TensorOptions& options) {
  TORCH_CHECK(options.device().is_cpu(), "empty_reused: CPU tensors only");
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (bytes < kPoolMinBytes || !pool_enabled()) {
    at::Tensor out = at::empty(sizes, options);
    advise_huge_pages(out.data_ptr(), out.nbytes());  // before the first write
    return out;
  }
  void* p = pool().take(bytes);
  return at::from_blob(p, sizes, [bytes](void* q) { pool().give(q, bytes); }, options);
}

size_t buffer_pool_idle_blocks() { return pool().idle().first; }
size_t buffer_pool_idle_bytes() { return pool().idle().second; }

}  // namespace exgramed
