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
      for (int yy = 0; yy < so.h; ++yy) {
        // The window's rows in tap order (a, b); each row holds taps e = 0, 1.
        const float* rows[4];
        for (int a = 0; a < kd; ++a)
          for (int b = 0; b < 2; ++b) rows[a * 2 + b] = xc + ((int64_t)(kd * z + a) * s.h + 2 * yy + b) * s.w;
        const int64_t o = ((int64_t)z * so.h + yy) * so.w;
        // Selects instead of branches, so the loop over xx vectorises. '>' keeps
        // the first maximum, like PyTorch; NaN never wins (inputs are checked).
        for (int xx = 0; xx < so.w; ++xx) {
          float best = rows[0][2 * xx];
          int bt = 0;
          for (int t = 1; t < 2 * kd * 2; ++t) {
            const float v = rows[t / 2][2 * xx + t % 2];
            bt = v > best ? t : bt;
            best = v > best ? v : best;
          }
          yc[o + xx] = best;
          ac[o + xx] = (uint8_t)bt;
        }
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
    const float* dyc = dy + c * Vo;
    const uint8_t* ac = arg + c * Vo;
    // Every input position belongs to exactly one window: write each once (the
    // winner gets dy, the rest 0), row by row, with no separate zero fill.
    for (int z = 0; z < so.d; ++z)
      for (int yy = 0; yy < so.h; ++yy) {
        const int64_t o = ((int64_t)z * so.h + yy) * so.w;
        for (int a = 0; a < kd; ++a)
          for (int b = 0; b < 2; ++b) {
            float* row = dxc + ((int64_t)(kd * z + a) * s.h + 2 * yy + b) * s.w;
            const int t0 = (a * 2 + b) * 2;
            for (int xx = 0; xx < so.w; ++xx) {
              const int t = ac[o + xx];
              const float g = dyc[o + xx];
              row[2 * xx] = t == t0 ? g : 0.f;
              row[2 * xx + 1] = t == t0 + 1 ? g : 0.f;
            }
          }
      }
  });
}

}  // namespace cmseg
