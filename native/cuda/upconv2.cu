// The transposed convolution (upconv2: kernel 2, stride 2, with bias; SPEC section
// 2) on the device. CPU reference: native/layers/upconv2.cpp.
//
// Default path (ContextOptions::upconv == Gemm): the plan of upconv2_gemm.hpp, per
// image and chunk of input positions one cuBLAS GEMM and one of our kernels:
//   forward   Ycol = W^T X (GEMM), then the scatter kernel writes each Ycol entry to
//             its output voxel and adds the bias;
//   backward  the gather kernel reads dy once, in output order, into dYcol and sums
//             each block's share of every channel for the bias gradient; then
//             dX = W dYcol (GEMM) and dW += X dYcol^T (a strided batch of GEMMs over
//             runs of positions into partial slots, added in order: FilterSplit).
// The GEMMs use TF32 tensor cores with the context's tf32.
// The other paths run cuDNN (conv_cudnn.cu) and add the bias here.
// Every reduction has a fixed shape (grid and order depend on the shape and the
// device only), so results repeat bit for bit.
#include "common.cuh"
#include "upconv2_gemm.hpp"

namespace cmseg {
namespace cuda {
namespace {

constexpr int kThreads = 256;  // 8 warps; each warp walks one output row at a time
constexpr int kRowsPerBlock = kThreads / 32;

void check_shape(const char* what, int n, int cin, int cout, Spatial s, int ndim) {
  if (ndim != 2 && ndim != 3) fail(what, ": ndim must be 2 or 3, got ", ndim);
  if (ndim == 2 && s.d != 1) fail(what, ": a 2D map must have depth 1, got ", s.d);
  if (n < 1 || cin < 1 || cout < 1 || s.size() < 1)
    fail(what, ": empty shape (n ", n, ", cin ", cin, ", cout ", cout, ", ", s.d, "x", s.h, "x", s.w, ")");
  if (s.size() * (ndim == 3 ? 8 : 4) > INT32_MAX)
    fail(what, ": ", s.size(), " positions per image exceed cuBLAS's 32-bit dimensions");
}

UpGemmGeom geom_of(Context& ctx, int n, int cin, int cout, Spatial s, int ndim) {
  return up_gemm_geom(ndim, n, cin, cout, s.d, s.h, s.w, ctx.options().upconv_chunk_bytes);
}

// Blocks along a chunk's rows: enough to fill the device with the channels
// (blockIdx.y) a few times over; a function of the shape and the device only.
int row_blocks(Context& ctx, const UpGemmGeom& g) {
  const UpChunk first = up_chunk(g, 0);
  const int need = (first.rows + kRowsPerBlock - 1) / kRowsPerBlock;
  const int want = std::max(1, ctx.impl().multiprocessors * 16 / g.cout);
  return std::max(1, std::min(need, want));
}

// y (one image) for the chunk's output rows, every channel: Ycol entry + bias.
__global__ void __launch_bounds__(kThreads) scatter_kernel(const float* __restrict__ ycol, const float* __restrict__ b,
                                                           float* __restrict__ y, UpGemmGeom g, UpChunk ch) {
  const int co = blockIdx.y, lane = threadIdx.x & 31;
  const float bias = b[co];
  float* yc = y + (int64_t)co * g.Vo;
  for (int r = blockIdx.x * kRowsPerBlock + (threadIdx.x >> 5); r < ch.rows; r += gridDim.x * kRowsPerBlock) {
    const int64_t ro = ch.row0 + r;
    int64_t vrow;
    int t;
    up_locate(g, ro, vrow, t);
    float* dst = yc + ro * g.Wo;
    for (int xo = lane; xo < g.Wo; xo += 32) dst[xo] = ycol[up_col_index(g, ch, co, vrow, t, xo)] + bias;
  }
}

// dYcol from dy (one image) for the chunk's output rows; partial[co][blockIdx.x]:
// this block's sum of the dy it read, in double, for the bias gradient.
__global__ void __launch_bounds__(kThreads) gather_kernel(const float* __restrict__ dy, float* __restrict__ dycol,
                                                          UpGemmGeom g, UpChunk ch, double* __restrict__ partial) {
  __shared__ double scratch[32];
  const int co = blockIdx.y, lane = threadIdx.x & 31;
  const float* dyc = dy + (int64_t)co * g.Vo;
  double s = 0;
  for (int r = blockIdx.x * kRowsPerBlock + (threadIdx.x >> 5); r < ch.rows; r += gridDim.x * kRowsPerBlock) {
    const int64_t ro = ch.row0 + r;
    int64_t vrow;
    int t;
    up_locate(g, ro, vrow, t);
    const float* src = dyc + ro * g.Wo;
    for (int xo = lane; xo < g.Wo; xo += 32) {
      const float v = src[xo];
      dycol[up_col_index(g, ch, co, vrow, t, xo)] = v;
      s += v;
    }
  }
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) partial[(int64_t)co * gridDim.x + blockIdx.x] = s;
}

// db[co] += the gather calls' block sums, call by call, block by block.
__global__ void bias_finish_kernel(const double* __restrict__ partial, int calls, int blocks, int cout,
                                   float* __restrict__ db) {
  const int co = blockIdx.x * blockDim.x + threadIdx.x;
  if (co >= cout) return;
  double s = 0;
  for (int c = 0; c < calls; ++c)
    for (int b = 0; b < blocks; ++b) s += partial[((int64_t)c * cout + co) * blocks + b];
  db[co] += (float)s;
}

// The cuDNN paths' bias: y[., co, .] += b[co].
__global__ void add_bias_kernel(float* __restrict__ y, const float* __restrict__ b, int cout, int64_t Vo,
                                int64_t total) {
  for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < total; k += (int64_t)gridDim.x * blockDim.x)
    y[k] += b[(k / Vo) % cout];
}

// The cuDNN paths' bias gradient: per (block, channel) sums in double, then the same
// finish as the GEMM path (one "call").
__global__ void __launch_bounds__(kThreads) bias_partial_kernel(const float* __restrict__ dy, int n, int cout,
                                                                int64_t Vo, double* __restrict__ partial) {
  __shared__ double scratch[32];
  const int co = blockIdx.y;
  double s = 0;
  for (int i = 0; i < n; ++i) {
    const float* d = dy + ((int64_t)i * cout + co) * Vo;
    for (int64_t v = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; v < Vo; v += (int64_t)gridDim.x * blockDim.x)
      s += d[v];
  }
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) partial[(int64_t)co * gridDim.x + blockIdx.x] = s;
}

