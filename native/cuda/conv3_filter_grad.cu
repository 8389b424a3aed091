// conv3's filter gradient through our own TF32 tensor-core kernel: the launch, the
// device's operations for the kernel body in conv3_filter_grad.cuh (where the design
// is described), and the partials' sum. conv_cudnn.cu's conv3_backward calls it per
// ContextOptions::conv_wgrad; the CPU reference is native/layers/conv3.cpp.
#include <cstdlib>
#include <map>
#include <mutex>

#include "common.cuh"
#include "conv3_filter_grad.cuh"

namespace cmseg {
namespace cuda {
namespace {

// The kernel body's operations on the device. Fragment layouts of
// mma.m16n8k8.row.col.f32.tf32.tf32.f32 (PTX ISA, "Matrix Fragments for mma.m16n8k8"),
// g = lane / 4, t = lane % 4: A a0 (g, t), a1 (g + 8, t), a2 (g, t + 4), a3 (g + 8, t + 4);
// B b0 (t, g), b1 (t + 4, g); C as wgrad::acc_row / acc_col.
struct DeviceOps {
  struct FragA {
    uint32_t r[4];
  };
  struct FragB {
    uint32_t r[2];
  };
  int g, t;
  __device__ DeviceOps() : g((threadIdx.x & 31) >> 2), t(threadIdx.x & 3) {}
  __device__ __forceinline__ int tid() const { return threadIdx.x; }
  __device__ __forceinline__ int block(int axis) const {
    return axis == 0 ? blockIdx.x : axis == 1 ? blockIdx.y : blockIdx.z;
  }
  __device__ __forceinline__ int grid(int axis) const { return axis == 0 ? gridDim.x : axis == 1 ? gridDim.y : gridDim.z; }
  __device__ __forceinline__ void sync() const { __syncthreads(); }
  // cp.async of 4 bytes; a source size of 0 fills the 4 bytes with zeros.
  __device__ __forceinline__ void copy4(float* dst, const float* src, bool valid) const {
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(d), "l"(src), "r"(valid ? 4 : 0)
                 : "memory");
  }
  // 16 bytes (.cg: cached in L2 only); both addresses 16-byte aligned.
  __device__ __forceinline__ void copy16(float* dst, const float* src, bool valid) const {
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(valid ? 16 : 0)
                 : "memory");
  }
  __device__ __forceinline__ void commit() const { asm volatile("cp.async.commit_group;\n" ::); }
  __device__ __forceinline__ void wait_all_but_one() const { asm volatile("cp.async.wait_group 1;\n" ::: "memory"); }
  __device__ __forceinline__ static float round(float v) {
    uint32_t u;
    asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(u) : "f"(v));
    return __uint_as_float(u);
  }
  // The slots hold TF32 values already (round, once per plane): the fragments are
  // their bits as they are.
  __device__ __forceinline__ void load_a(FragA& f, const float* base, int ld) const {
    f.r[0] = __float_as_uint(base[g * ld + t]);
    f.r[1] = __float_as_uint(base[(g + 8) * ld + t]);
    f.r[2] = __float_as_uint(base[g * ld + t + 4]);
    f.r[3] = __float_as_uint(base[(g + 8) * ld + t + 4]);
  }
  __device__ __forceinline__ void load_b(FragB& f, const float* base, int ld) const {
    f.r[0] = __float_as_uint(base[t + g * ld]);
    f.r[1] = __float_as_uint(base[t + 4 + g * ld]);
  }
  __device__ __forceinline__ void mma(float (&c)[4], const FragA& a, const FragB& b) const {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a.r[0]), "r"(a.r[1]), "r"(a.r[2]), "r"(a.r[3]), "r"(b.r[0]), "r"(b.r[1]));
  }
};

__global__ void __launch_bounds__(wgrad::kThreads, 1) filter_grad_kernel(wgrad::Params P) {
  extern __shared__ __align__(16) float smem[];
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  DeviceOps ops;
  wgrad::block_body(P, ops, smem);
#else
  __trap();  // never launched there (own_filter_grad_fits); partials would stay unwritten
#endif
}

__global__ void add_partials_kernel(const float* __restrict__ partial, int blocks_x, int grid_y, int cin, int cout,
                                    int64_t items, float* __restrict__ dw) {
  const int64_t item = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (item < items) wgrad::add_partials(partial, blocks_x, grid_y, cin, cout, item, dw);
}

constexpr size_t kSmemBytes = sizeof(float) * wgrad::kSmemFloats;

// Blocks of the kernel resident per SM on a device, once per device (its shared memory
// needs the opt-in above 48 KiB, which is per device).
int resident_blocks(int device) {
  static std::mutex mu;
  static std::map<int, int> known;
  std::lock_guard<std::mutex> lk(mu);
  if (auto it = known.find(device); it != known.end()) return it->second;
  CMSEG_CUDA(cudaFuncSetAttribute(filter_grad_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)kSmemBytes));
  int blocks = 0;
  CMSEG_CUDA(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, filter_grad_kernel, wgrad::kThreads, kSmemBytes));
  if (blocks < 1) fail("conv3 filter gradient kernel: ", kSmemBytes, " bytes of shared memory per block do not fit");
  return known[device] = blocks;
}

