// The reused output buffers (cpu/buffer_pool.h): a freed block of the same size is handed out
// again, other sizes get their own, at most kPoolMaxIdle idle blocks are kept, small requests
// bypass the pool, the idle bytes stay under the cap, and the tensors behave as ordinary CPU tensors.
#include "cpu/buffer_pool.h"
#include "test_util.h"

int main() {
  using exgramed::buffer_pool_idle_blocks;
  using exgramed::buffer_pool_idle_bytes;
  using exgramed::empty_reused;
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  const int64_t n = int64_t(exgramed::kPoolMinBytes / 4) + 1000;  // just above the pool's threshold
  EXPECT(buffer_pool_idle_blocks() == 0);

  void* first = nullptr;
  {
    at::Tensor a = empty_reused({n}, opts);
    EXPECT(a.is_contiguous() && a.numel() == n && a.scalar_type() == at::kFloat && a.device().is_cpu());
    a.fill_(3.0f);
    EXPECT(a.sum().item<double>() == 3.0 * double(n));
    first = a.data_ptr();
    EXPECT(reinterpret_cast<uintptr_t>(first) % (size_t(2) << 20) == 0);  // huge-page aligned
  }
  EXPECT(buffer_pool_idle_blocks() == 1);
  EXPECT(buffer_pool_idle_bytes() == size_t(n) * 4);
  {
    at::Tensor b = empty_reused({n}, opts);  // the same size: the same block
    EXPECT(b.data_ptr() == first);
    EXPECT(buffer_pool_idle_blocks() == 0);
    at::Tensor c = empty_reused({n + 8}, opts);  // another size: a new block
    EXPECT(c.data_ptr() != first);
    at::Tensor d = empty_reused({2, n / 2}, opts.dtype(at::kDouble));  // shape and dtype only matter by bytes
    EXPECT(d.dim() == 2 && d.scalar_type() == at::kDouble);
  }
  // Three blocks freed, two kept (the most recently freed).
  EXPECT(buffer_pool_idle_blocks() == size_t(exgramed::kPoolMaxIdle));

  // Below the threshold: plain allocations, the pool untouched.
  const size_t idle = buffer_pool_idle_blocks();
  { at::Tensor s = empty_reused({16, 16}, opts); EXPECT(s.numel() == 256); }
  EXPECT(buffer_pool_idle_blocks() == idle);
  { at::Tensor z = empty_reused({0, 5}, opts); EXPECT(z.numel() == 0); }
  EXPECT(buffer_pool_idle_blocks() == idle);

  // A pooled tensor shared by views keeps its block until the last view goes.
  {
    at::Tensor e = empty_reused({n}, opts);
    at::Tensor v = e.narrow(0, 10, 100);
    const size_t before = buffer_pool_idle_blocks();
    e = at::Tensor();
    EXPECT(buffer_pool_idle_blocks() == before);
    v.fill_(1.0f);
    EXPECT(v.sum().item<double>() == 100.0);
  }

  // A block above the idle cap is freed at once; blocks that would pass it push the oldest out.
  {
    const int64_t big = int64_t(exgramed::kPoolMaxIdleBytes / 4) + 1;
    at::Tensor huge = empty_reused({big}, opts);
    huge.fill_(0.0f);
  }
  EXPECT(buffer_pool_idle_bytes() <= exgramed::kPoolMaxIdleBytes);
  {
    const int64_t third = int64_t(exgramed::kPoolMaxIdleBytes / 4 / 3) + 1;  // two fit, not with the rest
    at::Tensor a = empty_reused({third}, opts), b = empty_reused({third + 1}, opts);
  }
  EXPECT(buffer_pool_idle_bytes() <= exgramed::kPoolMaxIdleBytes);
  EXPECT(buffer_pool_idle_blocks() <= size_t(exgramed::kPoolMaxIdle));

  EXPECT_THROWS_WITH(empty_reused({4}, opts.device(at::kMeta)), "CPU tensors only");
  return exgramed_test::failures;
}
