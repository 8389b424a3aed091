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
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "check.hpp"
#include "cmseg/cuda.hpp"
#include "cmseg/error.hpp"
#include "cmseg/layers.hpp"
#include "cmseg/loss.hpp"
#include "cmseg/model.hpp"

using namespace cmseg;
namespace cu = cmseg::cuda;

namespace {

cu::Context& ctx() {
  static cu::Context c;
  return c;
}

double rel_l2(const float* a, const float* b, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; ++i) {
    const double d = (double)a[i] - (double)b[i];
    num += d * d;
    den += (double)b[i] * b[i];
  }
  if (den == 0) return std::sqrt(num);
  return std::sqrt(num / den);
}

// Records a failure with the achieved error when it exceeds the tolerance.
void expect_close(const char* what, const std::vector<float>& gpu, const std::vector<float>& cpu, double tol) {
  CHECK(gpu.size() == cpu.size());
  const double e = rel_l2(gpu.data(), cpu.data(), std::min(gpu.size(), cpu.size()));
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

void conv3_case(int ndim, int n, int cin, int cout, Spatial s, bool tf32) {
  const double tol = tf32 ? 1e-2 : 1e-4;
  ctx().set_tf32(tf32);
  const size_t V = (size_t)s.size(), T = conv3_taps(ndim);
  auto x = rnd(n * cin * V, 1), w = rnd(cout * cin * T, 2, -0.3f, 0.3f), dy = rnd(n * cout * V, 3);
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
  std::vector<float> dx_cpu(count), dx_gpu(count), dg_cpu = dg0, dg_gpu = dg0, db_cpu = db0, db_gpu = db0;
  instance_norm_backward(x.data(), y_cpu.data(), m_cpu.data(), r_cpu.data(), gamma.data(), dy.data(), dx_cpu.data(),
                         dg_cpu.data(), db_cpu.data(), n, c, V, relu);
  cu::host::instance_norm_backward(ctx(), x.data(), y_cpu.data(), m_cpu.data(), r_cpu.data(), gamma.data(), dy.data(),
                                   dx_gpu.data(), dg_gpu.data(), db_gpu.data(), n, c, V, relu);
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
LossCase make_loss_case(CmMode mode, int n, int L, int R, int64_t V, int rank, float lambda, uint32_t seed) {
  LossCase c{n, L, R, rank, V, mode, lambda, {}, {}, {}, {}};
  c.logits = rnd((size_t)n * L * V, seed, -3.f, 3.f);
  const size_t K = mode == CmMode::Global ? (size_t)L * L : (size_t)cm_head_channels(mode, L, rank);
  for (int r = 0; r < R; ++r) {
    c.raw.push_back(rnd(mode == CmMode::Global ? K : (size_t)n * K * V, seed + 10 + r, -3.f, 3.f));
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

void cm_loss_case(CmMode mode, int L, int rank, float lambda) {
  LossCase c = make_loss_case(mode, 3, L, 3, 37 * 41, rank, lambda, 100 + L + 7 * (int)mode);
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
  // The annotator with no labelled pixel contributes to neither term.
  CHECK(gpu.ce[c.R - 1] == 0.0 && gpu.trace[c.R - 1] == 0.0);
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
  // An impossible allocation is a typed error, and the context stays usable.
  CHECK_THROWS_WITH(ctx().alloc((size_t)1 << 52), "device allocation");
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
}

TEST(conv3_matches_cpu) {
  for (bool tf32 : {false, true}) {
    conv3_case(2, 2, 3, 5, {1, 12, 10}, tf32);
    conv3_case(3, 2, 4, 6, {6, 8, 10}, tf32);
    conv3_case(3, 1, 16, 32, {8, 8, 8}, tf32);
  }
}

TEST(upconv2_matches_cpu) {
  for (bool tf32 : {false, true}) {
    upconv2_case(2, 2, 6, 3, {1, 5, 7}, tf32);
    upconv2_case(3, 2, 8, 4, {3, 4, 5}, tf32);
  }
}

TEST(cm_loss_full_matches_cpu) {
  cm_loss_case(CmMode::Full, 2, 1, 0.01f);
  cm_loss_case(CmMode::Full, 4, 1, 0.3f);
  cm_loss_case(CmMode::Full, 4, 1, -0.01f);  // warm-up: negated trace
  cm_loss_case(CmMode::Full, 5, 1, 0.3f);    // generic (non-specialised) kernel
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
      cu::instance_norm_backward(c, x.data(), y.data(), mean.data(), rstd.data(), g.data(), dy.data(), dx.data(),
                                 dg.data(), db.data(), n, ch, V, true);
    });
    report_bandwidth("instance_norm+relu backward (x, y, dy twice; dx)", 7 * T, ms);
    cu::Buffer<float> p(c, count / 8), dpx(c, count);
    cu::Buffer<uint8_t> arg(c, count / 8);
    ms = c.time_ms([&] { cu::maxpool2_forward(c, x.data(), p.data(), arg.data(), n * ch, s, 3); });
    report_bandwidth("maxpool2 forward (x; y, arg)", T + T / 8 + count / 8.0, ms);
    ms = c.time_ms([&] { cu::maxpool2_backward(c, p.data(), arg.data(), dpx.data(), n * ch, s, 3); });
    report_bandwidth("maxpool2 backward (dy, arg; dx)", T + T / 8 + count / 8.0, ms);

    // conv3 at this level, TF32 and FMA math: TFLOP/s rather than GB/s.
    cu::Buffer<float> w(c, fast_fill((size_t)ch * ch * 27, 5, 0.05f)), dw(c, (size_t)ch * ch * 27);
    const double flops = 2.0 * n * V * ch * ch * 27;
    for (bool tf32 : {true, false}) {
      c.set_tf32(tf32);
      const float f = c.time_ms([&] { cu::conv3_forward(c, x.data(), w.data(), y.data(), n, ch, ch, s, 3); }, 5);
      const float bw = c.time_ms(
          [&] { cu::conv3_backward(c, x.data(), w.data(), dy.data(), dx.data(), dw.data(), n, ch, ch, s, 3); }, 5);
      std::printf("  conv3 3D 32->32 128^3 n=2 %s: forward %.3f ms (%.1f TFLOP/s), backward data+filter %.3f ms (%.1f TFLOP/s)\n",
                  tf32 ? "tf32" : "fp32", f, flops / (f * 1e-3) / 1e12, bw, 2 * flops / (bw * 1e-3) / 1e12);
    }
    c.set_tf32(true);
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

int main(int argc, char** argv) {
  if (!cu::available()) {
    std::printf("SKIP: no CUDA device (%s)\n", cu::unavailable_reason().c_str());
    return 0;
  }
  return check::run_all(argc, argv);
}
