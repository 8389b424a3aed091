// Every CPU reference layer: forward against a direct, independent loop
// implementation, and backward against central finite differences of the
// objective sum(y * r) for a fixed random r.
//
// Tolerances: float32 forward/backward, finite differences in float32 with
// step 1e-2 (the layers here are linear or smooth away from ReLU/max-pool kinks,
// and the inputs keep clear of them): |analytic - numeric| <= 1e-3 + 2e-2 * |numeric|.
#include <algorithm>
#include <numeric>

#include "check.hpp"
#include "cmseg/layers.hpp"
#include "cmseg/stitch.hpp"

#include <cmath>

using namespace cmseg;

namespace {

constexpr double kRtol = 2e-2, kAtol = 1e-3;

double dot(const std::vector<float>& a, const std::vector<float>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += (double)a[i] * b[i];
  return s;
}

// Central differences of objective() with respect to every element of x (or a
// strided subset for big tensors), compared with analytic.
void fd_check(const char* what, std::vector<float>& x, const std::vector<float>& analytic,
              const std::function<double()>& objective, float h = 1e-2f) {
  const size_t stride = std::max<size_t>(1, x.size() / 97);
  int bad = 0;
  for (size_t i = 0; i < x.size(); i += stride) {
    const float keep = x[i];
    x[i] = keep + h;
    const double up = objective();
    x[i] = keep - h;
    const double down = objective();
    x[i] = keep;
    const double num = (up - down) / (2.0 * h);
    if (!check::close(analytic[i], num, kRtol, kAtol)) {
      if (bad++ < 3) std::printf("  %s[%zu]: analytic %.6g, numeric %.6g\n", what, i, analytic[i], num);
    }
  }
  if (bad) ++check::failures();
}

// Direct 3x3(x3) convolution, pad 1.
std::vector<float> direct_conv3(const std::vector<float>& x, const std::vector<float>& w, int n, int cin, int cout,
                                Spatial s, int ndim) {
  const int kd = ndim == 3 ? 3 : 1, T = conv3_taps(ndim);
  std::vector<float> y((size_t)n * cout * s.size(), 0.f);
  for (int i = 0; i < n; ++i)
    for (int co = 0; co < cout; ++co)
      for (int z = 0; z < s.d; ++z)
        for (int yy = 0; yy < s.h; ++yy)
          for (int xx = 0; xx < s.w; ++xx) {
            double acc = 0;
            for (int ci = 0; ci < cin; ++ci)
              for (int a = 0; a < kd; ++a)
                for (int b = 0; b < 3; ++b)
                  for (int c = 0; c < 3; ++c) {
                    const int zz = z + (kd == 3 ? a - 1 : 0), y2 = yy + b - 1, x2 = xx + c - 1;
                    if (zz < 0 || zz >= s.d || y2 < 0 || y2 >= s.h || x2 < 0 || x2 >= s.w) continue;
                    acc += (double)w[((size_t)co * cin + ci) * T + (a * 3 + b) * 3 + c] *
                           x[(((size_t)i * cin + ci) * s.d + zz) * s.h * s.w + (size_t)y2 * s.w + x2];
                  }
            y[(((size_t)i * cout + co) * s.d + z) * s.h * s.w + (size_t)yy * s.w + xx] = (float)acc;
          }
  return y;
}

void conv3_case(int ndim, int n, int cin, int cout, Spatial s) {
  const int T = conv3_taps(ndim);
  auto x = check::random_vector((size_t)n * cin * s.size(), 11);
  auto w = check::random_vector((size_t)cout * cin * T, 12);
  auto r = check::random_vector((size_t)n * cout * s.size(), 13);
  std::vector<float> y(r.size());
  conv3_forward(x.data(), w.data(), y.data(), n, cin, cout, s, ndim);
  auto ref = direct_conv3(x, w, n, cin, cout, s, ndim);
  for (size_t i = 0; i < y.size(); ++i) CHECK_CLOSE(y[i], ref[i], 1e-5, 1e-5);
  std::vector<float> dx(x.size()), dw(w.size(), 0.f);
  conv3_backward(x.data(), w.data(), r.data(), dx.data(), dw.data(), n, cin, cout, s, ndim);
  auto obj = [&] {
    conv3_forward(x.data(), w.data(), y.data(), n, cin, cout, s, ndim);
    return dot(y, r);
  };
  fd_check("conv3 dx", x, dx, obj);
  fd_check("conv3 dw", w, dw, obj);
}

}  // namespace

