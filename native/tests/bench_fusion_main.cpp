// Times cmseg's multi-label STAPLE on raters' label maps stored as raw uint8 files,
// and writes the consensus and CMs so scripts/bench_fusion.py can compare them with
// SimpleITK's MultiLabelSTAPLEImageFilter on the same input.
//
//   bench_fusion_main --shape 155,240,240 --classes 4 [--repeat 5] [--undecided N]
//                     [--out-labels labels.u8] [--out-cm cm.txt] rater0.u8 rater1.u8 ...
//
// Prints the median wall time of multi_label_staple (validation included), the
// iterations and the thread count.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "cmseg/error.hpp"
#include "cmseg/fusion.hpp"
#include "cmseg/threads.hpp"

namespace {

std::vector<int64_t> parse_shape(const std::string& s) {
  std::vector<int64_t> out;
  size_t pos = 0;
  while (pos <= s.size()) {
    const size_t comma = s.find(',', pos);
    out.push_back(std::stoll(s.substr(pos, comma - pos)));
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  return out;
}

std::vector<uint8_t> read_map(const std::string& path, int64_t V) {
  std::ifstream f(path, std::ios::binary);
  std::vector<uint8_t> m(V);
  f.read((char*)m.data(), V);
  if (!f || f.peek() != EOF) cmseg::fail(path, ": expected exactly ", V, " bytes (the --shape voxel count)");
  return m;
}

int usage() {
  std::fprintf(stderr,
               "usage: bench_fusion_main --shape D,H,W --classes L [--repeat N] [--undecided U]\n"
               "                         [--out-labels FILE] [--out-cm FILE] rater0.u8 rater1.u8 ...\n"
               "example: bench_fusion_main --shape 155,240,240 --classes 4 r0.u8 r1.u8 r2.u8\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<int64_t> shape;
  int L = 0, repeat = 5, undecided = -1;
  std::string out_labels, out_cm;
  std::vector<std::string> files;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string { return i + 1 < argc ? argv[++i] : ""; };
    if (a == "--shape") shape = parse_shape(next());
    else if (a == "--classes") L = std::atoi(next().c_str());
    else if (a == "--repeat") repeat = std::max(1, std::atoi(next().c_str()));
    else if (a == "--undecided") undecided = std::atoi(next().c_str());
    else if (a == "--out-labels") out_labels = next();
    else if (a == "--out-cm") out_cm = next();
    else if (a == "-h" || a == "--help") return usage();
    else files.push_back(a);
  }
  if (shape.empty() || L < 2 || files.empty()) return usage();
  try {
    int64_t V = 1;
    for (int64_t n : shape) V *= n;
    std::vector<std::vector<uint8_t>> maps;
    cmseg::FusionInput in;
    for (const auto& f : files) maps.push_back(read_map(f, V));
    for (const auto& m : maps) in.raters.push_back(m.data());
    in.V = V;
    in.L = L;
    in.extent = shape;
    cmseg::MultiLabelStapleOptions opt;
    opt.undecided = undecided;

    std::vector<double> ms;
    cmseg::MultiLabelStapleResult res;
    for (int k = 0; k < repeat; ++k) {
      const auto t0 = std::chrono::steady_clock::now();
      res = cmseg::multi_label_staple(in, opt);
      ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(ms.begin(), ms.end());
    std::printf("multi_label_staple: %lld voxels, %zu raters, %d classes: median %.1f ms (min %.1f) over %d runs, "
                "%d iterations, converged %d, %d threads, %.0f Mvoxel/s\n",
                (long long)V, maps.size(), L, ms[ms.size() / 2], ms[0], repeat, res.iterations, (int)res.converged,
                cmseg::num_threads(), V / (ms[ms.size() / 2] * 1e3));
    if (!out_labels.empty()) {
      std::ofstream(out_labels, std::ios::binary).write((const char*)res.labels.data(), V);
      std::printf("labels -> %s\n", out_labels.c_str());
    }
    if (!out_cm.empty()) {
      std::ofstream f(out_cm);
      f.precision(17);
      for (double x : res.cm) f << x << "\n";
      std::printf("CMs [R, L, L] -> %s\n", out_cm.c_str());
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_fusion_main: %s\n", e.what());
    return 1;
  }
  return 0;
}
