// The CUDA backend (native/cuda/) against the CPU reference (native/layers,
// native/loss, native/model/adam.cpp), kernel by kernel, as llm.c's dev/cuda does.
// Without a device (or in a build without CUDA) it prints "SKIP: ..." and passes.
//
// Tolerances, as relative L2 error ||gpu - cpu|| / ||cpu|| over a whole tensor:
//   exact (0)   max-pool values, winning taps and routed gradients (no arithmetic);
//   1e-5        instance norm, the fused CM loss (full, lowrank) and Adam: the same
//               float expressions, different summation order and exp/log ulps;
//   1e-4        global-CM gradients (a sum over every pixel, in another order) and
//               convolutions with FMA math (cuDNN's algorithms sum 27 * cin terms in
//               their own order, Winograd/FFT included);
//   1e-2        convolutions with TF32 tensor cores (10-bit mantissa products).
// Losses and per-annotator terms: relative 1e-5 (absolute 1e-7 for zeros).
// After the checks it times the memory-bound kernels on a brats3d-gpu-sized tensor
// and prints achieved GB/s (bytes each kernel must move / time), and the conv's TFLOP/s.
#include <algorithm>
#include <cstdlib>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <optional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "check.hpp"
#include "cmseg/cuda.hpp"
#include "cmseg/error.hpp"
#include "cmseg/layers.hpp"
#include "cmseg/loss.hpp"
#include "cmseg/model.hpp"
#if CMSEG_HAVE_CUDA
#include "../cuda/shape_cache.hpp"  // the context's per-shape caches (host-only header)
#endif

using namespace cmseg;
namespace cu = cmseg::cuda;

namespace {

cu::Context& ctx() {
  static cu::Context c;
  return c;
}

// Records a failure with the achieved error when it exceeds the tolerance.
void expect_close(const char* what, const std::vector<float>& gpu, const std::vector<float>& cpu, double tol) {
  CHECK(gpu.size() == cpu.size());
  const double e = check::rel_l2(gpu.data(), cpu.data(), std::min(gpu.size(), cpu.size()));
  const bool ok = e <= tol && std::isfinite(e);
  std::printf("  %-44s rel L2 %.2e (tol %.0e)%s\n", what, e, tol, ok ? "" : "  <-- FAIL");
  if (!ok) ++check::failures();
}

std::vector<float> rnd(size_t n, uint32_t seed, float lo = -1.f, float hi = 1.f) {
  return check::random_vector(n, seed, lo, hi);
}

// Fast fill for the large timing buffers (content does not matter, only finiteness).
std::vector<float> fast_fill(size_t n, uint32_t seed, float scale = 1.f) {
  std::vector<float> v(n);
  uint32_t s = seed * 2654435761u + 1;
  for (auto& x : v) {
    s ^= s << 13, s ^= s >> 17, s ^= s << 5;
    x = scale * ((float)(s >> 8) * (1.f / 8388608.f) - 1.f);
  }
  return v;
}

// ---- convolutions -----------------------------------------------------------------

// bf16: the operands are bf16 values already, so the CPU reference sees what the
// device's copies hold and the difference is the rounding of the results to bf16
// (2^-9 relative) and the summation order.
void conv3_case(int ndim, int n, int cin, int cout, Spatial s, bool tf32, bool bf16 = false) {
  const double tol = bf16 ? 5e-3 : tf32 ? 1e-2 : 1e-4;
  ctx().set_tf32(tf32);
  const size_t V = (size_t)s.size(), T = conv3_taps(ndim);
  auto x = rnd(n * cin * V, 1), w = rnd(cout * cin * T, 2, -0.3f, 0.3f), dy = rnd(n * cout * V, 3);
  if (bf16)
    for (auto* v : {&x, &w, &dy})
      for (float& e : *v) e = cu::round_to_bf16(e);
  auto dw0 = rnd(cout * cin * T, 4);  // dw accumulates onto what is there
  std::vector<float> y_cpu(n * cout * V), y_gpu(y_cpu.size());
  conv3_forward(x.data(), w.data(), y_cpu.data(), n, cin, cout, s, ndim);
  cu::host::conv3_forward(ctx(), x.data(), w.data(), y_gpu.data(), n, cin, cout, s, ndim);
  std::vector<float> dx_cpu(x.size()), dx_gpu(x.size()), dw_cpu = dw0, dw_gpu = dw0;
  conv3_backward(x.data(), w.data(), dy.data(), dx_cpu.data(), dw_cpu.data(), n, cin, cout, s, ndim);
  cu::host::conv3_backward(ctx(), x.data(), w.data(), dy.data(), dx_gpu.data(), dw_gpu.data(), n, cin, cout, s, ndim);
  char what[96];
  std::snprintf(what, sizeof what, "conv3 %dD %s y", ndim, tf32 ? "tf32" : "fp32");
  expect_close(what, y_gpu, y_cpu, tol);
  std::snprintf(what, sizeof what, "conv3 %dD %s dx", ndim, tf32 ? "tf32" : "fp32");
  expect_close(what, dx_gpu, dx_cpu, tol);
  if (bf16) {
    // Through bf16 buffers rather than an fp32 fallback: every output is a bf16
    // value; dw too, accumulated onto zeros. Required where cuDNN's bf16 kernels
    // take the channel counts (multiples of 8); said for the others.
    std::vector<float> dw_zero(dw0.size(), 0.f);
    cu::host::conv3_backward(ctx(), x.data(), w.data(), dy.data(), nullptr, dw_zero.data(), n, cin, cout, s, ndim);
    size_t off = 0;
    for (const auto* v : {&y_gpu, &dx_gpu, &dw_zero})
      for (float e : *v) off += e != cu::round_to_bf16(e);
    const bool aligned = cin % 8 == 0 && cout % 8 == 0;
    std::printf("  conv3 %dD %d->%d bf16: y, dx and dw hold bf16 values (%zu are not)%s\n", ndim, cin, cout, off,
                aligned ? "" : "; channel counts not multiples of 8: not required");
    if (aligned) CHECK(off == 0);
  }
  // Compare the accumulated part only, so the initial dw does not hide an error.
  for (size_t i = 0; i < dw0.size(); ++i) dw_cpu[i] -= dw0[i], dw_gpu[i] -= dw0[i];
  std::snprintf(what, sizeof what, "conv3 %dD %s dw (accumulated)", ndim, tf32 ? "tf32" : "fp32");
  expect_close(what, dw_gpu, dw_cpu, tol);
  // dx == null skips the data gradient and still accumulates dw.
  std::vector<float> dw_only = dw0;
  cu::host::conv3_backward(ctx(), x.data(), w.data(), dy.data(), nullptr, dw_only.data(), n, cin, cout, s, ndim);
  for (size_t i = 0; i < dw0.size(); ++i) dw_only[i] -= dw0[i];
  std::snprintf(what, sizeof what, "conv3 %dD %s dw (dx = null)", ndim, tf32 ? "tf32" : "fp32");
  expect_close(what, dw_only, dw_cpu, tol);
  ctx().set_tf32(true);
}

void upconv2_case(int ndim, int n, int cin, int cout, Spatial s, bool tf32) {
  const double tol = tf32 ? 1e-2 : 1e-4;
  ctx().set_tf32(tf32);
  const size_t V = (size_t)s.size(), Vo = V * (ndim == 3 ? 8 : 4), T = pool2_taps(ndim);
  auto x = rnd(n * cin * V, 11), w = rnd(cin * cout * T, 12, -0.5f, 0.5f), b = rnd(cout, 13),
       dy = rnd(n * cout * Vo, 14);
  auto dw0 = rnd(cin * cout * T, 15), db0 = rnd(cout, 16);
  std::vector<float> y_cpu(n * cout * Vo), y_gpu(y_cpu.size());
  upconv2_forward(x.data(), w.data(), b.data(), y_cpu.data(), n, cin, cout, s, ndim);
  cu::host::upconv2_forward(ctx(), x.data(), w.data(), b.data(), y_gpu.data(), n, cin, cout, s, ndim);
  std::vector<float> dx_cpu(x.size()), dx_gpu(x.size()), dw_cpu = dw0, dw_gpu = dw0, db_cpu = db0, db_gpu = db0;
  upconv2_backward(x.data(), w.data(), dy.data(), dx_cpu.data(), dw_cpu.data(), db_cpu.data(), n, cin, cout, s, ndim);
  cu::host::upconv2_backward(ctx(), x.data(), w.data(), dy.data(), dx_gpu.data(), dw_gpu.data(), db_gpu.data(), n, cin,
                             cout, s, ndim);
  for (size_t i = 0; i < dw0.size(); ++i) dw_cpu[i] -= dw0[i], dw_gpu[i] -= dw0[i];
  for (size_t i = 0; i < db0.size(); ++i) db_cpu[i] -= db0[i], db_gpu[i] -= db0[i];
  const char* m = tf32 ? "tf32" : "fp32";
  char what[96];
  std::snprintf(what, sizeof what, "upconv2 %dD %s y", ndim, m);
  expect_close(what, y_gpu, y_cpu, tol);
  std::snprintf(what, sizeof what, "upconv2 %dD %s dx", ndim, m);
  expect_close(what, dx_gpu, dx_cpu, tol);
  std::snprintf(what, sizeof what, "upconv2 %dD %s dw (accumulated)", ndim, m);
  expect_close(what, dw_gpu, dw_cpu, tol);
  std::snprintf(what, sizeof what, "upconv2 %dD %s db (accumulated)", ndim, m);
  expect_close(what, db_gpu, db_cpu, 1e-5);

  // The same with y and dy as the second half of each image of a concat buffer (images
  // 2 * cout * Vo apart; ContextOptions::concat_in_place): the first halves untouched.
  const int64_t run = (int64_t)cout * Vo, stride = 2 * run;
  cu::Buffer<float> X(ctx(), x.size()), Wt(ctx(), w.size()), B(ctx(), b.size()), CAT(ctx(), (size_t)n * stride),
      DXs(ctx(), x.size()), DWs(ctx(), dw0.size()), DBs(ctx(), db0.size());
  X.upload(x.data()), Wt.upload(w.data()), B.upload(b.data()), DWs.upload(dw0.data()), DBs.upload(db0.data());
  std::vector<float> cat0 = rnd((size_t)n * stride, 17);
  CAT.upload(cat0.data());
  cu::upconv2_forward(ctx(), X.data(), Wt.data(), B.data(), CAT.data() + run, n, cin, cout, s, ndim, stride);
  std::vector<float> cat = CAT.to_host(), y_strided(y_cpu.size()), first_halves, first_halves0;
  for (int i = 0; i < n; ++i) {
    std::copy(cat.begin() + i * stride + run, cat.begin() + (i + 1) * stride, y_strided.begin() + i * run);
    first_halves.insert(first_halves.end(), cat.begin() + i * stride, cat.begin() + i * stride + run);
    first_halves0.insert(first_halves0.end(), cat0.begin() + i * stride, cat0.begin() + i * stride + run);
  }
  std::snprintf(what, sizeof what, "upconv2 %dD %s y into a concat buffer", ndim, m);
  expect_close(what, y_strided, y_cpu, tol);
  CHECK(first_halves == first_halves0);
  for (int i = 0; i < n; ++i) std::copy(dy.begin() + i * run, dy.begin() + (i + 1) * run, cat0.begin() + i * stride + run);
  CAT.upload(cat0.data());
  cu::upconv2_backward(ctx(), X.data(), Wt.data(), CAT.data() + run, DXs.data(), DWs.data(), DBs.data(), n, cin, cout, s,
                       ndim, stride);
  auto dws = DWs.to_host(), dbs = DBs.to_host();
  for (size_t i = 0; i < dw0.size(); ++i) dws[i] -= dw0[i];
  for (size_t i = 0; i < db0.size(); ++i) dbs[i] -= db0[i];
  std::snprintf(what, sizeof what, "upconv2 %dD %s dx from a concat buffer", ndim, m);
  expect_close(what, DXs.to_host(), dx_cpu, tol);
  std::snprintf(what, sizeof what, "upconv2 %dD %s dw from a concat buffer", ndim, m);
  expect_close(what, dws, dw_cpu, tol);
  std::snprintf(what, sizeof what, "upconv2 %dD %s db from a concat buffer", ndim, m);
  expect_close(what, dbs, db_cpu, 1e-5);
  ctx().set_tf32(true);
}

// ---- instance norm ------------------------------------------------------------------

void instance_norm_case(int n, int c, int64_t V, bool relu, float offset) {
  // `offset` shifts the input far from zero to exercise the variance's precision.
  auto x = rnd((size_t)n * c * V, 21, offset - 2.f, offset + 2.f);
  auto gamma = rnd(c, 22, 0.5f, 1.5f), beta = rnd(c, 23), dy = rnd((size_t)n * c * V, 24);
  auto dg0 = rnd(c, 25), db0 = rnd(c, 26);
  const size_t count = x.size(), planes = (size_t)n * c;
  std::vector<float> y_cpu(count), y_gpu(count), m_cpu(planes), m_gpu(planes), r_cpu(planes), r_gpu(planes);
  instance_norm_forward(x.data(), gamma.data(), beta.data(), y_cpu.data(), m_cpu.data(), r_cpu.data(), n, c, V, relu);
  cu::host::instance_norm_forward(ctx(), x.data(), gamma.data(), beta.data(), y_gpu.data(), m_gpu.data(),
                                  r_gpu.data(), n, c, V, relu);
  // Both backwards from the device's forward: the device recomputes the ReLU's mask
  // from x and the statistics, which must give y_gpu > 0 exactly (a mask that
  // differs in one element moves dx by far more than the tolerance). With the CPU's
  // forward instead, an element whose pre-activation rounds to opposite signs on the
  // two sides would do the same, by chance.
  std::vector<float> dx_cpu(count), dx_gpu(count), dg_cpu = dg0, dg_gpu = dg0, db_cpu = db0, db_gpu = db0;
  instance_norm_backward(x.data(), y_gpu.data(), m_gpu.data(), r_gpu.data(), gamma.data(), dy.data(), dx_cpu.data(),
                         dg_cpu.data(), db_cpu.data(), n, c, V, relu);
  cu::host::instance_norm_backward(ctx(), x.data(), m_gpu.data(), r_gpu.data(), gamma.data(), beta.data(), dy.data(),
                                   dx_gpu.data(), dg_gpu.data(), db_gpu.data(), n, c, V, relu);
  {
    // The forward's output recomputed from its statistics: bit for bit (the model's
    // backward relies on it for each block's first activation).
    cu::Buffer<float> X(ctx(), x), M(ctx(), m_gpu), Rs(ctx(), r_gpu), G(ctx(), gamma), Bt(ctx(), beta);
    cu::Buffer<float> Y(ctx(), count);
    cu::instance_norm_apply(ctx(), X.data(), M.data(), Rs.data(), G.data(), Bt.data(), Y.data(), n, c, V, relu);
    const std::vector<float> again = Y.to_host();
    const bool same = again.size() == y_gpu.size() && std::memcmp(again.data(), y_gpu.data(), again.size() * 4) == 0;
    CHECK(same);
    std::printf("  instance_norm%s V=%lld apply from the statistics: %s\n", relu ? "+relu" : "", (long long)V,
                same ? "identical to the forward" : "DIFFERENT from the forward");
    // The backward in place (dx over dy, as the model runs it): the same dx.
    cu::Buffer<float> DY(ctx(), dy), DG(ctx(), dg0), DB(ctx(), db0);
    cu::instance_norm_backward(ctx(), X.data(), M.data(), Rs.data(), G.data(), Bt.data(), DY.data(), DY.data(),
                               DG.data(), DB.data(), n, c, V, relu);
    const bool in_place = DY.to_host() == dx_gpu;
    CHECK(in_place);
    std::printf("  instance_norm%s V=%lld backward in place: %s\n", relu ? "+relu" : "", (long long)V,
                in_place ? "identical" : "DIFFERENT");
  }
  char what[96];
  const char* tag = relu ? "+relu" : "";
  std::snprintf(what, sizeof what, "instance_norm%s V=%lld y", tag, (long long)V);
  expect_close(what, y_gpu, y_cpu, 1e-5);
  std::snprintf(what, sizeof what, "instance_norm%s V=%lld mean", tag, (long long)V);
  expect_close(what, m_gpu, m_cpu, 1e-5);
  std::snprintf(what, sizeof what, "instance_norm%s V=%lld rstd", tag, (long long)V);
  expect_close(what, r_gpu, r_cpu, 1e-5);
  std::snprintf(what, sizeof what, "instance_norm%s V=%lld dx", tag, (long long)V);
  expect_close(what, dx_gpu, dx_cpu, 1e-5);
  std::snprintf(what, sizeof what, "instance_norm%s V=%lld dgamma, dbeta", tag, (long long)V);
  std::vector<float> both_gpu = dg_gpu, both_cpu = dg_cpu;
  both_gpu.insert(both_gpu.end(), db_gpu.begin(), db_gpu.end());
  both_cpu.insert(both_cpu.end(), db_cpu.begin(), db_cpu.end());
  expect_close(what, both_gpu, both_cpu, 1e-5);
}

// ---- max-pool -------------------------------------------------------------------------

void maxpool_case(int ndim, int nc, Spatial s) {
  const size_t V = (size_t)s.size(), Vo = V / (ndim == 3 ? 8 : 4);
  auto x = rnd(nc * V, 31);
  for (size_t i = 0; i < x.size(); i += 7) x[i] = 0.25f;  // ties: the first maximum must win
  std::vector<float> y_cpu(nc * Vo), y_gpu(nc * Vo), dx_cpu(nc * V), dx_gpu(nc * V);
  std::vector<uint8_t> a_cpu(nc * Vo), a_gpu(nc * Vo);
  maxpool2_forward(x.data(), y_cpu.data(), a_cpu.data(), nc, s, ndim);
  cu::host::maxpool2_forward(ctx(), x.data(), y_gpu.data(), a_gpu.data(), nc, s, ndim);
  auto dy = rnd(nc * Vo, 32);
  maxpool2_backward(dy.data(), a_cpu.data(), dx_cpu.data(), nc, s, ndim);
  cu::host::maxpool2_backward(ctx(), dy.data(), a_cpu.data(), dx_gpu.data(), nc, s, ndim);
  const bool same = y_gpu == y_cpu && a_gpu == a_cpu && dx_gpu == dx_cpu;
  std::printf("  maxpool2 %dD %dx%dx%d: %s\n", ndim, s.d, s.h, s.w, same ? "identical" : "DIFFERENT  <-- FAIL");
  CHECK(same);
}

// ---- fused CM loss ---------------------------------------------------------------------

struct LossCase {
  int n, L, R, rank;
  int64_t V;
  CmMode mode;
  float lambda;
  std::vector<float> logits;
  std::vector<std::vector<float>> raw;
  std::vector<std::vector<uint8_t>> labels;
  std::vector<uint8_t> present;

