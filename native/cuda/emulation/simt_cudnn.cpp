// cuDNN's legacy convolution API on the host, for test_cuda_simt_cudnn: conv_cudnn.cu
// itself (its descriptors, algorithm choice and caches, channels-last and bf16 copies,
// fallbacks) runs against it. The convolutions are computed directly from what the
// descriptors say (dimensions, strides, formats, padding, stride, data type, math), so
// a descriptor that does not describe the buffer it comes with gives wrong results or
// CUDNN_STATUS_BAD_PARAM, as cuDNN would.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "simt_cuda.hpp"

struct SimtTensorDesc {
  cudnnDataType_t type = CUDNN_DATA_FLOAT;
  int nb = 0;
  int dims[5] = {1, 1, 1, 1, 1};     // n (or k), c, d, h, w: 2D has d = 1
  int64_t strides[5] = {0, 0, 0, 0, 0};  // in elements, for the same order
};
struct SimtConvDesc {
  int ndim = 0, pad[3] = {0, 0, 0}, stride[3] = {1, 1, 1};
  cudnnMathType_t math = CUDNN_DEFAULT_MATH;
};

namespace {

constexpr size_t kTensorOpWorkspace = 4096;  // algorithm 1's (a workspace the caller must size)

// Strides of a packed [a, b, d, h, w] tensor stored NCDHW or NDHWC.
void packed_strides(SimtTensorDesc* t, bool channels_last) {
  const int64_t c = t->dims[1], d = t->dims[2], h = t->dims[3], w = t->dims[4];
  if (!channels_last) {
    t->strides[4] = 1, t->strides[3] = w, t->strides[2] = h * w, t->strides[1] = d * h * w;
  } else {
    t->strides[1] = 1, t->strides[4] = c, t->strides[3] = w * c, t->strides[2] = h * w * c;
  }
  t->strides[0] = c * d * h * w;
}

// [a, b, (d,) h, w] from an n-d list: 2D gets depth 1.
bool set_dims(SimtTensorDesc* t, int nb, const int* dims) {
  if (nb != 4 && nb != 5) return false;
  t->nb = nb;
  t->dims[0] = dims[0], t->dims[1] = dims[1];
  t->dims[2] = nb == 5 ? dims[2] : 1;
  t->dims[3] = dims[nb - 2], t->dims[4] = dims[nb - 1];
  for (int k = 0; k < 5; ++k)
    if (t->dims[k] < 1) return false;
  return true;
}

float load(const SimtTensorDesc* t, const void* p, int64_t i) {
  if (t->type == CUDNN_DATA_BFLOAT16) return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  return static_cast<const float*>(p)[i];
}
void store(const SimtTensorDesc* t, void* p, int64_t i, double v) {
  if (t->type == CUDNN_DATA_BFLOAT16)
    static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn((float)v);
  else
    static_cast<float*>(p)[i] = (float)v;
}
int64_t offset(const SimtTensorDesc* t, int a, int b, int d, int h, int w) {
  return a * t->strides[0] + b * t->strides[1] + d * t->strides[2] + h * t->strides[3] + w * t->strides[4];
}

// An operand as the math type reads it: TF32 tensor-op math rounds fp32 inputs to TF32
// (cvt.rna), FMA math keeps them; bf16 inputs are bf16 already.
float operand(const SimtConvDesc* c, const SimtTensorDesc* t, float v) {
  if (t->type != CUDNN_DATA_FLOAT || c->math == CUDNN_FMA_MATH) return v;
  return __uint_as_float(::simt::cvt_rna_tf32(v));
}

// The convolution's geometry, checked against the descriptors: x [n, c, sx], w [k, c, taps],
// y [n, k, sy] with sy = (sx + 2 pad - ksize) / stride + 1 per axis.
struct Geometry {
  const SimtTensorDesc *x, *w, *y;
  const SimtConvDesc* c;
  int k[3];  // kernel size per axis (d, h, w)
  bool ok = false;
  Geometry(const SimtTensorDesc* x_, const SimtTensorDesc* w_, const SimtTensorDesc* y_, const SimtConvDesc* c_)
      : x(x_), w(w_), y(y_), c(c_) {
    if (!x || !w || !y || !c || x->nb != w->nb || x->nb != y->nb || c->ndim != x->nb - 2) return;
    if (x->dims[0] != y->dims[0] || x->dims[1] != w->dims[1] || y->dims[1] != w->dims[0]) return;
    if (x->type != w->type || x->type != y->type) return;
    for (int a = 0; a < 3; ++a) {
      k[a] = w->dims[2 + a];
      const int ax = c->ndim == 3 ? a : a - 1;  // the descriptor's axis (2D: h, w)
      const int pad = ax >= 0 ? c->pad[ax] : 0, stride = ax >= 0 ? c->stride[ax] : 1;
      if ((x->dims[2 + a] + 2 * pad - k[a]) / stride + 1 != y->dims[2 + a]) return;
    }
    ok = true;
  }
  int pad(int a) const { return c->ndim == 3 ? c->pad[a] : a == 0 ? 0 : c->pad[a - 1]; }
  int stride(int a) const { return c->ndim == 3 ? c->stride[a] : a == 0 ? 1 : c->stride[a - 1]; }
  // Calls f(n, ci, co, input d/h/w, output d/h/w, tap d/h/w) for every product of the convolution.
  template <class F>
  void each(F f) const {
    for (int n = 0; n < x->dims[0]; ++n)
      for (int co = 0; co < y->dims[1]; ++co)
        for (int od = 0; od < y->dims[2]; ++od)
          for (int oh = 0; oh < y->dims[3]; ++oh)
            for (int ow = 0; ow < y->dims[4]; ++ow)
              for (int ci = 0; ci < x->dims[1]; ++ci)
                for (int td = 0; td < k[0]; ++td) {
                  const int id = od * stride(0) - pad(0) + td;
                  if (id < 0 || id >= x->dims[2]) continue;
                  for (int th = 0; th < k[1]; ++th) {
                    const int ih = oh * stride(1) - pad(1) + th;
                    if (ih < 0 || ih >= x->dims[3]) continue;
                    for (int tw = 0; tw < k[2]; ++tw) {
                      const int iw = ow * stride(2) - pad(2) + tw;
                      if (iw < 0 || iw >= x->dims[4]) continue;
                      f(offset(x, n, ci, id, ih, iw), offset(y, n, co, od, oh, ow), offset(w, co, ci, td, th, tw));
                    }
                  }
                }
  }
};

int64_t elements(const SimtTensorDesc* t) { return (int64_t)t->dims[0] * t->dims[1] * t->dims[2] * t->dims[3] * t->dims[4]; }

// out = alpha * sum + beta * out over out's elements (sums indexed like out's offsets).
void blend(const SimtTensorDesc* t, void* out, const std::vector<double>& sum, double a, double b) {
  for (int i0 = 0; i0 < t->dims[0]; ++i0)
    for (int i1 = 0; i1 < t->dims[1]; ++i1)
      for (int i2 = 0; i2 < t->dims[2]; ++i2)
        for (int i3 = 0; i3 < t->dims[3]; ++i3)
          for (int i4 = 0; i4 < t->dims[4]; ++i4) {
            const int64_t o = offset(t, i0, i1, i2, i3, i4);
            store(t, out, o, a * sum[(size_t)o] + (b != 0 ? b * load(t, out, o) : 0.0));
          }
}

// The span of offsets a tensor's strides reach (its storage).
size_t span(const SimtTensorDesc* t) {
  int64_t last = 0;
  for (int k = 0; k < 5; ++k) last += (int64_t)(t->dims[k] - 1) * t->strides[k];
  return (size_t)last + 1;
}

size_t workspace_of(int algo) { return algo == 1 ? kTensorOpWorkspace : 0; }

// Tensor-op first, as cuDNN rates it faster (without TF32 the caller skips it).
template <class Perf>
void list_algorithms(Perf* p, int max, int* n) {
  *n = 0;
  for (int algo = 1; algo >= 0 && *n < max; --algo, ++*n) {
    p[*n] = Perf{};
    p[*n].algo = (decltype(p[*n].algo))algo;
    p[*n].status = CUDNN_STATUS_SUCCESS;
    p[*n].memory = workspace_of(algo);
    p[*n].mathType = algo == 1 ? CUDNN_TENSOR_OP_MATH : CUDNN_FMA_MATH;
  }
}

enum class Dir { Forward, BackwardData, BackwardFilter };

// The sums of one direction over every product of the convolution g, indexed like the
// output's offsets.
template <Dir D>
std::vector<double> sums(const Geometry& g, const void* x, const void* w, const void* y) {
  const SimtTensorDesc *xd = g.x, *wd = g.w, *yd = g.y, *od = D == Dir::Forward ? yd : D == Dir::BackwardData ? xd : wd;
  std::vector<double> sum(span(od), 0.0);
  g.each([&](int64_t xi, int64_t yi, int64_t wi) {
    if (D == Dir::Forward)
      sum[(size_t)yi] += (double)operand(g.c, xd, load(xd, x, xi)) * operand(g.c, wd, load(wd, w, wi));
    else if (D == Dir::BackwardData)
      sum[(size_t)xi] += (double)operand(g.c, yd, load(yd, y, yi)) * operand(g.c, wd, load(wd, w, wi));
    else
      sum[(size_t)wi] += (double)operand(g.c, xd, load(xd, x, xi)) * operand(g.c, yd, load(yd, y, yi));
  });
  return sum;
}

// One direction of the convolution of x, w and y (the output among them is written):
// out = alpha * sums + beta * out. Checked at the call, as cuDNN does; computed in the
// handle's stream order from copies of the descriptors and of alpha and beta (the
// caller may destroy or reuse them once the call returns).
template <Dir D>
cudnnStatus_t convolve(cudnnHandle_t h, const SimtTensorDesc* xd, const void* x, const SimtTensorDesc* wd,
                       const void* w, const SimtTensorDesc* yd, const void* y, const SimtConvDesc* cd, int algo,
                       size_t bytes, const void* alpha, const void* beta) {
  if (!Geometry(xd, wd, yd, cd).ok || bytes < workspace_of(algo)) return CUDNN_STATUS_BAD_PARAM;
  const double a = *static_cast<const float*>(alpha), b = *static_cast<const float*>(beta);
  ::simt::enqueue(::simt::stream_of(h), [=, X = *xd, W = *wd, Y = *yd, C = *cd] {
    const Geometry g(&X, &W, &Y, &C);
    const SimtTensorDesc* od = D == Dir::Forward ? &Y : D == Dir::BackwardData ? &X : &W;
    void* out = const_cast<void*>(D == Dir::Forward ? y : D == Dir::BackwardData ? x : w);
    blend(od, out, sums<D>(g, x, w, y), a, b);
  });
  return CUDNN_STATUS_SUCCESS;
}

const float kOne = 1.f, kZero = 0.f;

}  // namespace

