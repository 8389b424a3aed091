// Checks of the SIMT host emulation itself (native/cuda/emulation/), on kernels written
// for the purpose: that what test_cuda_simt runs the backend's kernels on behaves as a
// GPU does where those kernels depend on it (barriers, warp shuffles, shared memory,
// launch limits, device memory), and that it catches the mistakes it is there to catch
// (a missing barrier, a barrier in divergent code, a read of unwritten memory).
#include <cuda_runtime.h>

#include <cmath>
#include <string>
#include <vector>

#include "check.hpp"

namespace {

// Sum of in[0..n) per block: warp shuffles, then the warps' sums in shared memory.
__global__ void block_sum_kernel(const int* in, int n, int* out) {
  __shared__ int warp_sums[32];
  int v = 0;
  for (int k = blockIdx.x * blockDim.x + threadIdx.x; k < n; k += gridDim.x * blockDim.x) v += in[k];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    int t = lane < (int)((blockDim.x + 31) / 32) ? warp_sums[lane] : 0;
    for (int o = 16; o > 0; o >>= 1) t += __shfl_down_sync(0xffffffffu, t, o);
    if (lane == 0) out[blockIdx.x] = t;
  }
}

// Each thread reads its neighbour's (t + step) slot of shared memory, with or without
// the barrier that orders the write before the read. A read that comes before the write
// sees the poison each block's shared memory starts with (and each launch writes other
// values, seed, so not even a stale slot could pass).
__global__ void neighbour_kernel(int* out, int step, bool barrier, int seed) {
  __shared__ int slots[256];
  const int t = threadIdx.x, n = blockDim.x;
  slots[t] = seed + 1000 * (int)blockIdx.x + t + 1;
  if (barrier) __syncthreads();
  out[blockIdx.x * n + t] = slots[(t + step + n) % n];
}

// Threads past n return before the barrier; the others must still get through it.
__global__ void early_return_kernel(int n, int* out) {
  __shared__ int total;
  if ((int)threadIdx.x >= n) return;
  if (threadIdx.x == 0) total = 0;
  __syncthreads();
  atomicAdd(&total, 1);
  __syncthreads();
  out[threadIdx.x] = total;
}

// A full-mask shuffle that half of each warp skips (undefined on a GPU: a hang or garbage).
__global__ void half_warp_shuffle_kernel(int* out) {
  int v = (int)threadIdx.x;
  if ((threadIdx.x & 31) < 16) v = __shfl_down_sync(0xffffffffu, v, 1);
  __syncthreads();
  out[threadIdx.x] = v;
}

// Block 0 writes its shared array, the other blocks only read theirs: on a GPU each block
// has its own shared memory, whose contents before any write are undefined.
__global__ void unwritten_shared_kernel(float* out) {
  __shared__ float carried[32];
  if (blockIdx.x == 0) carried[threadIdx.x] = 1.0f + (float)threadIdx.x;
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = carried[threadIdx.x];
}

// Each thread copies its value into dynamic shared memory by cp.async (as the staged CM
// loss and the own filter gradient do) and reads the slot before and after the wait.
// `read` bytes of 4 come from the source, the rest are zeros.
__global__ void cp_async_kernel(const float* in, float* before, float* after, int read) {
  extern __shared__ float slots[];
  const unsigned d = (unsigned)__cvta_generic_to_shared(&slots[threadIdx.x]);
  const float* src = in + threadIdx.x;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(d), "l"(src), "r"(read) : "memory");
  asm volatile("cp.async.commit_group;\n" ::);
  before[threadIdx.x] = slots[threadIdx.x];
  asm volatile("cp.async.wait_group %0;\n" ::"n"(0) : "memory");
  after[threadIdx.x] = slots[threadIdx.x];
}

// Two groups in flight; wait_group 1 lands the older only.
__global__ void cp_async_groups_kernel(const float* in, float* out) {
  extern __shared__ float slots[];
  const int t = threadIdx.x;
  const unsigned d0 = (unsigned)__cvta_generic_to_shared(&slots[2 * t]);
  const unsigned d1 = (unsigned)__cvta_generic_to_shared(&slots[2 * t + 1]);
  const float* s0 = in + 2 * t;
  const float* s1 = in + 2 * t + 1;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(d0), "l"(s0), "r"(4) : "memory");
  asm volatile("cp.async.commit_group;\n" ::);
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(d1), "l"(s1), "r"(4) : "memory");
  asm volatile("cp.async.commit_group;\n" ::);
  asm volatile("cp.async.wait_group 1;\n" ::: "memory");
  out[2 * t] = slots[2 * t];
  out[2 * t + 1] = slots[2 * t + 1];
}