  CmLossInput input() const {
    CmLossInput in;
    in.n = n, in.L = L, in.R = R, in.V = V, in.mode = mode, in.rank = rank, in.trace_weight = lambda;
    in.seg_logits = logits.data();
    for (int r = 0; r < R; ++r) in.cm_raw.push_back(raw[r].data()), in.labels.push_back(labels[r].data());
    in.present = present.empty() ? nullptr : present.data();
    return in;
  }
};

// Random logits and heads; ~20% unlabelled (255) pixels; annotator 0 absent from
// image 1; the last annotator (when R >= 3) labels nothing in the whole batch.
// raw_lo, raw_hi: the range of the raw CM channels.
LossCase make_loss_case(CmMode mode, int n, int L, int R, int64_t V, int rank, float lambda, uint32_t seed,
                        float raw_lo = -3.f, float raw_hi = 3.f) {
  LossCase c{n, L, R, rank, V, mode, lambda, {}, {}, {}, {}};
  c.logits = rnd((size_t)n * L * V, seed, -3.f, 3.f);
  const size_t K = mode == CmMode::Global ? (size_t)L * L : (size_t)cm_head_channels(mode, L, rank);
  for (int r = 0; r < R; ++r) {
    c.raw.push_back(rnd(mode == CmMode::Global ? K : (size_t)n * K * V, seed + 10 + r, raw_lo, raw_hi));
    std::mt19937 g(seed + 20 + r);
    std::vector<uint8_t> lab((size_t)n * V);
    for (auto& x : lab) x = g() % 5 == 0 ? kUnlabelled : (uint8_t)(g() % L);
    if (R >= 3 && r == R - 1) std::fill(lab.begin(), lab.end(), kUnlabelled);
    c.labels.push_back(lab);
  }
  c.present.assign((size_t)n * R, 1);
  if (n > 1) c.present[1 * R + 0] = 0;
  return c;
}

void cm_loss_case(CmMode mode, int L, int rank, float lambda, int R = 3, int64_t V = 37 * 41, float raw_lo = -3.f,
                  float raw_hi = 3.f) {
  if (raw_lo != -3.f || raw_hi != 3.f)
    std::printf("  -- raw CM channels in [%g, %g]\n", (double)raw_lo, (double)raw_hi);
  LossCase c = make_loss_case(mode, 3, L, R, V, rank, lambda, 100 + L + 7 * (int)mode + 3 * R, raw_lo, raw_hi);
  const CmLossInput in = c.input();
  auto run = [&](bool gpu, std::vector<float>& dz, std::vector<std::vector<float>>& draw, CmLossOutput& out) {
    dz.assign(c.logits.size(), -9.f);
    draw.clear();
    for (int r = 0; r < c.R; ++r) draw.emplace_back(c.raw[r].size(), -9.f);  // every entry must be written
    out.d_seg_logits = dz.data();
    out.d_cm_raw.clear();
    for (auto& d : draw) out.d_cm_raw.push_back(d.data());
    if (gpu)
      cu::host::cm_loss(ctx(), in, out);
    else
      cm_loss(in, out);
  };
  std::vector<float> dz_cpu, dz_gpu;
  std::vector<std::vector<float>> draw_cpu, draw_gpu;
  CmLossOutput cpu, gpu;
  run(false, dz_cpu, draw_cpu, cpu);
  run(true, dz_gpu, draw_gpu, gpu);
  std::printf("  cm_loss %s L=%d%s lambda=%g: loss cpu %.9f gpu %.9f\n", cm_mode_name(mode), L,
              mode == CmMode::LowRank ? (" rank=" + std::to_string(rank)).c_str() : "", lambda, cpu.loss, gpu.loss);
  CHECK_CLOSE(gpu.loss, cpu.loss, 1e-5, 1e-7);
  CHECK(gpu.ce.size() == (size_t)c.R && gpu.trace.size() == (size_t)c.R);
  for (int r = 0; r < c.R && r < (int)gpu.ce.size(); ++r) {
    CHECK_CLOSE(gpu.ce[r], cpu.ce[r], 1e-5, 1e-7);
    CHECK_CLOSE(gpu.trace[r], cpu.trace[r], 1e-5, 1e-7);
  }
  // The annotator with no labelled pixel (make_loss_case: R >= 3) contributes to neither term.
  if (c.R >= 3) CHECK(gpu.ce[c.R - 1] == 0.0 && gpu.trace[c.R - 1] == 0.0);
  char what[96];
  std::snprintf(what, sizeof what, "cm_loss %s L=%d d logits", cm_mode_name(mode), L);
  expect_close(what, dz_gpu, dz_cpu, 1e-5);
  const double tol = mode == CmMode::Global ? 1e-4 : 1e-5;
  for (int r = 0; r < c.R; ++r) {
    std::snprintf(what, sizeof what, "cm_loss %s L=%d d raw CM, annotator %d", cm_mode_name(mode), L, r);
    expect_close(what, draw_gpu[r], draw_cpu[r], tol);
  }
  // Loss only (no gradient pointers) gives the same loss.
  CmLossOutput plain;
  cu::host::cm_loss(ctx(), in, plain);
  CHECK(plain.loss == gpu.loss);
  // Reproducible: a second run is bit-identical.
  std::vector<float> dz2;
  std::vector<std::vector<float>> draw2;
  CmLossOutput again;
  run(true, dz2, draw2, again);
  CHECK(again.loss == gpu.loss && dz2 == dz_gpu && draw2 == draw_gpu);
}

// ---- Adam -------------------------------------------------------------------------------

void adam_case(OptimKind kind, float weight_decay) {
  ModelConfig mc;
  mc.ndim = 2, mc.in_channels = 2, mc.classes = 3, mc.annotators = 2, mc.depth = 2, mc.base = 4, mc.seed = 5;
  Model cpu(mc);
  cpu.optim.kind = kind, cpu.optim.lr = 1e-2f, cpu.optim.weight_decay = weight_decay;
  std::vector<Param> gpu = cpu.params();
  uint32_t seed = 40;
  for (int step = 1; step <= 3; ++step) {
    for (size_t i = 0; i < gpu.size(); ++i) {
      auto g = rnd(gpu[i].grad.size(), seed++);
      cpu.params()[i].grad = g;
      gpu[i].grad = g;
    }
    cpu.apply_optimizer();  // increments cpu.step, then updates
    cu::host::adam_step(ctx(), gpu, cpu.optim, cpu.step);
  }
  std::vector<float> vc, vg, mc_, mg, sc, sg;
  for (size_t i = 0; i < gpu.size(); ++i) {
    const Param& p = cpu.params()[i];
    vc.insert(vc.end(), p.value.begin(), p.value.end()), vg.insert(vg.end(), gpu[i].value.begin(), gpu[i].value.end());
    mc_.insert(mc_.end(), p.m.begin(), p.m.end()), mg.insert(mg.end(), gpu[i].m.begin(), gpu[i].m.end());
    sc.insert(sc.end(), p.v.begin(), p.v.end()), sg.insert(sg.end(), gpu[i].v.begin(), gpu[i].v.end());
  }
  const char* name = kind == OptimKind::Adam ? "adam" : "adamw";
  char what[96];
  std::snprintf(what, sizeof what, "%s wd=%g, 3 steps: weights", name, weight_decay);
  expect_close(what, vg, vc, 1e-5);
  std::snprintf(what, sizeof what, "%s wd=%g, 3 steps: m", name, weight_decay);
  expect_close(what, mg, mc_, 1e-5);
  std::snprintf(what, sizeof what, "%s wd=%g, 3 steps: v", name, weight_decay);
  expect_close(what, sg, sc, 1e-5);
}

void report_bandwidth(const char* what, double bytes, float ms) {
  std::printf("  %-52s %8.3f ms  %7.1f GB/s\n", what, ms, bytes / (ms * 1e-3) / 1e9);
}

}  // namespace

TEST(device_and_pool) {
  const cu::DeviceInfo d = cu::device_info(0);
  std::printf("  device %d: %s, compute %d.%d, %d SMs, %.1f GiB, L2 %.0f MiB; runtime %d, driver %d, cuDNN %zu, cuBLAS %d\n",
              d.index, d.name.c_str(), d.cc_major, d.cc_minor, d.multiprocessors, d.memory_bytes / 1073741824.0,
              d.l2_bytes / 1048576.0, d.runtime_version, d.driver_version, d.cudnn_version, d.cublas_version);
  CHECK(d.cudnn_version == cu::cudnn_version() && d.cudnn_version >= 90000);
  {
    cu::Buffer<float> a(ctx(), 1 << 20);
    CHECK(ctx().pool_stats().in_use_bytes >= (4u << 20));
    std::vector<float> h = rnd(1 << 20, 1), back(1 << 20);
    a.upload(h.data());
    a.download(back.data());
    CHECK(back == h);
  }
  CHECK(ctx().pool_stats().in_use_bytes == 0);
  CHECK(ctx().pool_stats().peak_in_use_bytes >= (4u << 20));
  ctx().reset_peak();
  CHECK(ctx().pool_stats().peak_in_use_bytes == 0);
  // An impossible allocation is a typed error, and the context stays usable.
  CHECK_THROWS_WITH(ctx().alloc((size_t)1 << 52), "GPU out of memory: allocating 4294967296.0 MiB failed");
  bool oom_typed = false;
  try {
    ctx().alloc((size_t)1 << 52);
  } catch (const OutOfMemory&) {
    oom_typed = true;
  }
  CHECK(oom_typed);
  cu::Buffer<float> after(ctx(), 16);
  after.zero();
  CHECK(after.to_host() == std::vector<float>(16, 0.f));
}

TEST(maxpool2_matches_cpu_exactly) {
  maxpool_case(2, 6, {1, 10, 14});
  maxpool_case(3, 5, {6, 8, 10});
}

TEST(instance_norm_matches_cpu) {
  instance_norm_case(2, 3, 16 * 16, false, 0.f);
  instance_norm_case(2, 3, 16 * 16, true, 0.f);
  instance_norm_case(1, 4, 5 * 7 * 9, true, 0.f);      // V % 4 != 0: scalar path
  instance_norm_case(2, 2, 64 * 64 * 16, true, 0.f);   // several chunks per plane
  instance_norm_case(2, 2, 48 * 48, false, 100.f);     // |mean| >> std
  instance_norm_case(2, 3, 40 * 40, true, 100.f);      // the same with the ReLU's mask
}

// Both ways cuDNN is called: on channels-last copies (the default) and on the
// model's NCDHW tensors directly.
// Restores the shared context's options at the end of a test, also when it throws.
struct OptionsGuard {
  cu::ContextOptions saved = ctx().options();
  ~OptionsGuard() {
    ctx().set_tf32(saved.tf32);
    ctx().set_bf16(saved.bf16);
    ctx().set_conv_channels_last(saved.conv_channels_last);
    ctx().set_conv_graph(saved.conv_graph);
    ctx().set_conv_autotune(saved.conv_autotune);
    ctx().set_conv_overlap(saved.conv_overlap);
    ctx().set_heads_fused_weight_grad(saved.heads_fused_weight_grad);
    ctx().set_conv_wgrad(saved.conv_wgrad);
    ctx().set_upconv(saved.upconv, saved.upconv_chunk_bytes);
  }
};

// Every way cuDNN is called: its legacy API and its graph API (ContextOptions::
// conv_graph), each on channels-last copies (the default) and on the model's NCDHW
// tensors directly. A shape a path cannot run falls back to the next one (still
// checked here): the count says how many did.
TEST(conv3_matches_cpu) {
  OptionsGuard guard;
  ctx().set_conv_autotune(false);  // each path itself, not the fastest
  for (bool graph : {false, true})
    for (bool channels_last : {true, false}) {
      ctx().set_conv_graph(graph);
      ctx().set_conv_channels_last(channels_last);
      const char* api = graph ? "graph API" : "legacy API";
      std::printf("  -- conv3 with cuDNN's %s on %s tensors\n", api, channels_last ? "NDHWC (channels-last)" : "NCDHW");
      const size_t before = ctx().conv_fallbacks();
      for (bool tf32 : {false, true}) {
        const size_t runs_before = ctx().conv_graph_runs();
        conv3_case(2, 2, 3, 5, {1, 12, 10}, tf32);
        conv3_case(3, 2, 4, 6, {6, 8, 10}, tf32);
        conv3_case(3, 1, 16, 32, {8, 8, 8}, tf32);
        conv3_case(3, 2, 33, 7, {4, 6, 70}, tf32);  // transpose tiles cut at both edges
        const size_t runs = ctx().conv_graph_runs() - runs_before;
        if (graph) std::printf("  conv3 graph API on %s %s: %zu convolutions ran through it\n",
                               channels_last ? "NDHWC" : "NCDHW", tf32 ? "tf32" : "fp32", runs);
        // With TF32 the graph API must run these shapes itself (a total fallback to the
        // legacy API would pass the numeric checks and hide that it never ran).
        if (graph && tf32) CHECK(runs > 0);
      }
      std::printf("  conv3 %s %s: %zu direction-shapes fell back to the next path\n", api,
                  channels_last ? "NDHWC" : "NCDHW", ctx().conv_fallbacks() - before);
    }
}

// conv3's path chosen by timing (ContextOptions::conv_autotune): whichever of the four
// fp32 paths wins, the result is the CPU reference's, the real filter gradient is
// accumulated once (the timing runs go to scratch), and the options are as before.
TEST(conv3_autotuned_matches_cpu) {
  OptionsGuard guard;
  ctx().set_conv_autotune(true);
  std::printf("  -- conv3 with its path timed per direction and shape (choices on stderr)\n");
  for (bool tf32 : {false, true}) {
    conv3_case(2, 2, 3, 5, {1, 12, 10}, tf32);
    conv3_case(3, 2, 4, 6, {6, 8, 10}, tf32);
    conv3_case(3, 1, 16, 32, {8, 8, 8}, tf32);
  }
  CHECK(ctx().options().conv_channels_last == guard.saved.conv_channels_last);
  CHECK(ctx().options().conv_graph == guard.saved.conv_graph);
}

// bf16 copies (ContextOptions::bf16): inputs, weights and what cuDNN writes are
// rounded to bf16 (8-bit mantissa), products summed in fp32.
TEST(conv3_bf16_close_to_cpu) {
  OptionsGuard guard;
  ctx().set_bf16(true);
  std::printf("  -- conv3 with cuDNN on bf16 NDHWC copies, bf16 operands (tolerance 5e-3)\n");
  const size_t before = ctx().conv_fallbacks(), runs_before = ctx().conv_graph_runs();
  conv3_case(2, 2, 16, 16, {1, 12, 10}, true, true);
  conv3_case(3, 2, 32, 32, {6, 8, 10}, true, true);
  conv3_case(3, 1, 16, 32, {8, 8, 8}, true, true);
  conv3_case(2, 2, 3, 5, {1, 12, 10}, true, true);
  conv3_case(3, 2, 4, 6, {6, 8, 10}, true, true);
  conv3_case(3, 2, 33, 7, {4, 6, 70}, true, true);
  const size_t runs = ctx().conv_graph_runs() - runs_before;
  std::printf("  conv3 bf16: %zu direction-shapes fell back to the next path; %zu convolutions ran through the graph "
              "API\n",
              ctx().conv_fallbacks() - before, runs);
  // bf16 goes to the graph API first (the legacy API's bf16 3D kernels are ~30x slow):
  // it must have run these shapes itself.
  CHECK(runs > 0);
}

