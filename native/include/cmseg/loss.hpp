// Losses (SPEC section 4). The CM loss is fused: one pass per pixel computes the
// softmax, the annotators' confusion matrices, q_r = A_r p, the cross-entropy,
// the trace and every gradient, without an L x L x V temporary.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace cmseg {

constexpr int kMaxClasses = 16;
constexpr uint8_t kUnlabelled = 255;
constexpr float kProbFloor = 1e-12f;

enum class CmMode { Full, LowRank, Global };
CmMode parse_cm_mode(const std::string& s);
const char* cm_mode_name(CmMode m);

// Channels of one annotator's pixel-wise CM head: L*L (full), 2*L*l + 1 (lowrank), 0 (global).
int cm_head_channels(CmMode mode, int L, int rank);

struct CmLossInput {
  int n = 0, L = 0, R = 0;
  int64_t V = 0;
  CmMode mode = CmMode::Full;
  int rank = 1;
  const float* seg_logits = nullptr;          // [n, L, V]
  std::vector<const float*> cm_raw;           // per annotator: [n, K, V], or [L, L] for global
  std::vector<const uint8_t*> labels;         // per annotator: [n, V], 255 = unlabelled
  const uint8_t* present = nullptr;           // [n, R]; null = every annotator labelled every image
  float trace_weight = 0.f;                   // lambda, or -lambdaWarmup during the warm-up
};

struct CmLossOutput {
  double loss = 0;
  std::vector<double> ce, trace;  // per annotator (unweighted CE_r and T_r)
  // Gradients (overwritten): d/d seg_logits [n, L, V]; per annotator d/d cm_raw (same shape as cm_raw).
  // d_cm_raw[r] may be cm_raw[r] itself (pixel-wise modes): each pixel's raw channels
  // are read before its gradient is written, so the gradient can replace them in place.
  float* d_seg_logits = nullptr;
  std::vector<float*> d_cm_raw;
};

// Computes the loss of SPEC section 4 and, when gradient pointers are set, its gradients.
void cm_loss(const CmLossInput& in, CmLossOutput& out);

// Column-normalised CM of one pixel from its raw head channels (strided by `stride`),
// written as A[i * L + j]. Exposed for prediction and tests.
void cm_from_raw(CmMode mode, int L, int rank, const float* raw, int64_t stride, float* A);

// The same for a run of `count` pixels: pixel v's raw channel k at raw[k * stride + v], its
// CM entry (i, j) written to A[(i * L + j) * out_stride + v] (out_stride 0: count, rows
// packed; a volume's V: straight into a [L*L, V] output). The softplus runs vectorised over
// the run (as in cm_loss, so a prediction's CMs are the ones the loss trained); a run with a
// NaN or Inf raw value goes pixel by pixel through cm_from_raw, so the NaN shows in its CMs.
void cm_rows_from_raw(CmMode mode, int L, int rank, const float* raw, int64_t stride, int64_t count, float* A,
                      int64_t out_stride = 0);

// Plain cross-entropy on the consensus logits, for the `naive` and `oracle` methods:
// hard labels ([n, V], 255 ignored) or soft targets ([n, L, V], each pixel's row a
// distribution, or all zeros where nobody labelled it), both the mean over labelled
// pixels (a soft row with a nonzero entry counts), so that the same labels as one-hot
// rows give the same loss as hard labels. No labelled pixel: loss 0, gradients 0.
// Returns the loss; writes d_logits when non-null.
double ce_loss_hard(const float* logits, const uint8_t* labels, int n, int L, int64_t V, float* d_logits);
double ce_loss_soft(const float* logits, const float* target, int n, int L, int64_t V, float* d_logits);

}  // namespace cmseg