TEST(conv3_2d_forward_and_gradients) { conv3_case(2, 2, 3, 5, {1, 6, 7}); }
TEST(conv3_3d_forward_and_gradients) { conv3_case(3, 2, 2, 3, {4, 5, 6}); }
TEST(conv3_wide_channels_tiles) { conv3_case(2, 1, 20, 7, {1, 16, 24}); }

TEST(upconv2_forward_and_gradients) {
  for (int ndim : {2, 3}) {
    const int n = 2, cin = 3, cout = 2, T = pool2_taps(ndim);
    const Spatial s = ndim == 3 ? Spatial{2, 3, 2} : Spatial{1, 3, 4};
    const Spatial so = twice(s, ndim);
    auto x = check::random_vector((size_t)n * cin * s.size(), 21);
    auto w = check::random_vector((size_t)cin * cout * T, 22);
    auto b = check::random_vector(cout, 23);
    auto r = check::random_vector((size_t)n * cout * so.size(), 24);
    std::vector<float> y(r.size());
    upconv2_forward(x.data(), w.data(), b.data(), y.data(), n, cin, cout, s, ndim);
    // Direct: y[2z+a, 2y+b, 2x+c] = bias + sum_ci x[z,y,x] * w[ci, co, a, b, c].
    const int kd = ndim == 3 ? 2 : 1;
    for (int i = 0; i < n; ++i)
      for (int co = 0; co < cout; ++co)
        for (int z = 0; z < so.d; ++z)
          for (int yy = 0; yy < so.h; ++yy)
            for (int xx = 0; xx < so.w; ++xx) {
              const int zi = z / kd, yi = yy / 2, xi = xx / 2, t = ((z % kd) * 2 + yy % 2) * 2 + xx % 2;
              double acc = b[co];
              for (int ci = 0; ci < cin; ++ci)
                acc += (double)x[(((size_t)i * cin + ci) * s.d + zi) * s.h * s.w + yi * s.w + xi] *
                       w[((size_t)ci * cout + co) * T + t];
              CHECK_CLOSE(y[(((size_t)i * cout + co) * so.d + z) * so.h * so.w + yy * so.w + xx], acc, 1e-5, 1e-5);
            }
    std::vector<float> dx(x.size()), dw(w.size(), 0.f), db(cout, 0.f);
    upconv2_backward(x.data(), w.data(), r.data(), dx.data(), dw.data(), db.data(), n, cin, cout, s, ndim);
    auto obj = [&] {
      upconv2_forward(x.data(), w.data(), b.data(), y.data(), n, cin, cout, s, ndim);
      return dot(y, r);
    };
    fd_check("upconv dx", x, dx, obj);
    fd_check("upconv dw", w, dw, obj);
    fd_check("upconv db", b, db, obj);
  }
}

