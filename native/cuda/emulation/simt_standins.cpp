// test_cuda_simt's stand-ins for what cuDNN computes (conv_cudnn.cu, conv_graph.cu): the
// CPU reference layers on the emulated device memory, which is host memory. Everything
// else test_cuda_simt runs is the backend's own kernel code (conv3's own filter-gradient
// kernel too).
#include <vector>

#include "common.cuh"
#include "cmseg/layers.hpp"

namespace cmseg {
namespace cuda {

size_t conv_copy_bytes(Context&) { return 0; }
bool graph_conv3(Context&, GraphPart, const GraphShape&, const void*, const void*, const void*) { return false; }

void conv3_forward(Context&, const float* x, const float* w, float* y, int n, int cin, int cout, Spatial s, int ndim) {
  cmseg::conv3_forward(x, w, y, n, cin, cout, s, ndim);
}
// The filter gradient by the own kernel (conv3_filter_grad.cu, emulated) where
// ContextOptions::conv_wgrad asks for it, as conv_cudnn.cu's conv3_backward does; 'auto'
// takes it too (there is no cuDNN here to time it against).
void conv3_backward(Context& ctx, const float* x, const float* w, const float* dy, float* dx, float* dw, int n,
                    int cin, int cout, Spatial s, int ndim) {
  if (dw && own_wgrad_wanted(ctx.options(), ndim) && own_filter_grad_fits(ctx.device())) {
    if (dx) {  // the reference always sums a filter gradient: into a scratch one here
      std::vector<float> unused((size_t)cout * cin * conv3_taps(ndim), 0.f);
      cmseg::conv3_backward(x, w, dy, dx, unused.data(), n, cin, cout, s, ndim);
    }
    conv3_backward_filter_own(ctx, x, dy, dw, n, cin, cout, s);
    return;
  }
  cmseg::conv3_backward(x, w, dy, dx, dw, n, cin, cout, s, ndim);
}
void upconv2_forward_cudnn(Context&, const float* x, const float* w, float* y, int n, int cin, int cout, Spatial s,
                           int ndim, bool) {
  const std::vector<float> no_bias((size_t)cout, 0.f);  // cuDNN's part has none (upconv2.cu adds it)
  cmseg::upconv2_forward(x, w, no_bias.data(), y, n, cin, cout, s, ndim);
}
void upconv2_backward_cudnn(Context&, const float* x, const float* w, const float* dy, float* dx, float* dw, int n,
                            int cin, int cout, Spatial s, int ndim, bool) {
  std::vector<float> db_unused((size_t)cout, 0.f);  // upconv2.cu sums the bias gradient itself
  cmseg::upconv2_backward(x, w, dy, dx, dw, db_unused.data(), n, cin, cout, s, ndim);
}

// test_cuda's conv3 cases call these; they compare the reference with itself here.
namespace host {
void conv3_forward(Context& ctx, const float* x, const float* w, float* y, int n, int cin, int cout, Spatial s,
                   int ndim) {
  cuda::conv3_forward(ctx, x, w, y, n, cin, cout, s, ndim);
}
void conv3_backward(Context& ctx, const float* x, const float* w, const float* dy, float* dx, float* dw, int n,
                    int cin, int cout, Spatial s, int ndim) {
  cuda::conv3_backward(ctx, x, w, dy, dx, dw, n, cin, cout, s, ndim);
}
}  // namespace host

}  // namespace cuda
}  // namespace cmseg
