// The staged CM-loss kernel's walk over tiles (native/cuda/cm_loss_staging.cuh) run on the
// host through the SIMT emulation (native/cuda/emulation/simt_host.hpp): each pixel's
// compute must see exactly that pixel's logits, raw CM channels (of the annotators who
// labelled its image) and labels in its slot, every pixel exactly once, for tiles that
// cross image boundaries, a partial last tile, blocks without a tile, absent annotators,
// and 2 or 3 slots. Shared memory starts as NaN. Copies land at the two extremes the
// hardware allows: as late as the walk's waits permit (simt::ThreadOps: a missing or short
// wait, or a copy never issued, shows up as a wrong value), and at once when issued
// (EagerOps, with half the threads slow to read their slot: a slot refilled while a slower
// thread still reads it, e.g. without the sync after the compute, shows up too). The
// per-pixel math is the pixel kernel's (test_cuda compares the staged kernel's results with
// the pixel kernel's on a GPU).
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <random>
#include <chrono>
#include <thread>
#include <type_traits>
#include <vector>

#include "../cuda/cm_loss_staging.cuh"
#include "../cuda/emulation/simt_host.hpp"
#include "check.hpp"

namespace cs = cmseg::cuda::cmstage;
namespace simt = cmseg::simt;

namespace {

// What issue_tile reads (the device's LossParams has the same fields).
struct Params {
  const float* z;
  const float* raw[16];
  const uint8_t* labels[16];
  const uint8_t* present;
  int n;
  int64_t V;
};

// Copies that land the moment they are issued (the earliest the hardware may).
struct EagerOps : simt::ThreadOps {
  using ThreadOps::ThreadOps;
  void copy4(float* dst, const float* src, bool valid) {
    const float v = valid ? *src : 0.f;
    std::memcpy(dst, &v, 4);
  }
  void copy_bytes(void* dst, const void* src, int bytes) {
    uint32_t bits = 0;
    std::memcpy(&bits, src, (size_t)bytes);
    std::memcpy(dst, &bits, 4);
  }
};

struct Case {
  int n, L, R;
  int64_t V;
  int blocks;
  std::vector<uint8_t> present;  // empty: everyone labelled everything
};

template <int kStages, class Ops = simt::ThreadOps>
void staging_case(const Case& c, uint32_t seed) {
  const int L = c.L, R = c.R, K = L * L, n = c.n;
  const int64_t V = c.V, total = n * V;
  const auto z = check::random_vector((size_t)n * L * V, seed);
  std::vector<std::vector<float>> raw;
  // Labels from one allocation at offsets that are multiples of 4 but not of 16 (as
  // annotators' maps packed in one [R, n, V] array may be), plus 255s.
  const size_t label_stride = ((size_t)total + 3) / 4 * 4 + 4;
  std::vector<uint8_t> label_store(label_stride * R + 4);
  std::mt19937 g(seed + 1);
  for (int r = 0; r < R; ++r) {
    raw.push_back(check::random_vector((size_t)n * K * V, seed + 10 + r));
    uint8_t* lab = label_store.data() + 4 + r * label_stride;
    for (int64_t p = 0; p < total; ++p) lab[p] = g() % 5 == 0 ? 255 : (uint8_t)(g() % L);
  }
  Params P{};
  P.z = z.data();
  for (int r = 0; r < R; ++r) P.raw[r] = raw[r].data(), P.labels[r] = label_store.data() + 4 + r * label_stride;
  P.present = c.present.empty() ? nullptr : c.present.data();
  P.n = n, P.V = V;
  const cs::Slot S{L, R, K};

  std::vector<std::atomic<int>> visits((size_t)total);
  std::atomic<int64_t> wrong{0};
  std::mutex mu;
  int64_t first_wrong = -1;
  const int grid[3] = {c.blocks, 1, 1};
  constexpr bool eager = std::is_same_v<Ops, EagerOps>;
  simt::run_grid<Ops>(grid, cs::kTile, (size_t)kStages * S.floats(), true,
                                  [&](Ops& ops, float* smem) {
                                    cs::walk<kStages>(P, S, ops, smem, [&](const float* slot, int t, int64_t pix) {
                                      // Eager copies: the even threads read late, the odd ones run on.
                                      if (eager && t % 2 == 0) std::this_thread::sleep_for(std::chrono::microseconds(200));
                                      ++visits[(size_t)pix];
                                      const int64_t i = pix / V, v = pix - i * V;
                                      bool ok = true;
                                      for (int k = 0; k < L; ++k) ok &= slot[S.logit(k) + t] == z[(i * L + k) * V + v];
                                      const uint8_t* labels = reinterpret_cast<const uint8_t*>(slot + S.labels());
                                      for (int r = 0; r < R; ++r) {
                                        ok &= labels[r * cs::kTile + t] == P.labels[r][pix];
                                        if (P.present && !P.present[i * R + r]) continue;  // never read
                                        for (int e = 0; e < K; ++e)
                                          ok &= slot[S.channel(r, e) + t] == raw[r][(i * K + e) * V + v];
                                      }
                                      if (!ok && wrong++ == 0) {
                                        std::lock_guard<std::mutex> lk(mu);
                                        first_wrong = pix;
                                      }
                                    });
                                  });
  int64_t not_once = 0;
  for (auto& n_visits : visits) not_once += n_visits != 1;
  std::printf("  n %d, L %d, R %d, V %lld, %d block(s), %d slots, copies landing %s: %lld pixels in %lld tiles, %lld "
              "with wrong values, %lld not computed exactly once\n",
              n, L, R, (long long)V, c.blocks, kStages, eager ? "when issued" : "at the waits", (long long)total, (long long)((total + cs::kTile - 1) / cs::kTile),
              (long long)wrong.load(), (long long)not_once);
  if (first_wrong >= 0) std::printf("    first wrong pixel %lld\n", (long long)first_wrong);
  CHECK(wrong.load() == 0);
  CHECK(not_once == 0);
}

}  // namespace