TEST(maxpool2_hand_case_and_gradient) {
  // 2D, one channel 2x4: windows {1,5,2,0} -> 5 (tap 1), {3,-1,4,4} -> 4 (first max, tap 2).
  std::vector<float> x = {1, 5, 3, -1, 2, 0, 4, 4};
  std::vector<float> y(2);
  std::vector<uint8_t> arg(2);
  maxpool2_forward(x.data(), y.data(), arg.data(), 1, {1, 2, 4}, 2);
  CHECK(y[0] == 5 && y[1] == 4);
  std::vector<float> dy = {10, 20}, dx(8);
  maxpool2_backward(dy.data(), arg.data(), dx.data(), 1, {1, 2, 4}, 2);
  const std::vector<float> want = {0, 10, 0, 0, 0, 0, 20, 0};
  CHECK(dx == want);
  // 3D: distinct values, finite differences.
  const Spatial s{4, 2, 6};
  std::vector<float> x3(3 * s.size());
  std::iota(x3.begin(), x3.end(), 0.f);
  std::shuffle(x3.begin(), x3.end(), std::mt19937(5));
  const Spatial so = halve(s, 3);
  std::vector<float> y3(3 * so.size()), dx3(x3.size());
  std::vector<uint8_t> a3(y3.size());
  auto r = check::random_vector(y3.size(), 31);
  maxpool2_forward(x3.data(), y3.data(), a3.data(), 3, s, 3);
  // Each output is the largest of its 2x2x2 window, taken here directly.
  for (int c = 0; c < 3; ++c)
    for (int d = 0; d < so.d; ++d)
      for (int h = 0; h < so.h; ++h)
        for (int w = 0; w < so.w; ++w) {
          float m = -1e30f;
          for (int t = 0; t < 8; ++t)
            m = std::max(m, x3[(((size_t)c * s.d + 2 * d + t / 4) * s.h + 2 * h + t / 2 % 2) * s.w + 2 * w + t % 2]);
          CHECK(y3[(((size_t)c * so.d + d) * so.h + h) * so.w + w] == m);
        }
  maxpool2_backward(r.data(), a3.data(), dx3.data(), 3, s, 3);
  fd_check("maxpool dx", x3, dx3, [&] {
    maxpool2_forward(x3.data(), y3.data(), a3.data(), 3, s, 3);
    return dot(y3, r);
  }, 0.1f);
}

TEST(instance_norm_forward_stats_and_gradients) {
  for (bool relu : {false, true}) {
    const int n = 2, c = 3;
    const int64_t V = 40;
    auto x = check::random_vector((size_t)n * c * V, 41, -2.f, 3.f);
    auto g = check::random_vector(c, 42, 0.5f, 1.5f);
    auto b = check::random_vector(c, 43, -0.2f, 0.2f);
    auto r = check::random_vector(x.size(), 44);
    std::vector<float> y(x.size()), mean(n * c), rstd(n * c);
    instance_norm_forward(x.data(), g.data(), b.data(), y.data(), mean.data(), rstd.data(), n, c, V, relu);
    if (!relu) {
      // Each (n, c) slice of (y - beta) / gamma has mean 0 and biased variance var / (var + eps) ~ 1.
      for (int i = 0; i < n * c; ++i) {
        double m = 0, v = 0;
        for (int64_t k = 0; k < V; ++k) m += (y[i * V + k] - b[i % c]) / g[i % c];
        m /= V;
        for (int64_t k = 0; k < V; ++k) v += std::pow((y[i * V + k] - b[i % c]) / g[i % c] - m, 2);
        CHECK_CLOSE(m, 0.0, 0, 1e-5);
        CHECK_CLOSE(v / V, 1.0, 1e-4, 1e-4);
      }
    }
    std::vector<float> dx(x.size()), dg(c, 0.f), db(c, 0.f);
    instance_norm_backward(x.data(), y.data(), mean.data(), rstd.data(), g.data(), r.data(), dx.data(), dg.data(),
                           db.data(), n, c, V, relu);
    auto obj = [&] {
      instance_norm_forward(x.data(), g.data(), b.data(), y.data(), mean.data(), rstd.data(), n, c, V, relu);
      return dot(y, r);
    };
    fd_check("norm dx", x, dx, obj, 1e-3f);
    fd_check("norm dgamma", g, dg, obj, 1e-3f);
    fd_check("norm dbeta", b, db, obj, 1e-3f);
  }
}

TEST(instance_norm_long_rows_keep_float_accuracy) {
  // 3D-sized rows (several reduction blocks and a lane tail) with a mean far
  // from zero against the spread: mean and rstd against a double computation.
  const int n = 1, c = 2;
  const int64_t V = 70001;
  auto x = check::random_vector((size_t)n * c * V, 45, 99.f, 101.f);
  std::vector<float> g(c, 1.f), b(c, 0.f), y(x.size()), mean(c), rstd(c);
  instance_norm_forward(x.data(), g.data(), b.data(), y.data(), mean.data(), rstd.data(), n, c, V, false);
  for (int ch = 0; ch < c; ++ch) {
    double m = 0, v = 0;
    for (int64_t k = 0; k < V; ++k) m += x[ch * V + k];
    m /= V;
    for (int64_t k = 0; k < V; ++k) v += std::pow(x[ch * V + k] - m, 2);
    CHECK_CLOSE(mean[ch], m, 1e-6, 0);
    CHECK_CLOSE(rstd[ch], 1.0 / std::sqrt(v / V + kInstanceNormEps), 1e-4, 0);
  }
}

