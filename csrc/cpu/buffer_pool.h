// Reused CPU output buffers for the large tensors an op writes in full every training step
// (pair_scores' edge-pair table: 39 MB at align's B = 256).
//
// A buffer above glibc's largest mmap threshold (32 MiB) is new memory on every allocation: the
// kernel zero-fills each page on first touch (about a fifth of pair_scores' time at B = 256, even in
// transparent huge pages) and, with huge pages advised, may compact memory first. A step's table is
// freed by the time the next step asks for one of the same size, so handing the block back instead
// of unmapping it removes both.
//
// empty_reused(sizes, options): like at::empty on the CPU (contiguous, uninitialised); the caller
// must write every element. Blocks of at least kPoolMinBytes come from / return to a small
// process-wide pool keyed by exact byte size (at most kPoolMaxIdle idle blocks and kPoolMaxIdleBytes
// in all, the oldest freed first beyond that: the idle memory a training loop holds between steps is
// bounded), 2 MiB aligned and advised as transparent huge pages once, at allocation. The cap holds
// align's table up to B = 1024 at K = 3 (600 MiB), whose zero-fill when fresh costs about 13 % of a step.
// Smaller requests are at::empty. The tensors do not own a resizable storage (like from_blob).
// EXGRAMED_BUFFER_POOL=0 in the environment turns the pool off (every request is at::empty with
// the huge-page advice).
#pragma once
#include <ATen/ATen.h>

#include <cstddef>

namespace exgramed {

constexpr size_t kPoolMinBytes = size_t(4) << 20;
constexpr int kPoolMaxIdle = 2;
constexpr size_t kPoolMaxIdleBytes = size_t(1024) << 20;

at::Tensor empty_reused(at::IntArrayRef sizes, const at::TensorOptions& options);

// Idle blocks held and their bytes (tests, diagnostics).
size_t buffer_pool_idle_blocks();
size_t buffer_pool_idle_bytes();

}  // namespace exgramed