// conv3's filter gradient on the side stream while its data gradient runs on the
// model's (ContextOptions::conv_overlap): the same results on every path, including
// the filter gradient accumulated once into what dw held.
TEST(conv3_overlapped_matches_cpu) {
  OptionsGuard guard;
  ctx().set_conv_overlap(true);
  ctx().set_conv_autotune(false);
  for (bool channels_last : {true, false}) {
    ctx().set_conv_channels_last(channels_last);
    std::printf("  -- conv3 backward with the filter gradient on a second stream, %s\n",
                channels_last ? "NDHWC copies" : "NCDHW");
    for (bool tf32 : {false, true}) {
      conv3_case(2, 2, 3, 5, {1, 12, 10}, tf32);
      conv3_case(3, 2, 4, 6, {6, 8, 10}, tf32);
      conv3_case(3, 1, 16, 32, {8, 8, 8}, tf32);
      conv3_case(3, 2, 33, 7, {4, 6, 70}, tf32);
    }
  }
  ctx().set_conv_channels_last(true);
  ctx().set_bf16(true);
  std::printf("  -- the same with bf16 copies\n");
  conv3_case(3, 2, 32, 32, {6, 8, 10}, true, true);
  conv3_case(3, 2, 4, 6, {6, 8, 10}, true, true);
}

// conv3's own filter-gradient kernel (native/cuda/conv3_filter_grad.cu; TF32 tensor
// cores on the NCDHW tensors): called directly, its dw accumulated onto a random start
// against the CPU reference at TF32's tolerance (the host emulation of the same kernel
// gave 2.4e-4 to 2.6e-4), and the same bits on a second run; then through
// conv3_backward with ContextOptions::conv_wgrad own (every 3D TF32 call) and auto
// (timed against cuDNN per shape; the choices go to stderr).
// Where a wrong own filter gradient is wrong, for the first device run to name its cause:
// the error per tap (a slot or halo offset), per output channel mod 16 (the A fragment's
// rows), per input channel mod 8 (the B fragment's columns), and the non-finite count
// (a shared-memory slot no copy reached).
void explain_filter_grad_error(const std::vector<float>& got, const std::vector<float>& want, int cin, int cout) {
  std::vector<double> num_tap(27), den_tap(27), num_co(16), den_co(16), num_ci(8), den_ci(8);
  size_t non_finite = 0;
  for (int co = 0; co < cout; ++co)
    for (int ci = 0; ci < cin; ++ci)
      for (int k = 0; k < 27; ++k) {
        const size_t i = ((size_t)co * cin + ci) * 27 + k;
        if (!std::isfinite(got[i])) {
          ++non_finite;
          continue;
        }
        const double d = (double)got[i] - want[i], w = (double)want[i] * want[i];
        num_tap[k] += d * d, den_tap[k] += w;
        num_co[co % 16] += d * d, den_co[co % 16] += w;
        num_ci[ci % 8] += d * d, den_ci[ci % 8] += w;
      }
  auto row = [](const char* what, const std::vector<double>& num, const std::vector<double>& den) {
    std::printf("    rel L2 by %s:", what);
    for (size_t i = 0; i < num.size(); ++i) std::printf(" %.1e", den[i] > 0 ? std::sqrt(num[i] / den[i]) : 0.0);
    std::printf("\n");
  };
  std::printf("    non-finite values: %zu of %zu\n", non_finite, got.size());
  row("tap (kd, kh, kw)", num_tap, den_tap);
  row("output channel mod 16", num_co, den_co);
  row("input channel mod 8", num_ci, den_ci);
}

void own_filter_grad_case(int n, int cin, int cout, Spatial s) {
  const size_t V = (size_t)s.size(), wn = (size_t)cout * cin * 27;
  const auto x = rnd(n * cin * V, 21), dy = rnd(n * cout * V, 22), dw0 = rnd(wn, 23);
  std::vector<float> want = dw0, got = dw0, again = dw0;
  conv3_backward(x.data(), nullptr, dy.data(), nullptr, want.data(), n, cin, cout, s, 3);
  cu::host::conv3_backward_filter_own(ctx(), x.data(), dy.data(), got.data(), n, cin, cout, s);
  cu::host::conv3_backward_filter_own(ctx(), x.data(), dy.data(), again.data(), n, cin, cout, s);
  CHECK(std::memcmp(got.data(), again.data(), wn * sizeof(float)) == 0);
  for (size_t i = 0; i < wn; ++i) want[i] -= dw0[i], got[i] -= dw0[i];
  char what[96];
  std::snprintf(what, sizeof what, "own filter grad n %d %d->%d %dx%dx%d", n, cin, cout, s.d, s.h, s.w);
  const int before = check::failures();
  expect_close(what, got, want, 3e-3);
  if (check::failures() != before) explain_filter_grad_error(got, want, cin, cout);
}

// Whether this GPU and build run the own filter-gradient kernel (compute capability 8.0
// and its shared memory); where not, conv_wgrad own / auto keep cuDNN's.
bool own_wgrad_supported() {
  static const bool yes = [] {
    std::vector<float> x(8 * 27, 1.f), dy(8 * 27, 1.f), dw(8 * 8 * 27, 0.f);
    try {
      cu::host::conv3_backward_filter_own(ctx(), x.data(), dy.data(), dw.data(), 1, 8, 8, {3, 3, 3});
      return true;
    } catch (const cmseg::Error& e) {
      if (std::string(e.what()).find("needs compute capability") == std::string::npos) throw;
      std::printf("  own filter-gradient kernel not supported here: %s\n", e.what());
      return false;
    }
  }();
  return yes;
}

TEST(conv3_own_filter_grad_matches_cpu) {
  OptionsGuard guard;
  std::printf("  -- conv3's filter gradient through our own TF32 kernel\n");
  if (!own_wgrad_supported()) {
    check::skip("the own filter-gradient kernel cannot run on this GPU");
    return;
  }
  own_filter_grad_case(1, 32, 32, {3, 4, 32});  // one patch, one run
  own_filter_grad_case(2, 40, 20, {4, 5, 35});     // patches cut in h and w; channel blocks part-used
  own_filter_grad_case(1, 3, 5, {19, 3, 7});       // two runs along depth; few channels
  own_filter_grad_case(2, 64, 32, {20, 12, 64});   // two input-channel blocks, several runs per block
  own_filter_grad_case(1, 32, 64, {8, 8, 8});      // two output-channel blocks
}

// conv3's filter gradient per ContextOptions::conv_wgrad: own and auto take the own
// kernel for 3D TF32 convolutions only (2D and fp32 keep cuDNN's); the results match
// the CPU either way.
TEST(conv3_wgrad_paths_match_cpu) {
  OptionsGuard guard;
  if (!own_wgrad_supported()) {
    check::skip("the own filter-gradient kernel cannot run on this GPU");
    return;
  }
  for (cu::WgradPath path : {cu::WgradPath::Own, cu::WgradPath::Auto}) {
    ctx().set_conv_wgrad(path);
    std::printf("  -- conv3 with conv_wgrad %s\n", cu::wgrad_path_name(path));
    for (bool tf32 : {false, true}) {  // fp32 keeps cuDNN's filter gradient
      const size_t before = ctx().conv_own_wgrad_runs();
      conv3_case(2, 2, 3, 5, {1, 12, 10}, tf32);
      const size_t after_2d = ctx().conv_own_wgrad_runs();
      conv3_case(3, 2, 4, 6, {6, 8, 10}, tf32);
      conv3_case(3, 1, 16, 32, {8, 8, 8}, tf32);
      conv3_case(3, 2, 33, 7, {4, 6, 70}, tf32);
      const size_t runs = ctx().conv_own_wgrad_runs() - before;
      std::printf("  conv_wgrad %s, %s: the own kernel ran %zu time(s)\n", cu::wgrad_path_name(path),
                  tf32 ? "tf32" : "fp32", runs);
      CHECK(after_2d == before);  // 2D: cuDNN's
      if (!tf32) CHECK(runs == 0);
      if (tf32 && path == cu::WgradPath::Own) CHECK(runs == 6);  // 3 shapes x 2 backward calls each
    }
  }
}

// Every path: cuBLAS GEMMs with our scatter/gather (the default; also with chunks of
// one depth slice or row, so several chunks per image and a short last one), cuDNN on
// the NCDHW tensors and on channels-last copies.
TEST(upconv2_matches_cpu) {
  OptionsGuard guard;
  struct Path {
    cu::UpconvPath path;
    size_t chunk_bytes;
    const char* what;
  };
  for (const Path& p : {Path{cu::UpconvPath::Gemm, 0, "GEMM + scatter/gather, whole images"},
                        Path{cu::UpconvPath::Gemm, 1, "GEMM + scatter/gather, one unit per chunk"},
                        Path{cu::UpconvPath::Cudnn, 0, "cuDNN on NCDHW tensors"},
                        Path{cu::UpconvPath::CudnnChannelsLast, 0, "cuDNN on NDHWC (channels-last) copies"}}) {
    ctx().set_upconv(p.path, p.chunk_bytes);
    std::printf("  -- upconv2: %s\n", p.what);
    for (bool tf32 : {false, true}) {
      upconv2_case(2, 2, 6, 3, {1, 5, 7}, tf32);
      upconv2_case(3, 2, 8, 4, {3, 4, 5}, tf32);
      upconv2_case(3, 2, 33, 5, {2, 3, 20}, tf32);  // transpose tiles cut at the edges
      upconv2_case(3, 1, 16, 8, {5, 6, 40}, tf32);  // output rows wider than a warp
    }
  }
}

TEST(cm_loss_full_matches_cpu) {
  cm_loss_case(CmMode::Full, 2, 1, 0.01f);
  cm_loss_case(CmMode::Full, 4, 1, 0.3f);
  cm_loss_case(CmMode::Full, 4, 1, -0.01f);  // warm-up: negated trace
  cm_loss_case(CmMode::Full, 5, 1, 0.3f);    // generic (non-specialised) kernel
  // Whole columns of small softplus values (a CM the loss can drift to: the column
  // normalisation does not see the scale), and large ones.
  cm_loss_case(CmMode::Full, 4, 1, 0.3f, 3, 37 * 41, -14.f, -6.f);
  cm_loss_case(CmMode::Full, 4, 1, 0.3f, 3, 37 * 41, 6.f, 30.f);
}

TEST(cm_loss_lowrank_matches_cpu) {
  cm_loss_case(CmMode::LowRank, 3, 2, 0.3f);
  cm_loss_case(CmMode::LowRank, 6, 1, 0.3f);
}

TEST(cm_loss_global_matches_cpu) {
  cm_loss_case(CmMode::Global, 3, 1, 0.3f);
  cm_loss_case(CmMode::Global, 4, 1, -0.01f);
  cm_loss_case(CmMode::Global, 7, 1, 0.3f);
}

// CMSEG_CM_LOSS_KERNEL set for one test only, also when a case throws.
struct CmLossKernelEnv {
  explicit CmLossKernelEnv(const char* k) { setenv("CMSEG_CM_LOSS_KERNEL", k, 1); }
  ~CmLossKernelEnv() { unsetenv("CMSEG_CM_LOSS_KERNEL"); }
};
// A failure unless the last cm_loss call ran the expected main kernel.
void ran(const char* expected) {
  if (std::strcmp(cu::last_cm_loss_kernel(), expected) != 0) {
    std::printf("  cm_loss ran the %s kernel, expected %s\n", cu::last_cm_loss_kernel(), expected);
    ++check::failures();
  }
}

// The GPU model lets the loss write each head's gradient over its raw output
// (loss.hpp): on the device, with both kernels, the same loss and bit-identical
// gradients as into separate arrays.
TEST(cm_loss_gradient_in_place_on_device) {
  for (const char* kernel : {"pixel", "pairs", "prefetch", "staged"}) {
    CmLossKernelEnv env(kernel);
    for (CmMode mode : {CmMode::Full, CmMode::LowRank}) {
      LossCase c = make_loss_case(mode, 3, 4, 3, 5000, 2, 0.3f, 700 + (int)mode);
      cu::Context& x = ctx();
      cu::Buffer<float> z(x, c.logits), dz1(x, c.logits.size()), dz2(x, c.logits.size());
      std::vector<cu::Buffer<float>> raw1, raw2, draw1;
      std::vector<cu::Buffer<uint8_t>> lab;
      cu::Buffer<uint8_t> present(x, c.present);
      CmLossInput in1 = c.input(), in2 = c.input();
      CmLossOutput apart, inplace;
      in1.seg_logits = in2.seg_logits = z.data();
      in1.present = in2.present = present.data();
      apart.d_seg_logits = dz1.data(), inplace.d_seg_logits = dz2.data();
      for (int r = 0; r < c.R; ++r) {
        raw1.emplace_back(x, c.raw[r]), raw2.emplace_back(x, c.raw[r]), draw1.emplace_back(x, c.raw[r].size());
        lab.emplace_back(x, c.labels[r]);
        in1.cm_raw[r] = raw1[r].data(), in2.cm_raw[r] = raw2[r].data();
        in1.labels[r] = in2.labels[r] = lab[r].data();
        apart.d_cm_raw.push_back(draw1[r].data());
        inplace.d_cm_raw.push_back(raw2[r].data());
      }
      cu::cm_loss(x, in1, apart);
      cu::cm_loss(x, in2, inplace);
      CHECK(inplace.loss == apart.loss);
      std::vector<float> a(c.logits.size()), b(c.logits.size());
      dz1.download(a.data()), dz2.download(b.data());
      CHECK(a == b);
      for (int r = 0; r < c.R; ++r) {
        std::vector<float> g1(c.raw[r].size()), g2(c.raw[r].size());
        draw1[r].download(g1.data()), raw2[r].download(g2.data());
        CHECK(g1 == g2);
      }
      std::printf("  %s kernel, %s: in place == apart\n", kernel, cm_mode_name(mode));
    }
  }
}

// The kernel CMSEG_CM_LOSS_KERNEL=`kernel` runs for L classes and R annotators: the
// staged kernel's per-thread sums and slots ([L logits + R * L * L channels] x 128 pixels
// of floats, R x 128 label bytes) must fit a block's shared memory on this GPU (227 KiB on
// an H100, 99 KiB on sm_86/89 parts), else the pixel kernel runs.
const char* expected_kernel(const char* kernel, int L, int R) {
  if (std::strcmp(kernel, "staged") != 0) return kernel;
  const char* s = std::getenv("CMSEG_CM_LOSS_STAGES");
  const size_t stages = s && std::atoi(s) == 2 ? 2 : 3;
  // + 256: block_sum's static scratch (32 doubles), which shares the opt-in with the slots
  const size_t need = 8 * 2 * R * 128 + 4 * stages * ((size_t)(L + R * L * L) * 128 + R * 32) + 256;
  return need <= cu::device_info(ctx().device()).shared_bytes_per_block ? kernel : "pixel";
}

// A full-CM kernel that repeats the pixel kernel's arithmetic (prefetch: the next
// annotator's loads in flight during this one's math; staged: tiles copied into shared
// memory ahead) against the pixel kernel on the same inputs: the same per-pixel arithmetic,
// so the same gradients (the compiler could in principle contract the two differently:
// then the difference is printed, and must stay at rounding); the staged kernel's grid
// differs, so its loss sums run in another order (equal to 1e-9).
void kernel_against_pixel(const char* kernel, int L, int R, int64_t V) {
  CmLossKernelEnv env("pixel");  // run() sets it per call; unset when this returns
  LossCase c = make_loss_case(CmMode::Full, 2, L, R, V, 1, 0.3f, 500 + L + 7 * R);
  const CmLossInput in = c.input();
  auto run = [&](const char* kernel, std::vector<float>& dz, std::vector<std::vector<float>>& draw) {
    setenv("CMSEG_CM_LOSS_KERNEL", kernel, 1);
    CmLossOutput out;
    dz.assign(c.logits.size(), 0.f);
    out.d_seg_logits = dz.data();
    draw.assign(c.R, {});
    for (int r = 0; r < c.R; ++r) draw[r].assign(c.raw[r].size(), 0.f), out.d_cm_raw.push_back(draw[r].data());
    cu::host::cm_loss(ctx(), in, out);
    return out.loss;
  };
  std::vector<float> dz_a, dz_b;
  std::vector<std::vector<float>> dr_a, dr_b;
  const double la = run("pixel", dz_a, dr_a), lb = run(kernel, dz_b, dr_b);
  CHECK(std::strcmp(cu::last_cm_loss_kernel(), expected_kernel(kernel, L, R)) == 0);
  double worst = 0;
  auto diff = [&](const std::vector<float>& a, const std::vector<float>& b) {
    double m = 0, d = 0;
    for (size_t i = 0; i < a.size(); ++i) m = std::max(m, (double)std::fabs(a[i])), d = std::max(d, (double)std::fabs(a[i] - b[i]));
    worst = std::max(worst, m > 0 ? d / m : d);
  };
  diff(dz_a, dz_b);
  for (int r = 0; r < c.R; ++r) diff(dr_a[r], dr_b[r]);
  const bool same = la == lb && worst == 0;
  std::printf("  %s vs pixel kernel, L=%d, %d annotator(s): %s (loss %.9f vs %.9f, worst gradient difference "
              "%.2e of its array's largest)\n",
              kernel, L, R, same ? "identical" : "DIFFERENT", la, lb, worst);
  CHECK_CLOSE(lb, la, 1e-9, 1e-12);
  CHECK(worst <= 1e-6);
}