// A 16-byte copy from `in + offset` (16-byte aligned only when offset % 4 == 0).
__global__ void cp_async16_kernel(const float* in, int offset, float* out) {
  extern __shared__ __align__(16) float quad[];
  const unsigned d = (unsigned)__cvta_generic_to_shared(quad);
  const float* src = in + offset;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(16) : "memory");
  asm volatile("cp.async.commit_group;\n" ::);
  asm volatile("cp.async.wait_group %0;\n" ::"n"(0) : "memory");
  for (int k = 0; k < 4; ++k) out[k] = quad[k];
}

// D = A B + C on the tensor cores, one warp: A 16x8 row-major, B 8x8 row-major (read as
// the column operand), C and D 16x8, fragments per the PTX ISA's m16n8k8 .tf32 layout
// (g = lane / 4, t = lane % 4), written out independently of the emulation's own code.
__global__ void mma_kernel(const float* A, const float* B, const float* C, float* D) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  uint32_t a[4], b[2];
  float c[4];
  const float av[4] = {A[g * 8 + t], A[(g + 8) * 8 + t], A[g * 8 + t + 4], A[(g + 8) * 8 + t + 4]};
  for (int i = 0; i < 4; ++i) asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(a[i]) : "f"(av[i]));
  b[0] = __float_as_uint(B[t * 8 + g]);
  b[1] = __float_as_uint(B[(t + 4) * 8 + g]);
  for (int i = 0; i < 4; ++i) c[i] = C[(g + (i >= 2 ? 8 : 0)) * 8 + 2 * t + (i & 1)];
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  for (int i = 0; i < 4; ++i) D[(g + (i >= 2 ? 8 : 0)) * 8 + 2 * t + (i & 1)] = c[i];
}

__global__ void tf32_round_kernel(const float* in, float* out, int n) {
  for (int k = threadIdx.x; k < n; k += blockDim.x) {
    uint32_t u;
    asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(u) : "f"(in[k]));
    out[k] = __uint_as_float(u);
  }
}

// Each block adds one to what the block before it wrote: a chain a GPU runs in no order.
__global__ void chained_blocks_kernel(int* a) {
  if (threadIdx.x == 0) a[blockIdx.x + 1] = a[blockIdx.x] + 1;
}

__global__ void copy_kernel(const float* in, float* out, int n) {
  for (int k = blockIdx.x * blockDim.x + threadIdx.x; k < n; k += gridDim.x * blockDim.x) out[k] = in[k];
}

template <class T>
T* device_array(size_t n) {
  void* p = nullptr;
  CHECK(cudaMallocAsync(&p, n * sizeof(T), nullptr) == cudaSuccess);
  return static_cast<T*>(p);
}

TEST(shuffle_and_shared_memory_reductions) {
  for (int threads : {32, 96, 256, 1024}) {
    const int n = 12345, blocks = 3;
    std::vector<int> in(n);
    long long want = 0;
    for (int k = 0; k < n; ++k) want += in[k] = (k * 7919) % 1001 - 500;
    int* d_in = device_array<int>(n);
    int* d_out = device_array<int>(blocks);
    cudaMemcpyAsync(d_in, in.data(), n * sizeof(int), cudaMemcpyHostToDevice);
    block_sum_kernel<<<blocks, threads>>>(d_in, n, d_out);
    CHECK(cudaGetLastError() == cudaSuccess);
    long long got = 0;
    for (int b = 0; b < blocks; ++b) got += d_out[b];
    std::printf("  block sum, %d threads a block: %lld (want %lld)\n", threads, got, want);
    CHECK(got == want);
    cudaFreeAsync(d_in, nullptr), cudaFreeAsync(d_out, nullptr);
  }
}