cudnnStatus_t cudnnCreateTensorDescriptor(cudnnTensorDescriptor_t* d) { return *d = new SimtTensorDesc, CUDNN_STATUS_SUCCESS; }
cudnnStatus_t cudnnDestroyTensorDescriptor(cudnnTensorDescriptor_t d) { return delete d, CUDNN_STATUS_SUCCESS; }
cudnnStatus_t cudnnSetTensorNdDescriptor(cudnnTensorDescriptor_t d, cudnnDataType_t t, int nb, const int* dims,
                                         const int* strides) {
  if (!set_dims(d, nb, dims)) return CUDNN_STATUS_BAD_PARAM;
  d->type = t;
  for (int k = 0; k < 5; ++k) d->strides[k] = 0;
  d->strides[0] = strides[0], d->strides[1] = strides[1];
  if (nb == 5) d->strides[2] = strides[2];
  d->strides[3] = strides[nb - 2], d->strides[4] = strides[nb - 1];
  return CUDNN_STATUS_SUCCESS;
}
cudnnStatus_t cudnnSetTensor4dDescriptor(cudnnTensorDescriptor_t d, cudnnTensorFormat_t f, cudnnDataType_t t, int n,
                                         int c, int h, int w) {
  const int dims[4] = {n, c, h, w};
  if (!set_dims(d, 4, dims)) return CUDNN_STATUS_BAD_PARAM;
  d->type = t;
  packed_strides(d, f == CUDNN_TENSOR_NHWC);
  return CUDNN_STATUS_SUCCESS;
}
cudnnStatus_t cudnnCreateFilterDescriptor(cudnnFilterDescriptor_t* d) { return *d = new SimtTensorDesc, CUDNN_STATUS_SUCCESS; }
cudnnStatus_t cudnnDestroyFilterDescriptor(cudnnFilterDescriptor_t d) { return delete d, CUDNN_STATUS_SUCCESS; }
cudnnStatus_t cudnnSetFilterNdDescriptor(cudnnFilterDescriptor_t d, cudnnDataType_t t, cudnnTensorFormat_t f, int nb,
                                         const int* dims) {
  if (!set_dims(d, nb, dims)) return CUDNN_STATUS_BAD_PARAM;
  d->type = t;
  packed_strides(d, f == CUDNN_TENSOR_NHWC);  // [k, c, taps] or [k, taps, c]
  return CUDNN_STATUS_SUCCESS;
}
cudnnStatus_t cudnnCreateConvolutionDescriptor(cudnnConvolutionDescriptor_t* d) { return *d = new SimtConvDesc, CUDNN_STATUS_SUCCESS; }
cudnnStatus_t cudnnDestroyConvolutionDescriptor(cudnnConvolutionDescriptor_t d) { return delete d, CUDNN_STATUS_SUCCESS; }
cudnnStatus_t cudnnSetConvolutionNdDescriptor(cudnnConvolutionDescriptor_t d, int n, const int* pads,
                                              const int* strides, const int* dilations, cudnnConvolutionMode_t m,
                                              cudnnDataType_t) {
  if (n < 2 || n > 3 || m != CUDNN_CROSS_CORRELATION) return CUDNN_STATUS_NOT_SUPPORTED;
  d->ndim = n;
  for (int a = 0; a < n; ++a) {
    if (dilations[a] != 1 || strides[a] < 1 || pads[a] < 0) return CUDNN_STATUS_NOT_SUPPORTED;
    d->pad[a] = pads[a], d->stride[a] = strides[a];
  }
  return CUDNN_STATUS_SUCCESS;
}
cudnnStatus_t cudnnSetConvolutionMathType(cudnnConvolutionDescriptor_t d, cudnnMathType_t m) {
  return d->math = m, CUDNN_STATUS_SUCCESS;
}