// What both full-CM kernels (prefetch, staged) run, with CMSEG_CM_LOSS_KERNEL naming
// `kernel`: against the CPU for 2-4 classes, 60000 pixels an image and 1 to 5 annotators
// (odd counts end the prefetch kernel's pairs on an unpaired one); 5 classes and low-rank
// CMs take the pixel kernel; then against the pixel kernel, bit for bit.
void full_cm_kernel_cases(const char* kernel) {
  for (int L : {2, 3, 4}) {
    cm_loss_case(CmMode::Full, L, 1, 0.3f);
    ran(expected_kernel(kernel, L, 3));
  }
  cm_loss_case(CmMode::Full, 4, 1, 0.3f, 3, 60000);
  cm_loss_case(CmMode::Full, 4, 1, 0.3f, 1);
  cm_loss_case(CmMode::Full, 4, 1, 0.3f, 4);
  ran(expected_kernel(kernel, 4, 4));
  cm_loss_case(CmMode::Full, 4, 1, 0.3f, 5);
  ran(expected_kernel(kernel, 4, 5));
  cm_loss_case(CmMode::Full, 5, 1, 0.3f);  // 5 classes: the pixel kernel
  ran("pixel");
  cm_loss_case(CmMode::LowRank, 3, 2, 0.3f);
  ran("pixel");
  for (int L : {2, 4})
    for (int R : {1, 2, 3, 5}) kernel_against_pixel(kernel, L, R, 20000);  // unsets CMSEG_CM_LOSS_KERNEL
}

TEST(cm_loss_prefetch_kernel_matches_cpu) {
  CmLossKernelEnv env("prefetch");
  full_cm_kernel_cases("prefetch");
}

// The staged kernel (CMSEG_CM_LOSS_KERNEL=staged: tiles of pixels copied into shared
// memory ahead of their math; full CMs, 2-4 classes), with 3 and 2 slots; its walk over
// tiles is also checked on the host (test_cm_loss_staging). 37 x 41 pixels an image leave
// tiles across images and a partial last one. 16 annotators need more shared memory than
// a block may have with 3 slots: the pixel kernel then runs.
TEST(cm_loss_staged_kernel_matches_cpu) {
  CmLossKernelEnv env("staged");
  for (const char* stages : {"3", "2"}) {
    setenv("CMSEG_CM_LOSS_STAGES", stages, 1);
    setenv("CMSEG_CM_LOSS_KERNEL", "staged", 1);
    std::printf("  -- %s slots\n", stages);
    full_cm_kernel_cases("staged");
  }
  setenv("CMSEG_CM_LOSS_STAGES", "3", 1);
  setenv("CMSEG_CM_LOSS_KERNEL", "staged", 1);
  cm_loss_case(CmMode::Full, 4, 1, 0.3f, 16, 300);
  ran(expected_kernel("staged", 4, 16));  // 405 KiB: the pixel kernel on every GPU so far
  unsetenv("CMSEG_CM_LOSS_STAGES");
}

// The pairs kernel (CMSEG_CM_LOSS_KERNEL=pairs: a thread per pixel and annotator)
// against the CPU, as above: 3 x 1517 pixels leave a partial last tile of 64; 3 x
// 60000 give every block several tiles; 1, 8 and 2 annotators (16 classes: the
// most shared memory); 9 annotators and global CMs fall back to the pixel kernel.
TEST(cm_loss_pairs_kernel_matches_cpu) {
  CmLossKernelEnv env("pairs");
  cm_loss_case(CmMode::Full, 2, 1, 0.01f);
  ran("pairs");
  cm_loss_case(CmMode::Full, 4, 1, 0.3f);
  cm_loss_case(CmMode::Full, 4, 1, 0.3f, 3, 60000);
  ran("pairs");
  cm_loss_case(CmMode::Full, 5, 1, 0.3f);
  cm_loss_case(CmMode::Full, 4, 1, 0.3f, 1);
  cm_loss_case(CmMode::Full, 4, 1, 0.3f, 8);
  cm_loss_case(CmMode::Full, 16, 1, 0.3f, 2, 300);
  ran("pairs");
  cm_loss_case(CmMode::LowRank, 3, 2, 0.3f);
  cm_loss_case(CmMode::LowRank, 6, 1, 0.3f, 4);
  ran("pairs");
  cm_loss_case(CmMode::Full, 3, 1, 0.3f, 9, 500);
  ran("pixel");
  cm_loss_case(CmMode::Global, 4, 1, 0.3f);
  ran("pixel");
}

TEST(adam_matches_cpu) {
  adam_case(OptimKind::Adam, 0.f);
  adam_case(OptimKind::Adam, 1e-2f);
  adam_case(OptimKind::AdamW, 1e-2f);
}

// Timings on the top level of brats3d-gpu (2 x 32 x 128^3 activations; the CM loss
// on 2 x 128^3 pixels, L = 4, R = 3, full mode). Bytes are what each kernel must read
// and write at least; GB/s near the device's copy bandwidth means the kernel is done.
TEST(bandwidth_brats3d_gpu_level0) {
  cu::Context& c = ctx();
  const int n = 2, ch = 32;
  const Spatial s{128, 128, 128};
  const int64_t V = s.size();
  const size_t count = (size_t)n * ch * V;
  {
    cu::Buffer<float> x(c, fast_fill(count, 1)), y(c, count), dy(c, fast_fill(count, 2)), dx(c, count);
    cu::Buffer<float> g(c, fast_fill(ch, 3)), b(c, fast_fill(ch, 4)), dg(c, ch), db(c, ch), mean(c, n * ch),
        rstd(c, n * ch);
    const double T = (double)count * sizeof(float);
    float ms = c.time_ms([&] {
      cu::instance_norm_forward(c, x.data(), g.data(), b.data(), y.data(), mean.data(), rstd.data(), n, ch, V, true);
    });
    report_bandwidth("instance_norm+relu forward (x twice, y)", 3 * T, ms);
    ms = c.time_ms([&] {
      cu::instance_norm_backward(c, x.data(), mean.data(), rstd.data(), g.data(), b.data(), dy.data(), dx.data(),
                                 dg.data(), db.data(), n, ch, V, true);
    });
    report_bandwidth("instance_norm+relu backward (x, dy twice; dx)", 5 * T, ms);
    cu::Buffer<float> p(c, count / 8), dpx(c, count);
    cu::Buffer<uint8_t> arg(c, count / 8);
    ms = c.time_ms([&] { cu::maxpool2_forward(c, x.data(), p.data(), arg.data(), n * ch, s, 3); });
    report_bandwidth("maxpool2 forward (x; y, arg)", T + T / 8 + count / 8.0, ms);
    ms = c.time_ms([&] { cu::maxpool2_backward(c, p.data(), arg.data(), dpx.data(), n * ch, s, 3); });
    report_bandwidth("maxpool2 backward (dy, arg; dx)", T + T / 8 + count / 8.0, ms);

    // conv3 at this level, TF32 and FMA math: TFLOP/s rather than GB/s.
    cu::Buffer<float> w(c, fast_fill((size_t)ch * ch * 27, 5, 0.05f)), dw(c, (size_t)ch * ch * 27);
    const double flops = 2.0 * n * V * ch * ch * 27;
    OptionsGuard guard;  // c is the shared context: its options come back even if a call throws
    c.set_conv_autotune(false);  // each path's own time
    for (bool graph : {false, true})
      for (bool channels_last : {true, false})
        for (bool tf32 : {true, false}) {
          if (graph && !tf32) continue;  // the graph API's FMA engines: not what the step runs
          c.set_tf32(tf32);
          c.set_conv_graph(graph);
          c.set_conv_channels_last(channels_last);
          const float f = c.time_ms([&] { cu::conv3_forward(c, x.data(), w.data(), y.data(), n, ch, ch, s, 3); }, 5);
          const float bd = c.time_ms(
              [&] { cu::conv3_backward(c, x.data(), w.data(), dy.data(), dx.data(), dw.data(), n, ch, ch, s, 3); }, 5);
          const float bf = c.time_ms(
              [&] { cu::conv3_backward(c, x.data(), w.data(), dy.data(), nullptr, dw.data(), n, ch, ch, s, 3); }, 5);
          std::printf("  conv3 3D 32->32 128^3 n=2 %s %s %s: forward %.3f ms (%.1f TFLOP/s), backward data+filter "
                      "%.3f ms (%.1f TFLOP/s), of which filter %.3f ms\n",
                      graph ? "graph" : "legacy", channels_last ? "NDHWC" : "NCDHW", tf32 ? "tf32" : "fp32", f,
                      flops / (f * 1e-3) / 1e12, bd, 2 * flops / (bd * 1e-3) / 1e12, bf);
        }
  }
  {
    const int L = 4, R = 3, K = L * L;
    const int64_t pixels = (int64_t)n * V;
    cu::Buffer<float> z(c, fast_fill((size_t)pixels * L, 6, 3.f)), dz(c, (size_t)pixels * L);
    std::vector<cu::Buffer<float>> raw, draw;
    std::vector<cu::Buffer<uint8_t>> lab;
    CmLossInput in;
    CmLossOutput out;
    in.n = n, in.L = L, in.R = R, in.V = V, in.mode = CmMode::Full, in.trace_weight = 0.01f;
    in.seg_logits = z.data();
    std::vector<uint8_t> hl((size_t)pixels);
    for (size_t i = 0; i < hl.size(); ++i) hl[i] = (uint8_t)(i * 2654435761u >> 28) % L;
    for (int r = 0; r < R; ++r) {
      raw.emplace_back(c, fast_fill((size_t)pixels * K, 10 + r, 3.f));
      draw.emplace_back(c, (size_t)pixels * K);
      lab.emplace_back(c, hl);
      in.cm_raw.push_back(raw.back().data());
      in.labels.push_back(lab.back().data());
      out.d_cm_raw.push_back(draw.back().data());
    }
    out.d_seg_logits = dz.data();
    const double bytes = (double)pixels * (2.0 * L * 4 + 2.0 * R * K * 4 + 2.0 * R);  // labels read twice (count, main)
    const float ms = c.time_ms([&] { cu::cm_loss(c, in, out); }, 5);
    report_bandwidth("cm_loss full L=4 R=3, 2x128^3 (fwd+bwd, incl. host wait)", bytes, ms);
    CHECK(std::isfinite(out.loss));
  }
  {
    const int64_t numel = 32 << 20;  // 32 M parameters in 40 tensors of mixed sizes
    std::vector<cu::Buffer<float>> bufs;
    std::vector<cu::AdamTensor> ts;
    int64_t left = numel;
    for (int t = 0; t < 40 && left > 0; ++t) {
      const int64_t sz = t == 39 ? left : std::min<int64_t>(left, (int64_t)1 << (10 + t % 12));
      left -= sz;
      for (int k = 0; k < 4; ++k) bufs.emplace_back(c, fast_fill((size_t)sz, 50 + 4 * t + k, k == 3 ? 0.f : 1.f));
      const size_t b = bufs.size() - 4;
      ts.push_back({bufs[b].data(), bufs[b + 1].data(), bufs[b + 2].data(), bufs[b + 3].data(), sz});
    }
    OptimConfig o;
    const float ms = c.time_ms([&] { cu::adam_step(c, ts, o, 1); });
    report_bandwidth("adam, 32M parameters in 40 tensors (w,g,m,v; w,m,v)", (double)numel * 28, ms);
  }
  const cu::PoolStats ps = c.pool_stats();
  std::printf("  pool: peak %.2f GiB in use, %.2f GiB reserved\n", ps.peak_in_use_bytes / 1073741824.0,
              ps.reserved_bytes / 1073741824.0);
}

