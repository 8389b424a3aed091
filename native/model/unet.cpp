// The U-Net of SPEC section 2 on the CPU reference layers: encoder blocks with
// max-pooling, decoder with transposed convolutions and skip concatenation, a
// consensus head and one CM head per annotator sharing the whole trunk.
#include <algorithm>
#include <cmath>
#include <cstring>
#if defined(__GLIBC__)
#include <malloc.h>  // malloc_trim (release_buffers)
#endif

#include "cmseg/backend.hpp"
#include "cmseg/cuda.hpp"  // cuda::ModelGpu, owned by Model (Device::Cuda)
#include "cmseg/error.hpp"
#include "cmseg/model.hpp"
#include "cmseg/onednn.hpp"  // the channel-blocked trunk (issue 7)
#include "cmseg/profile.hpp"
#include <cstdio>
#include "cmseg/threads.hpp"

namespace cmseg {
namespace {

// splitmix64: deterministic, seedable parameter initialisation.
struct Rng {
  uint64_t s;
  uint64_t next() {
    uint64_t z = (s += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }
  double uniform() { return (next() >> 11) * (1.0 / 9007199254740992.0); }
  double normal() {
    const double u1 = std::max(uniform(), 1e-300), u2 = uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }
};

double inverse_softplus(double y) { return y + std::log(-std::expm1(-y)); }

// One block: conv3 -> IN -> ReLU -> conv3 -> IN -> ReLU. Indices into params.
struct Block {
  int cin = 0, cout = 0;
  int w1 = -1, g1 = -1, b1 = -1, w2 = -1, g2 = -1, b2 = -1;
};

// Activations a block keeps for its backward pass.
struct BlockCache {
  std::vector<float> h1, a1, h2, a2, mean1, rstd1, mean2, rstd2;
};

// Grow-only: buffers keep the largest size a run needed, so the levels' and
// steps' varying sizes neither reallocate nor re-zero them (callers use
// explicit counts, never size()).
void grow(std::vector<float>& v, size_t n) {
  if (v.size() < n) v.resize(n);
}

// The first index in [0, count) where bad(i) holds, or -1; the scan runs over the
// thread pool (a training step's inputs are tens of millions of values, checked on
// the host before every step, also while a GPU works on the previous one).
template <class Bad>
int64_t first_bad(int64_t count, const Bad& bad) {
  constexpr int64_t kChunk = 1 << 18;
  const int64_t chunks = (count + kChunk - 1) / kChunk;
  std::vector<int64_t> first(chunks, -1);
  parallel_for(chunks, [&](int64_t c, int) {
    const int64_t e1 = std::min(count, (c + 1) * kChunk);
    for (int64_t e = c * kChunk; e < e1; ++e)
      if (bad(e)) {
        first[c] = e;
        return;
      }
  });
  for (int64_t f : first)
    if (f >= 0) return f;
  return -1;
}

// dst[i] += src[i] over the thread pool.
void add_into(float* dst, const float* src, int64_t count) {
  constexpr int64_t kChunk = 1 << 16;
  parallel_for((count + kChunk - 1) / kChunk, [&](int64_t c, int) {
    const int64_t e1 = std::min(count, (c + 1) * kChunk);
    for (int64_t e = c * kChunk; e < e1; ++e) dst[e] += src[e];
  });
}

}  // namespace

// What a call leaves for the next one: the forward state of the last call and every
// activation and scratch buffer, all grown on demand (grow()), so a fresh set is always a
// valid one (Model::release_buffers swaps one in).
struct CallBuffers {
  int n = 0;
  int block = 0;  // the trunk's layout in that call: 0 plain, else oneDNN's channel block (Trunk below)
  Spatial s0;
  std::vector<Spatial> level_s;
  std::vector<BlockCache> enc_c, dec_c, cmb_c;
  std::vector<std::vector<float>> pooled, ups, cats;
  std::vector<std::vector<uint8_t>> pool_arg;
  std::vector<float> feat_plain;               // blocked trunk: the features in plain layout for the heads
  std::vector<std::vector<float>> head_plain;  // blocked trunk: CM-block outputs in plain layout for their heads
  std::vector<float> seg_logits;
  std::vector<std::vector<float>> cm_raw;
  // Backward scratch; forward-only runs borrow some of it for what they read once (run()).
  std::vector<float> d_seg;
  std::vector<std::vector<float>> g_enc;
  std::vector<float> scratch_a, scratch_b, d_feat, d_feat_trunk, d_tmp, d_tmp2;
  std::vector<float> g_out, d_cat, d_up, d_below, d_in, d_pool;  // decoder / encoder backward
};

struct Model::Impl : CallBuffers {
  std::vector<Block> enc, dec, cm_blocks_flat;     // cm_blocks_flat[r * B + b]
  std::vector<int> up_w, up_b, cm_w, cm_b, gcm;    // per level / annotator
  int seg_w = -1, seg_b = -1;
};

namespace {

// Values, gradients and both Adam moments of every parameter: 16 bytes each. A layout
// larger than the machine's memory (depth 8 at 1024 channels is terabytes) is refused
// before any page is touched.
void allocate_params(std::vector<Param>& params) {
  std::vector<int64_t> counts;
  int64_t count = 0;
  for (const Param& p : params) {
    int64_t n = 1;
    for (auto d : p.shape) n *= d;
    counts.push_back(n);
    count += n;
  }
  const double bytes = (double)count * 4 * sizeof(float), ram = physical_memory_bytes();
  if (ram > 0 && bytes > ram)
    throw OutOfMemory(str("the model's ", count, " parameters need ", gib_text(bytes),
                          " (values, gradients and Adam moments), more than this machine's ", gib_text(ram),
                          " of memory: lower baseChannels or depth"));
  for (size_t i = 0; i < params.size(); ++i) {
    Param& p = params[i];
    const int64_t n = counts[i];
    p.value.assign(n, 0.f);
    p.grad.assign(n, 0.f);
    p.m.assign(n, 0.f);
    p.v.assign(n, 0.f);
  }
}

}  // namespace

void validate_config(const ModelConfig& c) {
  if (c.ndim != 2 && c.ndim != 3) fail("ndim must be 2 or 3, got ", c.ndim);
  if (c.in_channels < 1) fail("inChannels must be >= 1, got ", c.in_channels);
  if (c.classes < 2 || c.classes > kMaxClasses) fail("classes must be in 2..", kMaxClasses, ", got ", c.classes);
  if (c.annotators < 1 || c.annotators > 64) fail("annotators must be in 1..64, got ", c.annotators);
  if (c.depth < 1 || c.depth > 8) fail("depth must be in 1..8, got ", c.depth);
  if (c.base < 1 || c.base > 1024) fail("baseChannels must be in 1..1024, got ", c.base);
  // Checked in every mode: the full and global CMs do not read it, but the config echoes it
  // back (and into checkpoints), where a rank of -5 would read as a real setting.
  if (c.cm_rank < 1 || c.cm_rank > 8) fail("cmRank must be in 1..8, got ", c.cm_rank);
  if (c.cm_head_blocks < 0 || c.cm_head_blocks > 8) fail("cmHeadBlocks must be in 0..8, got ", c.cm_head_blocks);
}

Model::Model(const ModelConfig& config) : config_(config), impl_(new Impl) {
  validate_config(config);
  const ModelConfig& c = config_;
  const int T3 = conv3_taps(c.ndim), T2 = pool2_taps(c.ndim);
  auto kdims = [&](int k) { return std::vector<int64_t>(c.ndim, k); };
  auto add = [&](const std::string& name, std::vector<int64_t> shape) {
    Param p;
    p.name = name;
    p.shape = std::move(shape);
    params_.push_back(std::move(p));  // allocated below, once the whole layout is known
    return (int)params_.size() - 1;
  };
  auto conv_shape = [&](int cout, int cin, int k) {
    std::vector<int64_t> s = {cout, cin};
    for (auto d : kdims(k)) s.push_back(d);
    return s;
  };
  auto add_block = [&](const std::string& prefix, int cin, int cout) {
    Block b;
    b.cin = cin, b.cout = cout;
    b.w1 = add(prefix + ".conv1.weight", conv_shape(cout, cin, 3));
    b.g1 = add(prefix + ".norm1.weight", {cout});
    b.b1 = add(prefix + ".norm1.bias", {cout});
    b.w2 = add(prefix + ".conv2.weight", conv_shape(cout, cout, 3));
    b.g2 = add(prefix + ".norm2.weight", {cout});
    b.b2 = add(prefix + ".norm2.bias", {cout});
    return b;
  };
  auto width = [&](int level) { return c.base << level; };

  Impl& m = *impl_;
  for (int k = 0; k < c.depth; ++k)
    m.enc.push_back(add_block("enc." + std::to_string(k), k == 0 ? c.in_channels : width(k - 1), width(k)));
  for (int k = 0; k + 1 < c.depth; ++k) {
    const int from = width(c.depth - 1 - k), to = width(c.depth - 2 - k);
    std::vector<int64_t> ws = {from, to};
    for (auto d : kdims(2)) ws.push_back(d);
    m.up_w.push_back(add("up." + std::to_string(k) + ".weight", ws));
    m.up_b.push_back(add("up." + std::to_string(k) + ".bias", {to}));
    m.dec.push_back(add_block("dec." + std::to_string(k), 2 * to, to));
  }
  const int L = c.classes, C0 = c.base;
  m.seg_w = add("seg.weight", conv_shape(L, C0, 1));
  m.seg_b = add("seg.bias", {L});
  const int K = cm_head_channels(c.cm_mode, L, c.cm_rank);
  for (int r = 0; r < c.annotators; ++r) {
    if (c.cm_mode == CmMode::Global) {
      m.gcm.push_back(add("gcm." + std::to_string(r), {L, L}));
      continue;
    }
    for (int b = 0; b < c.cm_head_blocks; ++b)
      m.cm_blocks_flat.push_back(add_block("cmblock." + std::to_string(r) + "." + std::to_string(b), C0, C0));
    m.cm_w.push_back(add("cm." + std::to_string(r) + ".weight", conv_shape(K, C0, 1)));
    m.cm_b.push_back(add("cm." + std::to_string(r) + ".bias", {K}));
  }

  allocate_params(params_);

  // Initialisation (documented in README "Model"): He-normal for 3x3 convolutions
  // (ReLU follows), uniform +-1/sqrt(fan_in) for transposed convs and heads,
  // norms at weight 1 / bias 0; CM heads biased towards a diagonal of 0.8.
  Rng rng{c.seed * 0x2545F4914F6CDD1DULL + 0x1234567ULL};
  auto uniform_fill = [&](Param& p, double bound) {
    for (auto& x : p.value) x = (float)((rng.uniform() * 2 - 1) * bound);
  };
  for (auto& p : params_) {
    const std::string& nm = p.name;
    auto ends = [&](const char* suf) {
      const size_t ls = std::strlen(suf);
      return nm.size() >= ls && nm.compare(nm.size() - ls, ls, suf) == 0;
    };
    if (ends(".conv1.weight") || ends(".conv2.weight")) {
      const double std_ = std::sqrt(2.0 / (p.shape[1] * T3));
      for (auto& x : p.value) x = (float)(rng.normal() * std_);
    } else if (nm.find(".norm") != std::string::npos) {
      std::fill(p.value.begin(), p.value.end(), ends(".weight") ? 1.f : 0.f);
    } else if (nm.rfind("up.", 0) == 0) {
      // filled below, where the weight's fan-in is at hand for its bias too
    } else if (nm.rfind("gcm.", 0) == 0) {
      for (int i = 0; i < L; ++i)
        for (int j = 0; j < L; ++j)
          p.value[i * L + j] = c.cm_init == CmInit::Uniform ? 0.f
                               : (float)inverse_softplus(i == j ? 4.0 * (L - 1) : 1.0);
    } else {
      uniform_fill(p, 1.0 / std::sqrt((double)C0));  // seg / cm heads
    }
  }
  // Transposed-conv weights: fan-in of the input channels times taps.
  for (size_t k = 0; k < m.up_w.size(); ++k) {
    Param& w = params_[m.up_w[k]];
    uniform_fill(w, 1.0 / std::sqrt((double)w.shape[0] * T2));
    uniform_fill(params_[m.up_b[k]], 1.0 / std::sqrt((double)w.shape[0] * T2));
  }
  if (c.cm_init == CmInit::Identity && c.cm_mode != CmMode::Global) {
    for (int r = 0; r < c.annotators; ++r) {
      Param& w = params_[m.cm_w[r]];
      for (auto& x : w.value) x *= 0.1f;  // keep the initial CM close to the bias everywhere
      Param& b = params_[m.cm_b[r]];
      if (c.cm_mode == CmMode::Full) {
        for (int i = 0; i < L; ++i)
          for (int j = 0; j < L; ++j) b.value[i * L + j] = (float)inverse_softplus(i == j ? 4.0 * (L - 1) : 1.0);
      } else {
        const int l = c.cm_rank;
        const float uw = (float)inverse_softplus(std::sqrt(1.0 / l));
        for (int e = 0; e < 2 * L * l; ++e) b.value[e] = uw;
        b.value[2 * L * l] = (float)inverse_softplus(4.0 * (L - 1) - 1.0);
      }
    }
  }
  attach_device();  // Device::Cuda: parameters to the GPU (model_device.cpp)
}

Model::~Model() = default;

Param* Model::find(const std::string& name) {
  for (auto& p : params())  // syncs a GPU model's host copy (model_device.cpp)
    if (p.name == name) return &p;
  return nullptr;
}

int64_t Model::parameter_count() const {
  int64_t n = 0;
  for (auto& p : params_) n += p.numel();
  return n;
}

void Model::validate_images(const float* images, int n, Spatial s) const {
  const ModelConfig& c = config_;
  if (n < 1) fail("batch must hold at least one image, got ", n);
  if (c.ndim == 2 && s.d != 1) fail("2D model given a 3D extent (depth ", s.d, ")");
  const int m = 1 << (c.depth - 1);
  const int dims[3] = {s.d, s.h, s.w};
  const char* names[3] = {"depth", "height", "width"};
  for (int i = c.ndim == 3 ? 0 : 1; i < 3; ++i) {
    // 0 is divisible by anything: an empty axis needs its own message.
    if (dims[i] < 1) fail("spatial ", names[i], " is ", dims[i], "; every spatial size must be >= 1");
    if (dims[i] % m != 0)
      fail("spatial ", names[i], " ", dims[i], " is not divisible by 2^(depth-1) = ", m, " (depth ", c.depth, ")");
  }
  // Instance norm over a single position is degenerate (zero variance: its output
  // is beta plus rounding noise, and so are the gradients through it); PyTorch
  // refuses it too.
  if ((int64_t)s.size() / ((int64_t)m * m * (c.ndim == 3 ? m : 1)) < 2)
    fail("the deepest level (depth ", c.depth, ") of a ", c.ndim == 3 ? std::to_string(s.d) + "x" : std::string(), s.h,
         "x", s.w, " input has a single position: instance norm needs more than one; use a larger input or a smaller "
         "depth");
  const int64_t total = (int64_t)n * c.in_channels * s.size();
  const int64_t i = first_bad(total, [&](int64_t e) { return !std::isfinite(images[e]); });
  if (i >= 0) {
    const int64_t V = s.size();
    fail("images contain ", std::isnan(images[i]) ? "NaN" : "Inf", " at index ", i, " (image ",
         i / (V * c.in_channels), ", channel ", (i / V) % c.in_channels, ")");
  }
}

void Model::validate(const Batch& b) const {
  validate_images(b.images, b.n, b.s);
  const int L = config_.classes;
  const int64_t count = (int64_t)b.n * b.s.size();
  auto check_map = [&](const uint8_t* lab, const std::string& what) {
    const int64_t i = first_bad(count, [&](int64_t e) { return lab[e] >= L && lab[e] != kUnlabelled; });
    if (i >= 0)
      fail(what, ": label ", (int)lab[i], " at index ", i, " (image ", i / b.s.size(), ") is >= classes (", L,
           ") and is not 255 (unlabelled)");
  };
  if (b.target) {
    check_map(b.target, "target");
  } else if (b.soft_target) {
    const int64_t total = count * L;
    const int64_t bad = first_bad(total, [&](int64_t e) { return !std::isfinite(b.soft_target[e]) || b.soft_target[e] < 0; });
    if (bad >= 0) fail("softTarget: value ", b.soft_target[bad], " at index ", bad, " is not a finite probability");
    // Each pixel's class probabilities sum to 1, or to 0 where nobody labelled it (the
    // mean of no votes): another sum would silently weight that pixel's cross-entropy.
    const int64_t V = b.s.size();
    auto sum_at = [&](int64_t i) {
      const float* t = b.soft_target + (i / V) * L * V + i % V;
      double sum = 0;
      for (int k = 0; k < L; ++k) sum += t[k * V];
      return sum;
    };
    const int64_t i = first_bad(count, [&](int64_t e) {
      const double sum = sum_at(e);
      return sum != 0 && std::fabs(sum - 1) > 1e-3;
    });
    if (i >= 0)
      fail("softTarget: the class probabilities of pixel ", i % V, " of image ", i / V, " sum to ", sum_at(i),
           "; each pixel's must sum to 1 (or 0 where nobody labelled it)");
  } else {
    if ((int)b.labels.size() != config_.annotators)
      fail("expected labels for ", config_.annotators, " annotators, got ", b.labels.size());
    for (int r = 0; r < config_.annotators; ++r) check_map(b.labels[r], "labels of annotator " + std::to_string(r));
  }
}

namespace {

// The layout of the trunk's activations for one run. Block 0: plain N, C, *S
// through the reference layers (which hand each convolution to oneDNN when it
// is enabled, reordering at every call). Block B > 0: oneDNN's channel-blocked
// layout from the first convolution's output to the last decoder block, so
// that activations are reordered only at the model's boundaries (issue 7): the
// images enter the first convolution plain, and the features leave for the
// heads (and their gradient comes back) through one conversion each.
struct Trunk {
  int block = 0;