TEST(tiles_cross_images_and_end_partial) {
  staging_case<3>({2, 4, 3, 300, 2, {}}, 1);  // 600 pixels: 5 tiles, one across the images, 88 in the last
  staging_case<2>({2, 4, 3, 300, 2, {}}, 2);
}

TEST(exact_tiles_one_block_many_tiles) {
  staging_case<3>({1, 2, 1, 4 * cs::kTile, 1, {}}, 3);  // one block walks all 4 tiles
  staging_case<2>({1, 2, 1, 4 * cs::kTile, 1, {}}, 4);
}

TEST(more_blocks_than_tiles_and_absent_annotators) {
  // 3 images x 50 pixels = 2 tiles on 4 blocks (two without a tile); annotator 1 absent
  // from image 1 (its channels are zero filled and never compared), 0 from image 2.
  staging_case<3>({3, 3, 2, 50, 4, {1, 1, 1, 0, 0, 1}}, 5);
  staging_case<2>({3, 3, 2, 50, 4, {1, 1, 1, 0, 0, 1}}, 6);
}

TEST(copies_landing_when_issued) {
  staging_case<3, EagerOps>({2, 4, 3, 300, 2, {}}, 9);
  staging_case<2, EagerOps>({1, 2, 1, 4 * cs::kTile, 1, {}}, 10);
  staging_case<2, EagerOps>({3, 3, 2, 50, 4, {1, 1, 1, 0, 0, 1}}, 11);
}

TEST(labels_end_inside_a_copy) {
  // 131 pixels: the last tile holds 3, and its labels' 4-byte copy reads 3 bytes.
  staging_case<3>({1, 2, 2, 131, 3, {}}, 7);
  staging_case<2>({1, 4, 1, 1, 1, {}}, 8);  // a single pixel
}

TEST_MAIN()