namespace {

// ---- the pieces the whole step adds: heads, concat, plain CE, softmax, CM prediction ----

template <class T>
cu::Buffer<T> dev(const std::vector<T>& h) {
  return cu::Buffer<T>(ctx(), h);
}

void conv1_case(int n, int cin, int cout, int64_t V, bool tf32) {
  const double tol = tf32 ? 1e-2 : 1e-5;
  ctx().set_tf32(tf32);
  auto x = rnd((size_t)n * cin * V, 61), w = rnd((size_t)cout * cin, 62), b = rnd(cout, 63),
       dy = rnd((size_t)n * cout * V, 64), dx0 = rnd((size_t)n * cin * V, 65), dw0 = rnd((size_t)cout * cin, 66),
       db0 = rnd(cout, 67);
  std::vector<float> y(n * cout * V), dx = dx0, dw = dw0, db = db0;
  conv1_forward(x.data(), w.data(), b.data(), y.data(), n, cin, cout, V);
  conv1_backward(x.data(), w.data(), dy.data(), dx.data(), dw.data(), db.data(), n, cin, cout, V);
  auto X = dev(x), Wt = dev(w), Bb = dev(b), DY = dev(dy), DX = dev(dx0), DW = dev(dw0), DB = dev(db0);
  cu::Buffer<float> Y(ctx(), y.size());
  cu::conv1_forward(ctx(), X.data(), Wt.data(), Bb.data(), Y.data(), n, cin, cout, V);
  cu::conv1_backward(ctx(), X.data(), Wt.data(), DY.data(), DX.data(), DW.data(), DB.data(), n, cin, cout, V);
  auto dwg = DW.to_host(), dbg = DB.to_host();
  for (size_t i = 0; i < dw.size(); ++i) dw[i] -= dw0[i], dwg[i] -= dw0[i];  // the accumulated parts
  for (size_t i = 0; i < db.size(); ++i) db[i] -= db0[i], dbg[i] -= db0[i];
  char what[96];
  const char* m = tf32 ? "tf32" : "fp32";
  std::snprintf(what, sizeof what, "conv1 %d->%d V=%lld %s y", cin, cout, (long long)V, m);
  expect_close(what, Y.to_host(), y, tol);
  std::snprintf(what, sizeof what, "conv1 %d->%d %s dx (accumulated)", cin, cout, m);
  expect_close(what, DX.to_host(), dx, tol);
  std::snprintf(what, sizeof what, "conv1 %d->%d %s dw (accumulated)", cin, cout, m);
  expect_close(what, dwg, dw, tol);
  std::snprintf(what, sizeof what, "conv1 %d->%d %s db (accumulated)", cin, cout, m);
  expect_close(what, dbg, db, 1e-5);
  ctx().set_tf32(true);
}

// Several heads on the same features (the consensus head and the CM heads): the
// fused kernels for feature widths 8/16/32/64 with 2..17 heads, cuBLAS per head
// otherwise; against the CPU's conv1_forward_heads / conv1_backward_heads. V
// 3 * 2^14 + 5 splits each image's weight gradient into batches with a rest.
void conv1_heads_case(int n, int cin, const std::vector<int>& couts, int64_t V, bool tf32) {
  const double tol = tf32 ? 1e-2 : 1e-5;
  ctx().set_tf32(tf32);
  const size_t H = couts.size();
  auto x = rnd((size_t)n * cin * V, 71), dx0 = rnd((size_t)n * cin * V, 72);
  std::vector<std::vector<float>> w(H), b(H), dy(H), y(H), dw(H), db(H), dw0(H), db0(H);
  std::vector<cu::Buffer<float>> Wd, Bd, DYd, Yd, DWd, DBd;
  std::vector<Conv1Head> cpu(H), gpu(H);
  for (size_t h = 0; h < H; ++h) {
    const int K = couts[h];
    w[h] = rnd((size_t)K * cin, 80 + h, -0.5f, 0.5f), b[h] = rnd(K, 100 + h), dy[h] = rnd((size_t)n * K * V, 120 + h);
    dw0[h] = rnd((size_t)K * cin, 140 + h), db0[h] = rnd(K, 160 + h);
    y[h].assign((size_t)n * K * V, 0.f), dw[h] = dw0[h], db[h] = db0[h];
    cpu[h].cout = K, cpu[h].w = w[h].data(), cpu[h].b = b[h].data(), cpu[h].y = y[h].data();
    cpu[h].dy = dy[h].data(), cpu[h].dw = dw[h].data(), cpu[h].db = db[h].data();
    Wd.push_back(dev(w[h])), Bd.push_back(dev(b[h])), DYd.push_back(dev(dy[h]));
    Yd.emplace_back(ctx(), y[h].size()), DWd.push_back(dev(dw0[h])), DBd.push_back(dev(db0[h]));
  }
  for (size_t h = 0; h < H; ++h) {
    gpu[h].cout = couts[h], gpu[h].w = Wd[h].data(), gpu[h].b = Bd[h].data(), gpu[h].y = Yd[h].data();
    gpu[h].dy = DYd[h].data(), gpu[h].dw = DWd[h].data(), gpu[h].db = DBd[h].data();
  }
  std::vector<float> dx = dx0;
  conv1_forward_heads(x.data(), cpu, n, cin, V);
  conv1_backward_heads(x.data(), cpu, dx.data(), n, cin, V);
  auto X = dev(x), DX = dev(dx0);
  cu::conv1_forward_heads(ctx(), X.data(), gpu, n, cin, V);
  cu::conv1_backward_heads(ctx(), X.data(), gpu, DX.data(), n, cin, V);
  const char* m = tf32 ? "tf32" : "fp32";
  char what[112];
  for (size_t h = 0; h < H; ++h) {
    auto dwg = DWd[h].to_host(), dbg = DBd[h].to_host();
    for (size_t i = 0; i < dwg.size(); ++i) dwg[i] -= dw0[h][i], dw[h][i] -= dw0[h][i];
    for (size_t i = 0; i < dbg.size(); ++i) dbg[i] -= db0[h][i], db[h][i] -= db0[h][i];
    std::snprintf(what, sizeof what, "heads cin %d, %zu heads, head %zu (%d) %s y", cin, H, h, couts[h], m);
    expect_close(what, Yd[h].to_host(), y[h], tol);
    std::snprintf(what, sizeof what, "heads cin %d, head %zu %s dw (accumulated)", cin, h, m);
    expect_close(what, dwg, dw[h], tol);
    std::snprintf(what, sizeof what, "heads cin %d, head %zu %s db (accumulated)", cin, h, m);
    expect_close(what, dbg, db[h], 1e-5);
  }
  std::snprintf(what, sizeof what, "heads cin %d, %zu heads %s dx (accumulated)", cin, H, m);
  expect_close(what, DX.to_host(), dx, tol);
  ctx().set_tf32(true);
}

void concat_case(int n, int ca, int cb, int64_t V) {
  auto a = rnd((size_t)n * ca * V, 71), b = rnd((size_t)n * cb * V, 72), dy = rnd((size_t)n * (ca + cb) * V, 73),
       acc0 = rnd((size_t)n * ca * V, 74);
  std::vector<float> y(dy.size()), da(a.size()), db(b.size());
  concat_forward(a.data(), ca, b.data(), cb, y.data(), n, V);
  concat_backward(dy.data(), da.data(), ca, db.data(), cb, n, V);
  auto A = dev(a), B = dev(b), DY = dev(dy), ACC = dev(acc0);
  cu::Buffer<float> Y(ctx(), y.size()), DA(ctx(), da.size()), DB(ctx(), db.size());
  cu::concat_forward(ctx(), A.data(), ca, B.data(), cb, Y.data(), n, V);
  cu::concat_backward(ctx(), DY.data(), DA.data(), ca, DB.data(), cb, n, V);
  cu::concat_backward(ctx(), DY.data(), ACC.data(), ca, nullptr, cb, n, V, true);
  CHECK(Y.to_host() == y);
  CHECK(DA.to_host() == da);
  CHECK(DB.to_host() == db);
  std::vector<float> acc = acc0;
  for (size_t i = 0; i < acc.size(); ++i) acc[i] += da[i];
  CHECK(ACC.to_host() == acc);
  // y += x
  cu::add_inplace(ctx(), A.data(), ACC.data(), (int64_t)a.size());
  std::vector<float> sum = a;
  for (size_t i = 0; i < sum.size(); ++i) sum[i] += acc[i];
  CHECK(A.to_host() == sum);
  std::printf("  concat n=%d %d+%d V=%lld: forward, split, accumulate, add: identical\n", n, ca, cb, (long long)V);
}

void ce_case(int n, int L, int64_t V) {
  auto z = rnd((size_t)n * L * V, 81, -4.f, 4.f);
  std::vector<uint8_t> lab((size_t)n * V);
  std::mt19937 g(82);
  for (auto& l : lab) l = g() % 7 == 0 ? kUnlabelled : (uint8_t)(g() % L);
  std::vector<float> t((size_t)n * L * V);
  for (int i = 0; i < n; ++i)
    for (int64_t v = 0; v < V; ++v) {
      if (lab[(size_t)i * V + v] == kUnlabelled) continue;  // a row of zeros: nobody labelled it
      float s = 0;
      for (int k = 0; k < L; ++k) s += (t[((size_t)i * L + k) * V + v] = (float)(g() % 50 + 1));
      for (int k = 0; k < L; ++k) t[((size_t)i * L + k) * V + v] /= s;
    }
  std::vector<float> dh(z.size()), ds(z.size());
  const double lh = ce_loss_hard(z.data(), lab.data(), n, L, V, dh.data());
  const double ls = ce_loss_soft(z.data(), t.data(), n, L, V, ds.data());
  auto Z = dev(z), T = dev(t);
  auto LAB = dev(lab);
  cu::Buffer<float> DH(ctx(), z.size()), DS(ctx(), z.size());
  DH.upload(rnd(z.size(), 83).data());  // every entry must be written, unlabelled pixels included
  const double gh = cu::ce_loss_hard(ctx(), Z.data(), LAB.data(), n, L, V, DH.data());
  const double gs = cu::ce_loss_soft(ctx(), Z.data(), T.data(), n, L, V, DS.data());
  std::printf("  plain CE L=%d: hard cpu %.9f gpu %.9f, soft cpu %.9f gpu %.9f\n", L, lh, gh, ls, gs);
  CHECK_CLOSE(gh, lh, 1e-5, 1e-7);
  CHECK_CLOSE(gs, ls, 1e-5, 1e-7);
  char what[96];
  std::snprintf(what, sizeof what, "plain CE hard L=%d d logits", L);
  expect_close(what, DH.to_host(), dh, 1e-5);
  std::snprintf(what, sizeof what, "plain CE soft L=%d d logits", L);
  expect_close(what, DS.to_host(), ds, 1e-5);
  CHECK(cu::ce_loss_hard(ctx(), Z.data(), LAB.data(), n, L, V, nullptr) == gh);
  // No labelled pixel at all: loss 0, gradients 0.
  std::vector<uint8_t> none(lab.size(), kUnlabelled);
  auto NONE = dev(none);
  CHECK(cu::ce_loss_hard(ctx(), Z.data(), NONE.data(), n, L, V, DH.data()) == 0.0);
  CHECK(DH.to_host() == std::vector<float>(z.size(), 0.f));
}

void predict_case(CmMode mode, int L, int rank) {
  const int n = 2, R = 3;
  const int64_t V = 9 * 11;
  const bool global = mode == CmMode::Global;
  const int K = global ? L * L : cm_head_channels(mode, L, rank);
  auto z = rnd((size_t)n * L * V, 91, -3.f, 3.f);
  std::vector<float> p(z.size());
  softmax_forward(z.data(), p.data(), n, L, V);
  auto Z = dev(z);
  cu::Buffer<float> P(ctx(), p.size());
  cu::softmax_forward(ctx(), Z.data(), P.data(), n, L, V);
  char what[96];
  std::snprintf(what, sizeof what, "softmax L=%d", L);
  expect_close(what, P.to_host(), p, 1e-6);
  std::vector<std::vector<float>> raw;
  std::vector<cu::Buffer<float>> RAW;
  std::vector<const float*> raw_d;
  for (int r = 0; r < R; ++r) {
    raw.push_back(rnd(global ? (size_t)K : (size_t)n * K * V, 92 + r, -3.f, 3.f));
    RAW.push_back(dev(raw.back()));
    raw_d.push_back(RAW.back().data());
  }
  std::vector<float> cms((size_t)n * R * L * L * V), q((size_t)n * R * L * V);
  float A[kMaxClasses * kMaxClasses];
  for (int i = 0; i < n; ++i)
    for (int r = 0; r < R; ++r)
      for (int64_t v = 0; v < V; ++v) {
        if (global)
          cm_from_raw(mode, L, rank, raw[r].data(), 1, A);
        else
          cm_from_raw(mode, L, rank, raw[r].data() + (size_t)i * K * V + v, V, A);
        for (int e = 0; e < L * L; ++e) cms[(((size_t)i * R + r) * L * L + e) * V + v] = A[e];
        for (int a = 0; a < L; ++a) {
          float s = 0.f;
          for (int j = 0; j < L; ++j) s += A[a * L + j] * p[((size_t)i * L + j) * V + v];
          q[(((size_t)i * R + r) * L + a) * V + v] = s;
        }
      }
  cu::Buffer<float> CMS(ctx(), cms.size()), Q(ctx(), q.size());
  cu::cm_predict(ctx(), mode, L, rank, raw_d, P.data(), n, R, V, CMS.data(), Q.data());
  std::snprintf(what, sizeof what, "cm_predict %s L=%d cms", cm_mode_name(mode), L);
  expect_close(what, CMS.to_host(), cms, 1e-5);
  std::snprintf(what, sizeof what, "cm_predict %s L=%d annotator probs", cm_mode_name(mode), L);
  expect_close(what, Q.to_host(), q, 1e-5);
}

}  // namespace

TEST(heads_concat_ce_predict_match_cpu) {
  for (bool tf32 : {false, true}) {
    conv1_case(2, 4, 3, 13 * 17, tf32);
    conv1_case(3, 16, 16, 8 * 8 * 8, tf32);
    conv1_case(2, 32, 4, 3 * 16384 + 5, tf32);  // the weight gradient split into batches and a rest
  }
  {
    OptionsGuard guard;
    // The heads' weight and bias gradients through cuBLAS per head, then in one fused
    // pass (ContextOptions::heads_fused_weight_grad: widths 32 and 64, up to 64 rows;
    // the other cases fall back to cuBLAS either way).
    for (bool fused_wgrad : {false, true}) {
      ctx().set_heads_fused_weight_grad(fused_wgrad);
      std::printf("  -- heads' weight gradients %s\n", fused_wgrad ? "in one fused pass" : "through cuBLAS per head");
      conv1_heads_case(2, 32, {4, 16, 16, 16}, 9 * 11 * 13, false);  // brats3d-gpu's heads (fused)
      conv1_heads_case(2, 32, {4, 16, 16, 16}, 3 * 16384 + 5, false);
      conv1_heads_case(1, 8, {2, 4, 4}, 1000, false);
      conv1_heads_case(2, 16, {3, 9, 9, 9, 9, 9}, 777, false);
      conv1_heads_case(1, 64, {5, 7}, 4096 + 3, false);
      conv1_heads_case(2, 64, std::vector<int>(16, 4), 64 * 50 + 1, false);  // 64 rows: the most the fused pass takes
      conv1_heads_case(2, 64, std::vector<int>(16, 4), 3 * 16384 + 5, false); // width 64, several tiles per block
      conv1_heads_case(5, 32, {1, 2}, 4000, false);                         // 3 rows (warps without one), 5 images
      conv1_heads_case(1, 32, std::vector<int>(17, 3), 500, false);       // 17 heads: the most fused
      conv1_heads_case(1, 32, std::vector<int>(17, 4), 500, false);       // 68 rows: cuBLAS weight gradients
      conv1_heads_case(1, 32, std::vector<int>(18, 3), 500, false);       // 18: cuBLAS per head
      conv1_heads_case(2, 24, {4, 16}, 800, false);                      // width 24: cuBLAS per head
      conv1_heads_case(2, 32, {4, 16, 16, 16}, 9 * 11 * 13, true);
      conv1_heads_case(2, 32, {4, 16, 16, 16}, 3, false);  // fewer positions than a tile
    }
  }
  concat_case(2, 3, 5, 7 * 9);
  concat_case(1, 4, 4, 64);
  concat_case(3, 4, 8, 16 * 16);  // float4 path, several images
  ce_case(2, 2, 15 * 17);
  ce_case(3, 4, 33 * 31);
  ce_case(2, 6, 100);  // generic kernel
  predict_case(CmMode::Full, 3, 1);
  predict_case(CmMode::Full, 5, 1);
  predict_case(CmMode::LowRank, 4, 2);
  predict_case(CmMode::Global, 4, 1);
}

namespace {

// ---- the whole model: a Device::Cuda Model (strict fp32) against the CPU Model ---------
// Same config and seed, so the same initial parameters; every comparison is the
// max-abs error normalised by the CPU tensor's max-abs value, per tensor:
//   kStepTol   losses, every parameter gradient, weights and m after 3 Adam steps,
//              predictions (probabilities, CMs, annotator probabilities).
// Adam runs with eps = 1e-3 here: with the default 1e-8 the first update is about
// lr * sign(g), so a gradient element that is zero up to rounding could flip sign
// between backends and move a weight by 2 lr; a larger eps keeps the update a
// smooth function of the gradient (the Adam kernel itself is checked above).

constexpr double kStepTol = 1e-4;

double max_abs_rel(const std::vector<float>& gpu, const std::vector<float>& cpu) {
  double num = 0, den = 0;
  for (size_t i = 0; i < cpu.size() && i < gpu.size(); ++i) {
    num = std::max(num, std::fabs((double)gpu[i] - (double)cpu[i]));
    den = std::max(den, std::fabs((double)cpu[i]));
  }
  if (!std::isfinite(num)) return num;
  return den > 0 ? num / den : num;
}

// Prints only failures (a model has ~50 tensors); returns the error.
double expect_maxabs(const std::string& what, const std::vector<float>& gpu, const std::vector<float>& cpu,
                     double tol = kStepTol) {
  CHECK(gpu.size() == cpu.size());
  const double e = max_abs_rel(gpu, cpu);
  if (!(e <= tol)) {
    std::printf("  %-52s max-abs rel %.2e (tol %.0e)  <-- FAIL\n", what.c_str(), e, tol);
    ++check::failures();
  }
  return e;
}

enum class Target { Cm, Hard, Soft };

struct StepCase {
  std::string name;
  ModelConfig c;
  int n = 2;
  Spatial s;
  Target target = Target::Cm;
  int64_t warmup = 0;
};

struct StepData {
  std::vector<float> images, soft;
  std::vector<std::vector<uint8_t>> labels;
  std::vector<uint8_t> present, target;
  Batch batch;
};

// Random images; labels with about 10% unlabelled (255) pixels; annotator 0 absent
// from image 1 (when n > 1).
StepData make_step_data(const StepCase& k, uint32_t seed) {
  StepData d;
  const ModelConfig& c = k.c;
  const int64_t V = k.s.size(), NV = (int64_t)k.n * V;
  d.images = rnd((size_t)k.n * c.in_channels * V, seed, -2.f, 2.f);
  std::mt19937 g(seed + 1);
  auto label_map = [&] {
    std::vector<uint8_t> l((size_t)NV);
    for (auto& v : l) v = g() % 10 == 0 ? kUnlabelled : (uint8_t)(g() % c.classes);
    return l;
  };
  Batch& b = d.batch;
  b.n = k.n, b.s = k.s;
  if (k.target == Target::Hard) {
    d.target = label_map();
  } else if (k.target == Target::Soft) {
    d.soft.assign((size_t)NV * c.classes, 0.f);
    for (int i = 0; i < k.n; ++i)
      for (int64_t v = 0; v < V; ++v) {
        float sum = 0;
        std::vector<float> t(c.classes);
        for (auto& x : t) sum += (x = (float)(g() % 100 + 1));
        for (int l = 0; l < c.classes; ++l) d.soft[((size_t)i * c.classes + l) * V + v] = t[l] / sum;
      }
  } else {
    for (int r = 0; r < c.annotators; ++r) d.labels.push_back(label_map());
    d.present.assign((size_t)k.n * c.annotators, 1);
    if (k.n > 1) d.present[1 * c.annotators + 0] = 0;
  }
  b.images = d.images.data();
  if (!d.target.empty()) b.target = d.target.data();
  if (!d.soft.empty()) b.soft_target = d.soft.data();
  for (auto& l : d.labels) b.labels.push_back(l.data());
  if (!d.present.empty()) b.present = d.present.data();
  return d;
}

void setup(Model& m, const StepCase& k) {
  m.loss.lambda = 0.3f;  // a trace term large enough to matter in the gradients
  m.loss.lambda_warmup = 0.2f;
  m.loss.warmup_steps = k.warmup;
  m.optim.lr = 1e-3f;
  m.optim.eps = 1e-3f;  // see the note above
}

void compare_step_results(const std::string& what, const StepResult& g, const StepResult& c) {
  std::printf("  %-40s loss cpu %.9f gpu %.9f\n", what.c_str(), c.loss, g.loss);
  CHECK_CLOSE(g.loss, c.loss, kStepTol, 1e-7);
  CHECK(g.ce.size() == c.ce.size() && g.trace.size() == c.trace.size());
  for (size_t r = 0; r < c.ce.size() && r < g.ce.size(); ++r) {
    CHECK_CLOSE(g.ce[r], c.ce[r], kStepTol, 1e-7);
    CHECK_CLOSE(g.trace[r], c.trace[r], kStepTol, 1e-7);
  }
  CHECK(g.trace_weight == c.trace_weight);
  CHECK(g.step == c.step);
}

// The same model on the device ('cuda').
ModelConfig on_cuda(ModelConfig c) {
  c.device = Device::Cuda;
  return c;
}

void whole_step_case(const StepCase& k) {
  ModelConfig cg = on_cuda(k.c);
  cg.tf32 = false;
  Model cpu(k.c), gpu(cg);
  setup(cpu, k), setup(gpu, k);
  StepData d = make_step_data(k, 900 + (uint32_t)k.name.size());
  std::printf("  -- %s\n", k.name.c_str());

  // Forward + loss only.
  compare_step_results(k.name + ": evaluate", gpu.evaluate(d.batch), cpu.evaluate(d.batch));
  // Gradients of every parameter.
  compare_step_results(k.name + ": gradients", gpu.compute_gradients(d.batch), cpu.compute_gradients(d.batch));
  {
    const Model& gc = gpu;
    const std::vector<Param>& pg = gc.params();  // const: download only
    const std::vector<Param>& pc = cpu.params();
    CHECK(pg.size() == pc.size());
    double worst = 0;
    std::string worst_name;
    for (size_t i = 0; i < pc.size() && i < pg.size(); ++i) {
      CHECK(pg[i].name == pc[i].name);
      const double e = expect_maxabs(k.name + ": grad " + pc[i].name, pg[i].grad, pc[i].grad);
      if (e > worst) worst = e, worst_name = pc[i].name;
      // The forward pass leaves the weights alone.
      CHECK(pg[i].value == pc[i].value);
    }
    std::printf("  %-40s %zu gradients, worst max-abs rel %.2e (%s)\n", (k.name + ":").c_str(), pc.size(), worst,
                worst_name.c_str());
  }
  // Three optimiser steps (the warm-up case crosses into the positive trace).
  for (int step = 0; step < 3; ++step) {
    const StepResult rg = gpu.train_step(d.batch), rc = cpu.train_step(d.batch);
    compare_step_results(k.name + ": train step " + std::to_string(step + 1), rg, rc);
  }
  {
    const Model& gc = gpu;
    const std::vector<Param>& pg = gc.params();
    const std::vector<Param>& pc = cpu.params();
    double worst = 0;
    for (size_t i = 0; i < pc.size() && i < pg.size(); ++i) {
      worst = std::max(worst, expect_maxabs(k.name + ": after 3 steps, value " + pc[i].name, pg[i].value, pc[i].value));
      worst = std::max(worst, expect_maxabs(k.name + ": after 3 steps, m " + pc[i].name, pg[i].m, pc[i].m));
    }
    std::printf("  %-40s weights and m after 3 steps, worst max-abs rel %.2e\n", (k.name + ":").c_str(), worst);
  }
  // Prediction: probabilities, per-pixel CMs, annotator probabilities.
  const ModelConfig& c = k.c;
  const int64_t V = k.s.size();
  const size_t np = (size_t)k.n * c.classes * V, nc = (size_t)k.n * c.annotators * c.classes * c.classes * V,
               nq = (size_t)k.n * c.annotators * c.classes * V;
  std::vector<float> p_c(np), p_g(np, -1.f), cm_c(nc), cm_g(nc, -1.f), q_c(nq), q_g(nq, -1.f);
  cpu.predict(d.images.data(), k.n, k.s, p_c.data(), cm_c.data(), q_c.data());
  gpu.predict(d.images.data(), k.n, k.s, p_g.data(), cm_g.data(), q_g.data());
  const double ep = expect_maxabs(k.name + ": predict probs", p_g, p_c);
  const double ec = expect_maxabs(k.name + ": predict cms", cm_g, cm_c);
  const double eq = expect_maxabs(k.name + ": predict annotator probs", q_g, q_c);
  std::printf("  %-40s predict max-abs rel: probs %.2e, cms %.2e, annotator probs %.2e\n", (k.name + ":").c_str(), ep,
              ec, eq);
  // Probabilities only (no CM outputs) gives the same probabilities.
  std::vector<float> p_only(np, -1.f);
  gpu.predict(d.images.data(), k.n, k.s, p_only.data(), nullptr, nullptr);
  CHECK(p_only == p_g);
}

StepCase step_case(const std::string& name, int ndim, CmMode mode, int blocks, Target target = Target::Cm) {
  StepCase k;
  k.name = name;
  ModelConfig& c = k.c;
  c.ndim = ndim, c.cm_mode = mode, c.cm_rank = 2, c.cm_head_blocks = blocks, c.seed = 11;
  if (ndim == 2) {
    c.in_channels = 2, c.classes = 3, c.annotators = 3, c.depth = 3, c.base = 4;
    k.n = 2, k.s = {1, 16, 12};
  } else {
    c.in_channels = 2, c.classes = 4, c.annotators = 2, c.depth = 3, c.base = 4;
    k.n = 2, k.s = {8, 8, 12};
  }
  k.target = target;
  return k;
}

void whole_step_parity_test() {
  // ensure the device exists before models are built (a clear SKIP path is in main)
  std::vector<StepCase> cases = {
      step_case("2D full", 2, CmMode::Full, 0),
      step_case("2D full, 1 head block", 2, CmMode::Full, 1),
      step_case("2D lowrank, 1 head block", 2, CmMode::LowRank, 1),
      step_case("2D global", 2, CmMode::Global, 0),
      step_case("3D full", 3, CmMode::Full, 0),
      step_case("3D full, 1 head block", 3, CmMode::Full, 1),
      step_case("3D lowrank", 3, CmMode::LowRank, 0),
      step_case("3D global", 3, CmMode::Global, 0),
      step_case("2D plain CE, hard target", 2, CmMode::Full, 0, Target::Hard),
      step_case("3D plain CE, soft target", 3, CmMode::Full, 1, Target::Soft),
      step_case("3D global, plain CE hard", 3, CmMode::Global, 0, Target::Hard),
  };
  StepCase warm = step_case("2D full, trace warm-up 2 steps", 2, CmMode::Full, 0);
  warm.warmup = 2;
  cases.push_back(warm);
  StepCase shallow = step_case("2D full, depth 1", 2, CmMode::Full, 0);
  shallow.c.depth = 1;
  cases.push_back(shallow);
  StepCase single = step_case("3D full, one image, uniform init", 3, CmMode::Full, 0);
  single.n = 1, single.c.cm_init = CmInit::Uniform;
  cases.push_back(single);
  for (const StepCase& k : cases) whole_step_case(k);
}

}  // namespace

