// The U-Net's convolutions on the device through cuDNN's convolution API (SPEC
// section 2; CPU reference: native/layers/conv3.cpp and upconv2.cpp):
//   conv3    3x3(x3), stride 1, zero padding 1, no bias: forward, backward data,
//            backward filter (accumulated, beta = 1);
//   upconv2  transposed convolution, kernel 2, stride 2, when ContextOptions::upconv
//            asks for cuDNN (native/cuda/upconv2.cu runs it as GEMMs by default and
//            adds the bias either way). A transposed convolution is the data gradient
//            of the convolution with the same filter ([cin, cout, 2^ndim], the
//            PyTorch layout), so its forward is cudnnConvolutionBackwardData and its
//            data gradient is cudnnConvolutionForward.
// The model's tensors are NCDHW (2D: NCHW) float32. cuDNN may instead run on
// channels-last copies (ContextOptions::conv_channels_last for conv3, default on;
// UpconvPath::CudnnChannelsLast for upconv2) or on bf16 channels-last copies with fp32
// accumulation (ContextOptions::bf16, conv3); a path cuDNN cannot run for a shape
// falls back to the next one, down to the NCDHW tensors. With ContextOptions::tf32
// the convolutions may run on TF32 tensor cores (cuDNN's default math); without it,
// FMA math only. The algorithm for each (call, path, shape, math) is chosen once and
// cached in the context (choose() below: heuristics, then timing with
// conv_benchmark). Workspaces and copies come from the context's pool.
#include <cuda_bf16.h>

#include <cmath>
#include <cstdio>
#include <optional>
#include <type_traits>

#include "common.cuh"

