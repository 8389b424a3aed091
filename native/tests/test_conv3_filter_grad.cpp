// conv3's own filter-gradient kernel (native/cuda/conv3_filter_grad.cuh) run on the
// host through the SIMT emulation (native/cuda/emulation/simt_host.hpp), against the
// CPU reference's filter gradient (native/layers/conv3.cpp). Exact mode (fp32
// fragments) checks the kernel's tiling, halos, ring of plane slots, cp.async waits,
// channel and block splits and the partials' sum to fp32 rounding; TF32 mode checks
// the rounding the tensor cores apply stays within TF32's tolerance. test_cuda runs
// the same kernel on a GPU.
#include <cmath>
#include <cstdio>
#include <vector>

#include "../cuda/conv3_filter_grad.cuh"
#include "../cuda/emulation/simt_host.hpp"
#include "check.hpp"
#include "cmseg/layers.hpp"

using namespace cmseg;
namespace wg = cmseg::cuda::wgrad;

namespace {

struct HostOps : simt::ThreadOps {
  using ThreadOps::ThreadOps;
  void mma(float (&acc)[4], const FragA& a, const FragB& b) const { mma_with(acc, a, b, wg::acc_row, wg::acc_col); }
};

// dw += the kernel's filter gradient, on a grid of blocks_x x ceil(cin/32) x ceil(cout/32).
void emulated_filter_grad(const std::vector<float>& x, const std::vector<float>& dy, std::vector<float>& dw, int n,
                          int cin, int cout, Spatial s, int blocks_x, bool exact, int run_d) {
  wg::Params P{};
  P.x = x.data(), P.dy = dy.data();
  P.cin = cin, P.cout = cout, P.D = s.d, P.H = s.h, P.W = s.w;
  P.tiles_h = (s.h + wg::kTileH - 1) / wg::kTileH;
  P.tiles_w = (s.w + wg::kTileW - 1) / wg::kTileW;
  P.run_d = run_d;
  P.quads = s.w % 4 == 0 && reinterpret_cast<uintptr_t>(x.data()) % 16 == 0 &&
            reinterpret_cast<uintptr_t>(dy.data()) % 16 == 0;
  P.runs = (s.d + run_d - 1) / run_d;
  P.units = (int64_t)n * P.tiles_h * P.tiles_w * P.runs;
  const int grid[3] = {blocks_x, (cin + wg::kCi - 1) / wg::kCi, (cout + wg::kCo - 1) / wg::kCo};
  std::vector<float> partial((size_t)grid[0] * grid[1] * grid[2] * wg::kPartial, std::nanf(""));
  P.partial = partial.data();
  simt::run_grid<HostOps>(grid, wg::kThreads, wg::kSmemFloats, exact,
                          [&](HostOps& ops, float* smem) { wg::block_body(P, ops, smem); });
  const int64_t items = (int64_t)grid[1] * grid[2] * wg::kPartial;
  for (int64_t item = 0; item < items; ++item) wg::add_partials(partial.data(), grid[0], grid[1], cin, cout, item, dw.data());
}

double rel_l2(const std::vector<float>& a, const std::vector<float>& b) { return check::rel_l2(a.data(), b.data(), a.size()); }

std::vector<float> tf32_rounded(std::vector<float> v) {
  for (float& e : v) e = simt::round_tf32(e);
  return v;
}

// The kernel's dw (accumulated onto a random start) against the CPU reference's: in
// fp32 (exact fragments), and in TF32 against the reference on TF32-rounded inputs,
// where only the summation order differs (an operand left unrounded would be truncated,
// as the tensor cores do, and show at ~1e-4); and the TF32 result against the fp32
// reference at TF32's tolerance.
void filter_grad_case(int n, int cin, int cout, Spatial s, int blocks_x, int run_d = wg::kRunD) {
  const int64_t V = s.size();
  const auto x = check::random_vector((size_t)n * cin * V, 11);
  const auto dy = check::random_vector((size_t)n * cout * V, 12);
  const auto start = check::random_vector((size_t)cout * cin * 27, 14);
  std::vector<float> want = start, want_tf32 = start;
  conv3_backward(x.data(), nullptr, dy.data(), nullptr, want.data(), n, cin, cout, s, 3);
  conv3_backward(tf32_rounded(x).data(), nullptr, tf32_rounded(dy).data(), nullptr, want_tf32.data(), n, cin, cout, s,
                 3);
  for (bool exact : {true, false}) {
    std::vector<float> got = start;
    emulated_filter_grad(x, dy, got, n, cin, cout, s, blocks_x, exact, run_d);
    const double err = rel_l2(got, exact ? want : want_tf32);
    size_t bad = 0;
    for (float v : got) bad += !std::isfinite(v);
    std::printf("  n %d, %d->%d, %dx%dx%d, runs of %d planes, %d block(s) per channel pair, copies of %s: %s rel L2 "
                "%.2e against the reference on %s inputs",
                n, cin, cout, s.d, s.h, s.w, run_d, blocks_x, s.w % 4 == 0 ? "quads" : "floats",
                exact ? "fp32" : "tf32", err, exact ? "fp32" : "TF32-rounded");
    CHECK(bad == 0);
    CHECK(err < 1e-5);
    if (!exact) {
      const double loose = rel_l2(got, want);
      std::printf(", %.2e against fp32", loose);
      CHECK(loose < 3e-3);
    }
    std::printf("\n");
  }
}

}  // namespace

