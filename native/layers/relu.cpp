// ReLU. The U-Net blocks use the fused instance-norm + ReLU; this standalone
// layer serves the CM-head blocks' tests and custom graphs.
#include "cmseg/layers.hpp"
#include "cmseg/threads.hpp"

namespace cmseg {

void relu_forward(const float* x, float* y, int64_t count) {
  parallel_range(count, [&](int64_t b, int64_t e, int) {
    for (int64_t i = b; i < e; ++i) y[i] = x[i] > 0.f ? x[i] : 0.f;
  });
}

void relu_backward(const float* y, const float* dy, float* dx, int64_t count) {
  parallel_range(count, [&](int64_t b, int64_t e, int) {
    for (int64_t i = b; i < e; ++i) dx[i] = y[i] > 0.f ? dy[i] : 0.f;
  });
}

}  // namespace cmseg