double max_rel_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double d = 0, m = 0;
  for (size_t i = 0; i < a.size(); ++i)
    d = std::max(d, (double)std::fabs(a[i] - b[i])), m = std::max(m, (double)std::fabs(b[i]));
  return m > 0 ? d / m : d;
}

// The blocked norm (the oneDNN trunk's layout) against the plain one: the same
// statistics and gradients, on rows long enough for several reduction blocks
// and parts, with a mean far from zero, with and without the fused ReLU.
TEST(instance_norm_blocked_matches_plain) {
  struct Case {
    int n, blocks;
    int64_t V;
  };
  // Long rows in several parts; and one item of exactly one reduction block's worth and
  // of a few positions (a 3D model's first and deepest levels).
  for (const Case shape : {Case{2, 2, 9001}, Case{1, 1, 4096}, Case{1, 4, 64}})
  for (int B : {8, 16})
    for (bool relu : {false, true}) {
      const int n = shape.n, c = shape.blocks * B;
      const int64_t V = shape.V;
      auto x = check::random_vector((size_t)n * c * V, 71 + B, -1.f, 3.f);
      for (size_t i = 0; i < x.size(); ++i) x[i] += (float)((i / V) % 5);  // per-channel offsets
      auto g = check::random_vector(c, 72, 0.5f, 1.5f), b = check::random_vector(c, 73, -0.2f, 0.2f);
      auto dy = check::random_vector(x.size(), 74);
      std::vector<float> y(x.size()), mean(n * c), rstd(n * c), dx(x.size()), dg(c, 0.5f), db(c, -0.5f);
      instance_norm_forward(x.data(), g.data(), b.data(), y.data(), mean.data(), rstd.data(), n, c, V, relu);
      instance_norm_backward(x.data(), y.data(), mean.data(), rstd.data(), g.data(), dy.data(), dx.data(), dg.data(),
                             db.data(), n, c, V, relu);
      const auto xb = check::block_channels(x, n, c, V, B), dyb = check::block_channels(dy, n, c, V, B);
      std::vector<float> yb(x.size()), meanb(n * c), rstdb(n * c), dxb(x.size()), dgb(c, 0.5f), dbb(c, -0.5f);
      instance_norm_forward_blocked(xb.data(), g.data(), b.data(), yb.data(), meanb.data(), rstdb.data(), n, c, V,
                                    relu, B);
      instance_norm_backward_blocked(xb.data(), yb.data(), meanb.data(), rstdb.data(), g.data(), dyb.data(),
                                     dxb.data(), dgb.data(), dbb.data(), n, c, V, relu, B);
      CHECK(max_rel_diff(check::unblock_channels(yb, n, c, V, B), y) < 1e-5);
      CHECK(max_rel_diff(meanb, mean) < 1e-6);
      CHECK(max_rel_diff(rstdb, rstd) < 1e-5);
      CHECK(max_rel_diff(check::unblock_channels(dxb, n, c, V, B), dx) < 1e-4);
      CHECK(max_rel_diff(dgb, dg) < 1e-4);
      CHECK(max_rel_diff(dbb, db) < 1e-4);
    }
  // A block that does not divide the channels is refused, not read past.
  std::vector<float> x(12 * 10), y(x.size()), m(12), r(12), g(12, 1.f), b(12, 0.f);
  CHECK_THROWS_WITH(instance_norm_forward_blocked(x.data(), g.data(), b.data(), y.data(), m.data(), r.data(), 1, 12,
                                                  10, true, 8),
                    "does not divide 12 channels");
}

