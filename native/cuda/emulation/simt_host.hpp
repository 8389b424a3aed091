// Runs a CUDA kernel body written against an "Ops" interface (see
// native/cuda/conv3_filter_grad.cuh) on the host: one std::thread per CUDA thread of a
// block, a real barrier for __syncthreads, shared memory filled with NaN when the
// block starts (a read of a slot no copy reached shows up in the result), and cp.async
// copies held back until the wait that the kernel relies on (a missing wait, or a
// slot overwritten while still in use, changes the result). Blocks run one after
// another. For tests on machines without a GPU; the speed is a test's, not a GPU's.
#pragma once
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <vector>

namespace cmseg {
namespace simt {

class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait() {
    std::unique_lock<std::mutex> lk(m_);
    const uint64_t gen = gen_;
    if (++waiting_ == n_) {
      waiting_ = 0;
      ++gen_;
      cv_.notify_all();
      return;
    }
    cv_.wait(lk, [&] { return gen_ != gen; });
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  int n_, waiting_ = 0;
  uint64_t gen_ = 0;
};

// What the block's threads share.
struct Block {
  int index[3], dims[3];
  Barrier barrier;
  std::vector<float> smem;
  Block(const int (&idx)[3], const int (&dim)[3], int threads, size_t smem_floats)
      : index{idx[0], idx[1], idx[2]},
        dims{dim[0], dim[1], dim[2]},
        barrier(threads),
        smem(smem_floats, std::numeric_limits<float>::quiet_NaN()) {}
};

// cvt.rna.tf32.f32: the 13 low mantissa bits rounded off, ties away from zero.
inline float round_tf32(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & 0xffffe000u;
  std::memcpy(&v, &u, 4);
  return v;
}

// One emulated thread's Ops. exact: fragments keep fp32 (no TF32 rounding), for
// checks of the indexing alone at fp32 tolerance.
class ThreadOps {
 public:
  struct FragA {
    float v[16][8];
  };
  struct FragB {
    float v[8][8];
  };
  ThreadOps(Block& b, int tid, bool exact) : b_(b), tid_(tid), exact_(exact) {}
  int tid() const { return tid_; }
  int block(int axis) const { return b_.index[axis]; }
  int grid(int axis) const { return b_.dims[axis]; }
  void sync() { b_.barrier.wait(); }
  void copy4(float* dst, const float* src, bool valid) {
    uint32_t bits = 0;
    if (valid) std::memcpy(&bits, src, 4);
    open_.push_back({dst, bits});
  }
  // cp.async of 4 bytes of which the first `bytes` (0..4) are read, the rest zeros; both
  // addresses 4-byte aligned, as the instruction requires.
  void copy_bytes(void* dst, const void* src, int bytes) {
    if ((reinterpret_cast<uintptr_t>(dst) | (bytes ? reinterpret_cast<uintptr_t>(src) : 0)) & 3)
      throw std::logic_error("simt: a 4-byte copy between addresses not 4-byte aligned");
    if (bytes < 0 || bytes > 4) throw std::logic_error("simt: a 4-byte copy of more than 4 or fewer than 0 bytes");
    uint32_t bits = 0;
    std::memcpy(&bits, src, (size_t)bytes);
    open_.push_back({dst, bits});
  }
  void copy16(float* dst, const float* src, bool valid) {
    if ((reinterpret_cast<uintptr_t>(dst) | (valid ? reinterpret_cast<uintptr_t>(src) : 0)) & 15)
      throw std::logic_error("simt: a 16-byte copy between addresses not 16-byte aligned");
    for (int e = 0; e < 4; ++e) copy4(dst + e, src + e, valid);
  }
  void commit() {
    groups_.push_back(std::move(open_));
    open_.clear();
  }
  // cp.async.wait_group N: every group but the newest N has landed.
  template <int N>
  void wait_pending() {
    while (groups_.size() > (size_t)N) {
      for (const Copy& c : groups_.front()) std::memcpy(c.dst, &c.bits, 4);
      groups_.erase(groups_.begin());
    }
  }
  void wait_all_but_one() { wait_pending<1>(); }
  float round(float v) const { return exact_ ? v : round_tf32(v); }
  // The tensor cores read a TF32 operand's top 19 bits: the rest is dropped here too, so
  // an element the kernel forgot to round shows as truncated.
  void load_a(FragA& f, const float* base, int ld) const {
    for (int r = 0; r < 16; ++r)
      for (int k = 0; k < 8; ++k) f.v[r][k] = operand(base[r * ld + k]);
  }
  void load_b(FragB& f, const float* base, int ld) const {
    for (int k = 0; k < 8; ++k)
      for (int n = 0; n < 8; ++n) f.v[k][n] = operand(base[k + n * ld]);
  }
  // This lane's four accumulators of the 16 x 8 product, at the places acc_row /
  // acc_col give them (passed in, so the emulation uses the kernel's own mapping).
  template <class Row, class Col>
  void mma_with(float (&acc)[4], const FragA& a, const FragB& b, Row row, Col col) const {
    const int lane = tid_ & 31;
    for (int i = 0; i < 4; ++i) {
      const int r = row(lane, i), c = col(lane, i);
      double s = 0;
      for (int k = 0; k < 8; ++k) s += (double)a.v[r][k] * b.v[k][c];
      acc[i] += (float)s;
    }
  }

 private:
  struct Copy {
    void* dst;
    uint32_t bits;  // the 4 bytes the copy writes when it lands
  };
  float operand(float v) const {
    if (exact_) return v;
    uint32_t u;
    std::memcpy(&u, &v, 4);
    u &= 0xffffe000u;
    std::memcpy(&v, &u, 4);
    return v;
  }
  Block& b_;
  int tid_;
  bool exact_;
  std::vector<Copy> open_;
  std::vector<std::vector<Copy>> groups_;
};

// Runs body(ops, smem) for every thread of every block of the grid.
template <class Ops, class Body>
void run_grid(const int (&grid)[3], int threads, size_t smem_floats, bool exact, Body body) {
  for (int z = 0; z < grid[2]; ++z)
    for (int y = 0; y < grid[1]; ++y)
      for (int x = 0; x < grid[0]; ++x) {
        Block block({x, y, z}, grid, threads, smem_floats);
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (int t = 0; t < threads; ++t)
          pool.emplace_back([&, t] {
            Ops ops(block, t, exact);
            body(ops, block.smem.data());
          });
        for (std::thread& th : pool) th.join();
      }
}

}  // namespace simt
}  // namespace cmseg