// Without the barrier a GPU gives no order; the emulation runs the threads of even
// blocks upward and of odd ones downward, so the missing barrier shows whichever
// neighbour a thread reads.
TEST(a_missing_barrier_shows_in_the_result) {
  const int n = 64, blocks = 2;
  int* out = device_array<int>(blocks * n);
  int seed = 0;
  for (int step : {1, -1}) {
    for (bool barrier : {true, false}) {
      seed += 100000;
      neighbour_kernel<<<blocks, n>>>(out, step, barrier, seed);
      CHECK(cudaGetLastError() == cudaSuccess);
      int wrong[2] = {0, 0};
      for (int b = 0; b < blocks; ++b)
        for (int t = 0; t < n; ++t) wrong[b] += out[b * n + t] != seed + 1000 * b + (t + step + n) % n + 1;
      std::printf("  neighbour %+d, %s barrier: reads wrong %d of %d in block 0, %d in block 1\n", step,
                  barrier ? "with" : "without", wrong[0], n, wrong[1]);
      CHECK(barrier ? wrong[0] + wrong[1] == 0 : wrong[0] + wrong[1] > 0);
    }
  }
  cudaFreeAsync(out, nullptr);
}

TEST(threads_that_returned_leave_the_barrier) {
  int* out = device_array<int>(128);
  early_return_kernel<<<1, 128>>>(100, out);
  CHECK(cudaGetLastError() == cudaSuccess);
  for (int t = 0; t < 100; ++t) CHECK(out[t] == 100);
  cudaFreeAsync(out, nullptr);
}

TEST(shuffles_a_gpu_leaves_undefined_are_launch_failures) {
  int* out = device_array<int>(1000);
  half_warp_shuffle_kernel<<<1, 64>>>(out);
  cudaError_t e = cudaGetLastError();
  std::printf("  half a warp at a shuffle: %s: %s\n", cudaGetErrorName(e), cudaGetErrorString(e));
  CHECK(e == cudaErrorLaunchFailure);
  CHECK(std::string(cudaGetErrorString(e)).find("deadlock") != std::string::npos);
  CHECK(cudaGetLastError() == cudaSuccess);  // read once, as the runtime's
  // 1000 threads: the last warp has 8 lanes, and the full-mask shuffles read lanes 8-31.
  block_sum_kernel<<<1, 1000>>>(out, 1000, out);
  e = cudaGetLastError();
  std::printf("  full-mask shuffle in a partial warp: %s: %s\n", cudaGetErrorName(e), cudaGetErrorString(e));
  CHECK(e == cudaErrorLaunchFailure);
  CHECK(std::string(cudaGetErrorString(e)).find("partial warp") != std::string::npos);
  cudaFreeAsync(out, nullptr);
}

TEST(launch_limits_are_the_gpus) {
  float* a = device_array<float>(4);
  copy_kernel<<<1, 1025>>>(a, a, 4);
  CHECK(cudaGetLastError() == cudaErrorInvalidValue);
  copy_kernel<<<0, 32>>>(a, a, 4);
  CHECK(cudaGetLastError() == cudaErrorInvalidValue);
  copy_kernel<<<dim3(2, 2), dim3(8, 4)>>>(a, a, 4);
  CHECK(cudaGetLastError() == cudaSuccess);
  cudaFreeAsync(a, nullptr);
}

TEST(device_memory_starts_as_nan_and_is_exactly_sized) {
  const int n = 37;
  float* in = device_array<float>(n);
  float* out = device_array<float>(n);
  copy_kernel<<<2, 32>>>(in, out, n);
  CHECK(cudaGetLastError() == cudaSuccess);
  int nans = 0;
  for (int k = 0; k < n; ++k) nans += std::isnan(out[k]);
  CHECK(nans == n);  // nobody wrote `in`
  void* huge = nullptr;
  CHECK(cudaMallocAsync(&huge, size_t(1) << 50, nullptr) == cudaErrorMemoryAllocation);
  CHECK(cudaFreeAsync(in, nullptr) == cudaSuccess && cudaFreeAsync(out, nullptr) == cudaSuccess);
  CHECK(cudaFreeAsync(in, nullptr) == cudaErrorInvalidValue);  // twice
}