// The blocked backward's parameter gradients are per-lane sums over a whole row (each
// lane is one channel). Runs of one value, as behind zero padding, make float rounding
// systematic, and halves of opposite sign cancel: against a double computation, summing
// 1024 positions in float before folding into doubles left 8.5e-6 of sum |dy| in dbeta
// (a 25% error of the sum itself), with or without FMA; 128 positions leave 9e-7.
TEST(instance_norm_blocked_sums_that_cancel) {
  for (int B : {8, 16}) {
    const int n = 1, c = B;
    const int64_t V = 32768;  // a 32^3 level
    auto x = check::random_vector((size_t)c * V, 81, -2.f, 2.f);
    std::vector<float> dy(x.size());
    for (int ch = 0; ch < c; ++ch)
      for (int64_t k = 0; k < V; ++k) dy[ch * V + k] = (k < V / 2 ? 0.3f : -0.3f) + 1e-5f * (float)(ch + 1);
    std::vector<float> g(c, 1.f), b(c, 0.f), y(x.size()), mean(c), rstd(c);
    instance_norm_forward(x.data(), g.data(), b.data(), y.data(), mean.data(), rstd.data(), n, c, V, false);
    const auto xb = check::block_channels(x, n, c, V, B), dyb = check::block_channels(dy, n, c, V, B);
    std::vector<float> yb(x.size()), meanb(c), rstdb(c), dxb(x.size()), dgb(c, 0.f), dbb(c, 0.f);
    instance_norm_forward_blocked(xb.data(), g.data(), b.data(), yb.data(), meanb.data(), rstdb.data(), n, c, V,
                                  false, B);
    instance_norm_backward_blocked(xb.data(), yb.data(), meanb.data(), rstdb.data(), g.data(), dyb.data(), dxb.data(),
                                   dgb.data(), dbb.data(), n, c, V, false, B);
    double worst_db = 0, worst_dg = 0;
    for (int ch = 0; ch < c; ++ch) {
      double sdy = 0, sdyx = 0, scale = 0;
      for (int64_t k = 0; k < V; ++k) {
        const double d = dy[ch * V + k];
        sdy += d, sdyx += d * ((x[ch * V + k] - (double)meanb[ch]) * rstdb[ch]), scale += std::fabs(d);
      }
      worst_db = std::max(worst_db, std::fabs(dbb[ch] - sdy) / scale);
      worst_dg = std::max(worst_dg, std::fabs(dgb[ch] - sdyx) / scale);
    }
    std::printf("  B %d: dbeta error %.2g, dgamma error %.2g of sum |dy|\n", B, worst_db, worst_dg);
    CHECK(worst_db < 2e-6);
    CHECK(worst_dg < 2e-6);
  }
}

TEST(conv1_heads_equal_one_call_per_head) {
  const int n = 2, cin = 5;
  const int64_t V = 3001;
  auto x = check::random_vector((size_t)n * cin * V, 61);
  const int couts[2] = {3, 7};
  std::vector<std::vector<float>> w, b, dy, y(2), dw(2), db(2), y1(2), dw1(2), db1(2);
  std::vector<Conv1Head> heads(2);
  for (int k = 0; k < 2; ++k) {
    w.push_back(check::random_vector((size_t)couts[k] * cin, 62 + k));
    b.push_back(check::random_vector(couts[k], 64 + k));
    dy.push_back(check::random_vector((size_t)n * couts[k] * V, 66 + k));
    y[k].assign((size_t)n * couts[k] * V, 0.f), y1[k] = y[k];
    dw[k].assign(w[k].size(), 0.5f), dw1[k] = dw[k];
    db[k].assign(couts[k], 0.25f), db1[k] = db[k];
    heads[k].cout = couts[k], heads[k].w = w[k].data(), heads[k].b = b[k].data(), heads[k].y = y[k].data();
    heads[k].dy = dy[k].data(), heads[k].dw = dw[k].data(), heads[k].db = db[k].data();
  }
  std::vector<float> dx(x.size(), 1.f), dx1(dx);
  conv1_forward_heads(x.data(), heads, n, cin, V);
  conv1_backward_heads(x.data(), heads, dx.data(), n, cin, V);
  for (int k = 0; k < 2; ++k) {
    conv1_forward(x.data(), w[k].data(), b[k].data(), y1[k].data(), n, cin, couts[k], V);
    conv1_backward(x.data(), w[k].data(), dy[k].data(), dx1.data(), dw1[k].data(), db1[k].data(), n, cin, couts[k], V);
    CHECK(y[k] == y1[k]);
    for (size_t e = 0; e < dw[k].size(); ++e) CHECK_CLOSE(dw[k][e], dw1[k][e], 1e-6, 1e-6);
    for (size_t e = 0; e < db[k].size(); ++e) CHECK_CLOSE(db[k][e], db1[k][e], 1e-6, 1e-6);
  }
  for (size_t e = 0; e < dx.size(); ++e) CHECK_CLOSE(dx[e], dx1[e], 1e-6, 1e-6);
}