cudnnStatus_t cudnnGetConvolutionForwardAlgorithm_v7(cudnnHandle_t, cudnnTensorDescriptor_t, cudnnFilterDescriptor_t,
                                                     cudnnConvolutionDescriptor_t, cudnnTensorDescriptor_t, int max,
                                                     int* n, cudnnConvolutionFwdAlgoPerf_t* p) {
  return list_algorithms(p, max, n), CUDNN_STATUS_SUCCESS;
}
cudnnStatus_t cudnnGetConvolutionBackwardDataAlgorithm_v7(cudnnHandle_t, cudnnFilterDescriptor_t,
                                                          cudnnTensorDescriptor_t, cudnnConvolutionDescriptor_t,
                                                          cudnnTensorDescriptor_t, int max, int* n,
                                                          cudnnConvolutionBwdDataAlgoPerf_t* p) {
  return list_algorithms(p, max, n), CUDNN_STATUS_SUCCESS;
}
cudnnStatus_t cudnnGetConvolutionBackwardFilterAlgorithm_v7(cudnnHandle_t, cudnnTensorDescriptor_t,
                                                            cudnnTensorDescriptor_t, cudnnConvolutionDescriptor_t,
                                                            cudnnFilterDescriptor_t, int max, int* n,
                                                            cudnnConvolutionBwdFilterAlgoPerf_t* p) {
  return list_algorithms(p, max, n), CUDNN_STATUS_SUCCESS;
}