// The emulation's __shared__ arrays are one object for every block (function-local
// statics); each block's first thread to reach one poisons it, so a block does not see
// what the previous block left there.
TEST(shared_memory_is_each_blocks_own) {
  const int n = 32, blocks = 3;
  float* out = device_array<float>(blocks * n);
  unwritten_shared_kernel<<<blocks, n>>>(out);
  CHECK(cudaGetLastError() == cudaSuccess);
  int nans[blocks] = {0, 0, 0};
  for (int b = 0; b < blocks; ++b)
    for (int t = 0; t < n; ++t) nans[b] += std::isnan(out[b * n + t]);
  std::printf("  NaN reads of unwritten shared memory: %d, %d, %d of %d in blocks 0-2\n", nans[0], nans[1], nans[2], n);
  for (int t = 0; t < n; ++t) CHECK(out[t] == 1.0f + (float)t);
  CHECK(nans[1] == n && nans[2] == n);
  cudaFreeAsync(out, nullptr);
}

template <class T>
std::vector<T> host_copy(const T* d, size_t n) {
  std::vector<T> h(n);
  cudaMemcpyAsync(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost);
  return h;
}

TEST(cp_async_lands_at_its_wait) {
  const int n = 64;
  std::vector<float> in(n);
  for (int k = 0; k < n; ++k) in[k] = 0.5f + (float)k;
  float* d_in = device_array<float>(n);
  float* before = device_array<float>(n);
  float* after = device_array<float>(n);
  cudaMemcpyAsync(d_in, in.data(), n * sizeof(float), cudaMemcpyHostToDevice);
  for (int read : {4, 0}) {
    cp_async_kernel<<<2, n, n * sizeof(float)>>>(d_in, before, after, read);
    CHECK(cudaGetLastError() == cudaSuccess);
    const std::vector<float> b = host_copy(before, n), a = host_copy(after, n);
    int nan_before = 0, right_after = 0;
    for (int k = 0; k < n; ++k) nan_before += std::isnan(b[k]), right_after += a[k] == (read ? in[k] : 0.f);
    std::printf("  cp.async reading %d of 4 bytes: NaN before the wait %d of %d, right after it %d\n", read, nan_before,
                n, right_after);
    CHECK(nan_before == n && right_after == n);
  }
  float* out = device_array<float>(2 * n);
  cp_async_groups_kernel<<<1, n / 2, n * sizeof(float)>>>(d_in, out);
  CHECK(cudaGetLastError() == cudaSuccess);
  const std::vector<float> o = host_copy(out, n);
  for (int t = 0; t < n / 2; ++t) CHECK(o[2 * t] == in[2 * t] && std::isnan(o[2 * t + 1]));
  cp_async16_kernel<<<1, 1, 16>>>(d_in, 4, out);
  CHECK(cudaGetLastError() == cudaSuccess);
  for (int k = 0; k < 4; ++k) CHECK(host_copy(out, 4)[k] == in[4 + k]);
  cp_async16_kernel<<<1, 1, 16>>>(d_in, 2, out);  // 8 bytes past a 16-byte boundary
  const cudaError_t e = cudaGetLastError();
  std::printf("  misaligned 16-byte cp.async: %s\n", cudaGetErrorString(e));
  CHECK(e == cudaErrorLaunchFailure && std::string(cudaGetErrorString(e)).find("aligned") != std::string::npos);
  cudaFreeAsync(d_in, nullptr), cudaFreeAsync(before, nullptr), cudaFreeAsync(after, nullptr);
  cudaFreeAsync(out, nullptr);
}

TEST(mma_matches_a_matrix_product) {
  // Small integers and halves: exact in TF32 and in every partial sum, so D is exact.
  std::vector<float> A(16 * 8), B(8 * 8), C(16 * 8), want(16 * 8);
  for (int r = 0; r < 16; ++r)
    for (int k = 0; k < 8; ++k) A[r * 8 + k] = (float)((r * 3 + k * 5) % 7 - 3);
  for (int k = 0; k < 8; ++k)
    for (int c = 0; c < 8; ++c) B[k * 8 + c] = 0.5f * (float)((k * 7 + c * 2) % 9 - 4);
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 8; ++c) {
      C[r * 8 + c] = (float)(r - c);
      double s = C[r * 8 + c];
      for (int k = 0; k < 8; ++k) s += (double)A[r * 8 + k] * B[k * 8 + c];
      want[r * 8 + c] = (float)s;
    }
  float *dA = device_array<float>(128), *dB = device_array<float>(64), *dC = device_array<float>(128),
        *dD = device_array<float>(128);
  cudaMemcpyAsync(dA, A.data(), 128 * sizeof(float), cudaMemcpyHostToDevice);
  cudaMemcpyAsync(dB, B.data(), 64 * sizeof(float), cudaMemcpyHostToDevice);
  cudaMemcpyAsync(dC, C.data(), 128 * sizeof(float), cudaMemcpyHostToDevice);
  mma_kernel<<<1, 32>>>(dA, dB, dC, dD);
  CHECK(cudaGetLastError() == cudaSuccess);
  const std::vector<float> got = host_copy(dD, 128);
  int wrong = 0;
  for (int k = 0; k < 128; ++k) wrong += got[k] != want[k];
  std::printf("  mma m16n8k8 tf32: %d of 128 outputs differ from the product\n", wrong);
  CHECK(wrong == 0);
  mma_kernel<<<1, 16>>>(dA, dB, dC, dD);  // half a warp
  const cudaError_t e = cudaGetLastError();
  CHECK(e == cudaErrorLaunchFailure && std::string(cudaGetErrorString(e)).find("partial warp") != std::string::npos);
  cudaFreeAsync(dA, nullptr), cudaFreeAsync(dB, nullptr), cudaFreeAsync(dC, nullptr), cudaFreeAsync(dD, nullptr);
}

