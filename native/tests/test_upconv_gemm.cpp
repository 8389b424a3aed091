// The GEMM plan of the device's transposed convolution (native/cuda/upconv2_gemm.hpp)
// run on the host with its reference GEMM, against upconv2 written out from its
// definition (every output voxel takes one tap of the input voxel under it). This
// checks the plan's index arithmetic, chunking and GEMM arguments on a machine
// without a GPU; test_cuda checks the device kernels that run the same plan.
#include <vector>

#include "../cuda/upconv2_gemm.hpp"
#include "check.hpp"
#include "cmseg/layers.hpp"

using namespace cmseg;
namespace cu = cmseg::cuda;

namespace {

struct Definition {
  int ndim, n, cin, cout, d, h, w, T;
  int64_t V, Vo;
  Definition(int nd, int n_, int ci, int co, int d_, int h_, int w_)
      : ndim(nd), n(n_), cin(ci), cout(co), d(d_), h(h_), w(w_), T(nd == 3 ? 8 : 4) {
    V = (int64_t)d * h * w;
    Vo = V * T;
  }
  // Output voxel index (within a channel) of input voxel (z, y, x) under tap t.
  int64_t out(int z, int y, int x, int t) const {
    const int a = ndim == 3 ? t / 4 : 0, b = (t / 2) % 2, c = t % 2;
    const int zo = ndim == 3 ? 2 * z + a : 0;
    return ((int64_t)zo * 2 * h + 2 * y + b) * (2 * w) + 2 * x + c;
  }
  template <class F>
  void each(F f) const {  // f(i, ci, co, t, input index, output index)
    for (int i = 0; i < n; ++i)
      for (int z = 0; z < d; ++z)
        for (int y = 0; y < h; ++y)
          for (int x = 0; x < w; ++x)
            for (int t = 0; t < T; ++t)
              for (int ci = 0; ci < cin; ++ci)
                for (int co = 0; co < cout; ++co)
                  f(i, ci, co, t, ((int64_t)i * cin + ci) * V + ((int64_t)z * h + y) * w + x,
                    ((int64_t)i * cout + co) * Vo + out(z, y, x, t));
  }
};

// split_min: the filter gradient's positions per batch (small here, so that the
// split into batches and its remainder run on these small images).
void plan_case(int ndim, int n, int cin, int cout, int d, int h, int w, size_t chunk_bytes, int want_chunks,
               int split_min = 8192) {
  const Definition D(ndim, n, cin, cout, d, h, w);
  cu::UpGemmGeom g = cu::up_gemm_geom(ndim, n, cin, cout, d, h, w, chunk_bytes);
  g.split_min = split_min;
  const cu::FilterSplit f = cu::up_backward_filter_split(g, 0, cu::up_chunk(g, 0));
  std::printf("  %dD n %d cin %d cout %d, %dx%dx%d, %d chunk(s) of %d unit(s), filter gradient in %d batch(es)%s\n",
              ndim, n, cin, cout, d, h, w, g.chunks, g.units_per_chunk, f.batches, f.has_rest ? " + rest" : "");
  CHECK(g.chunks == want_chunks);
  CHECK(g.Vo == D.Vo);
  const auto x = check::random_vector((size_t)n * cin * D.V, 1);
  const auto wt = check::random_vector((size_t)cin * cout * D.T, 2);
  const auto b = check::random_vector((size_t)cout, 3);
  const auto dy = check::random_vector((size_t)n * cout * D.Vo, 4);

  std::vector<float> y_def((size_t)n * cout * D.Vo, 0.f), dx_def(x.size(), 0.f), dw_def(wt.size(), 0.5f),
      db_def(b.size(), -0.25f);
  for (int i = 0; i < n; ++i)
    for (int co = 0; co < cout; ++co)
      for (int64_t v = 0; v < D.Vo; ++v) y_def[((int64_t)i * cout + co) * D.Vo + v] = b[co];
  D.each([&](int, int ci, int co, int t, int64_t xi, int64_t yi) {
    const int64_t wi = ((int64_t)ci * cout + co) * D.T + t;
    y_def[yi] += x[xi] * wt[wi];
    dx_def[xi] += wt[wi] * dy[yi];
    dw_def[wi] += x[xi] * dy[yi];
  });
  for (int i = 0; i < n; ++i)
    for (int co = 0; co < cout; ++co)
      for (int64_t v = 0; v < D.Vo; ++v) db_def[co] += dy[((int64_t)i * cout + co) * D.Vo + v];

  // NaN-filled outputs and scratch: whatever the plan leaves unwritten shows.
  const float nan = std::nanf("");
  std::vector<float> col((size_t)g.M * g.units_per_chunk * g.unit, nan);
  std::vector<float> partial((size_t)(cu::kFilterSplitMax + 1) * g.M * cin, nan);
  std::vector<float> y(y_def.size(), nan), dx(x.size(), nan), dw(wt.size(), 0.5f), db(b.size(), -0.25f);
  cu::up_gemm_forward_host(g, x.data(), wt.data(), b.data(), y.data(), col.data());
  std::fill(col.begin(), col.end(), nan);
  cu::up_gemm_backward_host(g, x.data(), wt.data(), dy.data(), dx.data(), dw.data(), db.data(), col.data(),
                            partial.data());
  auto compare = [](const char* what, const std::vector<float>& got, const std::vector<float>& want) {
    int bad = 0;
    for (size_t k = 0; k < got.size(); ++k)
      if (!check::close(got[k], want[k], 1e-5, 1e-5) && bad++ < 3)
        std::printf("  %s[%zu] = %.7g, definition %.7g\n", what, k, got[k], want[k]);
    CHECK(bad == 0);
  };
  compare("y", y, y_def);
  compare("dx", dx, dx_def);
  compare("dw", dw, dw_def);
  compare("db", db, db_def);

  // The same with no data gradient: dw and db still accumulate.
  std::vector<float> dw2(wt.size(), 0.5f), db2(b.size(), -0.25f);
  cu::up_gemm_backward_host(g, x.data(), wt.data(), dy.data(), nullptr, dw2.data(), db2.data(), col.data(),
                            partial.data());
  compare("dw (no dx)", dw2, dw_def);
  compare("db (no dx)", db2, db_def);

  // And the CPU reference layer agrees (the layer the GPU model is tested against).
  std::vector<float> y_ref(y.size());
  upconv2_forward(x.data(), wt.data(), b.data(), y_ref.data(), n, cin, cout, Spatial{d, h, w}, ndim);
  compare("y vs upconv2_forward", y, y_ref);
}

}  // namespace