TEST(model_step_gpu_matches_cpu) { whole_step_parity_test(); }

// The same with conv3 through cuDNN's graph API (CMSEG_CUDNN_GRAPH=1, read when a
// model's context is made), on channels-last copies and on the NCDHW tensors.
// Set for the models made in a scope (their contexts read it), then put back as it was.
struct ScopedEnv {
  std::vector<std::pair<std::string, std::optional<std::string>>> saved;
  void put(const char* k, const char* v) {
    const char* old = std::getenv(k);
    saved.emplace_back(k, old ? std::optional<std::string>(old) : std::nullopt);
    setenv(k, v, 1);
  }
  ~ScopedEnv() {  // newest first, so a key put twice ends as it was before the first
    for (auto it = saved.rbegin(); it != saved.rend(); ++it)
      it->second ? (void)setenv(it->first.c_str(), it->second->c_str(), 1) : (void)unsetenv(it->first.c_str());
  }
};

// The same with conv3 through cuDNN's graph API (CMSEG_CUDNN_GRAPH=1) on channels-last
// copies and on the NCDHW tensors, through the legacy API without the path timed per shape
// (CMSEG_CONV_AUTOTUNE=0; the default times it), with the filter gradients on a second
// stream (CMSEG_CONV_OVERLAP=1), with the heads' weight gradients in one fused pass
// (CMSEG_HEADS_WGRAD=fused), and with the up-convolutions written straight into the concat
// buffers (CMSEG_CONCAT_IN_PLACE=1).
TEST(model_step_gpu_graph_api_matches_cpu) {
  struct Setting {
    const char *graph, *channels_last, *autotune, *overlap, *heads, *concat, *name;
  };
  for (const Setting& e :
       {Setting{"1", "1", "0", "0", "cublas", "0", "graph API on NDHWC"},
        Setting{"1", "0", "0", "0", "cublas", "0", "graph API on NCDHW"},
        Setting{"0", "1", "0", "0", "cublas", "0", "legacy API on NDHWC, path not timed"},
        Setting{"0", "1", "0", "1", "cublas", "0", "filter gradients on a second stream"},
        Setting{"0", "1", "1", "1", "cublas", "0", "path timed per shape, filter gradients on a second stream"},
        Setting{"0", "1", "1", "0", "fused", "0", "heads' weight gradients in one pass"},
        Setting{"0", "1", "1", "0", "cublas", "1", "up-convolutions written into the concat buffers"}}) {
    ScopedEnv env;
    env.put("CMSEG_CUDNN_GRAPH", e.graph), env.put("CMSEG_CONV_CHANNELS_LAST", e.channels_last);
    env.put("CMSEG_CONV_AUTOTUNE", e.autotune), env.put("CMSEG_CONV_OVERLAP", e.overlap);
    env.put("CMSEG_HEADS_WGRAD", e.heads), env.put("CMSEG_CONCAT_IN_PLACE", e.concat);
    const std::string on = std::string(", ") + e.name;
    whole_step_case(step_case("2D full" + on, 2, CmMode::Full, 0));
    whole_step_case(step_case("3D full, 1 head block" + on, 3, CmMode::Full, 1));
  }
}

// The CPU and a GPU model set up alike, then one step's gradients of each on the same
// batch (seeded).
std::pair<StepResult, StepResult> step_gradients(const StepCase& k, Model& cpu, Model& gpu, uint32_t seed) {
  setup(cpu, k), setup(gpu, k);
  StepData d = make_step_data(k, seed);
  StepResult rc = cpu.compute_gradients(d.batch);
  StepResult rg = gpu.compute_gradients(d.batch);
  return {rc, rg};
}

// Relative L2 distance of a GPU model's gradients from the CPU model's: all together,
// and the worst conv layer's weights.
struct GradientError {
  double all = 0, worst = 0;
  std::string worst_name;
};
GradientError gradient_error(const Model& gpu, const Model& cpu) {
  GradientError r;
  double num = 0, den = 0;
  for (size_t i = 0; i < cpu.params().size(); ++i) {
    const std::vector<float>& a = gpu.params()[i].grad;
    const std::vector<float>& b = cpu.params()[i].grad;
    double tn = 0, td = 0;
    for (size_t j = 0; j < b.size(); ++j) {
      const double dd = (double)a[j] - (double)b[j];
      tn += dd * dd, td += (double)b[j] * b[j];
    }
    num += tn, den += td;
    const double e = std::sqrt(tn / std::max(td, 1e-300));
    const std::string& name = cpu.params()[i].name;
    if (name.find("conv") != std::string::npos && e > r.worst) r.worst = e, r.worst_name = name;
  }
  r.all = std::sqrt(num / den);
  return r;
}

// A 'cuda' model with bf16 convolutions against the fp32 CPU model, one step: the
// loss closely, the gradients within bounds that only catch gross errors (a wrong
// layout or a dropped term gives a relative error near 1). bf16's rounding, amplified
// by the instance norms' cancellations, already moves some gradients by 10-20% in
// the host emulation of this path; conv3_bf16_close_to_cpu checks the numerics.
TEST(model_step_gpu_bf16_close_to_cpu) {
  for (int ndim : {2, 3}) {
    StepCase k = step_case(ndim == 2 ? "bf16 2D" : "bf16 3D", ndim, CmMode::Full, 0);
    ModelConfig cg = on_cuda(k.c);
    cg.bf16 = true;
    Model cpu(k.c), gpu(cg);
    const auto [rc, rg] = step_gradients(k, cpu, gpu, 91);
    std::printf("  %-40s loss cpu %.9f gpu %.9f\n", k.name.c_str(), rc.loss, rg.loss);
    CHECK_CLOSE(rg.loss, rc.loss, 1e-3, 1e-6);
    // Over all gradients together: a bias whose gradient is a near-cancelling sum
    // (instance-norm biases ahead of another instance norm) carries bf16's rounding
    // at a size comparable to its own, as it does under torch.autocast.
    const GradientError e = gradient_error(gpu, cpu);
    const bool ok = e.all <= 0.15 && e.worst <= 0.4 && std::isfinite(e.all) && std::isfinite(e.worst);
    std::printf("  %-40s all %zu gradients rel L2 %.2e (tol 0.15); worst conv weight %.2e (%s, tol 0.4)%s\n",
                k.name.c_str(), cpu.params().size(), e.all, e.worst, e.worst_name.c_str(), ok ? "" : "  <-- FAIL");
    if (!ok) ++check::failures();
  }
}

// A 3D TF32 step with conv3's filter gradients through our own kernel
// (CMSEG_CONV_WGRAD=own) against the fp32 CPU model, next to the same step with
// cuDNN's: the own kernel's gradients no further from the CPU's than twice cuDNN's, or
// than TF32's rounding where cuDNN chose FMA math (a wrong tap or channel gives an error
// near 1).
TEST(model_step_gpu_own_filter_grad_close_to_cpu) {
  const StepCase k = step_case("tf32 3D, 1 head block", 3, CmMode::Full, 1);
  GradientError err[2];
  for (int own : {0, 1}) {
    ScopedEnv env;
    env.put("CMSEG_CONV_WGRAD", own ? "own" : "cudnn");
    ModelConfig cg = on_cuda(k.c);
    cg.tf32 = true;
    Model cpu(k.c), gpu(cg);
    const auto [rc, rg] = step_gradients(k, cpu, gpu, 93);
    CHECK_CLOSE(rg.loss, rc.loss, 1e-3, 1e-6);
    const size_t runs = gpu.gpu()->context().conv_own_wgrad_runs();
    std::printf("  own kernel ran %zu filter gradient(s) of the step\n", runs);
    CHECK(own && own_wgrad_supported() ? runs > 0 : runs == 0);
    err[own] = gradient_error(gpu, cpu);
    std::printf("  %s filter gradients: loss cpu %.9f gpu %.9f; all gradients rel L2 %.2e, worst conv weight %.2e (%s)\n",
                own ? "own-kernel" : "cuDNN", rc.loss, rg.loss, err[own].all, err[own].worst,
                err[own].worst_name.c_str());
  }
  CHECK(std::isfinite(err[1].all) && std::isfinite(err[1].worst));
  CHECK(err[1].all <= std::max(2 * err[0].all, 3e-3));
  CHECK(err[1].worst <= std::max(2 * err[0].worst, 1e-2));
}

// The host copy of a GPU model's parameters follows the device (model_device.cpp).
TEST(model_param_sync) {
  StepCase k = step_case("sync", 2, CmMode::Full, 0);
  ModelConfig cg = on_cuda(k.c);
  cg.tf32 = false;
  Model cpu(k.c), gpu(cg);
  setup(cpu, k), setup(gpu, k);
  StepData d = make_step_data(k, 77);
  // An edit through find() / params() reaches the device before the next step.
  for (Model* m : {&cpu, &gpu}) {
    m->find("seg.bias")->value[1] = 0.75f;
    m->params()[0].value[3] = -0.5f;  // enc.0.conv1.weight
  }
  compare_step_results("sync: gradients after a host edit", gpu.compute_gradients(d.batch),
                       cpu.compute_gradients(d.batch));
  {
    const Model& gc = gpu;
    CHECK(gc.params()[0].value[3] == -0.5f);
    const Param* pb = nullptr;
    for (const Param& p : gc.params())
      if (p.name == "seg.bias") pb = &p;
    CHECK(pb && pb->value[1] == 0.75f);
    expect_maxabs("sync: grad enc.0.conv1.weight", gc.params()[0].grad, cpu.params()[0].grad);
  }
  // Host-set gradients and moments are uploaded for apply_optimizer.
  for (size_t i = 0; i < cpu.params().size(); ++i) {
    const auto g = rnd(cpu.params()[i].grad.size(), 300 + (uint32_t)i);
    cpu.params()[i].grad = g;
    gpu.params()[i].grad = g;
  }
  cpu.apply_optimizer(), gpu.apply_optimizer();
  CHECK(gpu.step == 1 && cpu.step == 1);
  for (size_t i = 0; i < cpu.params().size(); ++i) {
    expect_maxabs("sync: value after host gradients " + cpu.params()[i].name, gpu.params()[i].value,
                  cpu.params()[i].value, 1e-6);
    expect_maxabs("sync: v after host gradients " + cpu.params()[i].name, gpu.params()[i].v, cpu.params()[i].v, 1e-6);
  }
  // A step after reads: the values stay in step with the CPU.
  compare_step_results("sync: train step after reads", gpu.train_step(d.batch), cpu.train_step(d.batch));
  const Model& gc = gpu;
  for (size_t i = 0; i < cpu.params().size(); ++i)
    expect_maxabs("sync: value after a step " + cpu.params()[i].name, gc.params()[i].value, cpu.params()[i].value);
  // Names and shapes without a download.
  CHECK(gpu.param_layout().size() == cpu.params().size());
}

// A gradient whose square overflows float32: the device skips the update (weights and
// moments unchanged), and the next call that reads the device says so by name, with
// the step count back to before the refused step; training then goes on.
TEST(model_gpu_refuses_unsquarable_gradient) {
  StepCase k = step_case("refuse", 2, CmMode::Full, 0);
  ModelConfig cg = on_cuda(k.c);
  cg.tf32 = false;
  Model gpu(cg);
  setup(gpu, k);
  StepData d = make_step_data(k, 31);
  gpu.train_step(d.batch);  // one good step first: moments nonzero
  const std::vector<Param> before = static_cast<const Model&>(gpu).params();
  gpu.loss.lambda = 1e30f;  // the trace term's gradient in the CM heads is far past 1.8e19
  gpu.train_step(d.batch);  // returns: the device's verdict is not waited for
  CHECK(gpu.step == 2);
  // The next step reports it (before its backward) and counts the step back.
  CHECK_THROWS_WITH(gpu.train_step(d.batch), "optimiser step 2 was not applied: the gradient of enc.0.conv1.weight[");
  CHECK(gpu.step == 1);
  const std::vector<Param>& after = static_cast<const Model&>(gpu).params();
  for (size_t i = 0; i < before.size(); ++i) {
    CHECK(after[i].value == before[i].value);
    CHECK(after[i].m == before[i].m);
    CHECK(after[i].v == before[i].v);
  }
  // A read of the weights reports it too (the last step of a run, then a checkpoint).
  gpu.train_step(d.batch);
  CHECK(gpu.step == 2);
  CHECK_THROWS_WITH(static_cast<const Model&>(gpu).params(), "its square overflows float32");
  CHECK(gpu.step == 1);
  // Reported once; with a sane lambda the model trains on, and agrees with a CPU model
  // that took the same one good step.
  setup(gpu, k);  // lambda back to 0.3
  Model cpu(k.c);
  setup(cpu, k);
  cpu.train_step(d.batch);
  compare_step_results("refuse: a good step after", gpu.train_step(d.batch), cpu.train_step(d.batch));
  CHECK(gpu.step == 2);
  for (size_t i = 0; i < before.size(); ++i) {
    const Model& gc = gpu;
    CHECK(std::isfinite(gc.params()[i].v[0]));
    expect_maxabs("refuse: value " + cpu.params()[i].name, gc.params()[i].value, cpu.params()[i].value, 1e-5);
  }
}