// cvt.rna.tf32.f32 keeps 10 mantissa bits, rounding to nearest with ties away from zero.
TEST(tf32_rounding_is_to_nearest_ties_away) {
  const float one = 1.0f, ulp = std::ldexp(1.0f, -10);  // TF32's spacing at 1
  const std::vector<float> in = {one + ulp / 2, -(one + ulp / 2), one + ulp / 4, one + 3 * ulp / 4,
                                 one + ulp + ulp / 2, 3.0f, INFINITY};
  const std::vector<float> want = {one + ulp, -(one + ulp), one, one + ulp, one + 2 * ulp, 3.0f, INFINITY};
  float* d_in = device_array<float>(in.size());
  float* d_out = device_array<float>(in.size());
  cudaMemcpyAsync(d_in, in.data(), in.size() * sizeof(float), cudaMemcpyHostToDevice);
  tf32_round_kernel<<<1, 32>>>(d_in, d_out, (int)in.size());
  CHECK(cudaGetLastError() == cudaSuccess);
  const std::vector<float> got = host_copy(d_out, in.size());
  for (size_t k = 0; k < in.size(); ++k) CHECK(got[k] == want[k]);
  cudaFreeAsync(d_in, nullptr), cudaFreeAsync(d_out, nullptr);
}

TEST(dynamic_shared_memory_past_48k_needs_the_opt_in) {
  float* a = device_array<float>(4);
  copy_kernel<<<1, 32, 64 * 1024>>>(a, a, 4);
  CHECK(cudaGetLastError() == cudaErrorInvalidValue);
  CHECK(cudaFuncSetAttribute(copy_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024) == cudaSuccess);
  cudaFuncAttributes fa{};
  CHECK(cudaFuncGetAttributes(&fa, copy_kernel) == cudaSuccess && fa.maxDynamicSharedSizeBytes == 64 * 1024);
  copy_kernel<<<1, 32, 64 * 1024>>>(a, a, 4);
  CHECK(cudaGetLastError() == cudaSuccess);
  copy_kernel<<<1, 32, 64 * 1024 + 4>>>(a, a, 4);  // past the opt-in
  CHECK(cudaGetLastError() == cudaErrorInvalidValue);
  CHECK(cudaFuncSetAttribute(copy_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 300 * 1024) ==
        cudaErrorInvalidValue);  // past the device's 227 KiB
  cudaGetLastError();
  cudaFreeAsync(a, nullptr);
}

// CMSEG_SIMT_BLOCK_ORDER=check runs each launch's blocks in grid order and in reverse
// from the same memory: blocks that depend on each other give other results.
TEST(blocks_that_race_are_found_by_running_them_in_reverse) {
  setenv("CMSEG_SIMT_BLOCK_ORDER", "check", 1);
  const int n = 9;
  int* a = device_array<int>(n);
  cudaMemsetAsync(a, 0, n * sizeof(int));
  chained_blocks_kernel<<<n - 1, 32>>>(a);
  const cudaError_t e = cudaGetLastError();
  std::printf("  a chain of blocks: %s\n", cudaGetErrorString(e));
  CHECK(e == cudaErrorLaunchFailure && std::string(cudaGetErrorString(e)).find("blocks race") != std::string::npos);
  float* in = device_array<float>(1000);
  float* out = device_array<float>(1000);
  cudaMemsetAsync(in, 0, 1000 * sizeof(float));
  copy_kernel<<<4, 64>>>(in, out, 1000);  // blocks that keep to their own elements
  CHECK(cudaGetLastError() == cudaSuccess);
  unsetenv("CMSEG_SIMT_BLOCK_ORDER");
  chained_blocks_kernel<<<n - 1, 32>>>(a);  // unchecked: grid order
  CHECK(cudaGetLastError() == cudaSuccess);
  CHECK(host_copy(a, n)[n - 1] == n - 1);
  cudaFreeAsync(a, nullptr), cudaFreeAsync(in, nullptr), cudaFreeAsync(out, nullptr);
}