  // The block the convolutions prefer here, if every trunk width is a multiple of it.
  static Trunk choose(const ModelConfig& c) { return {onednn::trunk_block(c.ndim, c.base, c.depth)}; }
  onednn::Blocks blocks(bool x_plain) const { return {x_plain ? 0 : block, block}; }

  void conv3_forward(const float* x, const float* w, float* y, int n, int cin, int cout, Spatial s, int nd,
                     bool x_plain) const {
    if (!block) return cmseg::conv3_forward(x, w, y, n, cin, cout, s, nd);
    onednn::conv3_forward(x, w, y, n, cin, cout, s, nd, blocks(x_plain));
  }
  void conv3_backward(const float* x, const float* w, const float* dy, float* dx, float* dw, int n, int cin, int cout,
                      Spatial s, int nd, bool x_plain) const {
    if (!block) return cmseg::conv3_backward(x, w, dy, dx, dw, n, cin, cout, s, nd);
    onednn::conv3_backward(x, w, dy, dx, dw, n, cin, cout, s, nd, blocks(x_plain));
  }
  void norm_forward(const float* x, const float* g, const float* b, float* y, float* mean, float* rstd, int n, int c,
                    int64_t V) const {
    if (!block) return instance_norm_forward(x, g, b, y, mean, rstd, n, c, V, true);
    instance_norm_forward_blocked(x, g, b, y, mean, rstd, n, c, V, true, block);
  }
  void norm_backward(const float* x, const float* y, const float* mean, const float* rstd, const float* g,
                     const float* dy, float* dx, float* dg, float* db, int n, int c, int64_t V) const {
    if (!block) return instance_norm_backward(x, y, mean, rstd, g, dy, dx, dg, db, n, c, V, true);
    instance_norm_backward_blocked(x, y, mean, rstd, g, dy, dx, dg, db, n, c, V, true, block);
  }
  void upconv2_forward(const float* x, const float* w, const float* b, float* y, int n, int cin, int cout, Spatial s,
                       int nd) const {
    if (!block) return cmseg::upconv2_forward(x, w, b, y, n, cin, cout, s, nd);
    onednn::upconv2_forward(x, w, b, y, n, cin, cout, s, nd, blocks(false));
  }
  void upconv2_backward(const float* x, const float* w, const float* dy, float* dx, float* dw, float* db, int n,
                        int cin, int cout, Spatial s, int nd) const {
    if (!block) return cmseg::upconv2_backward(x, w, dy, dx, dw, db, n, cin, cout, s, nd);
    onednn::upconv2_backward(x, w, dy, dx, dw, db, n, cin, cout, s, nd, blocks(false));
  }
  // s: the input extent. arg: the reference's winning taps or oneDNN's workspace.
  void pool_forward(const float* x, float* y, std::vector<uint8_t>& arg, int n, int c, Spatial s, int nd) const {
    const int64_t Vo = halve(s, nd).size();
    if (!block) {
      arg.resize((size_t)n * c * Vo);
      return maxpool2_forward(x, y, arg.data(), n * c, s, nd);
    }
    arg.resize(onednn::maxpool2_workspace_bytes(n, c, s, nd, block));
    onednn::maxpool2_forward(x, y, arg.data(), n, c, s, nd, block);
  }
  void pool_backward(const float* dy, const std::vector<uint8_t>& arg, float* dx, int n, int c, Spatial s,
                     int nd) const {
    if (!block) return maxpool2_backward(dy, arg.data(), dx, n * c, s, nd);
    onednn::maxpool2_backward(dy, arg.data(), dx, n, c, s, nd, block);
  }
  // The heads and the loss read plain arrays: trunk features out, their gradient in.
  const float* plain(const float* x, std::vector<float>& buf, int n, int c, Spatial s, int nd) const {
    if (!block) return x;
    grow(buf, (size_t)n * c * s.size());
    onednn::to_plain(x, buf.data(), n, c, s, nd, block);
    return buf.data();
  }
};

// Where one block's forward writes: the two convolutions' outputs h1, h2, the
// first norm's a1, the block's output y and the norms' statistics.
struct BlockOut {
  float *h1, *a1, *h2, *y;
  float *mean1, *rstd1, *mean2, *rstd2;
};

// Training: everything into the block's cache, which block_backward reads.
BlockOut cache_out(BlockCache& c, int64_t sz, int64_t nc) {
  grow(c.h1, sz), grow(c.a1, sz), grow(c.h2, sz), grow(c.a2, sz);
  grow(c.mean1, nc), grow(c.rstd1, nc), grow(c.mean2, nc), grow(c.rstd2, nc);
  return {c.h1.data(), c.a1.data(), c.h2.data(), c.a2.data(),
          c.mean1.data(), c.rstd1.data(), c.mean2.data(), c.rstd2.data()};
}

// Forward only: the output (and the small statistics) into the cache, the
// intermediates into two arrays that every block shares. h2 reuses h1's array:
// h1 is dead once the first norm has read it.
BlockOut scratch_out(BlockCache& c, std::vector<float>& s1, std::vector<float>& s2, int64_t sz, int64_t nc) {
  grow(s1, sz), grow(s2, sz), grow(c.a2, sz);
  grow(c.mean1, nc), grow(c.rstd1, nc), grow(c.mean2, nc), grow(c.rstd2, nc);
  return {s1.data(), s2.data(), s1.data(), c.a2.data(), c.mean1.data(), c.rstd1.data(), c.mean2.data(), c.rstd2.data()};
}

// x_plain: x is the images (plain whatever the trunk's layout).
void block_forward(std::vector<Param>& P, const Block& b, const float* x, int n, Spatial s, int ndim,
                   const BlockOut& o, const Trunk& t, bool x_plain = false) {
  const int64_t V = s.size();
  t.conv3_forward(x, P[b.w1].value.data(), o.h1, n, b.cin, b.cout, s, ndim, x_plain);
  t.norm_forward(o.h1, P[b.g1].value.data(), P[b.b1].value.data(), o.a1, o.mean1, o.rstd1, n, b.cout, V);
  t.conv3_forward(o.a1, P[b.w2].value.data(), o.h2, n, b.cout, b.cout, s, ndim, false);
  t.norm_forward(o.h2, P[b.g2].value.data(), P[b.b2].value.data(), o.y, o.mean2, o.rstd2, n, b.cout, V);
}

// dy: gradient of the block output; dx: gradient of its input (may be null).
void block_backward(std::vector<Param>& P, const Block& b, const float* x, int n, Spatial s, int ndim,
                    const BlockCache& c, const float* dy, float* dx, std::vector<float>& t1, std::vector<float>& t2,
                    const Trunk& t, bool x_plain = false) {
  const int64_t V = s.size(), sz = (int64_t)n * b.cout * V;
  grow(t1, sz), grow(t2, sz);
  t.norm_backward(c.h2.data(), c.a2.data(), c.mean2.data(), c.rstd2.data(), P[b.g2].value.data(), dy, t1.data(),
                  P[b.g2].grad.data(), P[b.b2].grad.data(), n, b.cout, V);
  t.conv3_backward(c.a1.data(), P[b.w2].value.data(), t1.data(), t2.data(), P[b.w2].grad.data(), n, b.cout, b.cout, s,
                   ndim, false);
  t.norm_backward(c.h1.data(), c.a1.data(), c.mean1.data(), c.rstd1.data(), P[b.g1].value.data(), t2.data(),
                  t1.data(), P[b.g1].grad.data(), P[b.b1].grad.data(), n, b.cout, V);
  t.conv3_backward(x, P[b.w1].value.data(), t1.data(), dx, P[b.w1].grad.data(), n, b.cin, b.cout, s, ndim, x_plain);
}

}  // namespace

namespace {

// A lower bound of the host memory a CPU call on n images of size s holds at once
// (bytes): buffers that run() grows and keeps until it returns, counted at their sizes, so
// that a request above the machine's memory is refused before any page is touched (Linux's
// overcommit would grant each buffer and kill the process mid-step), and one that fits is
// never refused. The real figure is higher (scratch, oneDNN's workspaces, deeper levels).
// - With the backward: every level's block activations (4 maps of its width), the
//   decoder's caches and concatenations (6 more), the segmentation logits and their
//   gradient, the CM heads' outputs (their gradients are written over them) and their
//   extra blocks' activations.
// - Forward only (evaluate, predict): at level 0 the block's two scratch maps and its
//   output, the skip (the first encoder block's output) and, with a decoder, the
//   concatenation (2 maps; it also holds the heads' plain features); the logits; and the
//   CM heads' outputs with their extra blocks' outputs when the heads run.
// heads: whether the pixel-wise CM heads run (CM loss or a prediction of CMs / q_r).
double step_bytes_lower_bound(const ModelConfig& c, int n, Spatial s, bool backward, bool heads) {
  const double V0 = (double)s.size(), L = c.classes, C0 = c.base;
  const bool pixel_cm = heads && c.cm_mode != CmMode::Global;
  const double head_maps = pixel_cm ? (double)c.annotators * cm_head_channels(c.cm_mode, c.classes, c.cm_rank) : 0.0;
  double floats = 0;
  if (backward) {
    for (int k = 0; k < c.depth; ++k) {
      const double Vk = V0 / std::pow(2.0, k * c.ndim), ck = (double)(c.base << k);
      floats += 4 * ck * Vk + (k + 1 < c.depth ? 6 * ck * Vk : 0.0);
    }
    // Each annotator's extra CM blocks keep their 4 maps of width C0 for the backward.
    floats += (2 * L + head_maps + (pixel_cm ? 4.0 * c.annotators * c.cm_head_blocks * C0 : 0.0)) * V0;
  } else {
    floats += ((c.depth > 1 ? 6 : 3) * C0 + L + head_maps + (pixel_cm ? c.cm_head_blocks * C0 : 0.0)) * V0;
  }
  return floats * n * sizeof(float);
}

void check_host_memory(const ModelConfig& c, int n, Spatial s, bool backward, bool heads) {
  const double need = step_bytes_lower_bound(c, n, s, backward, heads), ram = physical_memory_bytes();
  if (ram > 0 && need > ram)
    throw OutOfMemory(str(backward ? "a training step" : "a forward pass", " on ", n, " image(s) of ", s.d, "x", s.h, "x", s.w,
                          " needs more than ", gib_text(need), ", more than this machine's ", gib_text(ram),
                          " of memory: use a smaller batch or patch (or fewer channels)"));
}

}  // namespace

double Model::host_bytes_lower_bound(int n, Spatial s, bool backward, bool heads) const {
  return gpu_ ? 0.0 : step_bytes_lower_bound(config_, n, s, backward, heads);
}

StepResult Model::run(const Batch& batch, bool backward, bool loss, bool cm_heads) {
  if (gpu_) return run_device(batch, backward);  // Device::Cuda (model_device.cpp)
  if (loss)
    validate(batch);
  else
    validate_images(batch.images, batch.n, batch.s);  // predict: no labels are read
  const bool plain_ce = batch.target || batch.soft_target;
  // The pixel-wise CM heads run for the CM loss, and for a prediction only when it returns
  // CMs or q_r: R * K channels a pixel that a consensus-only prediction would compute and hold
  // for nothing (64 annotators x 16 classes: 64 KiB a pixel).
  const bool run_heads = loss ? !plain_ce : cm_heads;
  check_host_memory(config_, batch.n, batch.s, backward, run_heads);
  Impl& m = *impl_;
  const ModelConfig& c = config_;
  auto& P = params_;
  const int n = batch.n, D = c.depth, L = c.classes, R = c.annotators, nd = c.ndim;
  const int K = cm_head_channels(c.cm_mode, L, c.cm_rank);
  m.n = n;
  const Trunk t = Trunk::choose(c);
  m.block = t.block;
  m.level_s.assign(D, batch.s);
  for (int k = 1; k < D; ++k) m.level_s[k] = halve(m.level_s[k - 1], nd);
  auto V = [&](int k) { return m.level_s[k].size(); };
  m.enc_c.resize(D), m.dec_c.resize(D > 1 ? D - 1 : 0), m.pooled.resize(D), m.pool_arg.resize(D);
  m.ups.resize(D), m.cats.resize(D);

  // ---- forward
  // Training keeps every activation the backward pass reads. A forward-only run
  // (evaluate, predict) keeps in the caches only the block outputs, which later
  // layers read (skips, the decoder's inputs, the features); what a layer reads
  // only once goes to the backward pass's scratch arrays of the same shapes
  // (unused without a backward pass; training sizes them alike). Same layers,
  // same arithmetic: the outputs are bit-identical either way.
  auto block_out = [&](const Block& b, int level, BlockCache& cache) {
    const int64_t sz = (int64_t)n * b.cout * V(level), nc = (int64_t)n * b.cout;
    return backward ? cache_out(cache, sz, nc) : scratch_out(cache, m.scratch_a, m.scratch_b, sz, nc);
  };
  std::vector<uint8_t> pool_arg_once;  // forward only: the pools' workspace, dropped on return
  for (int k = 0; k < D; ++k) {
    const float* in = batch.images;
    if (k > 0) {
      const int ch = m.enc[k - 1].cout;
      std::vector<float>& pooled = backward ? m.pooled[k] : m.d_in;
      grow(pooled, (size_t)n * ch * V(k));
      t.pool_forward(m.enc_c[k - 1].a2.data(), pooled.data(), backward ? m.pool_arg[k] : pool_arg_once, n, ch,
                     m.level_s[k - 1], nd);
      in = pooled.data();
    }
    block_forward(P, m.enc[k], in, n, m.level_s[k], nd, block_out(m.enc[k], k, m.enc_c[k]), t, k == 0);
  }
  for (int k = 0; k + 1 < D; ++k) {
    const int lo = D - 1 - k, hi = D - 2 - k;  // from level lo up to level hi
    const float* below = k == 0 ? m.enc_c[D - 1].a2.data() : m.dec_c[k - 1].a2.data();
    const int cin = m.dec[k].cout * 2, cout = m.dec[k].cout;
    // Forward only: the up-convolution's output is read once, by the concat,
    // before the block's forward reuses the same scratch.
    std::vector<float>& up = backward ? m.ups[k] : m.scratch_a;
    std::vector<float>& cat = backward ? m.cats[k] : m.d_cat;
    grow(up, (size_t)n * cout * V(hi));
    t.upconv2_forward(below, P[m.up_w[k]].value.data(), P[m.up_b[k]].value.data(), up.data(), n, cin, cout,
                      m.level_s[lo], nd);
    grow(cat, (size_t)n * 2 * cout * V(hi));
    concat_forward(m.enc_c[hi].a2.data(), cout, up.data(), cout, cat.data(), n, V(hi));
    // Concatenating whole images works in both layouts: each image's channels
    // (or channel blocks) are contiguous.
    block_forward(P, m.dec[k], cat.data(), n, m.level_s[hi], nd, block_out(m.dec[k], hi, m.dec_c[k]), t);
  }
  const float* feat_trunk = D > 1 ? m.dec_c[D - 2].a2.data() : m.enc_c[0].a2.data();
  const int C0 = c.base;
  const int64_t V0 = V(0);
  // The heads read plain features. Forward only: the concat's scratch is dead
  // once the decoder is done.
  const float* feat = t.plain(feat_trunk, backward ? m.feat_plain : m.d_cat, n, C0, m.level_s[0], nd);
  grow(m.seg_logits, (size_t)n * L * V0);
  const int B = c.cm_head_blocks;
  const bool pixel_cm = c.cm_mode != CmMode::Global;
  // Heads on the shared features run in one pass over them (conv1_forward_heads).
  std::vector<Conv1Head> heads(1);
  heads[0].cout = L, heads[0].w = P[m.seg_w].value.data(), heads[0].b = P[m.seg_b].value.data();
  heads[0].y = m.seg_logits.data();
  std::vector<const float*> head_in(R, feat);  // plain, for the 1x1 heads
  if (run_heads && pixel_cm) {
    m.cm_raw.resize(R);
    m.cmb_c.resize((size_t)R * B);
    m.head_plain.resize(R);
    for (int r = 0; r < R; ++r) {
      // Forward only: each annotator's blocks (and head input) are read by its
      // head alone, right here, so every annotator reuses annotator 0's arrays.
      const int keep = backward ? r : 0;
      const float* x = feat_trunk;
      for (int b = 0; b < B; ++b) {
        const Block& blk = m.cm_blocks_flat[r * B + b];
        BlockCache& cache = m.cmb_c[keep * B + b];
        block_forward(P, blk, x, n, m.level_s[0], nd, block_out(blk, 0, cache), t);
        x = cache.a2.data();
      }
      if (B > 0) head_in[r] = t.plain(x, m.head_plain[keep], n, C0, m.level_s[0], nd);
      grow(m.cm_raw[r], (size_t)n * K * V0);
      Conv1Head h;
      h.cout = K, h.w = P[m.cm_w[r]].value.data(), h.b = P[m.cm_b[r]].value.data(), h.y = m.cm_raw[r].data();
      if (B == 0)
        heads.push_back(h);
      else
        conv1_forward_heads(head_in[r], {h}, n, C0, V0);
    }
  }
  conv1_forward_heads(feat, heads, n, C0, V0);

  // ---- loss
  StepResult res;
  if (!loss) return res;  // predict: the heads' outputs are all it reads
  if (backward)
    for (auto& p : P) std::fill(p.grad.begin(), p.grad.end(), 0.f);
  if (backward) grow(m.d_seg, (size_t)n * L * V0);
  float* dseg = backward ? m.d_seg.data() : nullptr;
  if (batch.target) {
    res.loss = ce_loss_hard(m.seg_logits.data(), batch.target, n, L, V0, dseg);
  } else if (batch.soft_target) {
    res.loss = ce_loss_soft(m.seg_logits.data(), batch.soft_target, n, L, V0, dseg);
  } else {
    CmLossInput in;
    in.n = n, in.L = L, in.R = R, in.V = V0, in.mode = c.cm_mode, in.rank = c.cm_rank;
    in.seg_logits = m.seg_logits.data();
    in.labels = batch.labels;
    in.present = batch.present;
    in.trace_weight = current_trace_weight();
    CmLossOutput out;
    out.d_seg_logits = dseg;
    for (int r = 0; r < R; ++r) {
      in.cm_raw.push_back(pixel_cm ? m.cm_raw[r].data() : P[m.gcm[r]].value.data());
      if (backward) {
        if (pixel_cm) {
          // The raw channels are read only by the loss: their gradient replaces
          // them (loss.hpp), so the step holds one array per head, not two.
          out.d_cm_raw.push_back(m.cm_raw[r].data());
        } else {
          out.d_cm_raw.push_back(P[m.gcm[r]].grad.data());
        }
      }
    }
    cm_loss(in, out);
    res.loss = out.loss, res.ce = out.ce, res.trace = out.trace, res.trace_weight = in.trace_weight;
  }
  res.step = step;
  if (!backward) return res;

  // ---- backward
  const size_t feat_count = (size_t)n * C0 * V0;
  grow(m.d_feat, feat_count);
  std::fill_n(m.d_feat.begin(), feat_count, 0.f);
  // The heads on the shared features: one pass (the seg head first, then, without
  // extra blocks, every CM head); heads behind extra blocks below.
  heads[0].dy = m.d_seg.data(), heads[0].dw = P[m.seg_w].grad.data(), heads[0].db = P[m.seg_b].grad.data();
  for (int r = 0; r + 1 < (int)heads.size(); ++r) {
    heads[r + 1].dy = m.cm_raw[r].data();
    heads[r + 1].dw = P[m.cm_w[r]].grad.data(), heads[r + 1].db = P[m.cm_b[r]].grad.data();
  }
  conv1_backward_heads(feat, heads, m.d_feat.data(), n, C0, V0);
  // The features' gradient in the trunk's layout.
  std::vector<float>* g_feat = &m.d_feat;
  if (t.block) {
    grow(m.d_feat_trunk, feat_count);
    onednn::to_blocked(m.d_feat.data(), m.d_feat_trunk.data(), n, C0, m.level_s[0], nd, t.block);
    g_feat = &m.d_feat_trunk;
  }
  if (!plain_ce && pixel_cm && B > 0) {
    for (int r = 0; r < R; ++r) {
      // Through the head, then this annotator's extra blocks, into the shared features.
      grow(m.d_tmp, feat_count);
      grow(m.d_tmp2, feat_count);
      std::fill_n(m.d_tmp.begin(), feat_count, 0.f);
      conv1_backward(head_in[r], P[m.cm_w[r]].value.data(), m.cm_raw[r].data(), m.d_tmp.data(),
                     P[m.cm_w[r]].grad.data(), P[m.cm_b[r]].grad.data(), n, C0, K, V0);
      if (t.block) {
        onednn::to_blocked(m.d_tmp.data(), m.d_tmp2.data(), n, C0, m.level_s[0], nd, t.block);
        std::swap(m.d_tmp, m.d_tmp2);
      }
      for (int b = B - 1; b >= 0; --b) {
        const float* bin = b == 0 ? feat_trunk : m.cmb_c[r * B + b - 1].a2.data();
        block_backward(P, m.cm_blocks_flat[r * B + b], bin, n, m.level_s[0], nd, m.cmb_c[r * B + b], m.d_tmp.data(),
                       m.d_tmp2.data(), m.scratch_a, m.scratch_b, t);
        std::swap(m.d_tmp, m.d_tmp2);
      }
      add_into(g_feat->data(), m.d_tmp.data(), (int64_t)feat_count);
    }
  }

  // Decoder, deepest first. g_enc[k] collects the gradient of encoder output k.
  m.g_enc.resize(D);
  for (int k = 0; k < D; ++k) {
    const size_t count = (size_t)n * m.enc[k].cout * V(k);
    grow(m.g_enc[k], count);
    // The deepest level's gradient is written whole by up.0's backward (below).
    if (k < D - 1 || D == 1) std::fill_n(m.g_enc[k].begin(), count, 0.f);
  }
  // The features' gradient moves (no copy) into the decoder, or straight to the encoder.
  std::vector<float>& g_out = m.g_out;
  std::vector<float>& d_cat = m.d_cat;
  std::vector<float>& d_up = m.d_up;
  std::vector<float>& d_below = m.d_below;
  if (D > 1)
    g_out.swap(*g_feat);
  else
    m.g_enc[0].swap(*g_feat);
  for (int k = D - 2; k >= 0; --k) {
    const int lo = D - 1 - k, hi = D - 2 - k, cout = m.dec[k].cout, cin = 2 * cout;
    grow(d_cat, (size_t)n * cin * V(hi));
    block_backward(P, m.dec[k], m.cats[k].data(), n, m.level_s[hi], nd, m.dec_c[k], g_out.data(), d_cat.data(),
                   m.scratch_a, m.scratch_b, t);
    grow(d_up, (size_t)n * cout * V(hi));
    if (k > 0) grow(d_below, (size_t)n * cin * V(lo));
    concat_backward(d_cat.data(), nullptr, cout, d_up.data(), cout, n, V(hi));
    // Skip gradient: add the first half of d_cat into g_enc[hi] (the skip's
    // channels, or channel blocks, come first in each image in both layouts).
    {
      const int64_t Vh = V(hi);
      float* ge = m.g_enc[hi].data();
      parallel_for(n, [&](int64_t i, int) {
        const float* src = d_cat.data() + i * cin * Vh;
        float* dst = ge + i * cout * Vh;
        for (int64_t e = 0; e < cout * Vh; ++e) dst[e] += src[e];
      });
    }
    const float* below = k == 0 ? m.enc_c[D - 1].a2.data() : m.dec_c[k - 1].a2.data();
    // up.0's input is the deepest encoder output, read by nothing else: its
    // gradient goes straight into g_enc[D - 1].
    float* dx = k == 0 ? m.g_enc[D - 1].data() : d_below.data();
    t.upconv2_backward(below, P[m.up_w[k]].value.data(), d_up.data(), dx, P[m.up_w[k]].grad.data(),
                       P[m.up_b[k]].grad.data(), n, cin, cout, m.level_s[lo], nd);
    if (k > 0) g_out.swap(d_below);
  }

  // Encoder, deepest first.
  std::vector<float>& d_in = m.d_in;
  std::vector<float>& d_pool = m.d_pool;
  for (int k = D - 1; k >= 0; --k) {
    const float* in = k == 0 ? batch.images : m.pooled[k].data();
    if (k > 0) grow(d_in, (size_t)n * m.enc[k].cin * V(k));
    block_backward(P, m.enc[k], in, n, m.level_s[k], nd, m.enc_c[k], m.g_enc[k].data(), k > 0 ? d_in.data() : nullptr,
                   m.scratch_a, m.scratch_b, t, k == 0);
    if (k > 0) {
      const int ch = m.enc[k - 1].cout;
      const int64_t count = (int64_t)n * ch * V(k - 1);
      grow(d_pool, count);
      t.pool_backward(d_in.data(), m.pool_arg[k], d_pool.data(), n, ch, m.level_s[k - 1], nd);
      add_into(m.g_enc[k - 1].data(), d_pool.data(), count);
    }
  }
  return res;
}

StepResult Model::compute_gradients(const Batch& batch) { return run(batch, true); }
StepResult Model::evaluate(const Batch& batch) { return run(batch, false); }

StepResult Model::train_step(const Batch& batch) {
  StepResult r;
  {
    ProfileScope prof("train_step");
    r = run(batch, true);
    apply_optimizer();
  }
  r.step = step;
  if (profiling_enabled()) {
    std::fprintf(stderr, "cmseg profile, step %lld:\n%s", (long long)step, profile_report().c_str());
    // A GPU model's host times say little (its work is queued): the device's own.
    if (gpu_)
      std::fprintf(stderr, "cmseg GPU profile, step %lld (device time):\n%s", (long long)step,
                   gpu_->context().profile_report(1).c_str());
  }
  return r;
}

void Model::predict(const float* images, int n, Spatial s, float* probs, float* cms, float* annotator_probs) {
  if (gpu_) return predict_device(images, n, s, probs, cms, annotator_probs);  // Device::Cuda
  const ModelConfig& c = config_;
  const int L = c.classes, R = c.annotators, K = cm_head_channels(c.cm_mode, L, c.cm_rank);
  // The forward and heads only: no labels, no loss.
  Batch b;
  b.n = n, b.s = s, b.images = images;
  run(b, false, false, cms || annotator_probs);
  Impl& m = *impl_;
  const int64_t V = s.size();
  softmax_forward(m.seg_logits.data(), probs, n, L, V);
  if (!cms && !annotator_probs) return;
  // Runs of pixels, each annotator's CMs as rows along the run (cm_rows_from_raw: the
  // softplus vectorised, 4x faster than pixel by pixel); q_r = A_r p along the same rows.
  constexpr int64_t kRun = 512;
  const int64_t runs = (V + kRun - 1) / kRun;
  const bool global = c.cm_mode == CmMode::Global;
  parallel_for((int64_t)n * R * runs, [&](int64_t item, int) {
    const int64_t t = item % runs, ir = item / runs;
    const int i = (int)(ir / R), r = (int)(ir % R);
    const int64_t v0 = t * kRun, cnt = std::min(kRun, V - v0);
    // The rows go straight into the CM output when there is one (row stride V), else into
    // a run-sized scratch (stride cnt) for q alone.
    thread_local std::vector<float> scratch;
    float* A;
    int64_t row_stride;
    if (cms) {
      A = cms + ((int64_t)i * R + r) * L * L * V + v0;
      row_stride = V;
    } else {
      scratch.resize((size_t)L * L * cnt);
      A = scratch.data();
      row_stride = cnt;
    }
    if (global) {
      float a[kMaxClasses * kMaxClasses];
      cm_from_raw(c.cm_mode, L, c.cm_rank, params_[m.gcm[r]].value.data(), 1, a);
      for (int e = 0; e < L * L; ++e) std::fill_n(A + e * row_stride, cnt, a[e]);
    } else {
      cm_rows_from_raw(c.cm_mode, L, c.cm_rank, m.cm_raw[r].data() + (int64_t)i * K * V + v0, V, cnt, A, row_stride);
    }
    if (annotator_probs)
      for (int a = 0; a < L; ++a) {
        float* q = annotator_probs + (((int64_t)i * R + r) * L + a) * V + v0;
        std::fill_n(q, cnt, 0.f);
        for (int j = 0; j < L; ++j) {
          const float* p = probs + ((int64_t)i * L + j) * V + v0;
          const float* Aaj = A + (a * L + j) * row_stride;
          for (int64_t v = 0; v < cnt; ++v) q[v] += Aaj[v] * p[v];
        }
      }
  });
}

void Model::release_buffers() {
  if (gpu_) {
    // The device pool keeps what is freed for the next allocation of any model on the
    // device (one default pool), so the next member of an ensemble reuses it.
    gpu_->release_activations();
    return;
  }
  static_cast<CallBuffers&>(*impl_) = CallBuffers();
#if defined(__GLIBC__)
  // glibc raises its mmap threshold after large frees, so buffers of a few MB come from
  // the heap's arenas and their pages stay resident until trimmed.
  malloc_trim(0);
#endif
}

}  // namespace cmseg
