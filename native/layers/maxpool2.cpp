// Max-pool 2, stride 2 (SPEC section 2: between encoder levels). The winning
// tap of each window is kept so the backward pass routes dy without search.
#include "cmseg/layers.hpp"
#include "cmseg/profile.hpp"
#include "cmseg/threads.hpp"

#include <algorithm>

namespace cmseg {

void maxpool2_forward(const float* x, float* y, uint8_t* arg, int nc, Spatial s, int ndim) {
  ProfileScope prof("maxpool2_forward");
  const Spatial so = halve(s, ndim);
  const int kd = ndim == 3 ? 2 : 1;
  const int64_t V = s.size(), Vo = so.size();
  parallel_for(nc, [&](int64_t c, int) {
    const float* xc = x + c * V;
    float* yc = y + c * Vo;
    uint8_t* ac = arg + c * Vo;
    for (int z = 0; z < so.d; ++z)
      for (int yy = 0; yy < so.h; ++yy)
        for (int xx = 0; xx < so.w; ++xx) {
          float best = -__builtin_inff();
          int bt = 0;
          for (int a = 0; a < kd; ++a)
            for (int b = 0; b < 2; ++b)
              for (int e = 0; e < 2; ++e) {
                const float v = xc[((int64_t)(kd * z + a) * s.h + 2 * yy + b) * s.w + 2 * xx + e];
                // '>' keeps the first maximum, like PyTorch; NaN never wins (inputs are checked).
                if (v > best || (a == 0 && b == 0 && e == 0)) {
                  best = v;
                  bt = (a * 2 + b) * 2 + e;
                }
              }
          const int64_t o = ((int64_t)z * so.h + yy) * so.w + xx;
          yc[o] = best;
          ac[o] = (uint8_t)bt;
        }
  });
}

void maxpool2_backward(const float* dy, const uint8_t* arg, float* dx, int nc, Spatial s, int ndim) {
  ProfileScope prof("maxpool2_backward");
  const Spatial so = halve(s, ndim);
  const int kd = ndim == 3 ? 2 : 1;
  const int64_t V = s.size(), Vo = so.size();
  parallel_for(nc, [&](int64_t c, int) {
    float* dxc = dx + c * V;
    std::fill(dxc, dxc + V, 0.f);
    const float* dyc = dy + c * Vo;
    const uint8_t* ac = arg + c * Vo;
    for (int z = 0; z < so.d; ++z)
      for (int yy = 0; yy < so.h; ++yy)
        for (int xx = 0; xx < so.w; ++xx) {
          const int64_t o = ((int64_t)z * so.h + yy) * so.w + xx;
          const int t = ac[o], a = t / 4, b = (t / 2) % 2, e = t % 2;
          dxc[((int64_t)(kd * z + a) * s.h + 2 * yy + b) * s.w + 2 * xx + e] = dyc[o];
        }
  });
}

}  // namespace cmseg
