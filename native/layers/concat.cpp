// Channel concat of the decoder: cat([skip, up], channel) (SPEC section 2).
#include <cstring>

#include "cmseg/layers.hpp"
#include "cmseg/profile.hpp"
#include "cmseg/threads.hpp"

namespace cmseg {

void concat_forward(const float* a, int ca, const float* b, int cb, float* y, int n, int64_t V) {
  ProfileScope prof("concat_forward");
  parallel_for(n, [&](int64_t i, int) {
    float* yi = y + i * (ca + cb) * V;
    std::memcpy(yi, a + i * ca * V, sizeof(float) * ca * V);
    if (b) std::memcpy(yi + ca * V, b + i * cb * V, sizeof(float) * cb * V);  // null: in place already
  });
}

void concat_backward(const float* dy, float* da, int ca, float* db, int cb, int n, int64_t V) {
  ProfileScope prof("concat_backward");
  parallel_for(n, [&](int64_t i, int) {
    const float* dyi = dy + i * (ca + cb) * V;
    if (da) std::memcpy(da + i * ca * V, dyi, sizeof(float) * ca * V);
    if (db) std::memcpy(db + i * cb * V, dyi + ca * V, sizeof(float) * cb * V);
  });
}

}  // namespace cmseg