// The searches run each algorithm into the output, as cuDNN's do (its contents are
// undefined afterwards), and list them with no time.
cudnnStatus_t cudnnFindConvolutionForwardAlgorithmEx(cudnnHandle_t h, cudnnTensorDescriptor_t xd, const void* x,
                                                     cudnnFilterDescriptor_t wd, const void* w,
                                                     cudnnConvolutionDescriptor_t cd, cudnnTensorDescriptor_t yd,
                                                     void* y, int max, int* n, cudnnConvolutionFwdAlgoPerf_t* p,
                                                     void*, size_t bytes) {
  list_algorithms(p, max, n);
  for (int i = 0; i < *n; ++i)
    p[i].status = convolve<Dir::Forward>(h, xd, x, wd, w, yd, y, cd, (int)p[i].algo, bytes, &kOne, &kZero);
  ::simt::flush(::simt::stream_of(h));  // a search returns when its runs are done
  return CUDNN_STATUS_SUCCESS;
}
cudnnStatus_t cudnnFindConvolutionBackwardDataAlgorithmEx(cudnnHandle_t h, cudnnFilterDescriptor_t wd, const void* w,
                                                          cudnnTensorDescriptor_t dyd, const void* dy,
                                                          cudnnConvolutionDescriptor_t cd, cudnnTensorDescriptor_t dxd,
                                                          void* dx, int max, int* n,
                                                          cudnnConvolutionBwdDataAlgoPerf_t* p, void*, size_t bytes) {
  list_algorithms(p, max, n);
  for (int i = 0; i < *n; ++i)
    p[i].status = convolve<Dir::BackwardData>(h, dxd, dx, wd, w, dyd, dy, cd, (int)p[i].algo, bytes, &kOne, &kZero);
  ::simt::flush(::simt::stream_of(h));
  return CUDNN_STATUS_SUCCESS;
}
cudnnStatus_t cudnnFindConvolutionBackwardFilterAlgorithmEx(cudnnHandle_t h, cudnnTensorDescriptor_t xd, const void* x,
                                                            cudnnTensorDescriptor_t dyd, const void* dy,
                                                            cudnnConvolutionDescriptor_t cd,
                                                            cudnnFilterDescriptor_t dwd, void* dw, int max, int* n,
                                                            cudnnConvolutionBwdFilterAlgoPerf_t* p, void*,
                                                            size_t bytes) {
  list_algorithms(p, max, n);
  for (int i = 0; i < *n; ++i)
    p[i].status = convolve<Dir::BackwardFilter>(h, xd, x, dwd, dw, dyd, dy, cd, (int)p[i].algo, bytes, &kOne, &kZero);
  ::simt::flush(::simt::stream_of(h));
  return CUDNN_STATUS_SUCCESS;
}