// ---- failures part-way through, each followed by the next valid call against the CPU.
// The CPU model is the truth: a refused CPU step throws at once, a GPU step
// at the model's next call that reads the device; after either, the two models must hold
// the same weights, Adam moments and step count, and train on alike.

// Every value, m and v of a GPU model against a CPU model's, and the step counts.
void expect_same_state(const std::string& what, const Model& gpu, const Model& cpu, double tol = kStepTol) {
  CHECK(gpu.step == cpu.step);
  const std::vector<Param>& pg = gpu.params();
  const std::vector<Param>& pc = cpu.params();
  CHECK(pg.size() == pc.size());
  for (size_t i = 0; i < pc.size() && i < pg.size(); ++i) {
    expect_maxabs(what + ": value " + pc[i].name, pg[i].value, pc[i].value, tol);
    expect_maxabs(what + ": m " + pc[i].name, pg[i].m, pc[i].m, tol);
    expect_maxabs(what + ": v " + pc[i].name, pg[i].v, pc[i].v, tol);
  }
}

// What a message says about the gradient, "the gradient of NAME[K] is G": NAME[K], and G
// (the CPU's and the GPU's words around it differ, and on a device G's last digits may).
struct GradientWords {
  std::string where;  // "NAME[K]"
  double value = 0;   // NaN for "NaN"
};
GradientWords gradient_words(const std::string& message) {
  GradientWords w;
  const std::string lead = "the gradient of ";
  const size_t a = message.find(lead), is = message.find(" is ", a);
  if (a == std::string::npos || is == std::string::npos) {
    w.where = "(no gradient named in '" + message + "')";
    return w;
  }
  w.where = message.substr(a + lead.size(), is - a - lead.size());
  w.value = message.compare(is + 4, 3, "NaN") == 0 ? std::nan("") : std::strtod(message.c_str() + is + 4, nullptr);
  return w;
}
bool same_gradient_words(const std::string& gpu, const std::string& cpu) {
  const GradientWords g = gradient_words(gpu), c = gradient_words(cpu);
  const bool value = std::isnan(c.value) ? std::isnan(g.value) : check::close(g.value, c.value, 1e-3, 0);
  return g.where == c.where && value;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "(did not throw)";
}

// A refused update (the trace term's gradient past 1.8e19, or NaN gradients from an
// overflowed forward pass), then each of the calls a user makes next: an edit of the
// weights (setWeights: find() / non-const params()), a prediction, an evaluation, a step.
// The refusal quotes the CPU's gradient (same parameter, index and value), the state is
// the CPU's, and the next valid step and prediction are the CPU's.
// Also a 3D global-CM model (its CM gradient written by the loss) under Adam's L2 weight
// decay (the guard reads g + wd * w).
TEST(model_gpu_refuses_unsquarable_gradient_then_next_call_matches_cpu) {
  enum class Next { Edit, Predict, Evaluate, Step, Gradients };
  for (const bool global : {false, true})
  for (const bool nan_loss : {false, true})
    for (const Next next : {Next::Edit, Next::Predict, Next::Evaluate, Next::Step, Next::Gradients}) {
      const char* nn[] = {"edit", "predict", "evaluate", "step", "gradients"};
      const std::string what = std::string(global ? "3D global, " : "2D full, ") +
                               (nan_loss ? "NaN loss" : "unsquarable") + ", then " + nn[(int)next];
      StepCase k = global ? step_case("refusal", 3, CmMode::Global, 0) : step_case("refusal", 2, CmMode::Full, 0);
      k.warmup = 2;  // the trace weight's sign flips at step 2: the step count must be the CPU's
      ModelConfig cg = on_cuda(k.c);
      cg.tf32 = false;
      Model cpu(k.c), gpu(cg);
      setup(cpu, k), setup(gpu, k);
      if (global) cpu.optim.weight_decay = gpu.optim.weight_decay = 1e-2f;
      StepData d = make_step_data(k, 41);
      compare_step_results(what + ": good step", gpu.train_step(d.batch), cpu.train_step(d.batch));
      // The bad step.
      for (Model* m : {&cpu, &gpu}) {
        if (nan_loss)
          m->find("seg.weight")->value[0] = 3e38f;  // logits overflow: loss and gradients NaN
        else
          m->loss.lambda = m->loss.lambda_warmup = 1e30f;  // in the warm-up, its weight
      }
      const std::string cpu_error = error_of([&] { cpu.train_step(d.batch); });
      CHECK(cpu.step == 1);
      const StepResult bad = gpu.train_step(d.batch);  // the device's verdict comes later
      if (nan_loss) CHECK(!std::isfinite(bad.loss));
      CHECK(gpu.step == 2);
      // Undo the cause on both (the GPU's host copy is edited after the report below).
      for (Model* m : {&cpu, &gpu}) setup(*m, k);
      std::string gpu_error;
      const int64_t V = k.s.size();
      const size_t np = (size_t)k.n * k.c.classes * V, nc = (size_t)k.n * k.c.annotators * k.c.classes * k.c.classes * V;
      switch (next) {
        case Next::Edit:
          gpu_error = error_of([&] { gpu.find("seg.bias"); });
          break;
        case Next::Predict: {
          // Reads valid weights (those before the refused step: the CPU's; in the NaN case
          // both hold the overflowing weight, so NaN), no report yet.
          std::vector<float> p_c(np), p_g(np, -1.f), cm_c(nc), cm_g(nc, -1.f);
          cpu.predict(d.images.data(), k.n, k.s, p_c.data(), cm_c.data(), nullptr);
          gpu.predict(d.images.data(), k.n, k.s, p_g.data(), cm_g.data(), nullptr);
          if (!nan_loss) {
            expect_maxabs(what + ": probs", p_g, p_c);
            expect_maxabs(what + ": cms", cm_g, cm_c);
          }
          gpu_error = error_of([&] { gpu.train_step(d.batch); });
          break;
        }
        case Next::Evaluate:
          gpu_error = error_of([&] { gpu.evaluate(d.batch); });
          break;
        case Next::Step:
          gpu_error = error_of([&] { gpu.train_step(d.batch); });
          break;
        case Next::Gradients:
          gpu_error = error_of([&] { gpu.compute_gradients(d.batch); });
          break;
      }
      std::printf("  %s:\n    cpu: %s\n    gpu: %s\n", what.c_str(), cpu_error.c_str(), gpu_error.c_str());
      CHECK(gpu_error.find("optimiser step 2 was not applied") != std::string::npos);
      CHECK(same_gradient_words(gpu_error, cpu_error));
      CHECK(gpu.step == 1);
      // An edit on both (a setWeights), undoing the overflowing weight of the NaN case.
      for (Model* m : {&cpu, &gpu}) {
        if (nan_loss) m->find("seg.weight")->value[0] = 0.125f;
        m->find("seg.bias")->value[1] = 0.75f;
      }
      expect_same_state(what + ": after the refusal", gpu, cpu);
      for (int more = 0; more < 2; ++more)  // into the positive trace weight
        compare_step_results(what + ": a next step", gpu.train_step(d.batch), cpu.train_step(d.batch));
      expect_same_state(what + ": after the next steps", gpu, cpu);
      std::vector<float> p_c(np), p_g(np, -1.f);
      cpu.predict(d.images.data(), k.n, k.s, p_c.data(), nullptr, nullptr);
      gpu.predict(d.images.data(), k.n, k.s, p_g.data(), nullptr, nullptr);
      expect_maxabs(what + ": probs after", p_g, p_c);
    }
}

// Out of memory at each point of a step (the forward, the loss, the backward: the limit
// walked across the big batch's peak), then a step that fits: the model is the CPU's,
// and holds no more memory than its parameters after the failure. Also with a refused
// update pending when the failure comes.
TEST(model_gpu_out_of_memory_mid_step_then_matches_cpu) {
  ScopedEnv env;
  env.put("CMSEG_CONV_AUTOTUNE", "0");
  StepCase small = step_case("oom mid-step", 2, CmMode::Full, 1);
  StepCase big = small;
  big.n = 4, big.s = {1, 32, 24};
  ModelConfig cg = on_cuda(small.c);
  cg.tf32 = false;
  StepData ds = make_step_data(small, 51), db = make_step_data(big, 52);
  size_t params_bytes = 0, small_peak = 0, big_peak = 0;
  {
    Model probe(cg);
    setup(probe, small);
    params_bytes = probe.gpu()->context().pool_stats().in_use_bytes;
    probe.train_step(ds.batch);
    probe.train_step(ds.batch);
    small_peak = probe.gpu()->context().pool_stats().peak_in_use_bytes;
    probe.release_buffers();
    probe.gpu()->context().reset_peak();
    probe.train_step(db.batch);
    big_peak = probe.gpu()->context().pool_stats().peak_in_use_bytes;
  }
  std::printf("  parameters %zu bytes, small step peak %zu, big step peak %zu\n", params_bytes, small_peak, big_peak);
  CHECK(big_peak > small_peak);
  const int kLimits = 8;
  for (const int refusal : {0, 1})
    for (int i = 0; i < kLimits; ++i) {
      int pending = refusal;  // 2 once the refusal has been reported
      const size_t limit = small_peak + (big_peak - small_peak) * i / kLimits;
      const std::string what = "oom at " + std::to_string(limit) + (pending ? ", refusal pending" : "");
      cg.gpu_memory_limit = limit;
      Model cpu(small.c), gpu(cg);
      setup(cpu, small), setup(gpu, small);
      compare_step_results(what + ": step 1", gpu.train_step(ds.batch), cpu.train_step(ds.batch));
      if (pending) {
        for (Model* m : {&cpu, &gpu}) m->loss.lambda = 1e30f;
        CHECK_THROWS_WITH(cpu.train_step(ds.batch), "its square overflows");
        gpu.train_step(ds.batch);
        for (Model* m : {&cpu, &gpu}) setup(*m, small);
      }
      std::string e = error_of([&] { gpu.train_step(db.batch); });
      if (pending && e.find("optimiser step 2 was not applied") != std::string::npos) {
        // The big step's forward fitted, and its wait for the loss read the refusal first
        // (reported once, the step count back): the same batch again runs out of memory.
        CHECK(gpu.step == 1);
        pending = 2;
        e = error_of([&] { gpu.train_step(db.batch); });
      }
      if (e == "(did not throw)") {
        // On a device the algorithms timed under the limit may need less workspace than
        // the probe's: the big step fitted. Then the CPU takes it too.
        std::printf("  %s: the big step fitted\n", what.c_str());
        CHECK(cu::device_info(0).name != "host emulation (no GPU)");  // the emulation's peak is exact
        cpu.train_step(db.batch);
      } else if (e.find("GPU out of memory") == std::string::npos) {
        std::printf("  %s: the big step's error '%s'\n", what.c_str(), e.c_str());
        ++check::failures();
      } else {
        CHECK(gpu.gpu()->context().pool_stats().in_use_bytes == params_bytes);
      }
      // A prediction of the big batch under the same limit: out of memory too, or it fits;
      // either way the pool holds the parameters and what predict keeps, and the model
      // carries on as the CPU's.
      {
        const size_t np = (size_t)big.n * big.c.classes * big.s.size();
        const size_t nc = np / big.c.classes * big.c.annotators * big.c.classes * big.c.classes;
        std::vector<float> p_g(np), cm_g(nc);
        const std::string pe =
            error_of([&] { gpu.predict(db.images.data(), big.n, big.s, p_g.data(), cm_g.data(), nullptr); });
        if (pe.find("GPU out of memory") != std::string::npos)
          CHECK(gpu.gpu()->context().pool_stats().in_use_bytes == params_bytes);
        else
          CHECK(pe == "(did not throw)");
        gpu.release_buffers();
      }
      if (pending == 1) {
        // The refusal is still to be reported, by the next call; then the models agree.
        CHECK_THROWS_WITH(gpu.train_step(ds.batch), "optimiser step 2 was not applied");
      }
      expect_same_state(what + ": after the failure", gpu, cpu);
      compare_step_results(what + ": a step that fits", gpu.train_step(ds.batch), cpu.train_step(ds.batch));
      expect_same_state(what + ": after it", gpu, cpu);
    }
}

// Batches of other shapes and sizes between steps (the buffers grow, and are reused
// when the next is smaller), predictions of another size between them: every step
// and prediction the CPU's.
TEST(model_step_gpu_shape_changes_match_cpu) {
  for (int ndim : {2, 3}) {
    StepCase a = step_case(ndim == 2 ? "shapes 2D" : "shapes 3D", ndim, CmMode::Full, 1);
    StepCase b = a, c = a;
    if (ndim == 2)
      b.n = 1, b.s = {1, 24, 20}, c.n = 3, c.s = {1, 8, 16};
    else
      b.n = 1, b.s = {12, 8, 8}, c.n = 3, c.s = {4, 8, 4};
    ModelConfig cg = on_cuda(a.c);
    cg.tf32 = false;
    Model cpu(a.c), gpu(cg);
    setup(cpu, a), setup(gpu, a);
    StepData da = make_step_data(a, 61), dbb = make_step_data(b, 62), dc = make_step_data(c, 63);
    int step = 0;
    for (const auto* p : {&a, &b, &a, &c, &b, &a}) {
      const StepData& d = p == &a ? da : p == &b ? dbb : dc;
      const std::string what = a.name + ": step " + std::to_string(++step);
      compare_step_results(what, gpu.train_step(d.batch), cpu.train_step(d.batch));
      // A prediction of another batch between steps.
      const StepCase& q = p == &a ? c : a;
      const StepData& dq = p == &a ? dc : da;
      const int64_t V = q.s.size();
      const size_t np = (size_t)q.n * q.c.classes * V, nq = (size_t)q.n * q.c.annotators * q.c.classes * V;
      std::vector<float> p_c(np), p_g(np, -1.f), q_c(nq), q_g(nq, -1.f);
      cpu.predict(dq.images.data(), q.n, q.s, p_c.data(), nullptr, q_c.data());
      gpu.predict(dq.images.data(), q.n, q.s, p_g.data(), nullptr, q_g.data());
      expect_maxabs(what + ": probs", p_g, p_c);
      expect_maxabs(what + ": annotator probs", q_g, q_c);
    }
    // Plain cross-entropy batches (a hard target, a soft one) between CM batches, on the
    // same model: other batch buffers, the CM heads skipped.
    StepCase h = b, so = c;
    h.target = Target::Hard, so.target = Target::Soft;
    StepData dh = make_step_data(h, 64), dso = make_step_data(so, 65);
    compare_step_results(a.name + ": hard target", gpu.train_step(dh.batch), cpu.train_step(dh.batch));
    compare_step_results(a.name + ": CM labels", gpu.train_step(da.batch), cpu.train_step(da.batch));
    compare_step_results(a.name + ": soft target", gpu.train_step(dso.batch), cpu.train_step(dso.batch));
    compare_step_results(a.name + ": hard target again", gpu.train_step(dh.batch), cpu.train_step(dh.batch));
    // Gradients of one batch, an evaluation of another shape, then the update: the
    // evaluation leaves the gradients alone on both.
    compare_step_results(a.name + ": gradients", gpu.compute_gradients(da.batch), cpu.compute_gradients(da.batch));
    compare_step_results(a.name + ": evaluate between", gpu.evaluate(dc.batch), cpu.evaluate(dc.batch));
    gpu.apply_optimizer(), cpu.apply_optimizer();
    // Eleven steps of rounding apart: m of a weight whose gradients nearly cancel drifts most.
    expect_same_state(a.name + ": after the steps", gpu, cpu, 1e-3);
  }
}