namespace cmseg {
namespace cuda {
namespace {

enum ConvOp {
  kConvFwd = 0, kConvBwdData = 1, kConvBwdFilter = 2, kUpFwd = 3, kUpBwdData = 4, kUpBwdFilter = 5,
  kConvFwdCL = 6, kConvBwdDataCL = 7, kConvBwdFilterCL = 8,  // conv3 on channels-last fp32 copies
  kConvFwdBF = 9, kConvBwdDataBF = 10, kConvBwdFilterBF = 11,  // conv3 on channels-last bf16 copies
  kUpFwdCL = 12, kUpBwdDataCL = 13, kUpBwdFilterCL = 14        // upconv2 on channels-last fp32 copies
};

struct TensorDesc {
  cudnnTensorDescriptor_t d = nullptr;
  // channels_last: the same logical [n, c, *s] tensor stored NDHWC (2D: NHWC).
  TensorDesc(int n, int c, Spatial s, int ndim, bool channels_last = false, cudnnDataType_t type = CUDNN_DATA_FLOAT) {
    CMSEG_CUDNN(cudnnCreateTensorDescriptor(&d));
    if (ndim == 3) {
      const int dims[5] = {n, c, s.d, s.h, s.w};
      const int V = s.d * s.h * s.w;
      const int ncdhw[5] = {c * V, V, s.h * s.w, s.w, 1};
      const int ndhwc[5] = {c * V, 1, s.h * s.w * c, s.w * c, c};
      CMSEG_CUDNN(cudnnSetTensorNdDescriptor(d, type, 5, dims, channels_last ? ndhwc : ncdhw));
    } else {
      CMSEG_CUDNN(cudnnSetTensor4dDescriptor(d, channels_last ? CUDNN_TENSOR_NHWC : CUDNN_TENSOR_NCHW, type, n, c,
                                             s.h, s.w));
    }
  }
  ~TensorDesc() { cudnnDestroyTensorDescriptor(d); }
  TensorDesc(const TensorDesc&) = delete;
};

struct FilterDesc {
  cudnnFilterDescriptor_t d = nullptr;
  // channels_last: [k, c, *taps] stored as [k, *taps, c].
  FilterDesc(int k, int c, int ksize, int ndim, bool channels_last = false, cudnnDataType_t type = CUDNN_DATA_FLOAT) {
    CMSEG_CUDNN(cudnnCreateFilterDescriptor(&d));
    const int dims[5] = {k, c, ksize, ksize, ksize};
    CMSEG_CUDNN(cudnnSetFilterNdDescriptor(d, type, channels_last ? CUDNN_TENSOR_NHWC : CUDNN_TENSOR_NCHW, ndim + 2,
                                           dims));
  }
  ~FilterDesc() { cudnnDestroyFilterDescriptor(d); }
  FilterDesc(const FilterDesc&) = delete;
};

struct ConvDesc {
  cudnnConvolutionDescriptor_t d = nullptr;
  ConvDesc(int pad, int stride, int ndim, bool tf32) {
    CMSEG_CUDNN(cudnnCreateConvolutionDescriptor(&d));
    const int pads[3] = {pad, pad, pad}, strides[3] = {stride, stride, stride}, dil[3] = {1, 1, 1};
    CMSEG_CUDNN(cudnnSetConvolutionNdDescriptor(d, ndim, pads, strides, dil, CUDNN_CROSS_CORRELATION,
                                                CUDNN_DATA_FLOAT));
    CMSEG_CUDNN(cudnnSetConvolutionMathType(d, tf32 ? CUDNN_DEFAULT_MATH : CUDNN_FMA_MATH));
  }
  ~ConvDesc() { cudnnDestroyConvolutionDescriptor(d); }
  ConvDesc(const ConvDesc&) = delete;
};

// No candidate cuDNN offered can run (conv3 then falls back from channels-last
// copies to the NCDHW tensors).
class NoConvAlgorithm : public Error {
 public:
  using Error::Error;
};

const char* math_name(int m) {
  return m == CUDNN_FMA_MATH ? "fma" : m == CUDNN_TENSOR_OP_MATH ? "tensor-op" : m == CUDNN_DEFAULT_MATH ? "default"
                                                                                                        : "other";
}

// Candidates from cuDNN (heuristics or timings), best first: take the first that
// ran, fits the workspace limit and, without TF32, uses FMA math.
template <class Perf>
ConvAlgo pick(const Perf* perf, int count, size_t limit, bool tf32, const char* what) {
  for (int pass = 0; pass < 2; ++pass)
    for (int i = 0; i < count; ++i) {
      const Perf& p = perf[i];
      if (p.status != CUDNN_STATUS_SUCCESS || p.memory > limit) continue;
      if (pass == 0 && !tf32 && p.mathType != CUDNN_FMA_MATH) continue;
      return ConvAlgo{(int)p.algo, p.memory, tf32 ? (int)p.mathType : (int)CUDNN_FMA_MATH};
    }
  std::string seen;
  for (int i = 0; i < count; ++i)
    seen += str(i ? "; " : "", "algo ", (int)perf[i].algo, " ", cudnnGetErrorString(perf[i].status), " ",
                mib_text(perf[i].memory), " ", math_name((int)perf[i].mathType));
  throw NoConvAlgorithm(str("cuDNN offered no usable algorithm for ", what, " within a ", mib_text(limit),
                            " workspace (candidates: ", count ? seen : std::string("none"), ")"));
}

// Filters may start at any float: the model packs its parameters back to back in one
// array (unet_cuda.cpp), so a conv weight can follow a bias of odd length (seg.bias
// or a low-rank cm.{r}.bias before the cmblock convs; small test widths). cuDNN 9
// engines are chosen for the pointers' alignment and may refuse a float-aligned one
// (CUDNN_STATUS_BAD_PARAM_MISALIGNED_POINTER). A filter below 32-byte alignment (the
// most PyTorch ever reports to cuDNN) goes through an aligned pool copy: filters are
// small next to the activations.
constexpr uintptr_t kFilterAlign = 32;
inline bool filter_aligned(const float* w) { return reinterpret_cast<uintptr_t>(w) % kFilterAlign == 0; }

struct AlignedFilter {
  Context& ctx;
  float* user;
  size_t bytes;
  Scratch copy;
  float* p;  // what cuDNN gets: `user` itself when aligned, else the copy
  // load: the copy starts as the user's values (a filter read, or a gradient accumulated into).
  AlignedFilter(Context& c, const float* w, size_t count, bool load)
      : ctx(c), user(const_cast<float*>(w)), bytes(count * sizeof(float)),
        copy(c, filter_aligned(w) ? 0 : bytes), p(filter_aligned(w) ? user : static_cast<float*>(copy.p)) {
    if (load && p != user) ctx.copy(p, user, bytes);
  }
  // After cuDNN wrote the gradient: back into the user's array (stream-ordered, before the copy is freed).
  void store() {
    if (p != user) ctx.copy(user, p, bytes);
  }
};

// Workspace for timing candidates: what the largest candidate within the configured
// limit asks for (cuDNN's own estimate), but no more than half of the device memory
// free now, nor more than the model's memory limit leaves (the search must not fail
// a step that fits, nor inflate the pool's peak with a 1 GiB buffer nobody uses).
template <class Perf>
size_t benchmark_workspace(Context& ctx, const Perf* perf, int count) {
  const ContextOptions& o = ctx.options();
  size_t want = 0;
  bool rated = false;
  for (int i = 0; i < count; ++i)
    if (perf[i].status == CUDNN_STATUS_SUCCESS) {
      rated = true;
      if (perf[i].memory <= o.max_workspace_bytes) want = std::max(want, perf[i].memory);
    }
  if (!rated) want = o.max_workspace_bytes;  // the heuristics rated nothing: let the search try all
  // Every rated candidate said 0 bytes: estimates can fall short of what an algorithm
  // takes under the math actually set, so the search still gets a modest workspace.
  else if (want == 0) want = std::min(o.max_workspace_bytes, size_t(256) << 20);
  size_t free_b = 0, total_b = 0;
  CMSEG_CUDA(cudaMemGetInfo(&free_b, &total_b));
  want = std::min(want, free_b / 2);
  if (o.memory_limit_bytes) {
    const size_t used = ctx.pool_stats().in_use_bytes;
    const size_t left = o.memory_limit_bytes > used ? o.memory_limit_bytes - used : 0;
    want = std::min(want, left / 2);
  }
  return want;
}

// Runs with the math type the algorithm was chosen for (as PyTorch does): a
// tensor-op algorithm needs it on the descriptor; FMA math when TF32 is off.
void use_math(const ConvDesc& cd, const ConvAlgo& a) {
  CMSEG_CUDNN(cudnnSetConvolutionMathType(cd.d, (cudnnMathType_t)a.math));
}

// The algo_* functions below size the workspace for the math the algorithm will
// run with (asked again once the math is on the descriptor): a candidate's `memory`
// is for its own math type, and without TF32 pick() may force FMA math onto a
// candidate rated with another one (cuDNN also returns candidates as
// CUDNN_DEFAULT_MATH); a workspace smaller than the run needs fails the call.
const int kMaxAlgos = 16;

// Where a convolution goes when cuDNN has no usable algorithm for its path.
const char* fallback_of(int op) {
  if (op >= kUpFwdCL) return "this transposed convolution runs on the NCDHW tensors instead";
  if (op >= kConvFwdBF) return "this convolution runs in fp32 instead";
  if (op >= kConvFwdCL) return "this convolution runs on the NCDHW tensors instead";
  return "no other path is left";
}

const char* path_of(int op) {
  if (op >= kUpFwdCL) return "channels-last fp32";
  if (op >= kConvFwdBF) return "channels-last bf16";
  if (op >= kConvFwdCL) return "channels-last fp32";
  return "NCDHW";
}

// A shape with no usable algorithm is remembered (algo -1), so later calls fall back
// at once; it is said once on stderr, with cuDNN's candidates.
void remember_unusable(Context& ctx, const ConvKey& key, const char* why) {
  ConvAlgo none;
  none.algo = -1;
  ctx.impl().remember_algo(key, none);
  std::fprintf(stderr, "cmseg: %s (op %d on %s tensors, n %d, %d->%d channels, %dx%dx%d, %s); %s\n", why, key.op,
               path_of(key.op), key.n, key.cin, key.cout, key.d, key.h, key.w,
               key.tf32 ? "tensor-op math allowed" : "fma math", fallback_of(key.op));
}

// One direction's algorithm, chosen once per key. cuDNN's heuristics list the
// candidates; with conv_benchmark they are also timed (cudnnFind*Ex, in a separate
// list, in a workspace sized from the heuristics' estimates). The first usable timed
// candidate wins; when the search cannot run (its workspace, or any cuDNN error) or
// finds nothing usable, the heuristics' list is used. No usable candidate in either:
// NoConvAlgorithm, remembered.
//   heuristics(perf, &count) and search(perf, &count, workspace, bytes) return a
//   cudnnStatus_t; workspace_of(algo, &bytes) asks the workspace for the math now set.
template <class Perf, class Heuristics, class Search, class WorkspaceOf>
ConvAlgo choose(Context& ctx, const ConvKey& key, const ConvDesc& cd, const char* what, Heuristics heuristics,
                Search search, WorkspaceOf workspace_of) {
  Context::Impl& im = ctx.impl();
  if (const ConvAlgo* known = im.conv_algos.find(key)) {
    if (known->algo < 0)
      throw NoConvAlgorithm("cuDNN offered no usable algorithm for this convolution shape (said on stderr before)");
    return *known;
  }
  Perf listed[kMaxAlgos], timed[kMaxAlgos];
  int n_listed = 0, n_timed = 0;
  if (heuristics(listed, &n_listed) != CUDNN_STATUS_SUCCESS) n_listed = 0;
  bool searched = false;
  if (ctx.options().conv_benchmark) {
    try {
      const size_t ws = benchmark_workspace(ctx, listed, n_listed);
      Scratch scratch(ctx, ws);
      searched = search(timed, &n_timed, scratch.p, ws) == CUDNN_STATUS_SUCCESS;
    } catch (const Error&) {  // no memory for the search: the heuristics' list
    }
  }
  const size_t limit = ctx.options().max_workspace_bytes;
  ConvAlgo a;
  try {
    try {
      if (!searched) throw NoConvAlgorithm("not searched");
      a = pick(timed, n_timed, limit, key.tf32, what);
    } catch (const NoConvAlgorithm&) {
      a = pick(listed, n_listed, limit, key.tf32, what);
    }
  } catch (const NoConvAlgorithm& e) {
    remember_unusable(ctx, key, e.what());
    throw;
  }
  use_math(cd, a);  // see the note above kMaxAlgos
  size_t ws = 0;
  if (workspace_of(a.algo, &ws) == CUDNN_STATUS_SUCCESS) a.workspace = std::max(a.workspace, ws);
  im.remember_algo(key, a);
  return a;
}

// y = conv(x, w): x [n, c_in, sx], w [k, c_in, ...], y [n, k, sy]
ConvAlgo algo_forward(Context& ctx, const ConvKey& key, const TensorDesc& xd, const void* x, const FilterDesc& wd,
                      const void* w, const ConvDesc& cd, const TensorDesc& yd, void* y) {
  cudnnHandle_t h = ctx.impl().cudnn();
  return choose<cudnnConvolutionFwdAlgoPerf_t>(
      ctx, key, cd, "a forward convolution",
      [&](cudnnConvolutionFwdAlgoPerf_t* p, int* n) {
        return cudnnGetConvolutionForwardAlgorithm_v7(h, xd.d, wd.d, cd.d, yd.d, kMaxAlgos, n, p);
      },
      [&](cudnnConvolutionFwdAlgoPerf_t* p, int* n, void* ws, size_t bytes) {
        return cudnnFindConvolutionForwardAlgorithmEx(h, xd.d, x, wd.d, w, cd.d, yd.d, y, kMaxAlgos, n, p, ws, bytes);
      },
      [&](int algo, size_t* bytes) {
        return cudnnGetConvolutionForwardWorkspaceSize(h, xd.d, wd.d, cd.d, yd.d, (cudnnConvolutionFwdAlgo_t)algo,
                                                       bytes);
      });
}

// dx = conv^T(dy, w)
ConvAlgo algo_backward_data(Context& ctx, const ConvKey& key, const FilterDesc& wd, const void* w,
                            const TensorDesc& dyd, const void* dy, const ConvDesc& cd, const TensorDesc& dxd,
                            void* dx) {
  cudnnHandle_t h = ctx.impl().cudnn();
  return choose<cudnnConvolutionBwdDataAlgoPerf_t>(
      ctx, key, cd, "a backward-data convolution",
      [&](cudnnConvolutionBwdDataAlgoPerf_t* p, int* n) {
        return cudnnGetConvolutionBackwardDataAlgorithm_v7(h, wd.d, dyd.d, cd.d, dxd.d, kMaxAlgos, n, p);
      },
      [&](cudnnConvolutionBwdDataAlgoPerf_t* p, int* n, void* ws, size_t bytes) {
        return cudnnFindConvolutionBackwardDataAlgorithmEx(h, wd.d, w, dyd.d, dy, cd.d, dxd.d, dx, kMaxAlgos, n, p, ws,
                                                           bytes);
      },
      [&](int algo, size_t* bytes) {
        return cudnnGetConvolutionBackwardDataWorkspaceSize(h, wd.d, dyd.d, cd.d, dxd.d,
                                                            (cudnnConvolutionBwdDataAlgo_t)algo, bytes);
      });
}

// dw = sum over images and positions of x * dy (timed into a scratch dw, since the
// real one is accumulated into)
ConvAlgo algo_backward_filter(Context& ctx, const ConvKey& key, const TensorDesc& xd, const void* x,
                              const TensorDesc& dyd, const void* dy, const ConvDesc& cd, const FilterDesc& dwd,
                              size_t dw_bytes) {
  cudnnHandle_t h = ctx.impl().cudnn();
  return choose<cudnnConvolutionBwdFilterAlgoPerf_t>(
      ctx, key, cd, "a backward-filter convolution",
      [&](cudnnConvolutionBwdFilterAlgoPerf_t* p, int* n) {
        return cudnnGetConvolutionBackwardFilterAlgorithm_v7(h, xd.d, dyd.d, cd.d, dwd.d, kMaxAlgos, n, p);
      },
      [&](cudnnConvolutionBwdFilterAlgoPerf_t* p, int* n, void* ws, size_t bytes) {
        Scratch dw(ctx, dw_bytes);
        return cudnnFindConvolutionBackwardFilterAlgorithmEx(h, xd.d, x, dyd.d, dy, cd.d, dwd.d, dw.p, kMaxAlgos, n, p,
                                                             ws, bytes);
      },
      [&](int algo, size_t* bytes) {
        return cudnnGetConvolutionBackwardFilterWorkspaceSize(h, xd.d, dyd.d, cd.d, dwd.d,
                                                              (cudnnConvolutionBwdFilterAlgo_t)algo, bytes);
      });
}

void check_shape(const char* what, int n, int cin, int cout, Spatial s, int ndim) {
  if (ndim != 2 && ndim != 3) fail(what, ": ndim must be 2 or 3, got ", ndim);
  if (ndim == 2 && s.d != 1) fail(what, ": a 2D map must have depth 1, got ", s.d);
  if (n < 1 || cin < 1 || cout < 1 || s.size() < 1)
    fail(what, ": empty shape (n ", n, ", cin ", cin, ", cout ", cout, ", ", s.d, "x", s.h, "x", s.w, ")");
}

ConvKey key_of(ConvOp op, int n, int cin, int cout, Spatial s, int ndim, bool tf32) {
  return ConvKey{(int)op, n, cin, cout, s.d, s.h, s.w, ndim, tf32};
}

// ---- NCDHW <-> NDHWC (and fp32 <-> bf16) ------------------------------------------

using bf16 = __nv_bfloat16;
__device__ inline float as_float(float v) { return v; }
__device__ inline float as_float(bf16 v) { return __bfloat162float(v); }
template <class T>
__device__ inline T from_float(float v);
template <>
__device__ inline float from_float<float>(float v) { return v; }
template <>
__device__ inline bf16 from_float<bf16>(float v) { return __float2bfloat16_rn(v); }

// y[b][c][r] = x[b][r][c] (ACC: +=) for x [B, R, C] row-major, converted from In to
// Out on the way: 32x32 tiles through shared memory, so both the reads and the
// writes are coalesced.
template <class In, class Out, bool ACC>
__global__ void transpose_kernel(const In* __restrict__ x, Out* __restrict__ y, int64_t R, int64_t C,
                                 int64_t tiles_c) {
  __shared__ float tile[32][33];
  const int64_t b = blockIdx.y, tr = blockIdx.x / tiles_c, tc = blockIdx.x % tiles_c;
  const In* xb = x + b * R * C;
  Out* yb = y + b * R * C;
  const int tx = threadIdx.x, ty = threadIdx.y;  // 32 x 8 threads
  for (int k = 0; k < 32; k += 8) {
    const int64_t r = tr * 32 + ty + k, c = tc * 32 + tx;
    if (r < R && c < C) tile[ty + k][tx] = as_float(xb[r * C + c]);
  }
  __syncthreads();
  for (int k = 0; k < 32; k += 8) {
    const int64_t c = tc * 32 + ty + k, r = tr * 32 + tx;
    if (r < R && c < C) {
      if constexpr (ACC)
        yb[c * R + r] += tile[tx][ty + k];
      else
        yb[c * R + r] = from_float<Out>(tile[tx][ty + k]);
    }
  }
}

template <class In, class Out>
void transpose(Context& ctx, const In* x, Out* y, int64_t B, int64_t R, int64_t C, bool accumulate) {
  ProfileScope prof_(ctx, "conv3: NCDHW<->NDHWC copies");
  if (B > 65535) fail("transpose: batch of ", B, " exceeds the CUDA grid limit");
  if (accumulate && !std::is_same_v<Out, float>) fail("transpose: only an fp32 output is accumulated into");
  const int64_t tiles_r = (R + 31) / 32, tiles_c = (C + 31) / 32;
  const dim3 grid((unsigned)(tiles_r * tiles_c), (unsigned)B), block(32, 8);
  if constexpr (std::is_same_v<Out, float>) {
    if (accumulate) {
      transpose_kernel<In, Out, true><<<grid, block, 0, stream_of(ctx)>>>(x, y, R, C, tiles_c);
      CMSEG_CUDA_LAUNCHED("transpose");
      return;
    }
  }
  transpose_kernel<In, Out, false><<<grid, block, 0, stream_of(ctx)>>>(x, y, R, C, tiles_c);
  CMSEG_CUDA_LAUNCHED("transpose");
}

// [b, c, v] -> [b, v, c]: activations (b images, c channels, v voxels) and filters
// (b output channels, c input channels, v taps).
template <class T>
void to_channels_last(Context& ctx, const float* x, T* y, int64_t b, int64_t c, int64_t v) {
  transpose<float, T>(ctx, x, y, b, c, v, false);
}
// [b, v, c] -> [b, c, v] in fp32, written or added.
template <class T>
void from_channels_last(Context& ctx, const T* x, float* y, int64_t b, int64_t c, int64_t v, bool accumulate) {
  transpose<T, float>(ctx, x, y, b, v, c, accumulate);
}

}  // namespace

namespace {

// Convolutions on NDHWC copies (ContextOptions::conv_channels_last and
// UpconvPath::CudnnChannelsLast) or bf16 NDHWC copies (ContextOptions::bf16, conv3). The model
// keeps fp32 NCDHW; these calls transpose (and convert) around cuDNN. On an H200 cuDNN's legacy API ran NDHWC and NCDHW
// about as fast once its workspace cap allowed the fast filter-gradient algorithm
// (BENCHMARKS.md). bf16 follows torch.autocast: inputs and weights rounded to bf16,
// products accumulated in fp32 (cuDNN's PSEUDO_BFLOAT16 configuration), the data
// and weight gradients rounded to bf16 before they are added to the fp32 ones.
// Each returns false, having written nothing the caller owns, when cuDNN has no
// usable algorithm for the shape (the caller then takes the next path).

template <class T>
struct Elem;
template <>
struct Elem<float> {
  static constexpr cudnnDataType_t type = CUDNN_DATA_FLOAT;
};
template <>
struct Elem<bf16> {
  static constexpr cudnnDataType_t type = CUDNN_DATA_BFLOAT16;
};

template <class T>
T* as(Scratch& s) {
  return static_cast<T*>(s.p);
}

// An earlier call found no usable algorithm for this key.
bool known_unusable(Context& ctx, const ConvKey& key) {
  const ConvAlgo* known = ctx.impl().conv_algos.find(key);
  return known && known->algo < 0;
}

// A channels-last call cuDNN refuses although it listed the algorithm (a bad
// parameter or an unsupported configuration): remembered like a shape without
// algorithms, so the caller takes the next path; only scratch was written. Other
// failures (internal, execution) are errors.
bool ran(Context& ctx, const ConvKey& key, cudnnStatus_t st, const char* what) {
  if (st == CUDNN_STATUS_SUCCESS) return true;
  const int category = CUDNN_STATUS_CATEGORY((int)st);
  if (category != CUDNN_STATUS_BAD_PARAM && category != CUDNN_STATUS_NOT_SUPPORTED)
    throw_cudnn(st, what, __FILE__, __LINE__);
  remember_unusable(ctx, key, str("cuDNN refused ", what, ": ", cudnnGetErrorString(st)).c_str());
  return false;
}

// A tensor [b, c, v] as T in NDHWC, made on first use, so that the calls sharing it
// (the two parts of a backward) transpose it once; release() hands it back early.
// borrow() lends another's copy (made already) instead of making one.
template <class T>
struct LazyChannelsLast {
  Context& ctx;
  const float* src;
  int64_t b, c, v;
  std::optional<Scratch> copy;
  T* lent = nullptr;
  void borrow(LazyChannelsLast& o) {
    if (o.copy) lent = as<T>(*o.copy);
  }
  T* get() {
    if (lent) return lent;
    if (!copy) {
      copy.emplace(ctx, sizeof(T) * b * c * v);
      to_channels_last(ctx, src, as<T>(*copy), b, c, v);
    }
    return as<T>(*copy);
  }
  void release() { copy.reset(); }
};

// One convolution in cuDNN's terms on channels-last copies: input X [n, cx, sx] to
// output Y [n, cy, sy] with a filter [cy, cx, k^ndim] (stored [cy, taps, cx] in the
// copy). conv3 is one directly (X its input); upconv2 is the transpose of one (its
// output is X, its input Y), so its three directions are this convolution's three
// with the roles swapped. ops: the layer's ConvOp key for each of this
// convolution's directions (forward, data gradient, filter gradient); the key names
// the layer's own shape (key_cin, key_cout, key_s).
struct ClConv {
  int n, cx, cy;
  Spatial sx, sy;
  int ndim, ksize, stride, pad;
  bool tf32;
  int ops[3];
  int key_cin, key_cout;
  Spatial key_s;
  int64_t taps() const { return ksize == 3 ? conv3_taps(ndim) : pool2_taps(ndim); }
};

// bf16 always allows tensor-op math (there is no FMA bf16 path); fp32 only with TF32 on.
template <class T>
bool tensor_ops(const ClConv& g) {
  return g.tf32 || std::is_same_v<T, bf16>;
}

// Its legacy-API descriptors in element type T, made only where the legacy API runs
// (each is a few cuDNN calls on the host, for ~200 convolutions a step).
template <class T>
struct ClDescs {
  bool tensor_ops;
  TensorDesc xd, yd;
  FilterDesc wd;
  ConvDesc cd;
  explicit ClDescs(const ClConv& g)
      : tensor_ops(cuda::tensor_ops<T>(g)),
        xd(g.n, g.cx, g.sx, g.ndim, true, Elem<T>::type),
        yd(g.n, g.cy, g.sy, g.ndim, true, Elem<T>::type),
        wd(g.cy, g.cx, g.ksize, g.ndim, true, Elem<T>::type),
        cd(g.pad, g.stride, g.ndim, tensor_ops) {}
};

// The graph API first for conv3: on fp32 copies with ContextOptions::conv_graph, on
// bf16 copies always. cuDNN's legacy API has no fast bf16 3D kernels: on an H200 its
// best timed bf16 data gradient took 50-100 ms per call at every level of
// brats3d-gpu (2.9 s per step, 34x PyTorch's bf16 autocast); the graph API's engines
// are the ones PyTorch runs.
template <class T>
bool graph_first(Context& ctx, const ClConv& g) {
  return g.ksize == 3 && (std::is_same_v<T, bf16> || ctx.options().conv_graph);
}
template <class T>
GraphShape graph_shape(const ClConv& g) {
  return GraphShape{g.n, g.cx, g.cy, g.sx, g.ndim, true, g.tf32, std::is_same_v<T, bf16>};
}

// part: 0 forward, 1 backward data, 2 backward filter.
ConvKey cl_key(const ClConv& g, int part, bool tensor_ops) {
  return key_of((ConvOp)g.ops[part], g.n, g.key_cin, g.key_cout, g.key_s, g.ndim, tensor_ops);
}

// Y = conv(X, W), written into y (fp32 NCDHW); x: X's channels-last copy.
template <class T>
bool cl_forward(Context& ctx, const ClConv& g, LazyChannelsLast<T>& x, const float* w, float* y) {
  const ConvKey key = cl_key(g, 0, tensor_ops<T>(g));
  if (known_unusable(ctx, key)) return false;
  const int64_t Vy = g.sy.size(), T_ = g.taps();
  Scratch wt(ctx, sizeof(T) * g.cy * g.cx * T_), yt(ctx, sizeof(T) * g.n * g.cy * Vy);
  to_channels_last(ctx, w, as<T>(wt), g.cy, g.cx, T_);
  T* xt = x.get();
  if (graph_first<T>(ctx, g) && graph_conv3(ctx, GraphPart::Forward, graph_shape<T>(g), xt, as<T>(wt), as<T>(yt))) {
    from_channels_last(ctx, as<T>(yt), y, g.n, g.cy, Vy, false);
    return true;
  }
  ClDescs<T> D(g);
  ConvAlgo a;
  try {
    a = algo_forward(ctx, key, D.xd, xt, D.wd, wt.p, D.cd, D.yd, yt.p);
  } catch (const NoConvAlgorithm&) {
    return false;
  }
  use_math(D.cd, a);
  Scratch ws(ctx, a.workspace);
  const float one = 1.f, zero = 0.f;
  const cudnnStatus_t st = cudnnConvolutionForward(ctx.impl().cudnn(), &one, D.xd.d, xt, D.wd.d, wt.p, D.cd.d,
                                                   (cudnnConvolutionFwdAlgo_t)a.algo, ws.p, a.workspace, &zero,
                                                   D.yd.d, yt.p);
  if (!ran(ctx, key, st, "cudnnConvolutionForward")) return false;
  from_channels_last(ctx, as<T>(yt), y, g.n, g.cy, Vy, false);
  return true;
}

// dX = conv^T(dY, W), written into dx (fp32 NCDHW); dy: dY's channels-last copy.
template <class T>
bool cl_backward_data(Context& ctx, const ClConv& g, const float* w, LazyChannelsLast<T>& dy, float* dx) {
  const ConvKey key = cl_key(g, 1, tensor_ops<T>(g));
  if (known_unusable(ctx, key)) return false;
  const int64_t Vx = g.sx.size(), T_ = g.taps();
  Scratch wt(ctx, sizeof(T) * g.cy * g.cx * T_), dxt(ctx, sizeof(T) * g.n * g.cx * Vx);
  to_channels_last(ctx, w, as<T>(wt), g.cy, g.cx, T_);
  if (graph_first<T>(ctx, g) &&
      graph_conv3(ctx, GraphPart::BackwardData, graph_shape<T>(g), as<T>(dxt), as<T>(wt), dy.get())) {
    from_channels_last(ctx, as<T>(dxt), dx, g.n, g.cx, Vx, false);
    return true;
  }
  ClDescs<T> D(g);
  ConvAlgo a;
  try {
    a = algo_backward_data(ctx, key, D.wd, wt.p, D.yd, dy.get(), D.cd, D.xd, dxt.p);
  } catch (const NoConvAlgorithm&) {
    return false;
  }
  use_math(D.cd, a);
  Scratch ws(ctx, a.workspace);
  const float one = 1.f, zero = 0.f;
  const cudnnStatus_t st = cudnnConvolutionBackwardData(ctx.impl().cudnn(), &one, D.wd.d, wt.p, D.yd.d, dy.get(),
                                                        D.cd.d, (cudnnConvolutionBwdDataAlgo_t)a.algo, ws.p,
                                                        a.workspace, &zero, D.xd.d, dxt.p);
  if (!ran(ctx, key, st, "cudnnConvolutionBackwardData")) return false;
  from_channels_last(ctx, as<T>(dxt), dx, g.n, g.cx, Vx, false);
  return true;
}

// dW += X * dY summed over images and positions, added into dw (fp32 [cy, cx, taps]).
template <class T>
bool cl_backward_filter(Context& ctx, const ClConv& g, LazyChannelsLast<T>& x, LazyChannelsLast<T>& dy, float* dw) {
  const ConvKey key = cl_key(g, 2, tensor_ops<T>(g));
  if (known_unusable(ctx, key)) return false;
  const int64_t T_ = g.taps();
  const size_t dw_bytes = sizeof(T) * g.cy * g.cx * T_;
  Scratch dwt(ctx, dw_bytes);
  T* xt = x.get();
  if (graph_first<T>(ctx, g) &&
      graph_conv3(ctx, GraphPart::BackwardFilter, graph_shape<T>(g), xt, as<T>(dwt), dy.get())) {
    from_channels_last(ctx, as<T>(dwt), dw, g.cy, g.cx, T_, true);  // dw is accumulated into
    return true;
  }
  ClDescs<T> D(g);
  ConvAlgo a;
  try {
    a = algo_backward_filter(ctx, key, D.xd, xt, D.yd, dy.get(), D.cd, D.wd, dw_bytes);
  } catch (const NoConvAlgorithm&) {
    return false;  // dw untouched
  }
  use_math(D.cd, a);
  Scratch ws(ctx, a.workspace);
  const float one = 1.f, zero = 0.f;
  const cudnnStatus_t st = cudnnConvolutionBackwardFilter(ctx.impl().cudnn(), &one, D.xd.d, xt, D.yd.d, dy.get(),
                                                          D.cd.d, (cudnnConvolutionBwdFilterAlgo_t)a.algo, ws.p,
                                                          a.workspace, &zero, D.wd.d, dwt.p);
  if (!ran(ctx, key, st, "cudnnConvolutionBackwardFilter")) return false;
  from_channels_last(ctx, as<T>(dwt), dw, g.cy, g.cx, T_, true);  // dw is accumulated into
  return true;
}

// conv3 as a ClConv on the path whose first key is `op`.
ClConv conv3_cl(int op, int n, int cin, int cout, Spatial s, int ndim, bool tf32) {
  return ClConv{n, cin, cout, s, s, ndim, 3, 1, 1, tf32, {op, op + 1, op + 2}, cin, cout, s};
}

// upconv2 (input [n, cin, s], output [n, cout, 2s]) is the transpose of the
// convolution from its output to its input: X = its output, Y = its input.
ClConv upconv2_cl(int n, int cin, int cout, Spatial s, Spatial so, int ndim, bool tf32) {
  // Its forward is this convolution's data gradient, its data gradient this forward.
  return ClConv{n, cout, cin, so, s, ndim, 2, 2, 0, tf32, {kUpBwdDataCL, kUpFwdCL, kUpBwdFilterCL}, cin, cout, s};
}

}  // namespace

namespace {
// dX = the data gradient of conv3 on the tensors as they are (NCDHW): the graph API
// first (ContextOptions::conv_graph), else the legacy API.
void ncdhw_backward_data(Context& ctx, const ConvKey& key, const FilterDesc& wd, const float* w, const TensorDesc& yd,
                         const float* dy, const ConvDesc& cd, const TensorDesc& xd, float* dx, size_t wn) {
  const AlignedFilter wa(ctx, w, wn, true);
  const GraphShape g{key.n, key.cin, key.cout, Spatial{key.d, key.h, key.w}, key.ndim, false, key.tf32};
  if (ctx.options().conv_graph && graph_conv3(ctx, GraphPart::BackwardData, g, dx, wa.p, dy)) return;
  const ConvAlgo a = algo_backward_data(ctx, key, wd, wa.p, yd, dy, cd, xd, dx);
  use_math(cd, a);
  Scratch ws(ctx, a.workspace);
  const float one = 1.f, zero = 0.f;
  CMSEG_CUDNN(cudnnConvolutionBackwardData(ctx.impl().cudnn(), &one, wd.d, wa.p, yd.d, dy, cd.d,
                                           (cudnnConvolutionBwdDataAlgo_t)a.algo, ws.p, a.workspace, &zero, xd.d, dx));
}

// dW += the filter gradient of the convolution X -> dY on the tensors as they are
// (NCDHW), through an aligned copy of dw (accumulated: beta = 1).
void ncdhw_backward_filter(Context& ctx, const ConvKey& key, const TensorDesc& xd, const float* x,
                           const TensorDesc& yd, const float* dy, const ConvDesc& cd, const FilterDesc& wd, float* dw,
                           size_t wn) {
  if (ctx.options().conv_graph && key.op == kConvBwdFilter) {  // conv3 through the graph API: written, then added
    Scratch part(ctx, wn * sizeof(float));
    const GraphShape g{key.n, key.cin, key.cout, Spatial{key.d, key.h, key.w}, key.ndim, false, key.tf32};
    if (graph_conv3(ctx, GraphPart::BackwardFilter, g, x, static_cast<float*>(part.p), dy)) {
      add_inplace(ctx, dw, static_cast<float*>(part.p), (int64_t)wn);
      return;
    }
  }
  AlignedFilter dwa(ctx, dw, wn, true);
  const ConvAlgo a = algo_backward_filter(ctx, key, xd, x, yd, dy, cd, wd, wn * sizeof(float));
  use_math(cd, a);
  Scratch ws(ctx, a.workspace);
  const float one = 1.f;
  CMSEG_CUDNN(cudnnConvolutionBackwardFilter(ctx.impl().cudnn(), &one, xd.d, x, yd.d, dy, cd.d,
                                             (cudnnConvolutionBwdFilterAlgo_t)a.algo, ws.p, a.workspace, &one, wd.d,
                                             dwa.p));
  dwa.store();
}
}  // namespace

namespace {

// Paths in order of preference: bf16 copies (with ContextOptions::bf16), fp32
// channels-last copies (with conv_channels_last), the NCDHW tensors themselves; each
// through the graph API first with conv_graph.
void conv3_forward_on(Context& ctx, const float* x, const float* w, float* y, int n, int cin, int cout, Spatial s,
                      int ndim) {
  ProfileScope prof_(ctx, "conv3_forward", cin, cout, s);
  const ContextOptions& o = ctx.options();
  const bool tf32 = o.tf32;
  if (o.bf16) {
    LazyChannelsLast<bf16> x16{ctx, x, n, cin, s.size(), {}};
    if (cl_forward(ctx, conv3_cl(kConvFwdBF, n, cin, cout, s, ndim, tf32), x16, w, y)) return;
  }
  if (o.conv_channels_last) {
    LazyChannelsLast<float> x32{ctx, x, n, cin, s.size(), {}};
    if (cl_forward(ctx, conv3_cl(kConvFwdCL, n, cin, cout, s, ndim, tf32), x32, w, y)) return;
  }
  TensorDesc xd(n, cin, s, ndim), yd(n, cout, s, ndim);
  FilterDesc wd(cout, cin, 3, ndim);
  ConvDesc cd(1, 1, ndim, tf32);
  const AlignedFilter wa(ctx, w, (size_t)cout * cin * conv3_taps(ndim), true);
  if (o.conv_graph && graph_conv3(ctx, GraphPart::Forward, GraphShape{n, cin, cout, s, ndim, false, tf32}, x, wa.p, y))
    return;
  const ConvAlgo a = algo_forward(ctx, key_of(kConvFwd, n, cin, cout, s, ndim, tf32), xd, x, wd, wa.p, cd, yd, y);
  use_math(cd, a);
  Scratch ws(ctx, a.workspace);
  const float one = 1.f, zero = 0.f;
  CMSEG_CUDNN(cudnnConvolutionForward(ctx.impl().cudnn(), &one, xd.d, x, wd.d, wa.p, cd.d,
                                      (cudnnConvolutionFwdAlgo_t)a.algo, ws.p, a.workspace, &zero, yd.d, y));
}

// The two directions of conv3's backward. With conv_overlap (and a data gradient
// wanted) the filter gradient is enqueued first on the side stream and the data
// gradient then on the model's stream, joined before returning. The output
// gradient's copy for the first path is made on the model's stream before the fork
// and lent to the side; whatever else the side needs it makes and frees itself, and
// it frees nothing the model's stream uses.
struct Conv3Backward {
  Context& ctx;
  const float *x, *w, *dy;
  int n, cin, cout;
  Spatial s;
  int ndim;
  bool tf32, bf, cl;
  size_t wn = (size_t)cout * cin * conv3_taps(ndim);
  ClConv g16 = conv3_cl(kConvFwdBF, n, cin, cout, s, ndim, tf32);
  ClConv g32 = conv3_cl(kConvFwdCL, n, cin, cout, s, ndim, tf32);