cudnnStatus_t cudnnGetConvolutionForwardWorkspaceSize(cudnnHandle_t, cudnnTensorDescriptor_t, cudnnFilterDescriptor_t,
                                                      cudnnConvolutionDescriptor_t, cudnnTensorDescriptor_t,
                                                      cudnnConvolutionFwdAlgo_t algo, size_t* bytes) {
  return *bytes = workspace_of((int)algo), CUDNN_STATUS_SUCCESS;
}
cudnnStatus_t cudnnGetConvolutionBackwardDataWorkspaceSize(cudnnHandle_t, cudnnFilterDescriptor_t,
                                                           cudnnTensorDescriptor_t, cudnnConvolutionDescriptor_t,
                                                           cudnnTensorDescriptor_t, cudnnConvolutionBwdDataAlgo_t algo,
                                                           size_t* bytes) {
  return *bytes = workspace_of((int)algo), CUDNN_STATUS_SUCCESS;
}
cudnnStatus_t cudnnGetConvolutionBackwardFilterWorkspaceSize(cudnnHandle_t, cudnnTensorDescriptor_t,
                                                             cudnnTensorDescriptor_t, cudnnConvolutionDescriptor_t,
                                                             cudnnFilterDescriptor_t,
                                                             cudnnConvolutionBwdFilterAlgo_t algo, size_t* bytes) {
  return *bytes = workspace_of((int)algo), CUDNN_STATUS_SUCCESS;
}

cudnnStatus_t cudnnConvolutionForward(cudnnHandle_t h, const void* alpha, cudnnTensorDescriptor_t xd, const void* x,
                                      cudnnFilterDescriptor_t wd, const void* w, cudnnConvolutionDescriptor_t cd,
                                      cudnnConvolutionFwdAlgo_t algo, void*, size_t bytes, const void* beta,
                                      cudnnTensorDescriptor_t yd, void* y) {
  return convolve<Dir::Forward>(h, xd, x, wd, w, yd, y, cd, (int)algo, bytes, alpha, beta);
}
cudnnStatus_t cudnnConvolutionBackwardData(cudnnHandle_t h, const void* alpha, cudnnFilterDescriptor_t wd, const void* w,
                                           cudnnTensorDescriptor_t dyd, const void* dy, cudnnConvolutionDescriptor_t cd,
                                           cudnnConvolutionBwdDataAlgo_t algo, void*, size_t bytes,
                                           const void* beta, cudnnTensorDescriptor_t dxd, void* dx) {
  return convolve<Dir::BackwardData>(h, dxd, dx, wd, w, dyd, dy, cd, (int)algo, bytes, alpha, beta);
}
cudnnStatus_t cudnnConvolutionBackwardFilter(cudnnHandle_t h, const void* alpha, cudnnTensorDescriptor_t xd,
                                             const void* x, cudnnTensorDescriptor_t dyd, const void* dy,
                                             cudnnConvolutionDescriptor_t cd, cudnnConvolutionBwdFilterAlgo_t algo,
                                             void*, size_t bytes, const void* beta, cudnnFilterDescriptor_t dwd,
                                             void* dw) {
  return convolve<Dir::BackwardFilter>(h, xd, x, dwd, dw, dyd, dy, cd, (int)algo, bytes, alpha, beta);
}