TEST(relu_concat_conv1_softmax_gradients) {
  // ReLU
  auto x = check::random_vector(50, 51);
  auto r = check::random_vector(50, 52);
  std::vector<float> y(50), dx(50);
  relu_forward(x.data(), y.data(), 50);
  relu_backward(y.data(), r.data(), dx.data(), 50);
  for (int i = 0; i < 50; ++i) CHECK(dx[i] == (x[i] > 0 ? r[i] : 0.f) && y[i] == std::max(x[i], 0.f));
  // concat
  const int n = 2, ca = 2, cb = 3;
  const int64_t V = 5;
  auto a = check::random_vector(n * ca * V, 53), b = check::random_vector(n * cb * V, 54);
  std::vector<float> cat(n * (ca + cb) * V);
  concat_forward(a.data(), ca, b.data(), cb, cat.data(), n, V);
  CHECK(cat[(ca + cb) * V + 1] == a[ca * V + 1]);
  CHECK(cat[(ca + cb) * V + ca * V + 2] == b[cb * V + 2]);
  std::vector<float> da(a.size()), dbb(b.size());
  concat_backward(cat.data(), da.data(), ca, dbb.data(), cb, n, V);
  CHECK(da == a && dbb == b);
  // conv1 (dx accumulates onto what is there)
  const int cin = 4, cout = 3;
  auto xi = check::random_vector(n * cin * V, 55), w = check::random_vector(cout * cin, 56),
       bias = check::random_vector(cout, 57), rr = check::random_vector(n * cout * V, 58);
  std::vector<float> yo(rr.size()), dxi(xi.size(), 1.f), dw(w.size(), 0.f), dbias(cout, 0.f);
  conv1_forward(xi.data(), w.data(), bias.data(), yo.data(), n, cin, cout, V);
  for (int co = 0; co < cout; ++co) {
    double acc = bias[co];
    for (int ci = 0; ci < cin; ++ci) acc += (double)w[co * cin + ci] * xi[(cin + ci) * V + 3];
    CHECK_CLOSE(yo[(cout + co) * V + 3], acc, 1e-5, 1e-6);
  }
  conv1_backward(xi.data(), w.data(), rr.data(), dxi.data(), dw.data(), dbias.data(), n, cin, cout, V);
  for (auto& v : dxi) v -= 1.f;
  auto obj = [&] {
    conv1_forward(xi.data(), w.data(), bias.data(), yo.data(), n, cin, cout, V);
    return dot(yo, rr);
  };
  fd_check("conv1 dx", xi, dxi, obj);
  fd_check("conv1 dw", w, dw, obj);
  fd_check("conv1 db", bias, dbias, obj);
  // softmax
  const int L = 4;
  auto z = check::random_vector(n * L * V, 59, -3.f, 3.f), rs = check::random_vector(n * L * V, 60);
  std::vector<float> p(z.size()), dp(rs), dz(z.size());
  softmax_forward(z.data(), p.data(), n, L, V);
  // exp(z_k) / sum_j exp(z_j), in double, for every pixel of every image.
  for (int i = 0; i < n; ++i)
    for (int v = 0; v < V; ++v) {
      double s = 0;
      for (int k = 0; k < L; ++k) s += std::exp((double)z[((size_t)i * L + k) * V + v]);
      for (int k = 0; k < L; ++k) {
        const size_t e = ((size_t)i * L + k) * V + v;
        CHECK_CLOSE(p[e], std::exp((double)z[e]) / s, 1e-6, 1e-7);
      }
    }
  softmax_backward(p.data(), dp.data(), dz.data(), n, L, V);
  fd_check("softmax dz", z, dz, [&] {
    softmax_forward(z.data(), p.data(), n, L, V);
    return dot(p, rs);
  }, 1e-3f);
}