__global__ void fill_kernel(int* out, int n, int value) {
  for (int k = blockIdx.x * blockDim.x + threadIdx.x; k < n; k += gridDim.x * blockDim.x) out[k] = value;
}

// CMSEG_SIMT_STREAMS=<mode> for the scope (all queued work done before it ends).
struct DeferredStreams {
  explicit DeferredStreams(const char* mode = "deferred") { setenv("CMSEG_SIMT_STREAMS", mode, 1); }
  ~DeferredStreams() { unsetenv("CMSEG_SIMT_STREAMS"); }
};

// What deferred streams make visible: work runs only when waited for, so a copy on one
// stream of what another computes gets the old contents unless it waits for an event
// recorded after that work, and a pinned source refilled before its copy ran is what the
// copy takes (a pageable one is taken at the call, as CUDA does).
TEST(deferred_streams_show_missing_waits) {
  DeferredStreams deferred;
  cudaStream_t a = nullptr, b = nullptr;
  cudaEvent_t done = nullptr;
  CHECK(cudaStreamCreateWithFlags(&a, 0) == cudaSuccess && cudaStreamCreateWithFlags(&b, 0) == cudaSuccess);
  CHECK(cudaEventCreate(&done) == cudaSuccess);
  const int n = 64;
  int* d = device_array<int>(n);
  std::vector<int> h(n, 0);
  fill_kernel<<<2, 32, 0, a>>>(d, n, 7);
  cudaMemcpyAsync(h.data(), d, n * sizeof(int), cudaMemcpyDeviceToHost, a);  // into pageable memory: waits
  CHECK(h[0] == 7 && h[n - 1] == 7);
  fill_kernel<<<2, 32, 0, a>>>(d, n, 8);
  cudaMemcpyAsync(h.data(), d, n * sizeof(int), cudaMemcpyDeviceToHost, b);  // b never waited for a
  CHECK(h[0] == 7);
  fill_kernel<<<2, 32, 0, a>>>(d, n, 9);
  cudaEventRecord(done, a);
  cudaStreamWaitEvent(b, done, 0);
  cudaMemcpyAsync(h.data(), d, n * sizeof(int), cudaMemcpyDeviceToHost, b);
  CHECK(h[0] == 9 && h[n - 1] == 9);

  int* pinned = nullptr;
  CHECK(cudaMallocHost(reinterpret_cast<void**>(&pinned), n * sizeof(int)) == cudaSuccess);
  for (int k = 0; k < n; ++k) pinned[k] = 1;
  cudaMemcpyAsync(d, pinned, n * sizeof(int), cudaMemcpyHostToDevice, a);
  for (int k = 0; k < n; ++k) pinned[k] = 2;  // refilled before the copy was waited for
  CHECK(cudaStreamSynchronize(a) == cudaSuccess);
  cudaMemcpyAsync(h.data(), d, n * sizeof(int), cudaMemcpyDeviceToHost, a);
  CHECK(h[0] == 2);
  std::vector<int> pageable(n, 1);
  cudaMemcpyAsync(d, pageable.data(), n * sizeof(int), cudaMemcpyHostToDevice, a);
  pageable.assign(n, 2);
  cudaMemcpyAsync(h.data(), d, n * sizeof(int), cudaMemcpyDeviceToHost, a);
  CHECK(h[0] == 1);
  // A failure in queued work shows at the synchronisation, not at the launch.
  half_warp_shuffle_kernel<<<1, 32, 0, a>>>(d);
  CHECK(cudaGetLastError() == cudaSuccess);
  CHECK(cudaStreamSynchronize(a) == cudaErrorLaunchFailure);
  CHECK(cudaGetLastError() == cudaErrorLaunchFailure);
  CHECK(cudaFreeHost(pinned) == cudaSuccess);
  CHECK(cudaFreeAsync(d, a) == cudaSuccess);
  CHECK(cudaFreeAsync(d, a) == cudaErrorInvalidValue);  // twice, before the first ran
  cudaStreamDestroy(a);
  cudaStreamDestroy(b);
  cudaEventDestroy(done);
}

