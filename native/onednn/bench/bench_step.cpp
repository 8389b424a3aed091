// Train-step time of the SPEC section 8 CPU configurations with the oneDNN
// fast paths on and off, interleaved in one run (on, off, on, off, ...) so
// that a busy machine slows both alike. Not a test; built as cmseg_bench_step
// when oneDNN is found.
//
//   cmseg_bench_step brats3d-cpu|mnist2d [steps=5] [on|off|both]
//   CMSEG_PROFILE=1 also prints the per-layer breakdown of every step (stderr).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "cmseg/model.hpp"
#include "cmseg/onednn.hpp"
#include "cmseg/profile.hpp"
#include "cmseg/threads.hpp"

using namespace cmseg;

int main(int argc, char** argv) {
  const std::string config = argc > 1 ? argv[1] : "mnist2d";
  const int steps = argc > 2 ? std::atoi(argv[2]) : 5;
  const std::string which = argc > 3 ? argv[3] : "both";
  ModelConfig c;
  int n;
  Spatial s;
  if (config == "brats3d-cpu") {
    c.ndim = 3, c.in_channels = 4, c.classes = 4, c.annotators = 3, c.depth = 4, c.base = 16;
    n = 1, s = {64, 64, 64};
  } else if (config == "mnist2d") {
    c.ndim = 2, c.in_channels = 1, c.classes = 2, c.annotators = 4, c.depth = 4, c.base = 32;
    n = 32, s = {1, 32, 32};
  } else {
    std::fprintf(stderr, "unknown config %s (brats3d-cpu | mnist2d)\n", config.c_str());
    return 2;
  }
  c.cm_mode = CmMode::Full;
  const int64_t V = s.size();
  std::mt19937 g(1);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  std::vector<float> images((size_t)n * c.in_channels * V);
  for (auto& x : images) x = u(g);
  std::vector<std::vector<uint8_t>> labels(c.annotators, std::vector<uint8_t>((size_t)n * V));
  for (auto& l : labels)
    for (auto& v : l) v = (uint8_t)(g() % c.classes);
  Batch b;
  b.n = n, b.s = s, b.images = images.data();
  for (auto& l : labels) b.labels.push_back(l.data());

  std::vector<int> modes;
  if (which != "off") modes.push_back(1);
  if (which != "on") modes.push_back(0);
  std::vector<std::unique_ptr<Model>> models;  // same seed: identical initial parameters
  for (size_t i = 0; i < modes.size(); ++i) {
    models.emplace_back(new Model(c));
    models.back()->loss.lambda = 0.01f;
  }
  std::printf("%s: %s, %d cmseg threads\n", config.c_str(), onednn::describe().c_str(), num_threads());
  std::vector<std::vector<double>> times(modes.size());
  for (int step = 0; step <= steps; ++step) {  // step 0 is the warm-up
    for (size_t i = 0; i < modes.size(); ++i) {
      onednn::set_enabled(modes[i] == 1);
      if (profiling_enabled()) std::fprintf(stderr, "== oneDNN %s, step %d\n", modes[i] ? "on" : "off", step);
      const auto t0 = std::chrono::steady_clock::now();
      const StepResult r = models[i]->train_step(b);
      const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      std::printf("  oneDNN %-3s step %d: %7.3f s  loss %.6f%s\n", modes[i] ? "on" : "off", step, sec, r.loss,
                  step == 0 ? "  (warm-up)" : "");
      std::fflush(stdout);
      if (step > 0) times[i].push_back(sec);
    }
  }
  for (size_t i = 0; i < modes.size(); ++i) {
    auto t = times[i];
    std::sort(t.begin(), t.end());
    const double med = t[t.size() / 2];
    std::printf("%s oneDNN %-3s: median %.3f s/step (min %.3f), %.3g voxels/s\n", config.c_str(),
                modes[i] ? "on" : "off", med, t.front(), n * V / med);
  }
  return 0;
}