// Planes per run: CMSEG_WGRAD_RUN_D (1..1024, for the device check's sweep), else kRunD.
int run_depth() {
  const char* e = std::getenv("CMSEG_WGRAD_RUN_D");
  const int v = e ? std::atoi(e) : 0;
  return v >= 1 && v <= 1024 ? v : wgrad::kRunD;
}

}  // namespace

bool own_filter_grad_fits(int device) {
  static std::mutex mu;
  static std::map<int, bool> known;
  std::lock_guard<std::mutex> lk(mu);
  if (auto it = known.find(device); it != known.end()) return it->second;
  // The device's capability and shared memory, and code for 8.0 or newer in this binary
  // as loaded for it (an older target's body is only a trap): asked with it current.
  int current = -1;
  if (cudaGetDevice(&current) != cudaSuccess || current != device) {
    cudaGetLastError();
    return false;  // not cached: the caller's device is made current before it matters
  }
  cudaDeviceProp prop{};
  cudaFuncAttributes fa{};
  const bool ok = cudaGetDeviceProperties(&prop, device) == cudaSuccess && prop.major >= 8 &&
                  prop.sharedMemPerBlockOptin >= kSmemBytes &&
                  cudaFuncGetAttributes(&fa, filter_grad_kernel) == cudaSuccess && fa.binaryVersion >= 80;
  cudaGetLastError();  // a refusal above is an answer, not an error for the next launch
  return known[device] = ok;
}

void conv3_backward_filter_own(Context& ctx, const float* x, const float* dy, float* dw, int n, int cin, int cout,
                               Spatial s) {
  ProfileScope prof_(ctx, "conv3_backward_filter (own)", cin, cout, s);
  if (!own_filter_grad_fits(ctx.device()))
    fail("conv3's own filter-gradient kernel needs compute capability 8.0 or newer and ", kSmemBytes,
         " bytes of shared memory per block; this GPU has not (CMSEG_CONV_WGRAD=cudnn uses cuDNN's)");
  if (n < 1 || cin < 1 || cout < 1 || s.d < 1 || s.h < 1 || s.w < 1)
    fail("conv3 filter gradient: empty shape (n ", n, ", ", cin, "->", cout, ", ", s.d, "x", s.h, "x", s.w, ")");
  Context::Impl& im = ctx.impl();
  wgrad::Params P{};
  P.x = x, P.dy = dy;
  P.cin = cin, P.cout = cout, P.D = s.d, P.H = s.h, P.W = s.w;
  P.tiles_h = (s.h + wgrad::kTileH - 1) / wgrad::kTileH;
  P.tiles_w = (s.w + wgrad::kTileW - 1) / wgrad::kTileW;
  P.run_d = run_depth();
  P.quads = s.w % 4 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(dy) % 16 == 0;
  P.runs = (s.d + P.run_d - 1) / P.run_d;
  P.units = (int64_t)n * P.tiles_h * P.tiles_w * P.runs;
  const int gy = (cin + wgrad::kCi - 1) / wgrad::kCi, gz = (cout + wgrad::kCo - 1) / wgrad::kCo;
  if (gy > 65535 || gz > 65535) fail("conv3 filter gradient: ", cin, "->", cout, " channels exceed the grid");
  const int64_t wave = (int64_t)im.multiprocessors * resident_blocks(ctx.device());
  const int gx = (int)wgrad::blocks_along_runs(P.units, (int64_t)gy * gz, wave);
  Buffer<float> partial(ctx, (size_t)gx * gy * gz * wgrad::kPartial);
  P.partial = partial.data();
  filter_grad_kernel<<<dim3((unsigned)gx, (unsigned)gy, (unsigned)gz), wgrad::kThreads, kSmemBytes,
                       stream_of(ctx)>>>(P);
  CMSEG_CUDA_LAUNCHED("conv3 filter gradient");
  const int64_t items = (int64_t)gy * gz * wgrad::kPartial;
  add_partials_kernel<<<(unsigned)((items + 255) / 256), 256, 0, stream_of(ctx)>>>(partial.data(), gx, gy, cin, cout,
                                                                                 items, dw);
  CMSEG_CUDA_LAUNCHED("conv3 filter gradient sum");
  ++im.own_wgrad_runs;
}

namespace host {

void conv3_backward_filter_own(Context& ctx, const float* x, const float* dy, float* dw, int n, int cin, int cout,
                               Spatial s) {
  const size_t V = (size_t)s.size(), wn = (size_t)cout * cin * wgrad::kTaps;
  Buffer<float> bx(ctx, (size_t)n * cin * V), bdy(ctx, (size_t)n * cout * V), bdw(ctx, wn);
  bx.upload(x), bdy.upload(dy), bdw.upload(dw);
  cuda::conv3_backward_filter_own(ctx, bx.data(), bdy.data(), bdw.data(), n, cin, cout, s);
  bdw.download(dw);
}

}  // namespace host
}  // namespace cuda
}  // namespace cmseg