// One run, one patch: every tap's halo at the volume's edges in all three axes.
TEST(filter_grad_single_patch) { filter_grad_case(1, 32, 32, Spatial{3, 4, 32}, 1); }

// Patches cut by the volume's end in h and w; input channels in two blocks (the second
// with 8 of 32 used), output channels under one block's 32; blocks taking several runs.
TEST(filter_grad_partial_tiles_and_channel_blocks) { filter_grad_case(2, 40, 20, Spatial{4, 5, 35}, 3); }

// Depth past one run (two runs, the second short), few channels, a volume narrower
// than a patch.
TEST(filter_grad_runs_along_depth) {
  filter_grad_case(1, 3, 5, Spatial{wg::kRunD + 3, 3, 7}, 2);
  filter_grad_case(1, 8, 8, Spatial{11, 4, 8}, 2, 3);  // runs of 3 planes (CMSEG_WGRAD_RUN_D): 4 runs, the last of 2
  filter_grad_case(1, 8, 8, Spatial{3, 4, 8}, 1, 1);   // runs of one plane
}

// Quads (W % 4 == 0) past the volume's end in a partial patch: 36 = one patch and a
// quad; 8 = a patch of two quads.
TEST(filter_grad_quads_past_the_edge) {
  filter_grad_case(1, 8, 16, Spatial{3, 5, 36}, 2);
  filter_grad_case(2, 4, 4, Spatial{2, 3, 8}, 1);
}

// More blocks than runs: blocks with no run write zeros.
TEST(filter_grad_idle_blocks) { filter_grad_case(1, 8, 40, Spatial{2, 2, 9}, 5); }

// The grid along the runs: a block one past a wave would cost a second wave (128->128
// channels at 32^3, n 2: 16 channel blocks, 32 runs, 132 SMs: 8 blocks of 4 runs, not 9
// of 3-4 in two waves); otherwise as many blocks as shorten the longest block's runs.
TEST(grid_along_runs) {
  CHECK(wg::blocks_along_runs(32, 16, 132) == 8);
  CHECK(wg::blocks_along_runs(2048, 1, 132) == 128);  // 16 runs a block, as with 132
  CHECK(wg::blocks_along_runs(5, 64, 132) == 2);      // 3 runs a block in one wave
  CHECK(wg::blocks_along_runs(1, 1, 132) == 1);
  CHECK(wg::blocks_along_runs(1000, 200, 132) == 1);  // more channel blocks than a wave: no more partials
}

TEST_MAIN()
