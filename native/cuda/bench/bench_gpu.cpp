// Whole-step train time of the SPEC section 8 GPU configuration on the CUDA
// backend, without Node (scripts/device-check.sh runs it next to the PyTorch
// reference's bench). Built as cmseg_bench_gpu when CUDA is on. Not a test.
//
//   cmseg_bench_gpu [brats3d-gpu|small] [steps=5] [tf32|fp32|bf16]
//
// One warm-up step (algorithm choice, pool growth), then `steps` timed steps, each
// waited for on the device. Prints a human line per step and one JSON line with
// the same keys as `torch_reference.py bench` (stepMsMedian, voxelsPerSecond,
// gflopPerSecond, peakGpuMB), plus the fused CM loss kernel alone on the same
// shapes: its time and achieved GB/s (bytes it must read and write / time), to
// compare with the device's memory bandwidth (issue 8: >= 70%).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cmseg/cuda.hpp"
#include "cmseg/model.hpp"

using namespace cmseg;
namespace cu = cmseg::cuda;

namespace {

// The options off the default path, for the run's label ("" when none is on).
std::string option_notes(const cu::ContextOptions& o) {
  std::string s;
  if (o.conv_overlap) s += ", filter gradients on a second stream";
  if (o.heads_fused_weight_grad) s += ", heads' weight gradients fused";
  if (o.concat_in_place) s += ", concat in place";
  if (o.conv_wgrad != cu::WgradPath::Cudnn) s += std::string(", conv3 filter gradients ") + cu::wgrad_path_name(o.conv_wgrad);
  if (const char* k = std::getenv("CMSEG_CM_LOSS_KERNEL"); k && *k) s += std::string(", CM loss kernel ") + k;
  return s;
}

// Convolution FLOPs of one step, counted as src/bench/flops.ts counts them (and the
// PyTorch reference): 2 * multiply-adds of every conv weight at its level's
// resolution, times 3 (forward, backward data, backward weights).
double step_conv_flops(const std::vector<Param>& params, Spatial s, int ndim, int n, int depth) {
  auto voxels_at = [&](int level) {
    const int dims[3] = {s.d, s.h, s.w};
    double v = 1;
    for (int i = ndim == 3 ? 0 : 1; i < 3; ++i) v *= std::max(1, dims[i] >> level);
    return v;
  };
  auto ends_with = [](const std::string& a, const char* b) {
    const size_t lb = std::strlen(b);
    return a.size() >= lb && a.compare(a.size() - lb, lb, b) == 0;
  };
  double forward = 0;
  for (const Param& p : params) {
    if (!ends_with(p.name, ".weight") || p.name.find(".norm") != std::string::npos) continue;
    double taps = 1;
    for (size_t k = 2; k < p.shape.size(); ++k) taps *= (double)p.shape[k];
    const std::string head = p.name.substr(0, p.name.find('.'));
    const std::string rest = p.name.substr(p.name.find('.') + 1);
    const int idx = std::atoi(rest.c_str());
    int level = 0;
    if (head == "enc") level = idx;
    else if (head == "dec") level = depth - 2 - idx;
    else if (head == "up") level = depth - 1 - idx;  // counted at its input resolution
    forward += 2.0 * (double)p.shape[0] * (double)p.shape[1] * taps * voxels_at(level) * n;
  }
  return 3 * forward;
}

std::vector<float> fill(size_t count, uint32_t seed, float scale) {
  std::vector<float> v(count);
  uint32_t s = seed * 2654435761u + 1;
  for (auto& x : v) {
    s ^= s << 13, s ^= s >> 17, s ^= s << 5;
    x = scale * ((float)(s >> 8) * (1.f / 8388608.f) - 1.f);
  }
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string config = argc > 1 ? argv[1] : "brats3d-gpu";
  const int steps = std::max(1, argc > 2 ? std::atoi(argv[2]) : 5);
  const std::string math = argc > 3 ? argv[3] : "tf32";
  if (!cu::available()) {
    std::printf("{\"bench\":\"cmseg-gpu\",\"ok\":false,\"error\":\"no CUDA device: %s\"}\n",
                cu::unavailable_reason().c_str());
    return 1;
  }
  ModelConfig c;
  int n = 2;
  Spatial s;
  if (config == "brats3d-gpu") {
    c.ndim = 3, c.in_channels = 4, c.classes = 4, c.annotators = 3, c.depth = 4, c.base = 32;
    n = 2, s = {128, 128, 128};
  } else if (config == "small") {  // a quick smoke run
    c.ndim = 3, c.in_channels = 4, c.classes = 4, c.annotators = 3, c.depth = 4, c.base = 16;
    n = 1, s = {64, 64, 64};
  } else {
    std::fprintf(stderr, "unknown config %s (brats3d-gpu | small)\n", config.c_str());
    return 2;
  }
  c.cm_mode = CmMode::Full;
  c.device = Device::Cuda;
  c.tf32 = math != "fp32";
  c.bf16 = math == "bf16";
  const int64_t V = s.size();
  try {
    const cu::DeviceInfo dev = cu::device_info(0);
    Model model(c);
    model.loss.lambda = 0.01f;
    cu::Context& ctx = model.gpu()->context();

    std::mt19937 g(1);
    std::vector<float> images = fill((size_t)n * c.in_channels * V, 7, 1.f);
    std::vector<std::vector<uint8_t>> labels(c.annotators, std::vector<uint8_t>((size_t)n * V));
    for (auto& l : labels)
      for (auto& v : l) v = (uint8_t)(g() % c.classes);
    Batch b;
    b.n = n, b.s = s, b.images = images.data();
    for (auto& l : labels) b.labels.push_back(l.data());

    std::vector<double> ms;
    for (int step = 0; step <= steps; ++step) {  // step 0: warm-up
      const auto t0 = std::chrono::steady_clock::now();
      const StepResult r = model.train_step(b);
      ctx.synchronize();
      const double t = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      std::printf("  step %d: %8.1f ms  loss %.6f%s\n", step, t, r.loss, step == 0 ? "  (warm-up)" : "");
      std::fflush(stdout);
      if (step > 0) ms.push_back(t);
      if (step == 0) {  // the warm-up's algorithm search is neither profiled nor in the peak
        ctx.profile_report();
        ctx.reset_peak();
      }
    }
    const std::string profile = ctx.profile_report(steps);
    if (!profile.empty()) std::printf("device time by layer (CMSEG_GPU_PROFILE), per step:\n%s", profile.c_str());
    // The same steps back to back, as a training loop runs them (and as `cmseg bench`
    // times them through Node): the host prepares step k+1 while the device still
    // runs step k's backward; one wait at the end. Its period is what a user gets.
    const auto p0 = std::chrono::steady_clock::now();
    for (int step = 0; step < steps; ++step) model.train_step(b);
    ctx.synchronize();
    const double period =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - p0).count() / steps;
    std::printf("  pipelined (%s, cuDNN %s on %s%s, upconv2 %s): %d steps back to back, %.1f ms/step\n",
                c.bf16 ? "bf16" : c.tf32 ? "tf32" : "fp32",
                c.bf16 ? "graph API" : ctx.options().conv_autotune ? "path timed per shape"
                : ctx.options().conv_graph ? "graph API" : "legacy API",
                c.bf16 ? "bf16 NDHWC" : ctx.options().conv_channels_last ? "NDHWC" : "NCDHW",
                option_notes(ctx.options()).c_str(),
                cu::upconv_path_name(ctx.options().upconv), steps, period);
    const std::string piped = ctx.profile_report(steps);
    if (!piped.empty()) {
      const size_t at = piped.find("  steps:");
      if (at != std::string::npos) std::printf("  pipelined %s", piped.substr(at + 2, piped.find('\n', at) - at - 1).c_str());
    }
    std::vector<double> sorted = ms;
    std::sort(sorted.begin(), sorted.end());
    const double med = sorted[sorted.size() / 2];
    const double flops = step_conv_flops(model.param_layout(), s, c.ndim, n, c.depth);
    const cu::PoolStats ps = ctx.pool_stats();

    // The fused CM loss alone, forward + backward, on this configuration's shapes.
    const int L = c.classes, R = c.annotators, K = L * L;
    const int64_t pixels = (int64_t)n * V;
    double loss_ms = 0, loss_bytes = 0;
    {
      cu::Buffer<float> z(ctx, fill((size_t)pixels * L, 3, 3.f)), dz(ctx, (size_t)pixels * L);
      std::vector<cu::Buffer<float>> raw, draw;
      std::vector<cu::Buffer<uint8_t>> lab;
      CmLossInput in;
      CmLossOutput out;
      in.n = n, in.L = L, in.R = R, in.V = V, in.mode = CmMode::Full, in.trace_weight = 0.01f;
      in.seg_logits = z.data();
      for (int r = 0; r < R; ++r) {
        raw.emplace_back(ctx, fill((size_t)pixels * K, 10 + r, 3.f));
        draw.emplace_back(ctx, (size_t)pixels * K);
        lab.emplace_back(ctx, labels[r]);
        in.cm_raw.push_back(raw.back().data());
        in.labels.push_back(lab.back().data());
        out.d_cm_raw.push_back(draw.back().data());
      }
      out.d_seg_logits = dz.data();
      // logits read + gradient written; R heads read + gradients written; labels read
      // twice (count pass, main pass).
      loss_bytes = (double)pixels * (2.0 * L * 4 + 2.0 * R * K * 4 + 2.0 * R);
      loss_ms = ctx.time_ms([&] { cu::cm_loss(ctx, in, out); }, 5);
    }
    // What this device's memory moves at: the datasheet's figure, and a device-to-device
    // copy of 1 GiB (bytes read + written), the practical ceiling the CM loss is held to.
    const double peak_gbs = dev.peak_memory_bytes_per_s / 1e9;
    double copy_gbs = 0;
    try {
      const size_t bytes = size_t(1) << 30;
      cu::Buffer<uint8_t> a(ctx, bytes), b(ctx, bytes);
      ctx.zero(a.data(), bytes);
      const float copy_ms = ctx.time_ms([&] { ctx.copy(b.data(), a.data(), bytes); }, 5);
      copy_gbs = 2.0 * bytes / (copy_ms * 1e-3) / 1e9;
    } catch (const OutOfMemory&) {
      // A device too full for 2 GiB more: the step's figures stand, the copy's is 0.
    }
    const double loss_gbs = loss_bytes / (loss_ms * 1e-3) / 1e9;
    std::printf("cm_loss bandwidth: %.0f GB/s = %.0f%% of the datasheet's %.0f GB/s, %.0f%% of a device copy's %.0f GB/s\n",
                loss_gbs, peak_gbs > 0 ? 100 * loss_gbs / peak_gbs : 0.0, peak_gbs,
                copy_gbs > 0 ? 100 * loss_gbs / copy_gbs : 0.0, copy_gbs);

    const bool cl = ctx.options().conv_channels_last, graph = ctx.options().conv_graph,
               tuned = ctx.options().conv_autotune && !c.bf16;
    const char* up = cu::upconv_path_name(ctx.options().upconv);
    const bool overlap = ctx.options().conv_overlap, heads_fused = ctx.options().heads_fused_weight_grad;
    std::printf("cmseg GPU %s (%s, %s, cuDNN %s on %s tensors%s, upconv2 %s): median %.1f ms/step, %.3g voxels/s, %.0f GFLOP/s, "
                "peak %.0f MiB; cm_loss %.3f ms, %.0f GB/s\n",
                config.c_str(), dev.name.c_str(), c.bf16 ? "bf16 convolutions" : c.tf32 ? "tf32" : "fp32",
                tuned ? "path timed per shape" : (graph || c.bf16) ? "graph API" : "legacy API",
                tuned ? "its fastest" : c.bf16 ? "bf16 NDHWC" : cl ? "NDHWC" : "NCDHW", option_notes(ctx.options()).c_str(), up, med, n * V / (med * 1e-3),
                flops / (med * 1e-3) / 1e9, ps.peak_in_use_bytes / 1048576.0, loss_ms,
                loss_bytes / (loss_ms * 1e-3) / 1e9);
    std::printf("{\"bench\":\"cmseg-gpu\",\"ok\":true,\"config\":\"%s\",\"device\":\"%s\",\"tf32\":%s,"
                "\"bf16\":%s,\"channelsLast\":%s,\"cudnnGraph\":%s,\"convAutotune\":%s,\"convOverlap\":%s,\"headsFused\":%s,\"concatInPlace\":%s,\"upconv\":\"%s\","
                "\"convWgrad\":\"%s\",\"cmLossKernel\":\"%s\",\"stepMs\":[",
                config.c_str(), dev.name.c_str(), c.tf32 ? "true" : "false", c.bf16 ? "true" : "false",
                cl ? "true" : "false", graph ? "true" : "false", tuned ? "true" : "false", overlap ? "true" : "false", heads_fused ? "true" : "false", ctx.options().concat_in_place ? "true" : "false", up,
                cu::wgrad_path_name(ctx.options().conv_wgrad), cu::last_cm_loss_kernel());
    for (size_t i = 0; i < ms.size(); ++i) std::printf("%s%.3f", i ? "," : "", ms[i]);
    std::printf("],\"stepMsMedian\":%.3f,\"voxelsPerSecond\":%.1f,\"gflopPerSecond\":%.1f,\"peakGpuMB\":%.1f,"
                "\"cmLossMs\":%.4f,\"cmLossBytes\":%.0f,\"cmLossGBs\":%.1f,\"peakMemoryGBs\":%.1f,\"deviceCopyGBs\":%.1f,"
                "\"pipelinedMs\":%.3f}\n",
                med, n * V / (med * 1e-3), flops / (med * 1e-3) / 1e9, ps.peak_in_use_bytes / 1048576.0, loss_ms,
                loss_bytes, loss_gbs, peak_gbs, copy_gbs, period);
  } catch (const std::exception& e) {
    std::string msg = e.what();
    std::replace(msg.begin(), msg.end(), '"', '\'');
    std::printf("{\"bench\":\"cmseg-gpu\",\"ok\":false,\"config\":\"%s\",\"error\":\"%s\"}\n", config.c_str(),
                msg.c_str());
    return 1;
  }
  return 0;
}