TEST_MAIN()

// Sliding-window stitching (cmseg/stitch.hpp): the sums of an independent loop that rounds
// as JavaScript does (product, then sum, in double; then the sum's type), bit for bit, for
// a window clipped at the volume's low corner and one at its far edge; nothing else written.
TEST(stitch_window_matches_a_direct_loop) {
  const int64_t volume[3] = {5, 7, 9}, patch[3] = {4, 6, 5};
  const int64_t V = 5 * 7 * 9, Pv = 4 * 6 * 5, channels = 3;
  const std::vector<float> values = check::random_vector(channels * Pv, 11);
  std::vector<double> weights(Pv);
  for (int64_t i = 0; i < Pv; i++) weights[i] = 1e-3 + std::fabs(std::sin(0.37 * i));
  const WindowPlacement placements[2] = {{{1, 0, 2}, {4, 6, 5}, {-1, 1, -2}}, {{0, 0, 0}, {4, 6, 5}, {1, 1, 4}}};
  for (const WindowPlacement& at : placements) {
    const std::vector<float> start = check::random_vector(channels * V, 12);
    std::vector<float> got = start, want32 = start;
    std::vector<double> got64(start.begin(), start.end()), want64 = got64;
    for (int64_t k = 0; k < channels; k++)
      for (int64_t z = at.from[0]; z < at.to[0]; z++)
        for (int64_t y = at.from[1]; y < at.to[1]; y++)
          for (int64_t x = at.from[2]; x < at.to[2]; x++) {
            const int64_t dst = k * V + ((at.origin[0] + z) * 7 + at.origin[1] + y) * 9 + at.origin[2] + x;
            const int64_t src = (z * 6 + y) * 5 + x;
            volatile double product = weights[src] * (double)values[k * Pv + src];  // rounded before the sum
            want32[dst] = (float)((double)want32[dst] + product);
            want64[dst] = want64[dst] + product;
          }
    stitch_window(got.data(), volume, values.data(), weights.data(), patch, channels, at);
    stitch_window(got64.data(), volume, values.data(), weights.data(), patch, channels, at);
    CHECK(got == want32);
    CHECK(got64 == want64);
    CHECK(got != start);
  }
}

// The weighted means (cmseg/stitch.hpp): each sum divided by its voxel's weight in double and
// rounded once to float, bit for bit a direct loop's, in place for a float sum, over more than
// one chunk of voxels (65536) and a short last one.
TEST(divide_by_weights_matches_a_direct_loop) {
  const int64_t V = 65536 + 4321, channels = 3;
  const std::vector<float> sum32 = check::random_vector(channels * V, 21);
  std::vector<double> sum64(channels * V), weights(V);
  for (int64_t i = 0; i < channels * V; i++) sum64[i] = (double)sum32[i] * (1.0 + 1e-9 * (double)i);
  for (int64_t v = 0; v < V; v++) weights[v] = 1e-3 + std::fabs(std::sin(0.11 * v)) * 7.0;
  std::vector<float> want32(channels * V), want64(channels * V);
  for (int64_t k = 0; k < channels; k++)
    for (int64_t v = 0; v < V; v++) {
      want32[k * V + v] = (float)((double)sum32[k * V + v] / weights[v]);
      want64[k * V + v] = (float)(sum64[k * V + v] / weights[v]);
    }
  std::vector<float> in_place = sum32, from64(channels * V, -1.f);
  divide_by_weights(in_place.data(), weights.data(), channels, V, in_place.data());
  divide_by_weights(sum64.data(), weights.data(), channels, V, from64.data());
  CHECK(in_place == want32);
  CHECK(from64 == want64);
  CHECK(in_place != sum32);
}
