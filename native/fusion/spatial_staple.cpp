// Spatial STAPLE: Asman & Landman, "Formulating spatially varying performance in the
// statistical fusion framework", IEEE TMI 31(6) 2012.
//
// Each rater's CM varies over the image. Following the paper, the CM that explains a
// voxel is estimated from the voxels of a window around it and regularised towards
// the rater's whole-image CM by a prior (a Dirichlet prior centred on the whole-image
// CM turns the M-step into "local counts + kappa * whole-image CM", normalised per
// column); the class prior stays global.
//
// Departures, for speed and stability (the window and prior-weight defaults are ours
// too, not the paper's):
// - The CM field is piecewise constant: the image is cut into cells of `stride`
//   voxels per axis, each cell's CM is estimated from the window of whole cells
//   centred on it (overlapping windows keep neighbouring cells' CMs close), and every
//   voxel of a cell uses that cell's CM.
// - Within a cell, voxels with the same label tuple have the same posterior, so each
//   iteration works on (cell, tuple) pairs - few where raters agree - and the
//   window sums are box filters over the cell grid.
// - The whole-image CMs and class prior are multi-label STAPLE's, computed first
//   and then kept fixed as the centre of every local prior.
#include <algorithm>
#include <cmath>

#include "cmseg/backend.hpp"
#include "cmseg/error.hpp"
#include "cmseg/threads.hpp"
#include "fusion_internal.hpp"

