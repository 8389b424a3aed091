// Label fusion: turning several raters' label maps of one image into one training
// target (SPEC section 4, the `naive` methods: mean, mode, staple, spatial-staple).
//
// Every function takes one image at a time, has no global state and returns plain
// vectors, so the Node binding can run it in a worker thread.
//
// Conventions shared by every function here:
// - Labels are SPEC section 1 labels: 0..L-1, 255 (kUnlabelled) = unlabelled voxel.
// - A rater who did not label the image at all is a null pointer in `raters`. Absent
//   raters and unlabelled voxels are simply missing observations: they contribute
//   nothing to any vote, count or likelihood.
// - A voxel that no rater labelled comes out as kUnlabelled in every label map, and
//   with the prior (STAPLE) or all zeros (mean) as its soft label.
// - Confusion matrices follow SPEC section 3: A[i][j] = p(rater says i | true j),
//   stored row-major as cm[(r * L + i) * L + j]; every column sums to 1. The
//   parameters of an absent rater are NaN; a column nothing can be learnt about
//   (no weight on class j among the voxels a rater labelled) stays at the identity.
// - Work is spread over cmseg::parallel_for; results do not depend on the thread count.
// - Invalid input (R = 0, every rater absent, L outside 2..255, a label >= L other
//   than 255, an extent that does not multiply to V, bad options) throws
//   cmseg::InvalidArgument naming the value, before any work is done.
#pragma once
#include <cstdint>
#include <vector>

#include "cmseg/loss.hpp"  // kUnlabelled

namespace cmseg {

// The raters' label maps of one image.
struct FusionInput {
  std::vector<const uint8_t*> raters;  // R maps of V labels each; nullptr = rater absent
  int64_t V = 0;                       // voxels per map
  int L = 2;                           // classes
  // Spatial size, C-order: (H, W) or (D, H, W). Only spatial STAPLE needs it; when
  // given, its product must equal V.
  std::vector<int64_t> extent;
};

// Throws InvalidArgument if `in` breaks any rule above; `who` prefixes the message.
void validate_fusion_input(const FusionInput& in, const char* who = "fusion");

// ---- mean and mode ------------------------------------------------------------

// Soft label [L, V]: out[j * V + v] = fraction of the raters who labelled v that said j.
// All zeros where nobody labelled v, so a soft cross-entropy ignores that voxel.
std::vector<float> fuse_mean(const FusionInput& in);

// Majority vote [V] over the raters who labelled each voxel. A tie between classes
// gives `undecided` (0..255; 255 makes the voxel unlabelled, so training ignores it),
// or, when undecided is -1, the lowest tied class (what argmax does in numpy/PyTorch).
std::vector<uint8_t> fuse_mode(const FusionInput& in, int undecided = -1);

// ---- binary STAPLE (Warfield, Zou, Wells, IEEE TMI 23(7) 2004) -------------------

struct StapleOptions {
  int foreground = 1;            // the label counted as foreground; every other label is background
  double prior = -1;             // p(true = foreground); < 0: mean over the present raters of
                                 // their foreground fraction among the voxels they labelled
  double threshold = 1e-5;       // stop once no sensitivity or specificity moves by more
  int max_iterations = 1000;     // >= 1
};

struct StapleResult {
  std::vector<float> posterior;      // W [V] = p(true = foreground | raters)
  std::vector<uint8_t> labels;       // [V] 1 where W > 0.5, else 0; kUnlabelled where nobody labelled
  std::vector<double> sensitivity;   // p [R]
  std::vector<double> specificity;   // q [R]
  double prior = 0;                  // the foreground prior used
  int iterations = 0;                // M-steps run
  bool converged = false;            // threshold reached before max_iterations
};

// EM as in the paper and ITK's STAPLEImageFilter: the truth estimate starts as the
// raters' mean vote; each iteration is an M-step (p, q) followed by an E-step (W).
StapleResult staple(const FusionInput& in, const StapleOptions& opt = {});

// ---- multi-label STAPLE (Rohlfing, Russakoff, Maurer, IEEE TMI 23(8) 2004) -------

struct MultiLabelStapleOptions {
  std::vector<double> prior;   // [L] class prior; empty: the labels' frequencies over
                               // every labelled voxel of every present rater (as ITK)
  double threshold = 1e-5;     // stop once no CM entry moves by more (ITK's default)
  int max_iterations = 1000;   // >= 0; 0 returns the majority-vote initialisation
  int undecided = -1;          // label for posterior ties: as fuse_mode (ITK uses L)
};

struct MultiLabelStapleResult {
  std::vector<uint8_t> labels;    // [V] argmax of the posterior (ties: `undecided`)
  std::vector<float> posterior;   // [L, V] p(true = j | raters)
  std::vector<double> cm;         // [R, L, L] see the conventions above
  std::vector<double> prior;      // [L] the class prior used
  int iterations = 0;             // E+M steps run after the initialisation
  bool converged = false;
};

// ITK MultiLabelSTAPLEImageFilter conventions, except where noted in
// multi_label_staple.cpp: CMs start from each rater's agreement with the majority
// vote, then EM runs until the largest CM change is below the threshold.
MultiLabelStapleResult multi_label_staple(const FusionInput& in, const MultiLabelStapleOptions& opt = {});

// ---- spatial STAPLE (Asman & Landman, IEEE TMI 31(6) 2012) ----------------------

struct SpatialStapleOptions {
  // The image is cut into cells of `stride` voxels per axis. Each cell gets its own
  // CM per rater, estimated from the window of `window` voxels per axis centred on
  // the cell; window must be an odd multiple of stride (a whole number of cells).
  int stride = 8;
  int window = 40;
  // Weight of the whole-image CM in every local estimate, in pseudo-voxels per CM
  // column, as a fraction of the voxels of a full window (the paper's MAP form: a
  // Dirichlet prior centred on the whole-image CM). Smaller follows the raters more
  // locally but lets columns of classes absent from a window fit the noise.
  double prior_weight = 1.0;
  std::vector<double> prior;   // [L] whole-image class prior; empty: label frequencies
  double threshold = 1e-5;     // stop once no local CM entry moves by more
  int max_iterations = 100;
  int undecided = -1;          // as in MultiLabelStapleOptions
};

struct SpatialStapleResult {
  std::vector<uint8_t> labels;     // [V]
  std::vector<float> posterior;    // [L, V]
  std::vector<int64_t> grid;       // cells per axis, same order as extent
  std::vector<float> local_cm;     // [R, cells, L, L], cells in C-order over `grid`
  std::vector<double> global_cm;   // [R, L, L] the whole-image CMs (multi-label STAPLE's)
  std::vector<double> prior;       // [L]
  int iterations = 0;              // EM iterations of the local CMs
  bool converged = false;
};

// Needs in.extent. The whole-image CMs are multi-label STAPLE's (same prior and
// threshold), kept fixed; the local CMs start from them and are re-estimated by EM.
// Each voxel is explained by the CMs of its own cell.
SpatialStapleResult spatial_staple(const FusionInput& in, const SpatialStapleOptions& opt = {});

}  // namespace cmseg