  // dy16 / dy32: the output gradient's copies; release: hand copies back between paths.
  void data(LazyChannelsLast<bf16>& dy16, LazyChannelsLast<float>& dy32, float* dx) {
    ProfileScope prof_(ctx, "conv3_backward_data", cin, cout, s);
    if ((bf && cl_backward_data(ctx, g16, w, dy16, dx)) || (cl && cl_backward_data(ctx, g32, w, dy32, dx))) return;
    const TensorDesc xd(n, cin, s, ndim), yd(n, cout, s, ndim);
    const FilterDesc wd(cout, cin, 3, ndim);
    const ConvDesc cd(1, 1, ndim, tf32);
    ncdhw_backward_data(ctx, key_of(kConvBwdData, n, cin, cout, s, ndim, tf32), wd, w, yd, dy, cd, xd, dx, wn);
  }
  void filter(LazyChannelsLast<bf16>& dy16, LazyChannelsLast<float>& dy32, float* dw) {
    ProfileScope prof_(ctx, "conv3_backward_filter", cin, cout, s);
    LazyChannelsLast<bf16> x16{ctx, x, n, cin, s.size(), {}};
    LazyChannelsLast<float> x32{ctx, x, n, cin, s.size(), {}};
    if (bf && cl_backward_filter(ctx, g16, x16, dy16, dw)) return;
    x16.release(), dy16.release();
    if (cl && cl_backward_filter(ctx, g32, x32, dy32, dw)) return;
    x32.release(), dy32.release();
    const TensorDesc xd(n, cin, s, ndim), yd(n, cout, s, ndim);
    const FilterDesc wd(cout, cin, 3, ndim);
    const ConvDesc cd(1, 1, ndim, tf32);
    ncdhw_backward_filter(ctx, key_of(kConvBwdFilter, n, cin, cout, s, ndim, tf32), xd, x, yd, dy, cd, wd, dw, wn);
  }
};

void conv3_backward_on(Context& ctx, const float* x, const float* w, const float* dy, float* dx, float* dw, int n,
                       int cin, int cout, Spatial s, int ndim) {
  const ContextOptions& o = ctx.options();
  Conv3Backward b{ctx, x, w, dy, n, cin, cout, s, ndim, o.tf32, o.bf16, o.conv_channels_last};
  LazyChannelsLast<bf16> dy16{ctx, dy, n, cout, s.size(), {}};
  LazyChannelsLast<float> dy32{ctx, dy, n, cout, s.size(), {}};
  if (dx && dw && o.conv_overlap) {
    if (b.bf) dy16.get();
    else if (b.cl) dy32.get();
    OnSideStream side(ctx);
    {
      LazyChannelsLast<bf16> side16{ctx, dy, n, cout, s.size(), {}};
      LazyChannelsLast<float> side32{ctx, dy, n, cout, s.size(), {}};
      side16.borrow(dy16), side32.borrow(dy32);
      b.filter(side16, side32, dw);
    }  // copies the side made are freed on the side stream, after its filter gradient
    side.leave();
    b.data(dy16, dy32, dx);
    side.join();  // before dy16 / dy32 (read by the side) are freed on the model's stream
    return;
  }
  if (dx) b.data(dy16, dy32, dx);
  if (dw) b.filter(dy16, dy32, dw);
}

// ---- conv3's path chosen by timing (ContextOptions::conv_autotune) ---------------
// The four ways conv3 can run in fp32: cuDNN's legacy or graph API, on channels-last
// copies or on the NCDHW tensors. Which is fastest differs by shape (the copies cost
// most at level 0; the engines differ by layout), so with conv_autotune each
// direction and shape times all four once, inside the first call, and keeps the
// fastest, as cudnn.benchmark does for algorithms.
struct ConvPath {
  bool channels_last, graph;
  const char* name;
};
constexpr ConvPath kConvPaths[] = {
    {true, false, "legacy NDHWC"}, {false, false, "legacy NCDHW"}, {true, true, "graph NDHWC"}, {false, true, "graph NCDHW"}};

// Sets a path's options on the context for a scope (put back after, also on a throw).
struct PathScope {
  Context& ctx;
  bool channels_last, graph;
  PathScope(Context& c, const ConvPath& p)
      : ctx(c), channels_last(c.options().conv_channels_last), graph(c.options().conv_graph) {
    ctx.set_conv_channels_last(p.channels_last);
    ctx.set_conv_graph(p.graph);
  }
  ~PathScope() {
    ctx.set_conv_channels_last(channels_last);
    ctx.set_conv_graph(graph);
  }
};

// The index into kConvPaths for a key: cached, or timed now. run(path) runs the call
// on scratch outputs; a path that throws (other than out of memory) drops out.
template <class Run>
int autotuned_path(Context& ctx, const ConvKey& key, const char* what, Run run) {
  ShapeCache<ConvKey, int>& cache = ctx.impl().conv_paths;
  if (const int* known = cache.find(key)) return *known;
  int best = -1;
  float best_ms = 0;
  std::string tried, out_of_memory;
  for (int p = 0; p < (int)std::size(kConvPaths); ++p) {
    float ms = -1;
    try {
      PathScope scope(ctx, kConvPaths[p]);
      run();  // warm-up: each path chooses its own algorithm or engine here
      ms = ctx.time_ms(run, 2);
    } catch (const OutOfMemory& e) {
      // A path that needs more memory (the channels-last copies) drops out: near a memory
      // limit the others may still fit, as the single default path did before timing.
      tried += str(tried.empty() ? "" : ", ", kConvPaths[p].name, " out of memory");
      out_of_memory = e.what();
      continue;
    } catch (const Error& e) {
      tried += str(tried.empty() ? "" : ", ", kConvPaths[p].name, " failed (", e.what(), ")");
      continue;
    }
    tried += str(tried.empty() ? "" : ", ", kConvPaths[p].name, " ", ms, " ms");
    if (best < 0 || ms < best_ms) best = p, best_ms = ms;
  }
  if (best < 0 && !out_of_memory.empty()) throw OutOfMemory(out_of_memory);  // said in the user's terms
  if (best < 0) fail(what, ": no conv3 path ran (", tried, ")");
  std::fprintf(stderr, "cmseg: conv3 %s %d->%d %dx%dx%d n %d: %s (%s)\n", what, key.cin, key.cout, key.d, key.h,
               key.w, key.n, kConvPaths[best].name, tried.c_str());
  cache.put(key, best);  // run() may have evicted entries meanwhile: nothing of the cache is held across it
  return best;
}

bool autotune(const Context& ctx) { return ctx.options().conv_autotune && !ctx.options().bf16; }

}  // namespace

void conv3_forward(Context& ctx, const float* x, const float* w, float* y, int n, int cin, int cout, Spatial s,
                   int ndim) {
  check_shape("conv3_forward", n, cin, cout, s, ndim);
  if (!autotune(ctx)) return conv3_forward_on(ctx, x, w, y, n, cin, cout, s, ndim);
  const ConvKey key{40, n, cin, cout, s.d, s.h, s.w, ndim, ctx.options().tf32};
  const int p = autotuned_path(ctx, key, "forward", [&] { conv3_forward_on(ctx, x, w, y, n, cin, cout, s, ndim); });
  PathScope scope(ctx, kConvPaths[p]);
  conv3_forward_on(ctx, x, w, y, n, cin, cout, s, ndim);
}

namespace {

// conv3's backward through cuDNN; dx or dw may be null (that direction is skipped).
void conv3_backward_cudnn(Context& ctx, const float* x, const float* w, const float* dy, float* dx, float* dw, int n,
                          int cin, int cout, Spatial s, int ndim) {
  if (!dx && !dw) return;
  if (!autotune(ctx)) return conv3_backward_on(ctx, x, w, dy, dx, dw, n, cin, cout, s, ndim);
  const ConvKey key{dx ? (dw ? 41 : 43) : 42, n, cin, cout, s.d, s.h, s.w, ndim, ctx.options().tf32};
  const size_t wn = (size_t)cout * cin * conv3_taps(ndim);
  int p;
  {
    Scratch timed_dw(ctx, dw ? wn * sizeof(float) : 0);  // the filter gradient is accumulated: time into scratch
    p = autotuned_path(ctx, key, dx ? (dw ? "backward" : "backward data") : "backward filter", [&] {
      conv3_backward_on(ctx, x, w, dy, dx, static_cast<float*>(timed_dw.p), n, cin, cout, s, ndim);
    });
  }
  PathScope scope(ctx, kConvPaths[p]);
  conv3_backward_on(ctx, x, w, dy, dx, dw, n, cin, cout, s, ndim);
}

// ||a - b|| / ||b|| of two device arrays of n floats (||a - b|| where b is all zeros),
// on the host.
double relative_l2(Context& ctx, const float* a, const float* b, size_t n) {
  std::vector<float> ha(n), hb(n);
  ctx.download(ha.data(), a, n * sizeof(float));
  ctx.download(hb.data(), b, n * sizeof(float));
  double num = 0, den = 0;
  for (size_t i = 0; i < n; ++i) {
    const double d = (double)ha[i] - hb[i];
    num += d * d, den += (double)hb[i] * hb[i];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

// Whether this call's filter gradient takes our own kernel (ContextOptions::conv_wgrad):
// 3D TF32 calls only. With Auto, the whole backward both ways (cuDNN's data gradient on
// its own timed path, then our filter gradient; or cuDNN's backward as it would run),
// each timed once per shape inside the first call and the faster kept, as the conv3
// paths above are; and the two filter gradients compared, so that an own kernel that
// disagrees with cuDNN's beyond TF32's rounding is never chosen. The timing writes dx
// (the call then overwrites it) and scratch filter gradients.
bool own_filter_gradient(Context& ctx, const float* x, const float* w, const float* dy, float* dx, int n, int cin,
                         int cout, Spatial s, int ndim) {
  const ContextOptions& o = ctx.options();
  if (!own_wgrad_wanted(o, ndim) || !own_filter_grad_fits(ctx.device())) return false;
  if (o.conv_wgrad == WgradPath::Own) return true;
  const ConvKey key{dx ? 44 : 45, n, cin, cout, s.d, s.h, s.w, ndim, true};
  ShapeCache<ConvKey, int>& cache = ctx.impl().conv_paths;
  if (const int* known = cache.find(key)) return *known == 1;
  const size_t wn = (size_t)cout * cin * conv3_taps(ndim);
  float own_ms = -1, cudnn_ms = -1;
  std::string oom;
  std::optional<Scratch> own_dw, cudnn_dw;
  try {
    own_dw.emplace(ctx, wn * sizeof(float));
    cudnn_dw.emplace(ctx, wn * sizeof(float));
  } catch (const OutOfMemory&) {
    return false;  // no room to time: cuDNN's way this once, timed at a later call
  }
  ctx.zero(own_dw->p, wn * sizeof(float));
  ctx.zero(cudnn_dw->p, wn * sizeof(float));
  float* dw_own = static_cast<float*>(own_dw->p);
  float* dw_cudnn = static_cast<float*>(cudnn_dw->p);
  try {
    own_ms = ctx.time_ms(
        [&] {
          conv3_backward_cudnn(ctx, x, w, dy, dx, nullptr, n, cin, cout, s, ndim);
          conv3_backward_filter_own(ctx, x, dy, dw_own, n, cin, cout, s);
        },
        2);
  } catch (const OutOfMemory& e) {  // near the memory limit the other way may still fit
    oom = e.what();
  }
  try {
    cudnn_ms = ctx.time_ms([&] { conv3_backward_cudnn(ctx, x, w, dy, dx, dw_cudnn, n, cin, cout, s, ndim); }, 2);
  } catch (const OutOfMemory& e) {
    oom = e.what();
  }
  if (own_ms < 0 && cudnn_ms < 0) throw OutOfMemory(oom);
  // Both ran 3 times (time_ms' warm-up and 2), each time adding its filter gradient.
  double disagreement = 0;
  if (own_ms >= 0 && cudnn_ms >= 0) {
    disagreement = relative_l2(ctx, dw_own, dw_cudnn, wn);
    if (!(disagreement <= 1e-2))
      std::fprintf(stderr,
                   "cmseg: warning: conv3's own filter-gradient kernel disagrees with cuDNN's for %d->%d %dx%dx%d "
                   "(relative L2 %.3g): cuDNN's is used\n",
                   cin, cout, s.d, s.h, s.w, disagreement);
  }
  own_dw.reset(), cudnn_dw.reset();
  const bool own = own_ms >= 0 && disagreement <= 1e-2 && (cudnn_ms < 0 || own_ms < cudnn_ms);
  auto said = [](float ms) { return ms < 0 ? std::string("out of memory") : str(ms, " ms"); };
  std::fprintf(stderr,
               "cmseg: conv3 %s %d->%d %dx%dx%d n %d: filter gradient by %s (with own kernel %s, cuDNN %s; "
               "the two filter gradients differ by %.2g relative L2)\n",
               dx ? "backward" : "backward filter", cin, cout, s.d, s.h, s.w, n, own ? "own kernel" : "cuDNN",
               said(own_ms).c_str(), said(cudnn_ms).c_str(), disagreement);
  cache.put(key, own ? 1 : 0);
  return own;
}

}  // namespace

void conv3_backward(Context& ctx, const float* x, const float* w, const float* dy, float* dx, float* dw, int n,
                    int cin, int cout, Spatial s, int ndim) {
  check_shape("conv3_backward", n, cin, cout, s, ndim);
  if (dw && own_filter_gradient(ctx, x, w, dy, dx, n, cin, cout, s, ndim)) {
    conv3_backward_cudnn(ctx, x, w, dy, dx, nullptr, n, cin, cout, s, ndim);
    conv3_backward_filter_own(ctx, x, dy, dw, n, cin, cout, s);
    return;
  }
  conv3_backward_cudnn(ctx, x, w, dy, dx, dw, n, cin, cout, s, ndim);
}

// upconv2 through cuDNN (native/cuda/upconv2.cu chooses the path and adds the
// bias): y = the transposed convolution of x, dx and dw its gradients (dw
// accumulated). channels_last: on NDHWC copies, falling back to the NCDHW tensors.
void upconv2_forward_cudnn(Context& ctx, const float* x, const float* w, float* y, int n, int cin, int cout,
                           Spatial s, int ndim, bool channels_last) {
  check_shape("upconv2_forward", n, cin, cout, s, ndim);
  const bool tf32 = ctx.options().tf32;
  const Spatial so{ndim == 3 ? 2 * s.d : 1, 2 * s.h, 2 * s.w};
  // Its forward is the data gradient of the convolution it transposes (dY = its input x).
  LazyChannelsLast<float> xt{ctx, x, n, cin, s.size(), {}};
  if (channels_last && cl_backward_data(ctx, upconv2_cl(n, cin, cout, s, so, ndim, tf32), w, xt, y)) return;
  xt.release();
  // The convolution this is the transpose of maps y (cout channels) to x (cin channels).
  TensorDesc xd(n, cin, s, ndim), yd(n, cout, so, ndim);
  FilterDesc wd(cin, cout, 2, ndim);
  ConvDesc cd(0, 2, ndim, tf32);
  const AlignedFilter wa(ctx, w, (size_t)cin * cout * pool2_taps(ndim), true);
  const ConvAlgo a = algo_backward_data(ctx, key_of(kUpFwd, n, cin, cout, s, ndim, tf32), wd, wa.p, xd, x, cd, yd, y);
  use_math(cd, a);
  Scratch ws(ctx, a.workspace);
  const float one = 1.f, zero = 0.f;
  CMSEG_CUDNN(cudnnConvolutionBackwardData(ctx.impl().cudnn(), &one, wd.d, wa.p, xd.d, x, cd.d,
                                           (cudnnConvolutionBwdDataAlgo_t)a.algo, ws.p, a.workspace, &zero, yd.d, y));
}

void upconv2_backward_cudnn(Context& ctx, const float* x, const float* w, const float* dy, float* dx, float* dw,
                            int n, int cin, int cout, Spatial s, int ndim, bool channels_last) {
  check_shape("upconv2_backward", n, cin, cout, s, ndim);
  const bool tf32 = ctx.options().tf32;
  const Spatial so{ndim == 3 ? 2 * s.d : 1, 2 * s.h, 2 * s.w};
  TensorDesc xd(n, cin, s, ndim), yd(n, cout, so, ndim);
  FilterDesc wd(cin, cout, 2, ndim);
  ConvDesc cd(0, 2, ndim, tf32);
  const float one = 1.f, zero = 0.f;
  cudnnHandle_t h = ctx.impl().cudnn();
  const size_t wn = (size_t)cin * cout * pool2_taps(ndim);
  const bool cl = channels_last;
  const ClConv g = upconv2_cl(n, cin, cout, s, so, ndim, tf32);
  // Its data gradient is the forward of the convolution it transposes (X = dy); its
  // filter gradient that convolution's, with X = dy and dY = its input x. dy's copy
  // serves both.
  LazyChannelsLast<float> dyt{ctx, dy, n, cout, so.size(), {}}, xt{ctx, x, n, cin, s.size(), {}};
  if (dx && !(cl && cl_forward(ctx, g, dyt, w, dx))) {
    const AlignedFilter wa(ctx, w, wn, true);
    const ConvAlgo a =
        algo_forward(ctx, key_of(kUpBwdData, n, cin, cout, s, ndim, tf32), yd, dy, wd, wa.p, cd, xd, dx);
    use_math(cd, a);
    Scratch ws(ctx, a.workspace);
    CMSEG_CUDNN(cudnnConvolutionForward(h, &one, yd.d, dy, wd.d, wa.p, cd.d, (cudnnConvolutionFwdAlgo_t)a.algo, ws.p,
                                        a.workspace, &zero, xd.d, dx));
  }
  if (cl && cl_backward_filter(ctx, g, dyt, xt, dw)) return;
  dyt.release(), xt.release();
  // In the convolution's terms, dy is the input and x the output gradient.
  ncdhw_backward_filter(ctx, key_of(kUpBwdFilter, n, cin, cout, s, ndim, tf32), yd, dy, xd, x, cd, wd, dw, wn);
}

namespace host {

void conv3_forward(Context& ctx, const float* x, const float* w, float* y, int n, int cin, int cout, Spatial s,
                   int ndim) {
  const size_t V = (size_t)s.size();
  Buffer<float> bx(ctx, (size_t)n * cin * V), bw(ctx, (size_t)cout * cin * conv3_taps(ndim)),
      by(ctx, (size_t)n * cout * V);
  bx.upload(x), bw.upload(w);
  cuda::conv3_forward(ctx, bx.data(), bw.data(), by.data(), n, cin, cout, s, ndim);
  by.download(y);
}

void conv3_backward(Context& ctx, const float* x, const float* w, const float* dy, float* dx, float* dw, int n,
                    int cin, int cout, Spatial s, int ndim) {
  const size_t V = (size_t)s.size(), wn = (size_t)cout * cin * conv3_taps(ndim);
  Buffer<float> bx(ctx, (size_t)n * cin * V), bw(ctx, wn), bdy(ctx, (size_t)n * cout * V),
      bdx(ctx, dx ? (size_t)n * cin * V : 0), bdw(ctx, wn);
  bx.upload(x), bw.upload(w), bdy.upload(dy), bdw.upload(dw);
  cuda::conv3_backward(ctx, bx.data(), bw.data(), bdy.data(), dx ? bdx.data() : nullptr, bdw.data(), n, cin, cout, s,
                       ndim);
  if (dx) bdx.download(dx);
  bdw.download(dw);
}

}  // namespace host
}  // namespace cuda
}  // namespace cmseg