// Early streams: when stream a's work is run, b's work that waits for nothing runs
// first, so a copy on b of what a computes, without b waiting for it, takes the old
// contents (on a GPU b may well start first); with the wait it takes the new ones.
TEST(early_streams_show_a_missing_wait_for_earlier_work) {
  DeferredStreams early("early");
  cudaStream_t a = nullptr, b = nullptr;
  cudaEvent_t ready = nullptr;
  CHECK(cudaStreamCreateWithFlags(&a, 0) == cudaSuccess && cudaStreamCreateWithFlags(&b, 0) == cudaSuccess);
  CHECK(cudaEventCreate(&ready) == cudaSuccess);
  const int n = 64;
  int *d = device_array<int>(n), *e = device_array<int>(n);
  std::vector<int> h(n, 0);
  fill_kernel<<<2, 32, 0, a>>>(d, n, 1);
  CHECK(cudaStreamSynchronize(a) == cudaSuccess);
  fill_kernel<<<2, 32, 0, a>>>(d, n, 5);
  cudaMemcpyAsync(e, d, n * sizeof(int), cudaMemcpyDeviceToDevice, b);  // b did not wait for a
  CHECK(cudaStreamSynchronize(a) == cudaSuccess);
  cudaMemcpyAsync(h.data(), e, n * sizeof(int), cudaMemcpyDeviceToHost, b);
  CHECK(h[0] == 1 && h[n - 1] == 1);
  fill_kernel<<<2, 32, 0, a>>>(d, n, 6);
  cudaEventRecord(ready, a);
  cudaStreamWaitEvent(b, ready, 0);
  cudaMemcpyAsync(e, d, n * sizeof(int), cudaMemcpyDeviceToDevice, b);
  CHECK(cudaStreamSynchronize(a) == cudaSuccess);
  cudaMemcpyAsync(h.data(), e, n * sizeof(int), cudaMemcpyDeviceToHost, b);
  CHECK(h[0] == 6 && h[n - 1] == 6);
  cudaFreeAsync(d, a);
  cudaFreeAsync(e, b);
  cudaStreamDestroy(a);
  cudaStreamDestroy(b);
  cudaEventDestroy(ready);
}

// A fork and join as conv3's overlapped backward does them: b waits for a's first work,
// writes, a waits for b and writes after it. Whatever runs early, a's work after its wait
// starts only once the wait is over, so a's write is the last.
TEST(early_streams_keep_work_after_a_wait_behind_it) {
  DeferredStreams early("early");
  cudaStream_t a = nullptr, b = nullptr;
  cudaEvent_t fork = nullptr, join = nullptr;
  CHECK(cudaStreamCreateWithFlags(&a, 0) == cudaSuccess && cudaStreamCreateWithFlags(&b, 0) == cudaSuccess);
  CHECK(cudaEventCreate(&fork) == cudaSuccess && cudaEventCreate(&join) == cudaSuccess);
  const int n = 64;
  int* d = device_array<int>(n);
  std::vector<int> h(n, 0);
  fill_kernel<<<2, 32, 0, a>>>(d, n, 1);
  cudaEventRecord(fork, a);
  cudaStreamWaitEvent(b, fork, 0);
  fill_kernel<<<2, 32, 0, b>>>(d, n, 5);
  cudaEventRecord(join, b);
  cudaStreamWaitEvent(a, join, 0);
  fill_kernel<<<2, 32, 0, a>>>(d, n, 7);
  cudaMemcpyAsync(h.data(), d, n * sizeof(int), cudaMemcpyDeviceToHost, a);
  CHECK(h[0] == 7 && h[n - 1] == 7);
  cudaFreeAsync(d, a);
  cudaStreamDestroy(a);
  cudaStreamDestroy(b);
  cudaEventDestroy(fork);
  cudaEventDestroy(join);
}

}  // namespace

TEST_MAIN()