#if CMSEG_HAVE_CUDA
// The context's per-shape caches (cuDNN's algorithms, graph plans, conv_autotune's paths)
// kept every shape forever; now each is a least-recently-used map of at most
// CMSEG_CUDA_CACHE_ENTRIES (256) entries (native/cuda/shape_cache.hpp). Named model_step_gpu_*
// so that the emulated build's ctest selection (CMakeLists.txt) runs them.
// First the map itself: the eviction order, a refused entry (null plan) evicted and
// re-chosen, a plan a caller holds surviving its eviction, the capacity's text.
TEST(model_step_gpu_shape_cache_lru) {
  cu::ShapeCache<int, int> c(3);
  for (int k = 1; k <= 5; ++k) c.put(k, 10 * k);
  CHECK(c.size() == 3 && c.added() == 5 && c.evicted() == 2);
  CHECK(!c.find(1) && !c.find(2));                     // the two least recently used went
  CHECK(c.find(3) && *c.find(3) == 30);                // a hit: 3 is now the most recent
  c.put(6, 60);                                        // evicts 4 (least recent), not 3
  CHECK(!c.find(4) && c.find(3) && c.find(5) && c.find(6));
  c.put(6, 66);                                        // a replacement, not a new entry
  CHECK(c.size() == 3 && c.added() == 6 && *c.find(6) == 66);
  std::vector<int> order;
  c.for_each([&](int k, int) { order.push_back(k); });  // most recent first, order untouched
  CHECK((order == std::vector<int>{6, 5, 3}));
  c.set_capacity(1);  // lowering it evicts at once, the most recent stays
  CHECK(c.size() == 1 && c.find(6) && !c.find(5));
  c.set_capacity(0);
  CHECK(c.capacity() == 1);

  // Plans: null is a refusal (the legacy path runs). Evicted, it is absent again, so the
  // next call chooses again and may store a plan; a plan a caller still holds lives on.
  cu::ShapeCache<int, std::shared_ptr<int>> plans(2);
  plans.put(1, nullptr);
  CHECK(plans.find(1) && !*plans.find(1));  // cached refusal
  auto held = std::make_shared<int>(7);
  std::weak_ptr<int> dropped;
  {
    auto p3 = std::make_shared<int>(3);
    dropped = p3;
    plans.put(2, held), plans.put(3, p3);  // evicts the refusal
  }
  CHECK(!plans.find(1));
  plans.put(1, std::make_shared<int>(1));  // re-seen: chosen again, a plan this time
  CHECK(plans.find(1) && *plans.find(1) && **plans.find(1) == 1);
  plans.put(4, std::make_shared<int>(4));  // evicts 2 (held by us) and then 3 on the next
  plans.put(5, std::make_shared<int>(5));
  CHECK(!plans.find(2) && !plans.find(3));
  CHECK(*held == 7 && held.use_count() == 1);  // evicted while held: intact, ours alone
  CHECK(dropped.expired());                    // evicted and unheld: destroyed

  CHECK(cu::parse_cache_entries("3", 256) == 3);
  CHECK(cu::parse_cache_entries("1", 256) == 1);
  CHECK(cu::parse_cache_entries(nullptr, 256) == 256);
  CHECK(cu::parse_cache_entries("", 256) == 256);
  for (const char* bad : {"0", "-2", "12abc", "x"}) CHECK(cu::parse_cache_entries(bad, 256) == 256);
  // A new context's caches start at CMSEG_CUDA_CACHE_ENTRIES (256 when unset).
  cu::Context fresh;
  CHECK(cu::conv_cache_stats(fresh).capacity ==
        cu::parse_cache_entries(std::getenv("CMSEG_CUDA_CACHE_ENTRIES"), cu::kShapeCacheCapacity));
}

// conv3 on one context capped at 3 entries, over 5 shapes: every cache holds at most 3,
// the most recent shape is a hit (nothing chosen again), the first one was evicted
// (chosen again when it comes back), and every result is the CPU reference's.
TEST(model_step_gpu_conv_caches_capped_match_cpu) {
  cu::Context c;  // its own context: the other cases' ctx() keeps the default capacity
  c.set_tf32(false);
  cu::set_conv_cache_capacity(c, 3);
  const size_t fallbacks0 = c.conv_fallbacks();
  auto added = [&] {
    const cu::ConvCacheStats st = cu::conv_cache_stats(c);
    return st.added[0] + st.added[1] + st.added[2];
  };
  const int n = 1, cin = 2, cout = 3, nd = 2;
  const Spatial shapes[] = {{1, 6, 5}, {1, 7, 5}, {1, 8, 6}, {1, 5, 9}, {1, 9, 4}};
  auto forward = [&](int k) {
    const Spatial s = shapes[k];
    const size_t V = (size_t)s.size();
    const auto x = rnd(n * cin * V, 100 + k), w = rnd(cout * cin * conv3_taps(nd), 200 + k, -0.3f, 0.3f);
    std::vector<float> y_cpu(n * cout * V), y_gpu(y_cpu.size(), -1.f);
    conv3_forward(x.data(), w.data(), y_cpu.data(), n, cin, cout, s, nd);
    cu::Buffer<float> dx(c, x.size()), dw(c, w.size()), dy(c, y_gpu.size());
    c.upload(dx.data(), x.data(), x.size() * sizeof(float));
    c.upload(dw.data(), w.data(), w.size() * sizeof(float));
    cu::conv3_forward(c, dx.data(), dw.data(), dy.data(), n, cin, cout, s, nd);
    c.download(y_gpu.data(), dy.data(), y_gpu.size() * sizeof(float));
    expect_close(("capped caches: conv3 forward " + std::to_string(s.h) + "x" + std::to_string(s.w)).c_str(), y_gpu,
                 y_cpu, 1e-4);
  };
  for (int k = 0; k < 5; ++k) forward(k);
  cu::ConvCacheStats st = cu::conv_cache_stats(c);
  std::printf("  capacity %zu: entries %zu %zu %zu, added %zu %zu %zu, evicted %zu %zu %zu\n", st.capacity,
              st.entries[0], st.entries[1], st.entries[2], st.added[0], st.added[1], st.added[2], st.evicted[0],
              st.evicted[1], st.evicted[2]);
  CHECK(st.capacity == 3);
  for (int i = 0; i < 3; ++i) CHECK(st.entries[i] <= 3);
  // 5 shapes made 5 entries or more in some cache (which ones depends on the paths the
  // environment's CMSEG_CONV_* settings leave; the emulation fills [0]).
  const size_t fullest = std::max({st.entries[0], st.entries[1], st.entries[2]});
  CHECK(fullest == 3 && st.evicted[0] + st.evicted[1] + st.evicted[2] >= 2);
  const size_t before = added();
  forward(4);  // the most recent shape: found in every cache
  CHECK(added() == before);
  forward(0);  // the first shape: evicted, chosen again, still right
  CHECK(added() > before);
  st = cu::conv_cache_stats(c);
  for (int i = 0; i < 3; ++i) CHECK(st.entries[i] <= 3);
  CHECK(c.conv_fallbacks() >= fallbacks0);  // counted as recorded: an eviction does not lower it
}

// A GPU model whose caches hold 3 entries (far fewer than one step's convolutions):
// steps and predictions of several sizes, each shape's choices evicted before it comes
// back, every result the CPU's.
TEST(model_step_gpu_capped_caches_shapes_match_cpu) {
  StepCase a = step_case("capped caches 2D", 2, CmMode::Full, 0);
  StepCase b = a, c = a;
  b.n = 1, b.s = {1, 24, 20}, c.n = 3, c.s = {1, 8, 16};
  ModelConfig cg = on_cuda(a.c);
  cg.tf32 = false;
  Model cpu(a.c), gpu(cg);
  setup(cpu, a), setup(gpu, a);
  cu::set_conv_cache_capacity(gpu.gpu()->context(), 3);
  const StepData da = make_step_data(a, 71), db = make_step_data(b, 72), dc = make_step_data(c, 73);
  int step = 0;
  for (const auto* p : {&a, &b, &c, &a, &b}) {
    const StepData& d = p == &a ? da : p == &b ? db : dc;
    const std::string what = a.name + ": step " + std::to_string(++step);
    compare_step_results(what, gpu.train_step(d.batch), cpu.train_step(d.batch));
    const int64_t V = p->s.size();
    const size_t np = (size_t)p->n * p->c.classes * V;
    std::vector<float> p_c(np), p_g(np, -1.f);
    cpu.predict(d.images.data(), p->n, p->s, p_c.data(), nullptr, nullptr);
    gpu.predict(d.images.data(), p->n, p->s, p_g.data(), nullptr, nullptr);
    expect_maxabs(what + ": predict probs", p_g, p_c);
  }
  expect_same_state(a.name + ": after the steps", gpu, cpu, 1e-3);
  const cu::ConvCacheStats st = cu::conv_cache_stats(gpu.gpu()->context());
  std::printf("  model, capacity %zu: entries %zu %zu %zu, evicted %zu %zu %zu\n", st.capacity, st.entries[0],
              st.entries[1], st.entries[2], st.evicted[0], st.evicted[1], st.evicted[2]);
  for (int i = 0; i < 3; ++i) CHECK(st.entries[i] <= 3);
  CHECK(std::max({st.entries[0], st.entries[1], st.entries[2]}) == 3 &&
        st.evicted[0] + st.evicted[1] + st.evicted[2] > 0);
}
#endif

// A GPU model rejects what the CPU model rejects, before any device work.
TEST(model_gpu_validates) {
  StepCase k = step_case("validate", 2, CmMode::Full, 0);
  ModelConfig cg = on_cuda(k.c);
  Model gpu(cg);
  StepData d = make_step_data(k, 5);
  d.labels[1][7] = 9;
  CHECK_THROWS_WITH(gpu.train_step(d.batch), "labels of annotator 1");
  d.labels[1][7] = 0;
  d.images[3] = std::nanf("");
  CHECK_THROWS_WITH(gpu.train_step(d.batch), "NaN");
  ModelConfig many = cg;
  many.annotators = 17;
  CHECK_THROWS_WITH(Model{many}, "at most 16 annotators");
}

// GPU out of memory: a clear error, the failed step gives its memory back, and a
// batch that fits runs afterwards. The per-model limit stands in for a full device
// (the same allocator path throws in both cases).
TEST(model_gpu_out_of_memory) {
  // One conv3 path for every model here, so that the probe's peak is the others' (the
  // paths timed per shape pick by timing, and differ in memory); the end checks the
  // timed choice under the same limit.
  ScopedEnv env;
  env.put("CMSEG_CONV_AUTOTUNE", "0");
  StepCase small = step_case("oom", 2, CmMode::Full, 0);
  StepCase big = small;
  big.n = 8, big.s = {1, 64, 48};  // 64x the pixels of `small`
  ModelConfig cg = on_cuda(small.c);
  cg.gpu_memory_limit = 1024;  // less than the parameters: construction fails
  CHECK_THROWS_WITH(Model{cg}, "GPU out of memory");
  CHECK_THROWS_WITH(Model{cg}, "limit of 1.0 KiB (gpuMemoryLimitMB)");  // not "0.0 MiB"
  // What a small step needs at most, measured without a limit.
  cg.gpu_memory_limit = 0;
  StepData ds = make_step_data(small, 5), db = make_step_data(big, 6);
  size_t params_bytes = 0, small_peak = 0;
  {
    Model probe(cg);
    params_bytes = probe.gpu()->context().pool_stats().in_use_bytes;
    probe.train_step(ds.batch);  // chooses the convolution algorithms (timing workspaces)
    probe.gpu()->context().reset_peak();
    probe.train_step(ds.batch);  // what a step then holds
    small_peak = probe.gpu()->context().pool_stats().peak_in_use_bytes;
  }
  cg.gpu_memory_limit = small_peak + 4096;
  Model gpu(cg);
  CHECK(gpu.gpu()->context().pool_stats().in_use_bytes == params_bytes);
  CHECK_THROWS_WITH(gpu.train_step(db.batch), "GPU out of memory");
  CHECK(gpu.gpu()->context().pool_stats().in_use_bytes == params_bytes);  // the failed step gave back what it took
  CHECK(gpu.step == 0);                                                    // and took no optimiser step
  const StepResult r = gpu.train_step(ds.batch);                           // a batch that fits still runs
  CHECK(std::isfinite(r.loss) && gpu.step == 1);
  // With the path timed per shape, the same limit: paths that need more memory than it
  // leaves drop out of the timing, and the step runs on one that fits.
  env.put("CMSEG_CONV_AUTOTUNE", "1");
  Model timed(cg);
  const StepResult rt = timed.train_step(ds.batch);
  CHECK(std::isfinite(rt.loss) && timed.step == 1);
}

// After a training step a GPU model holds its parameters (values, gradients, two
// moments) and the uploaded batches (one per staging slot used so far: a run
// alternates two), nothing else: the backward gave every activation, gradient and
// scratch array back to the pool. Also after a step with head blocks.
TEST(model_gpu_releases_step_buffers) {
  for (int blocks : {0, 1}) {
    StepCase k = step_case(blocks ? "release, head block" : "release", 3, CmMode::Full, blocks);
    ModelConfig cg = on_cuda(k.c);
    Model gpu(cg);
    setup(gpu, k);
    const size_t params_bytes = gpu.gpu()->context().pool_stats().in_use_bytes;
    StepData d = make_step_data(k, 13);
    const size_t NV = (size_t)k.n * k.s.size();
    const size_t batch_bytes = d.images.size() * sizeof(float) + (size_t)k.c.annotators * NV + d.present.size();
    for (int step = 0; step < 3; ++step) {
      gpu.train_step(d.batch);
      const cu::PoolStats ps = gpu.gpu()->context().pool_stats();
      const size_t slots = std::min(step + 1, cu::Context::kStageSlots);
      std::printf("  %-28s step %d: in use %zu bytes = parameters %zu + %zu x batch %zu; peak %zu\n", k.name.c_str(),
                  step, ps.in_use_bytes, params_bytes, slots, batch_bytes, ps.peak_in_use_bytes);
      CHECK(ps.in_use_bytes == params_bytes + slots * batch_bytes);
    }
  }
}

// Model::release_buffers() on a GPU model (ensemble members between predictions): every
// activation, batch slot and prediction buffer goes back to the pool (in use: the
// parameters alone), and the steps and predictions after it match a model that kept them.
TEST(model_gpu_release_buffers) {
  StepCase k = step_case("release_buffers", 3, CmMode::Full, 1);
  ModelConfig cg = on_cuda(k.c);
  Model kept(cg), released(cg);
  setup(kept, k), setup(released, k);
  const size_t params_bytes = released.gpu()->context().pool_stats().in_use_bytes;
  StepData d = make_step_data(k, 17);
  const int64_t V = k.s.size();
  const size_t np = (size_t)k.n * k.c.classes * V, nc = (size_t)k.n * k.c.annotators * k.c.classes * k.c.classes * V;
  for (int step = 0; step < 2; ++step) {
    compare_step_results("release_buffers: step " + std::to_string(step), released.train_step(d.batch),
                         kept.train_step(d.batch));
    std::vector<float> p_k(np), p_r(np, -1.f), cm_k(nc), cm_r(nc, -1.f);
    kept.predict(d.images.data(), k.n, k.s, p_k.data(), cm_k.data(), nullptr);
    released.predict(d.images.data(), k.n, k.s, p_r.data(), cm_r.data(), nullptr);
    expect_maxabs("release_buffers: probs", p_r, p_k);
    expect_maxabs("release_buffers: cms", cm_r, cm_k);
    released.release_buffers();
    const size_t in_use = released.gpu()->context().pool_stats().in_use_bytes;
    std::printf("  release_buffers step %d: in use %zu bytes, parameters %zu\n", step, in_use, params_bytes);
    CHECK(in_use == params_bytes);
  }
}

// The SPEC brats3d-gpu step (2 x 4 x 128^3, depth 4, c 32, L 4, R 3, cm full,
// lambda 0.01), TF32 on: whole-step time, waited for on the device.
TEST(model_step_brats3d_gpu_timing) {
  ModelConfig c;
  c.ndim = 3, c.in_channels = 4, c.classes = 4, c.annotators = 3, c.depth = 4, c.base = 32;
  c.cm_mode = CmMode::Full, c.device = Device::Cuda;
  const int n = 2;
  const Spatial s{128, 128, 128};
  const int64_t V = s.size();
  Model m(c);
  m.loss.lambda = 0.01f;
  std::vector<float> images = fast_fill((size_t)n * c.in_channels * V, 21);
  std::vector<std::vector<uint8_t>> labels(c.annotators, std::vector<uint8_t>((size_t)n * V));
  for (int r = 0; r < c.annotators; ++r)
    for (size_t i = 0; i < labels[r].size(); ++i) labels[r][i] = (uint8_t)((i * 2654435761u + r) >> 28) % c.classes;
  Batch b;
  b.n = n, b.s = s, b.images = images.data();
  for (auto& l : labels) b.labels.push_back(l.data());
  std::vector<double> ms;
  for (int step = 0; step <= 3; ++step) {
    const auto t0 = std::chrono::steady_clock::now();
    const StepResult r = m.train_step(b);
    m.gpu()->context().synchronize();
    const double t = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    CHECK(std::isfinite(r.loss));
    if (step > 0) ms.push_back(t);
    std::printf("  brats3d-gpu step %d: %.1f ms, loss %.6f%s\n", step, t, r.loss, step == 0 ? " (warm-up)" : "");
  }
  std::sort(ms.begin(), ms.end());
  const cu::PoolStats ps = m.gpu()->context().pool_stats();
  std::printf("  brats3d-gpu whole step (tf32): median %.1f ms, %.3g voxels/s, model pool peak %.2f GiB\n",
              ms[ms.size() / 2], n * V / (ms[ms.size() / 2] * 1e-3), ps.peak_in_use_bytes / 1073741824.0);
}

int main(int argc, char** argv) {
  if (!cu::available()) return check::skip_all(argc, argv, "no CUDA device (" + cu::unavailable_reason() + ")");
  return check::run_all(argc, argv);
}