namespace cmseg {

namespace {

// The image as (D, H, W) (missing leading axes are 1) cut into cells.
struct CellGrid {
  int64_t n[3] = {1, 1, 1};  // voxels per axis
  int64_t g[3] = {1, 1, 1};  // cells per axis
  int64_t stride = 1;
  int64_t radius = 0;        // window half-width in cells
  int64_t cells() const { return g[0] * g[1] * g[2]; }
};

CellGrid make_grid(const std::vector<int64_t>& extent, int stride, int window) {
  CellGrid grid;
  const size_t lead = 3 - extent.size();
  for (size_t a = 0; a < extent.size(); ++a) grid.n[lead + a] = extent[a];
  grid.stride = stride;
  grid.radius = (window / stride - 1) / 2;
  for (int a = 0; a < 3; ++a) grid.g[a] = (grid.n[a] + stride - 1) / stride;
  return grid;
}

// Calls fn(row_of_cells, cx, v_begin, v_end) for every run of voxels of one image row
// inside cell (cz, cy, cx), row_of_cells = cz * g[1] + cy; one row of cells per call
// of `item`, so a thread owns every cell it touches.
template <class Fn>
void for_each_run_in_row_of_cells(const CellGrid& grid, int64_t item, const Fn& fn) {
  const int64_t s = grid.stride, cz = item / grid.g[1], cy = item % grid.g[1];
  for (int64_t z = cz * s; z < std::min(grid.n[0], (cz + 1) * s); ++z)
    for (int64_t y = cy * s; y < std::min(grid.n[1], (cy + 1) * s); ++y) {
      const int64_t row = (z * grid.n[1] + y) * grid.n[2];
      for (int64_t cx = 0; cx < grid.g[2]; ++cx) fn(cx, row + cx * s, row + std::min(grid.n[2], (cx + 1) * s));
    }
}

// The label tuples present in each cell, with their voxel counts (CSR over cells;
// tuples ascending within a cell, as ids into the image's LabelPatterns).
struct CellPatterns {
  std::vector<int64_t> begin;     // [cells + 1]
  std::vector<uint32_t> pattern;
  std::vector<double> count;
};

CellPatterns group_cells(const CellGrid& grid, const fusion::LabelPatterns& pat) {
  const int64_t rows = grid.g[0] * grid.g[1];
  std::vector<std::vector<uint64_t>> keys(rows);  // per row of cells: (cx << 32 | pattern), run-length coded below
  std::vector<std::vector<double>> counts(rows);
  parallel_for(rows, [&](int64_t item, int) {
    std::vector<uint64_t> all;
    for_each_run_in_row_of_cells(grid, item, [&](int64_t cx, int64_t b, int64_t e) {
      for (int64_t v = b; v < e; ++v) all.push_back((uint64_t)cx << 32 | pat.of_voxel[v]);
    });
    std::sort(all.begin(), all.end());
    for (size_t k = 0; k < all.size(); ++k) {
      if (k == 0 || all[k] != all[k - 1]) {
        keys[item].push_back(all[k]);
        counts[item].push_back(0);
      }
      counts[item].back() += 1;
    }
  });
  CellPatterns cp;
  cp.begin.assign(grid.cells() + 1, 0);
  for (int64_t item = 0; item < rows; ++item)
    for (uint64_t key : keys[item]) ++cp.begin[item * grid.g[2] + (int64_t)(key >> 32) + 1];
  for (int64_t c = 0; c < grid.cells(); ++c) cp.begin[c + 1] += cp.begin[c];
  for (int64_t item = 0; item < rows; ++item) {
    for (uint64_t key : keys[item]) cp.pattern.push_back((uint32_t)key);
    cp.count.insert(cp.count.end(), counts[item].begin(), counts[item].end());
  }
  return cp;
}

// E-step in every cell with its own CMs, then per-cell sums of the M-step:
// sums[cell][c][i][j] = sum over the cell's voxels rater c labelled i of W[j].
std::vector<double> cell_sums(const fusion::LabelPatterns& pat, const CellPatterns& cp, const std::vector<double>& local,
                              const std::vector<double>& prior, int64_t cells) {
  const int L = pat.L, width = pat.width();
  const size_t K = (size_t)width * L * L;
  std::vector<double> sums(cells * K, 0.0);
  parallel_range(cells, [&](int64_t b, int64_t e, int) {
    std::vector<double> w(L);
    for (int64_t cell = b; cell < e; ++cell) {
      double* acc = sums.data() + cell * K;
      for (int64_t k = cp.begin[cell]; k < cp.begin[cell + 1]; ++k) {
        const uint8_t* d = pat.row(cp.pattern[k]);
        if (!fusion::tuple_posterior(d, width, local.data() + cell * K, prior.data(), L, w.data())) continue;
        for (int c = 0; c < width; ++c) {
          if (d[c] == kUnlabelled) continue;
          double* row = acc + ((size_t)c * L + d[c]) * L;
          for (int j = 0; j < L; ++j) row[j] += cp.count[k] * w[j];
        }
      }
    }
  });
  return sums;
}

// In place: every cell's K sums become the sums over the cells within `radius`
// along `axis` (windows clipped at the image border). Prefix sums per line.
void box_sum_axis(std::vector<double>& acc, const CellGrid& grid, size_t K, int axis) {
  const int64_t len = grid.g[axis], r = grid.radius;
  if (len == 1 || r == 0) return;
  const int64_t step = axis == 2 ? 1 : axis == 1 ? grid.g[2] : grid.g[1] * grid.g[2];
  parallel_for(grid.cells() / len, [&](int64_t line, int) {
    const int64_t start = (line / step) * step * len + line % step;  // first cell of the line
    std::vector<double> prefix((len + 1) * K, 0.0);
    for (int64_t i = 0; i < len; ++i) {
      const double* src = acc.data() + (start + i * step) * K;
      for (size_t k = 0; k < K; ++k) prefix[(i + 1) * K + k] = prefix[i * K + k] + src[k];
    }
    for (int64_t i = 0; i < len; ++i) {
      const int64_t lo = std::max<int64_t>(0, i - r), hi = std::min(len, i + r + 1);
      double* dst = acc.data() + (start + i * step) * K;
      for (size_t k = 0; k < K; ++k) dst[k] = prefix[hi * K + k] - prefix[lo * K + k];
    }
  });
}

// Local CMs from the window sums N, regularised towards the whole-image CMs:
// cm[i][j] = (N[i][j] + kappa * global[i][j]) / (sum_i N[i][j] + kappa).
// Overwrites `local`, returns the largest change of an entry.
double update_local_cms(const std::vector<double>& window_sums, const std::vector<double>& global, int L,
                        double kappa, std::vector<double>& local) {
  const size_t K = global.size(), raters = K / ((size_t)L * L);
  const int64_t cells = (int64_t)(window_sums.size() / K);
  std::vector<double> change(num_threads(), 0.0);
  parallel_range(cells, [&](int64_t b, int64_t e, int t) {
    for (int64_t cell = b; cell < e; ++cell) {
      const double* n = window_sums.data() + cell * K;
      double* cm = local.data() + cell * K;
      for (size_t c = 0; c < raters; ++c)
        for (int j = 0; j < L; ++j) {
          double sum = kappa;
          for (int i = 0; i < L; ++i) sum += n[(c * L + i) * L + j];
          for (int i = 0; i < L; ++i) {
            const size_t k = (c * L + i) * L + j;
            const double x = sum > 0 ? (n[k] + kappa * global[k]) / sum : global[k];
            change[t] = std::max(change[t], std::fabs(x - cm[k]));
            cm[k] = x;
          }
        }
    }
  });
  return *std::max_element(change.begin(), change.end());
}

// Posterior [L, V] and labels [V] from the final local CMs.
void scatter_cells(const CellGrid& grid, const fusion::LabelPatterns& pat, const CellPatterns& cp,
                   const std::vector<double>& local, const std::vector<double>& prior, int undecided,
                   SpatialStapleResult& res) {
  const int L = pat.L, width = pat.width();
  const size_t K = (size_t)width * L * L;
  const int64_t V = (int64_t)pat.of_voxel.size();
  res.posterior.resize((size_t)L * V);
  res.labels.resize(V);
  parallel_for(grid.g[0] * grid.g[1], [&](int64_t item, int) {
    // Posterior and label of every (cell, tuple) of this row of cells.
    const int64_t first = cp.begin[item * grid.g[2]], last = cp.begin[(item + 1) * grid.g[2]];
    std::vector<float> w_of((last - first) * L);
    std::vector<uint8_t> label_of(last - first);
    std::vector<double> w(L);
    for (int64_t cx = 0; cx < grid.g[2]; ++cx) {
      const int64_t cell = item * grid.g[2] + cx;
      for (int64_t k = cp.begin[cell]; k < cp.begin[cell + 1]; ++k) {
        const bool seen = fusion::tuple_posterior(pat.row(cp.pattern[k]), width, local.data() + cell * K,
                                                  prior.data(), L, w.data());
        for (int j = 0; j < L; ++j) w_of[(k - first) * L + j] = (float)w[j];
        label_of[k - first] = seen ? fusion::decide(w.data(), L, undecided) : kUnlabelled;
      }
    }
    for_each_run_in_row_of_cells(grid, item, [&](int64_t cx, int64_t b, int64_t e) {
      const int64_t cell = item * grid.g[2] + cx;
      const uint32_t* lo = cp.pattern.data() + cp.begin[cell];
      const uint32_t* hi = cp.pattern.data() + cp.begin[cell + 1];
      for (int64_t v = b; v < e; ++v) {
        const int64_t k = std::lower_bound(lo, hi, pat.of_voxel[v]) - cp.pattern.data() - first;
        res.labels[v] = label_of[k];
        for (int j = 0; j < L; ++j) res.posterior[(size_t)j * V + v] = w_of[k * L + j];
      }
    });
  });
}

void check_options(const FusionInput& in, const SpatialStapleOptions& opt, const char* who) {
  if (in.extent.empty()) fail(who, ": needs the image extent (H, W) or (D, H, W); got none for V = ", in.V);
  if (opt.stride < 1) fail(who, ": stride = ", opt.stride, ", expected >= 1");
  if (opt.window < opt.stride || opt.window % opt.stride != 0 || (opt.window / opt.stride) % 2 == 0)
    fail(who, ": window = ", opt.window, " is not an odd multiple of stride = ", opt.stride);
  if (!(opt.prior_weight >= 0) || !std::isfinite(opt.prior_weight))
    fail(who, ": prior_weight = ", opt.prior_weight, ", expected a finite value >= 0");
  fusion::check_undecided(opt.undecided, who);
  fusion::check_em_options(opt.threshold, opt.max_iterations, who);
  if (!opt.prior.empty()) fusion::normalised_prior(opt.prior, in.L, who);
}

// Every cell holds a CM per rater twice in double at once (the local CMs and the window sums
// of an iteration; later the local CMs and the result's float local_cm), beside the [L, V]
// posterior: a lower bound of the peak, so nothing that fits is refused. A fine grid of many
// classes asks for more than the machine has (stride 1 on a 240x240x155 volume of 5 classes
// and 3 raters: about 10 GiB): refused up front with the knob to turn, rather than a
// bad_alloc that spoke of batches and patches or, under Linux's overcommit, a process
// killed once the pages are touched.
void check_memory(const CellGrid& grid, int64_t raters, int L, int64_t V, const SpatialStapleOptions& opt,
                  const char* who) {
  const double K = (double)raters * L * L, cells = (double)grid.cells();
  const double need = cells * K * 2 * sizeof(double) + (double)L * V * sizeof(float);
  const double ram = physical_memory_bytes();
  if (ram > 0 && need > ram)
    throw OutOfMemory(str(who, ": ", grid.cells(), " cells (stride ", opt.stride, ") of ", raters, " raters' ", L, "x", L,
                          " CMs need more than ", gib_text(need), ", more than this machine's ", gib_text(ram),
                          " of memory: use a larger stride (fewer cells) or fewer classes"));
}

}  // namespace

SpatialStapleResult spatial_staple(const FusionInput& in, const SpatialStapleOptions& opt) {
  const char* who = "spatial_staple";
  validate_fusion_input(in, who);
  check_options(in, opt, who);
  const int L = in.L;
  const CellGrid grid = make_grid(in.extent, opt.stride, opt.window);
  const int64_t present = std::count_if(in.raters.begin(), in.raters.end(), [](const uint8_t* m) { return m != nullptr; });
  check_memory(grid, present, L, in.V, opt, who);

  // Whole image: multi-label STAPLE. (Re-estimating its CMs jointly with the local
  // ones was tried: a class missing from many windows then drifts through them too.)
  const fusion::LabelPatterns pat = fusion::group_label_patterns(in, L, fusion::identity_labels());
  SpatialStapleResult res;
  res.prior = opt.prior.empty() ? fusion::label_frequencies(pat) : fusion::normalised_prior(opt.prior, L, who);
  const std::vector<double> global = fusion::multi_label_em(pat, res.prior, opt.threshold, 1000).cm;

  // Prior strength: prior_weight times the voxels of a full window, the same for
  // every column. A column whose class fills much of the window is then estimated
  // largely locally, while one whose class is absent from the window (and would
  // otherwise be fitted to the raters' noise, the known failure of local STAPLE)
  // stays near the whole-image CM. (Scaling kappa by the class prior instead was
  // tried: on synthetic blobs it let the columns of rare classes drift.)
  double window_voxels = 1;
  for (int a = 0; a < 3; ++a) window_voxels *= (double)std::min<int64_t>(opt.window, grid.n[a]);
  const double kappa = opt.prior_weight * window_voxels;

  const CellPatterns cp = group_cells(grid, pat);
  const size_t K = global.size();
  std::vector<double> local(grid.cells() * K);
  for (int64_t cell = 0; cell < grid.cells(); ++cell) std::copy(global.begin(), global.end(), local.begin() + cell * K);
  while (res.iterations < opt.max_iterations) {
    std::vector<double> sums = cell_sums(pat, cp, local, res.prior, grid.cells());
    for (int axis = 0; axis < 3; ++axis) box_sum_axis(sums, grid, K, axis);
    const double change = update_local_cms(sums, global, L, kappa, local);
    ++res.iterations;
    if (change < opt.threshold) {
      res.converged = true;
      break;
    }
  }
  scatter_cells(grid, pat, cp, local, res.prior, opt.undecided, res);

  // Parameters of the present raters (pattern columns) placed by rater, NaN if absent.
  const int R = (int)in.raters.size();
  const size_t LL = (size_t)L * L;
  const int64_t cells = grid.cells();
  res.global_cm = fusion::cms_for_all_raters(pat, R, global);
  res.local_cm.assign((size_t)R * cells * LL, std::nanf(""));
  for (int c = 0; c < pat.width(); ++c)
    for (int64_t cell = 0; cell < cells; ++cell)
      for (size_t k = 0; k < LL; ++k)
        res.local_cm[((size_t)pat.raters[c] * cells + cell) * LL + k] = (float)local[cell * K + c * LL + k];
  res.grid.assign(grid.g + (3 - in.extent.size()), grid.g + 3);
  return res;
}

}  // namespace cmseg
