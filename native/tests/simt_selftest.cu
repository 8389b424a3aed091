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
// the barrier that orders the write before the read. Each launch writes other values
// (seed), so a read that comes before the write sees the last launch's.
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
  copy_kernel<<<1, 32, 64 * 1024>>>(a, a, 4);  // dynamic shared memory past 48 KiB without opt-in
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

}  // namespace

TEST_MAIN()