// y_stride: floats from one image of y to the next.
void forward_gemm(Context& ctx, const float* x, const float* w, const float* b, float* y, const UpGemmGeom& g,
                  int64_t y_stride) {
  Buffer<float> ycol(ctx, (size_t)g.M * g.units_per_chunk * g.unit);
  const dim3 grid((unsigned)row_blocks(ctx, g), (unsigned)g.cout);
  for (int i = 0; i < g.n; ++i)
    for (int c = 0; c < g.chunks; ++c) {
      const UpChunk ch = up_chunk(g, c);
      run_gemm(ctx, up_forward_gemm(g, i, ch), x, w, ycol.data());
      scatter_kernel<<<grid, kThreads, 0, stream_of(ctx)>>>(ycol.data(), b, y + (int64_t)i * y_stride, g, ch);
      CMSEG_CUDA_LAUNCHED("upconv2 scatter");
    }
}

// dy_stride: floats from one image of dy to the next.
void backward_gemm(Context& ctx, const float* x, const float* w, const float* dy, float* dx, float* dw, float* db,
                   const UpGemmGeom& g, int64_t dy_stride) {
  const int blocks = row_blocks(ctx, g), calls = g.n * g.chunks;
  int slots = 1;
  for (int c = 0; c < g.chunks; ++c) slots = std::max(slots, up_backward_filter_split(g, 0, up_chunk(g, c)).slots());
  Buffer<float> dycol(ctx, (size_t)g.M * g.units_per_chunk * g.unit);
  Buffer<float> dw_partial(ctx, (size_t)slots * g.M * g.cin);
  Buffer<double> db_partial(ctx, (size_t)calls * g.cout * blocks);
  const dim3 grid((unsigned)blocks, (unsigned)g.cout);
  for (int i = 0; i < g.n; ++i)
    for (int c = 0; c < g.chunks; ++c) {
      const UpChunk ch = up_chunk(g, c);
      double* dbp = db_partial.data() + (int64_t)(i * g.chunks + c) * g.cout * blocks;
      gather_kernel<<<grid, kThreads, 0, stream_of(ctx)>>>(dy + (int64_t)i * dy_stride, dycol.data(), g, ch, dbp);
      CMSEG_CUDA_LAUNCHED("upconv2 gather");
      if (dx) run_gemm(ctx, up_backward_data_gemm(g, i, ch), dycol.data(), w, dx);
      const FilterSplit f = up_backward_filter_split(g, i, ch);
      run_split(ctx, f, dycol.data(), x, dw_partial.data());
      add_slots(ctx, dw_partial.data(), f.slots(), f.slot, dw);
    }
  bias_finish_kernel<<<blocks_for(g.cout, 128), 128, 0, stream_of(ctx)>>>(db_partial.data(), calls, blocks, g.cout,
                                                                          db);
  CMSEG_CUDA_LAUNCHED("upconv2 bias finish");
}

// The image stride of an upconv2 output [n, cout, Vo] laid out with `stride` (0: packed).
int64_t image_stride(const char* what, int64_t stride, int cout, int64_t Vo) {
  if (stride == 0) return (int64_t)cout * Vo;
  if (stride < (int64_t)cout * Vo) fail(what, ": image stride ", stride, " is less than an image (", (int64_t)cout * Vo, ")");
  return stride;
}

}  // namespace