TEST(upconv_gemm_plan_3d) {
  plan_case(3, 2, 3, 2, 4, 3, 5, size_t(1) << 30, 1);  // whole image in one chunk
  plan_case(3, 2, 3, 2, 4, 3, 5, 1, 4);                // one depth slice per chunk
  // Three slices per chunk: the last chunk has one.
  plan_case(3, 1, 5, 3, 7, 2, 3, (size_t)3 * 3 * 8 * 6 * sizeof(float), 3);
  plan_case(3, 2, 1, 1, 1, 1, 1, 1, 1);                // a single voxel
  plan_case(3, 2, 3, 2, 4, 3, 5, size_t(1) << 30, 1, 6);  // 60 positions: 10 batches of 6
  plan_case(3, 2, 3, 2, 4, 3, 5, size_t(1) << 30, 1, 7);  // 8 batches of 7 and a rest of 4
  plan_case(3, 1, 2, 2, 5, 4, 6, 1, 5, 5);                // 24 per chunk: 4 batches of 6
  plan_case(3, 1, 2, 2, 40, 4, 4, size_t(1) << 30, 1, 2); // 640: 32 batches (the most) of 20
}

TEST(upconv_gemm_plan_2d) {
  plan_case(2, 2, 4, 3, 1, 5, 7, size_t(1) << 30, 1);
  plan_case(2, 3, 2, 5, 1, 6, 4, 1, 6);                                  // one row per chunk
  plan_case(2, 1, 3, 2, 1, 5, 3, (size_t)2 * 2 * 4 * 3 * sizeof(float), 3);  // rows 2, 2, 1
  plan_case(2, 2, 4, 3, 1, 5, 7, size_t(1) << 30, 1, 4);  // 35 positions: 8 batches of 4 and a rest of 3
}

int main(int argc, char** argv) { return check::run_all(argc, argv); }