void upconv2_forward(Context& ctx, const float* x, const float* w, const float* b, float* y, int n, int cin, int cout,
                     Spatial s, int ndim, int64_t y_image_stride) {
  ProfileScope prof_(ctx, "upconv2_forward", cin, cout, s);
  check_shape("upconv2_forward", n, cin, cout, s, ndim);
  const int64_t Vo = s.size() * (ndim == 3 ? 8 : 4), run = (int64_t)cout * Vo;
  const int64_t stride = image_stride("upconv2_forward", y_image_stride, cout, Vo);
  const UpconvPath path = ctx.options().upconv;
  if (path == UpconvPath::Gemm) return forward_gemm(ctx, x, w, b, y, geom_of(ctx, n, cin, cout, s, ndim), stride);
  if (stride != run) {  // the cuDNN paths write packed images: into scratch, then to their places
    Buffer<float> packed(ctx, (size_t)n * run);
    upconv2_forward(ctx, x, w, b, packed.data(), n, cin, cout, s, ndim);
    return copy_rows(ctx, y, stride, packed.data(), run, run, n);
  }
  upconv2_forward_cudnn(ctx, x, w, y, n, cin, cout, s, ndim, path == UpconvPath::CudnnChannelsLast);
  const int64_t total = n * run;
  add_bias_kernel<<<ctx.impl().grid_for(total, kThreads, 16), kThreads, 0, stream_of(ctx)>>>(y, b, cout, Vo, total);
  CMSEG_CUDA_LAUNCHED("upconv2 bias");
}

void upconv2_backward(Context& ctx, const float* x, const float* w, const float* dy, float* dx, float* dw, float* db,
                      int n, int cin, int cout, Spatial s, int ndim, int64_t dy_image_stride) {
  ProfileScope prof_(ctx, "upconv2_backward", cin, cout, s);
  check_shape("upconv2_backward", n, cin, cout, s, ndim);
  const int64_t Vo = s.size() * (ndim == 3 ? 8 : 4), run = (int64_t)cout * Vo;
  const int64_t stride = image_stride("upconv2_backward", dy_image_stride, cout, Vo);
  const UpconvPath path = ctx.options().upconv;
  if (path == UpconvPath::Gemm)
    return backward_gemm(ctx, x, w, dy, dx, dw, db, geom_of(ctx, n, cin, cout, s, ndim), stride);
  if (stride != run) {  // the cuDNN paths read packed images
    Buffer<float> packed(ctx, (size_t)n * run);
    copy_rows(ctx, packed.data(), run, dy, stride, run, n);
    return upconv2_backward(ctx, x, w, packed.data(), dx, dw, db, n, cin, cout, s, ndim);
  }
  upconv2_backward_cudnn(ctx, x, w, dy, dx, dw, n, cin, cout, s, ndim, path == UpconvPath::CudnnChannelsLast);
  const int blocks = ctx.impl().grid_for(Vo, kThreads, std::max(1, 16 / cout));
  Buffer<double> partial(ctx, (size_t)cout * blocks);
  bias_partial_kernel<<<dim3((unsigned)blocks, (unsigned)cout), kThreads, 0, stream_of(ctx)>>>(dy, n, cout, Vo,
                                                                                               partial.data());
  CMSEG_CUDA_LAUNCHED("upconv2 bias partial");
  bias_finish_kernel<<<blocks_for(cout, 128), 128, 0, stream_of(ctx)>>>(partial.data(), 1, blocks, cout, db);
  CMSEG_CUDA_LAUNCHED("upconv2 bias finish");
}

namespace host {

void upconv2_forward(Context& ctx, const float* x, const float* w, const float* b, float* y, int n, int cin, int cout,
                     Spatial s, int ndim) {
  const size_t V = (size_t)s.size(), Vo = V * (ndim == 3 ? 8 : 4);
  Buffer<float> bx(ctx, (size_t)n * cin * V), bw(ctx, (size_t)cin * cout * pool2_taps(ndim)), bb(ctx, (size_t)cout),
      by(ctx, (size_t)n * cout * Vo);
  bx.upload(x), bw.upload(w), bb.upload(b);
  cuda::upconv2_forward(ctx, bx.data(), bw.data(), bb.data(), by.data(), n, cin, cout, s, ndim);
  by.download(y);
}

void upconv2_backward(Context& ctx, const float* x, const float* w, const float* dy, float* dx, float* dw, float* db,
                      int n, int cin, int cout, Spatial s, int ndim) {
  const size_t V = (size_t)s.size(), Vo = V * (ndim == 3 ? 8 : 4), wn = (size_t)cin * cout * pool2_taps(ndim);
  Buffer<float> bx(ctx, (size_t)n * cin * V), bw(ctx, wn), bdy(ctx, (size_t)n * cout * Vo),
      bdx(ctx, dx ? (size_t)n * cin * V : 0), bdw(ctx, wn), bdb(ctx, (size_t)cout);
  bx.upload(x), bw.upload(w), bdy.upload(dy), bdw.upload(dw), bdb.upload(db);
  cuda::upconv2_backward(ctx, bx.data(), bw.data(), bdy.data(), dx ? bdx.data() : nullptr, bdw.data(), bdb.data(), n,
                         cin, cout, s, ndim);
  if (dx) bdx.download(dx);
  bdw.download(dw), bdb.download(db);
}

}  // namespace host
}  // namespace cuda
}  // namespace cmseg
