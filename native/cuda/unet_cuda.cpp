// The U-Net of SPEC section 2 on the device: the same graph, the same order of
// operations and the same buffer conventions as the CPU reference in
// native/model/unet.cpp, written against the layer API of cmseg/cuda.hpp (no CUDA
// header here: every launch lives in a .cu file of its layer).
//
// Memory. Parameters, gradients and Adam moments are four contiguous device arrays
// (one memset zeroes every gradient; one Adam launch updates everything). Every
// activation and scratch array is a pool allocation. The backward pass hands each
// one back to the pool once its last reader is queued (the heads' outputs and
// gradients before the decoder's scratch is taken, each decoder block's
// activations before its input gradient is taken, the scratch at the end), as
// autograd frees saved tensors; the CM loss writes each head's gradient over its
// raw output. A block does not keep its first activation (the backward recomputes
// it from the convolution's output and the norm's statistics, bit for bit, an
// elementwise pass), and an encoder's output goes back to the pool once the
// decoder has copied it as its skip (the backward reads neither). The peak is then
// the forward's activations plus the features' gradient, not everything at once
// (in the host emulation of a brats3d-like step: 13.2 level-0 activations, 14.4 with
// conv3's channels-last copies; 17.1 keeping the first activations and skips, 23.5
// without the early releases). The stream-ordered pool keeps the memory cached, so
// the next step's allocations are served from it without a device synchronisation.
// Scratch arrays are shared where their lifetimes do not overlap on the stream
// (noted at each use); the stream orders every reuse after the previous reader.
//
// Host synchronisation: a step waits for its loss (the value is returned), never
// for the backward pass or the update, which overlap with the host's next batch.
// Downloads (parameters, predictions) wait for the stream.
#include <algorithm>
#include <string>

#include "cmseg/cuda.hpp"
#include "cmseg/error.hpp"

namespace cmseg {
namespace cuda {
namespace {

constexpr int kMaxDeviceAnnotators = 16;  // the fused CM loss kernel's limit (cm_loss.cu)

// One block: conv3 -> IN -> ReLU -> conv3 -> IN -> ReLU. Indices into the parameters.
struct Block {
  int cin = 0, cout = 0;
  int w1 = -1, g1 = -1, b1 = -1, w2 = -1, g2 = -1, b2 = -1;
};

// What a block keeps for its backward pass (as BlockCache on the CPU, less the first
// activation a1 = relu(norm(h1)): the backward recomputes it from h1 and its
// statistics, bit for bit, into h2's memory once h2 is read for the last time).
struct BlockActs {
  Buffer<float> h1, h2, a2, mean1, rstd1, mean2, rstd2;
};

// Grows `b` to at least `count` elements (contents are not kept) and returns it.
template <class T>
T* ensure(Context& ctx, Buffer<T>& b, size_t count) {
  if (b.size() < count) {
    b.reset();  // free first: the pool can hand the same memory back
    b = Buffer<T>(ctx, count);
  }
  return b.data();
}

ContextOptions context_options(const ModelConfig& c) {
  ContextOptions o;
  o.tf32 = c.tf32;
  o.bf16 = c.bf16;
  o.memory_limit_bytes = c.gpu_memory_limit;
  return o;
}

}  // namespace

struct ModelGpu::Impl {
  ModelConfig c;
  Context ctx;  // first member: destroyed after every buffer below

  // ---- parameters: offsets into four contiguous arrays
  std::vector<std::string> names;
  std::vector<int64_t> offset, numel;
  int64_t total = 0;
  Buffer<float> value, grad, m1, m2;
  std::vector<Block> enc, dec, cmb;                // cmb[r * B + b]
  std::vector<int> up_w, up_b, cm_w, cm_b, gcm;    // per level / annotator
  int seg_w = -1, seg_b = -1;

  // ---- activations of the last forward pass and backward scratch
  std::vector<Spatial> level_s;
  std::vector<BlockActs> enc_a, dec_a, cmb_a;
  std::vector<Buffer<float>> pooled, cats, cm_raw, g_enc;  // cm_raw[r] turns into its gradient in the loss
  std::vector<Buffer<uint8_t>> pool_arg;
  Buffer<float> seg_logits, d_seg, d_feat, d_tmp, d_tmp2, scratch_a, d_cat, d_below, d_in;

  // ---- the batch, in two slots a training run alternates (Context::stage_*: the
  // upload of one step runs under the backward of the step before), the images
  // predict() reads, and its outputs
  struct BatchSlot {
    Buffer<float> images, soft_target;
    std::vector<Buffer<uint8_t>> labels;
    Buffer<uint8_t> present, target;
    bool fence = false;  // buffers (re)allocated on the main stream and not yet fenced for the copies
  };
  BatchSlot slots[Context::kStageSlots];
  int next_slot = 0;
  Buffer<float> pred_images, probs, cms, q;

  // ---- Adam's guard (adam()): the device raises `refused` to skip an update; the
  // host reads it at its next wait for the stream, not right after the update
  Buffer<unsigned long long> refused;
  bool update_unread = false;  // an adam() whose flag the host has not read yet
  int64_t unread_step = 0;

  Impl(const ModelConfig& config) : c(config), ctx(context_options(config)) {}

  // Reads the last adam()'s flag (waits for the stream) and throws RefusedUpdate, once,
  // when the device refused that update.
  void report_refused_update() {
    if (!update_unread) return;
    update_unread = false;
    unsigned long long flag = 0;
    refused.download(&flag);
    if (!flag) return;
    const int64_t k = total - (int64_t)flag;
    // The padding between parameters is zero and never trips the guard.
    const size_t i = std::upper_bound(offset.begin(), offset.end(), k) - offset.begin() - 1;
    float g = 0.f;
    ctx.download(&g, grad.data() + k, sizeof g);  // the next step's backward has not touched it yet
    throw RefusedUpdate(str("optimiser step ", unread_step, " was not applied: ",
                            unsquarable_gradient_message(names[i], k - offset[i], g),
                            " (the weights and Adam state are those from before that step; a GPU model reports",
                            " a refused update at its next call)"),
                        unread_step);
  }

  float* W(int i) { return value.data() + offset[i]; }
  float* G(int i) { return grad.data() + offset[i]; }
  int64_t V(int k) const { return level_s[k].size(); }

  int index(const std::string& name) const {
    for (size_t i = 0; i < names.size(); ++i)
      if (names[i] == name) return (int)i;
    throw Error(str("ModelGpu: the model has no parameter '", name, "'"));
  }
  Block block(const std::string& prefix) const {
    Block b;
    b.w1 = index(prefix + ".conv1.weight"), b.g1 = index(prefix + ".norm1.weight"), b.b1 = index(prefix + ".norm1.bias");
    b.w2 = index(prefix + ".conv2.weight"), b.g2 = index(prefix + ".norm2.weight"), b.b2 = index(prefix + ".norm2.bias");
    return b;
  }

  void set_levels(Spatial s) {
    level_s.assign(c.depth, s);
    for (int k = 1; k < c.depth; ++k) level_s[k] = halve(level_s[k - 1], c.ndim);
  }

  void block_forward(const Block& b, const float* x, int n, Spatial s, BlockActs& a) {
    const int64_t Vs = s.size();
    const size_t sz = (size_t)n * b.cout * Vs, planes = (size_t)n * b.cout;
    float* h1 = ensure(ctx, a.h1, sz);
    Buffer<float> a1_(ctx, sz);  // read by the second convolution only: back to the pool after it
    float* a1 = a1_.data();
    float* h2 = ensure(ctx, a.h2, sz);
    float* a2 = ensure(ctx, a.a2, sz);
    float* mean1 = ensure(ctx, a.mean1, planes);
    float* rstd1 = ensure(ctx, a.rstd1, planes);
    float* mean2 = ensure(ctx, a.mean2, planes);
    float* rstd2 = ensure(ctx, a.rstd2, planes);
    conv3_forward(ctx, x, W(b.w1), h1, n, b.cin, b.cout, s, c.ndim);
    instance_norm_forward(ctx, h1, W(b.g1), W(b.b1), a1, mean1, rstd1, n, b.cout, Vs, true);
    conv3_forward(ctx, a1, W(b.w2), h2, n, b.cout, b.cout, s, c.ndim);
    instance_norm_forward(ctx, h2, W(b.g2), W(b.b2), a2, mean2, rstd2, n, b.cout, Vs, true);
  }

  // A block's backward up to the gradient of its first convolution's output, left in
  // scratch_a (returned). dy, the gradient of the block's output, is overwritten
  // (each instance norm's backward runs in place), so the block needs one scratch
  // array, not two. The block's activations are not read after it.
  float* block_backward_to_conv1(const Block& b, int n, Spatial s, BlockActs& a, float* dy) {
    const int64_t Vs = s.size();
    const size_t sz = (size_t)n * b.cout * Vs;
    float* t = ensure(ctx, scratch_a, sz);
    instance_norm_backward(ctx, a.h2.data(), a.mean2.data(), a.rstd2.data(), W(b.g2), W(b.b2), dy, dy, G(b.g2),
                           G(b.b2), n, b.cout, Vs, true);
    // h2 is not read again: its memory takes a1, the second convolution's input.
    float* a1 = a.h2.data();
    instance_norm_apply(ctx, a.h1.data(), a.mean1.data(), a.rstd1.data(), W(b.g1), W(b.b1), a1, n, b.cout, Vs, true);
    conv3_backward(ctx, a1, W(b.w2), dy, t, G(b.w2), n, b.cout, b.cout, s, c.ndim);
    instance_norm_backward(ctx, a.h1.data(), a.mean1.data(), a.rstd1.data(), W(b.g1), W(b.b1), t, t, G(b.g1),
                           G(b.b1), n, b.cout, Vs, true);
    return t;
  }
  // dy (overwritten): gradient of the block output; dx: of its input (may be null),
  // not scratch_a.
  void block_backward(const Block& b, const float* x, int n, Spatial s, BlockActs& a, float* dy, float* dx) {
    float* t = block_backward_to_conv1(b, n, s, a, dy);
    conv3_backward(ctx, x, W(b.w1), t, dx, G(b.w1), n, b.cin, b.cout, s, c.ndim);
  }

  // Scratch sized once per step for the largest level it serves, so a pointer
  // taken from it stays valid for the whole step. (d_cat is taken in the decoder's
  // backward, once level 0's block activations are back in the pool.)
  void size_scratch(int n) {
    const int D = c.depth;
    size_t block_max = 0, below_max = 0, in_max = 0;
    auto blk = [&](const Block& b, int level) { block_max = std::max(block_max, (size_t)n * b.cout * V(level)); };
    for (int k = 0; k < D; ++k) blk(enc[k], k);
    for (int k = 0; k + 1 < D; ++k) {
      const int lo = D - 1 - k, hi = D - 2 - k;
      blk(dec[k], hi);
      below_max = std::max(below_max, (size_t)n * 2 * dec[k].cout * V(lo));
    }
    for (auto& b : cmb) blk(b, 0);
    for (int k = 1; k < D; ++k) {
      in_max = std::max(in_max, (size_t)n * enc[k].cin * V(k));
      block_max = std::max(block_max, (size_t)n * enc[k - 1].cout * V(k - 1));  // d_pool lives in scratch_a
    }
    ensure(ctx, scratch_a, block_max);
    ensure(ctx, d_below, below_max);
    ensure(ctx, d_in, in_max);
  }

  // ContextOptions::concat_in_place, for the GEMM up-convolutions only (the cuDNN
  // paths would copy their output in and out of packed scratch instead).
  bool concat_in_place() const {
    return ctx.options().concat_in_place && ctx.options().upconv == UpconvPath::Gemm;
  }

  // The U-Net and its heads on images already on the device. cm_heads: run the
  // pixel-wise CM heads (and their extra blocks) too.
  const float* forward(int n, const float* x0, bool cm_heads) {
    const int D = c.depth, nd = c.ndim, L = c.classes, R = c.annotators, C0 = c.base;
    for (int k = 0; k < D; ++k) {
      const float* in = x0;
      if (k > 0) {
        const int ch = enc[k - 1].cout;
        const size_t count = (size_t)n * ch * V(k);
        float* p = ensure(ctx, pooled[k], count);
        uint8_t* arg = ensure(ctx, pool_arg[k], count);
        maxpool2_forward(ctx, enc_a[k - 1].a2.data(), p, arg, n * ch, level_s[k - 1], nd);
        in = p;
      }
      block_forward(enc[k], in, n, level_s[k], enc_a[k]);
    }
    for (int k = 0; k + 1 < D; ++k) {
      const int lo = D - 1 - k, hi = D - 2 - k;
      const float* below = k == 0 ? enc_a[D - 1].a2.data() : dec_a[k - 1].a2.data();
      const int cout = dec[k].cout, cin = 2 * cout;
      float* cat = ensure(ctx, cats[k], (size_t)n * cin * V(hi));
      if (concat_in_place()) {
        // Straight into the second half of each image of the concat buffer.
        upconv2_forward(ctx, below, W(up_w[k]), W(up_b[k]), cat + (int64_t)cout * V(hi), n, cin, cout, level_s[lo],
                        nd, (int64_t)cin * V(hi));
        concat_forward(ctx, enc_a[hi].a2.data(), cout, nullptr, cout, cat, n, V(hi));
      } else {
        // The up-convolution's output is only read by the concat: scratch_a (free in the forward).
        float* up = ensure(ctx, scratch_a, (size_t)n * cout * V(hi));
        upconv2_forward(ctx, below, W(up_w[k]), W(up_b[k]), up, n, cin, cout, level_s[lo], nd);
        concat_forward(ctx, enc_a[hi].a2.data(), cout, up, cout, cat, n, V(hi));
      }
      // The skip's last reader: the backward needs neither it (the block's instance
      // norm recomputes its mask; the max-pool kept its argmax) nor this copy's source.
      enc_a[hi].a2.reset();
      block_forward(dec[k], cat, n, level_s[hi], dec_a[k]);
    }
    const float* feat = D > 1 ? dec_a[D - 2].a2.data() : enc_a[0].a2.data();
    const int64_t V0 = V(0);
    // The heads on the features in one pass (the CM heads too when they have no
    // extra blocks); a CM head after its blocks on its own.
    const int B = c.cm_head_blocks, K = cm_head_channels(c.cm_mode, L, c.cm_rank);
    std::vector<Conv1Head> heads{seg_head(n)};
    if (cm_heads && B == 0)
      for (int r = 0; r < R; ++r) heads.push_back(cm_head(r, n, K));
    conv1_forward_heads(ctx, feat, heads, n, C0, V0);
    if (cm_heads && B > 0) {
      for (int r = 0; r < R; ++r) {
        const float* head_in = feat;
        for (int b = 0; b < B; ++b) {
          block_forward(cmb[r * B + b], head_in, n, level_s[0], cmb_a[r * B + b]);
          head_in = cmb_a[r * B + b].a2.data();
        }
        const Conv1Head h = cm_head(r, n, K);
        conv1_forward(ctx, head_in, h.w, h.b, h.y, n, C0, K, V0);
      }
    }
    return feat;
  }

  // The consensus head: logits into seg_logits; backward: d_seg into the gradients.
  Conv1Head seg_head(int n) {
    Conv1Head h;
    h.cout = c.classes, h.w = W(seg_w), h.b = W(seg_b);
    h.y = ensure(ctx, seg_logits, (size_t)n * c.classes * V(0));
    h.dy = d_seg.data(), h.dw = G(seg_w), h.db = G(seg_b);
    return h;
  }
  // Annotator r's pixel-wise CM head: raw channels into cm_raw[r], whose contents the
  // loss replaces with their gradient.
  Conv1Head cm_head(int r, int n, int K) {
    Conv1Head h;
    h.cout = K, h.w = W(cm_w[r]), h.b = W(cm_b[r]);
    h.y = ensure(ctx, cm_raw[r], (size_t)n * K * V(0));
    h.dy = h.y, h.dw = G(cm_w[r]), h.db = G(cm_b[r]);
    return h;
  }

  // The heads' outputs and gradients once the heads' backward is queued.
  void release_heads() {
    for (Buffer<float>& b : cm_raw) b.reset();
    for (BlockActs& a : cmb_a) a = BlockActs();
    for (Buffer<float>* b : {&seg_logits, &d_seg, &d_tmp, &d_tmp2}) b->reset();
  }
  // The backward's scratch once the step is queued (the forward takes scratch_a again).
  void release_scratch() {
    for (Buffer<float>* b : {&scratch_a, &d_cat, &d_below, &d_in, &d_feat}) b->reset();
  }

  // The images predict() reads (uploaded on the main stream: nothing to overlap).
  float* upload_images(const float* host, int n, Spatial s) {
    const size_t count = (size_t)n * c.in_channels * s.size();
    float* d = ensure(ctx, pred_images, count);
    ctx.upload(d, host, count * sizeof(float));
    return d;
  }
};

ModelGpu::ModelGpu(const ModelConfig& config, const std::vector<Param>& params) {
  if (!available()) throw Error(str("device 'cuda': no usable CUDA device (", unavailable_reason(), ")"));
  if (config.annotators > kMaxDeviceAnnotators)
    fail("device 'cuda' takes at most ", kMaxDeviceAnnotators, " annotators, got ", config.annotators);
  impl_.reset(new Impl(config));
  Impl& m = *impl_;
  const ModelConfig& c = m.c;
  for (const Param& p : params) {
    m.names.push_back(p.name);
    // Each parameter starts on a 256-byte boundary (cuDNN and cuBLAS want aligned
    // filters; odd-length biases would misalign what follows). The padding stays
    // zero: zero on upload, zero gradient, and Adam keeps a zero at zero.
    m.total = (m.total + 63) / 64 * 64;
    m.offset.push_back(m.total);
    m.numel.push_back(p.numel());
    m.total += p.numel();
  }
  // The graph from the SPEC parameter names; widths from the weight shapes
  // ([cout, cin, k...] for conv3).
  auto with_widths = [&](Block b) {
    const Param& w = params[b.w1];
    b.cout = (int)w.shape[0], b.cin = (int)w.shape[1];
    return b;
  };
  for (int k = 0; k < c.depth; ++k) m.enc.push_back(with_widths(m.block("enc." + std::to_string(k))));
  for (int k = 0; k + 1 < c.depth; ++k) {
    m.up_w.push_back(m.index("up." + std::to_string(k) + ".weight"));
    m.up_b.push_back(m.index("up." + std::to_string(k) + ".bias"));
    m.dec.push_back(with_widths(m.block("dec." + std::to_string(k))));
  }
  m.seg_w = m.index("seg.weight"), m.seg_b = m.index("seg.bias");
  for (int r = 0; r < c.annotators; ++r) {
    const std::string rs = std::to_string(r);
    if (c.cm_mode == CmMode::Global) {
      m.gcm.push_back(m.index("gcm." + rs));
      continue;
    }
    for (int b = 0; b < c.cm_head_blocks; ++b)
      m.cmb.push_back(with_widths(m.block("cmblock." + rs + "." + std::to_string(b))));
    m.cm_w.push_back(m.index("cm." + rs + ".weight"));
    m.cm_b.push_back(m.index("cm." + rs + ".bias"));
  }
  const int D = c.depth, R = c.annotators;
  m.enc_a.resize(D), m.dec_a.resize(D > 1 ? D - 1 : 0), m.cmb_a.resize(m.cmb.size());
  m.pooled.resize(D), m.pool_arg.resize(D), m.cats.resize(D > 1 ? D - 1 : 0);
  m.cm_raw.resize(R), m.g_enc.resize(D);
  for (auto& slot : m.slots) slot.labels.resize(R);

  m.value = Buffer<float>(m.ctx, (size_t)m.total);
  m.grad = Buffer<float>(m.ctx, (size_t)m.total);
  m.m1 = Buffer<float>(m.ctx, (size_t)m.total);
  m.m2 = Buffer<float>(m.ctx, (size_t)m.total);
  m.refused = Buffer<unsigned long long>(m.ctx, 1);  // held with the parameters
  upload_params(params);
}

// The buffers are freed on this model's device, whichever thread drops the model.
ModelGpu::~ModelGpu() {
  try {
    impl_->ctx.make_current();
  } catch (...) {
  }
}

Context& ModelGpu::context() { return impl_->ctx; }
void ModelGpu::set_tf32(bool on) { impl_->ctx.set_tf32(on); }

void ModelGpu::upload_params(const std::vector<Param>& params) {
  Impl& m = *impl_;
  m.ctx.make_current();
  if (params.size() != m.names.size()) fail("ModelGpu: expected ", m.names.size(), " parameters, got ", params.size());
  std::vector<float> host((size_t)m.total);
  auto send = [&](std::vector<float> Param::*field, Buffer<float>& dst) {
    for (size_t i = 0; i < params.size(); ++i) {
      const std::vector<float>& src = params[i].*field;
      if ((int64_t)src.size() != m.numel[i] || params[i].name != m.names[i])
        fail("ModelGpu: parameter ", i, " ('", params[i].name, "') does not match the model it was built from");
      std::copy(src.begin(), src.end(), host.begin() + m.offset[i]);
    }
    dst.upload(host.data());
    // cudaMemcpyAsync from pageable memory is only documented as "might be
    // synchronous": wait before `host` is refilled for the next field or freed.
    // Rare (construction and host edits), so the wait costs nothing that matters.
    m.ctx.synchronize();
  };
  send(&Param::value, m.value);
  send(&Param::grad, m.grad);
  send(&Param::m, m.m1);
  send(&Param::v, m.m2);
}

void ModelGpu::download_params(std::vector<Param>& params) {
  Impl& m = *impl_;
  m.ctx.make_current();
  m.report_refused_update();
  if (params.size() != m.names.size()) fail("ModelGpu: expected ", m.names.size(), " parameters, got ", params.size());
  std::vector<float> host((size_t)m.total);
  auto fetch = [&](std::vector<float> Param::*field, const Buffer<float>& src) {
    src.download(host.data());  // waits for the stream
    for (size_t i = 0; i < params.size(); ++i) {
      std::vector<float>& dst = params[i].*field;
      dst.assign(host.begin() + m.offset[i], host.begin() + m.offset[i] + m.numel[i]);
    }
  };
  fetch(&Param::value, m.value);
  fetch(&Param::grad, m.grad);
  fetch(&Param::m, m.m1);
  fetch(&Param::v, m.m2);
}

StepResult ModelGpu::run(const Batch& batch, bool backward, float trace_weight) {
  Impl& m = *impl_;
  m.ctx.make_current();
  m.ctx.profile_step_begin();
  Context& ctx = m.ctx;
  const ModelConfig& c = m.c;
  const int n = batch.n, D = c.depth, L = c.classes, R = c.annotators, nd = c.ndim, C0 = c.base;
  const bool plain_ce = batch.target || batch.soft_target;
  const bool pixel_cm = c.cm_mode != CmMode::Global;
  const int K = cm_head_channels(c.cm_mode, L, c.cm_rank), B = c.cm_head_blocks;
  m.set_levels(batch.s);
  const int64_t V0 = m.V(0), NV = (int64_t)n * V0;

  // ---- the batch onto the device, through the slot the step before last used
  if (!batch.target && !batch.soft_target && (int)batch.labels.size() != R)
    fail("expected labels for ", R, " annotators, got ", batch.labels.size());
  const int slot = m.next_slot;
  Impl::BatchSlot& bs = m.slots[slot];
  const size_t image_bytes = (size_t)n * c.in_channels * batch.s.size() * sizeof(float);
  // Device buffers first (allocated on the main stream; the copy stream must not
  // write them before that point), then the copies.
  struct Copy {
    void* dst;
    const void* src;
    size_t bytes;
  };
  std::vector<Copy> copies;
  auto buffer = [&](auto& buf, size_t count, const void* src) {
    if (buf.size() < count) bs.fence = true;  // ensure() will (re)allocate it
    auto* d = ensure(ctx, buf, count);
    copies.push_back({d, src, count * sizeof(*d)});
    return d;
  };
  const float* x0 = buffer(bs.images, image_bytes / sizeof(float), batch.images);
  const uint8_t* target = nullptr;
  const float* soft = nullptr;
  std::vector<const uint8_t*> labels;
  const uint8_t* present = nullptr;
  if (batch.target) {
    target = buffer(bs.target, (size_t)NV, batch.target);
  } else if (batch.soft_target) {
    soft = buffer(bs.soft_target, (size_t)NV * L, batch.soft_target);
  } else {
    for (int r = 0; r < R; ++r) labels.push_back(buffer(bs.labels[r], (size_t)NV, batch.labels[r]));
    if (batch.present) present = buffer(bs.present, (size_t)n * R, batch.present);
  }
  size_t staged = 0;
  for (const Copy& k : copies) staged += k.bytes;
  if (bs.fence) {
    ctx.stage_after_alloc();
    bs.fence = false;
  }
  ctx.stage_begin(slot, staged);
  try {
    for (const Copy& k : copies) ctx.stage_copy(slot, k.dst, k.src, k.bytes);
    ctx.stage_end(slot);
  } catch (...) {
    ctx.stage_abort(slot);  // the copies already queued are waited for before anything frees their targets
    throw;
  }
  m.next_slot = (slot + 1) % Context::kStageSlots;
  // Whatever ends the step (its last reader queued, or an error), the slot is released
  // after everything queued so far.
  struct Release {
    Context& ctx;
    int slot;
    ~Release() { ctx.stage_release(slot); }
  } release{ctx, slot};

  // ---- forward
  const float* feat = m.forward(n, x0, !plain_ce && pixel_cm);

  // ---- loss
  StepResult res;
  // The stream is waited for here (the loss would wait for the same forward pass), and
  // before the gradients are zeroed: the error quotes the refused one.
  m.report_refused_update();
  if (backward) m.grad.zero();
  float* dseg = backward ? ensure(ctx, m.d_seg, (size_t)NV * L) : nullptr;
  if (target) {
    res.loss = ce_loss_hard(ctx, m.seg_logits.data(), target, n, L, V0, dseg);
  } else if (soft) {
    res.loss = ce_loss_soft(ctx, m.seg_logits.data(), soft, n, L, V0, dseg);
  } else {
    CmLossInput in;
    in.n = n, in.L = L, in.R = R, in.V = V0, in.mode = c.cm_mode, in.rank = c.cm_rank;
    in.seg_logits = m.seg_logits.data();
    in.labels = labels;
    in.present = present;
    in.trace_weight = trace_weight;
    CmLossOutput out;
    out.d_seg_logits = dseg;
    for (int r = 0; r < R; ++r) {
      in.cm_raw.push_back(pixel_cm ? m.cm_raw[r].data() : m.W(m.gcm[r]));
      // The raw CM channels are read only by the loss: their gradient overwrites them
      // in place (loss.hpp), which saves R x K channels of level-0 memory at the
      // step's peak. Global mode: the loss writes d/d gcm.r straight into its gradient.
      if (backward) out.d_cm_raw.push_back(pixel_cm ? m.cm_raw[r].data() : m.G(m.gcm[r]));
    }
    cm_loss(ctx, in, out);
    res.loss = out.loss, res.ce = out.ce, res.trace = out.trace, res.trace_weight = trace_weight;
  }
  if (!backward) return res;

  // ---- backward (the order of native/model/unet.cpp)
  const size_t feat_count = (size_t)NV * C0;
  float* d_feat = ensure(ctx, m.d_feat, feat_count);
  ctx.zero(d_feat, feat_count * sizeof(float));
  std::vector<Conv1Head> heads{m.seg_head(n)};
  if (!plain_ce && pixel_cm && B == 0)
    for (int r = 0; r < R; ++r) heads.push_back(m.cm_head(r, n, K));
  conv1_backward_heads(ctx, feat, heads, d_feat, n, C0, V0);
  if (!plain_ce && pixel_cm && B > 0) {
    for (int r = 0; r < R; ++r) {
      // Through the head, then this annotator's extra blocks, into the shared features.
      float* dt = ensure(ctx, m.d_tmp, feat_count);
      float* dt2 = ensure(ctx, m.d_tmp2, feat_count);
      ctx.zero(dt, feat_count * sizeof(float));
      const float* head_in = m.cmb_a[r * B + B - 1].a2.data();
      conv1_backward(ctx, head_in, m.W(m.cm_w[r]), m.cm_raw[r].data(), dt, m.G(m.cm_w[r]), m.G(m.cm_b[r]), n, C0, K,
                     V0);
      for (int b = B - 1; b >= 0; --b) {
        const float* bin = b == 0 ? feat : m.cmb_a[r * B + b - 1].a2.data();
        m.block_backward(m.cmb[r * B + b], bin, n, m.level_s[0], m.cmb_a[r * B + b], dt, dt2);
        std::swap(dt, dt2);
      }
      add_inplace(ctx, d_feat, dt, (int64_t)feat_count);
    }
  }
  m.release_heads();
  m.size_scratch(n);

  // Decoder, deepest first. g_enc[k]: gradient of encoder output k. Each level below
  // the deepest gets its skip gradient first (written, not added), the deepest gets
  // up.0's input gradient; the encoder pass then adds the max-pool gradients. Each
  // is allocated when first written.
  auto g_enc = [&](int k) { return ensure(ctx, m.g_enc[k], (size_t)n * m.enc[k].cout * m.V(k)); };
  if (D == 1) {
    ctx.copy(g_enc(0), d_feat, feat_count * sizeof(float));
    m.d_feat.reset();
  }
  float* g_out = d_feat;
  bool first = true;  // g_out is d_feat
  for (int k = D - 2; k >= 0; --k) {
    const int lo = D - 1 - k, hi = D - 2 - k, cout = m.dec[k].cout, cin = 2 * cout;
    float* t1 = m.block_backward_to_conv1(m.dec[k], n, m.level_s[hi], m.dec_a[k], g_out);
    // The block's activations are read for the last time above (its output was
    // `below` of the level above, done earlier); so is the features' gradient (the
    // first g_out). Back to the pool before d_cat is taken: at level 0, the step's
    // peak, d_cat then takes their memory instead of adding to it. (Grow-only: the
    // deeper levels reuse level 0's d_cat.)
    m.dec_a[k] = BlockActs();
    if (first) m.d_feat.reset(), first = false;
    float* d_cat = ensure(ctx, m.d_cat, (size_t)n * cin * m.V(hi));
    conv3_backward(ctx, m.cats[k].data(), m.W(m.dec[k].w1), t1, d_cat, m.G(m.dec[k].w1), n, cin, cout, m.level_s[hi],
                   nd);
    m.cats[k].reset();
    // The up-convolution's output gradient: read in place from d_cat's second halves,
    // or split off into scratch_a (the block is done with it).
    const bool in_place = m.concat_in_place();
    float* d_up = in_place ? d_cat + (int64_t)cout * m.V(hi) : m.scratch_a.data();
    concat_backward(ctx, d_cat, g_enc(hi), cout, in_place ? nullptr : d_up, cout, n, m.V(hi), false);
    const float* below = k == 0 ? m.enc_a[D - 1].a2.data() : m.dec_a[k - 1].a2.data();
    // d_below is next iteration's g_out: its previous contents (this iteration's
    // g_out) were consumed by block_backward above, earlier on the stream.
    float* dx = k == 0 ? g_enc(D - 1) : m.d_below.data();
    upconv2_backward(ctx, below, m.W(m.up_w[k]), d_up, dx, m.G(m.up_w[k]), m.G(m.up_b[k]), n, cin, cout, m.level_s[lo],
                     nd, in_place ? (int64_t)cin * m.V(hi) : 0);
    g_out = dx;
  }

  // Encoder, deepest first.
  for (int k = D - 1; k >= 0; --k) {
    const float* in = k == 0 ? x0 : m.pooled[k].data();
    float* d_in = k > 0 ? m.d_in.data() : nullptr;
    m.block_backward(m.enc[k], in, n, m.level_s[k], m.enc_a[k], m.g_enc[k].data(), d_in);
    if (k > 0) {
      const int ch = m.enc[k - 1].cout;
      float* d_pool = m.scratch_a.data();  // the block is done with it
      maxpool2_backward(ctx, d_in, m.pool_arg[k].data(), d_pool, n * ch, m.level_s[k - 1], nd);
      add_inplace(ctx, m.g_enc[k - 1].data(), d_pool, (int64_t)n * ch * m.V(k - 1));
    }
    m.enc_a[k] = BlockActs();
    m.g_enc[k].reset();
    m.pooled[k].reset();
    m.pool_arg[k].reset();
  }
  m.release_scratch();
  return res;
}

void ModelGpu::release_activations() {
  Impl& m = *impl_;
  m.ctx.make_current();
  for (auto* acts : {&m.enc_a, &m.dec_a, &m.cmb_a})
    for (BlockActs& a : *acts) a = BlockActs();
  for (auto* bufs : {&m.pooled, &m.cats, &m.cm_raw, &m.g_enc})
    for (Buffer<float>& b : *bufs) b.reset();
  for (Buffer<uint8_t>& b : m.pool_arg) b.reset();
  for (Impl::BatchSlot& bs : m.slots) {
    for (Buffer<uint8_t>& b : bs.labels) b.reset();
    for (Buffer<float>* b : {&bs.images, &bs.soft_target}) b->reset();
    bs.present.reset();
    bs.target.reset();
  }
  for (Buffer<float>* b : {&m.seg_logits, &m.d_seg, &m.d_feat, &m.d_tmp, &m.d_tmp2, &m.scratch_a, &m.d_cat,
                           &m.d_below, &m.d_in, &m.pred_images, &m.probs, &m.cms, &m.q})
    b->reset();
}

void ModelGpu::adam(const OptimConfig& o, int64_t step) {
  Impl& m = *impl_;
  m.ctx.make_current();
  m.report_refused_update();  // an update nobody has run a step after (adam() twice)
  // The guard, then the update that it may skip: all on the stream, no host wait.
  unsigned long long* flag = m.refused.data();
  m.ctx.zero(flag, sizeof *flag);
  const float l2 = o.kind == OptimKind::AdamW ? 0.f : o.weight_decay;
  find_unsquarable(m.ctx, m.grad.data(), m.value.data(), m.total, l2, kLargestSquarable, flag);
  // Adam is elementwise, so the four contiguous arrays are one tensor.
  adam_step(m.ctx, {AdamTensor{m.value.data(), m.grad.data(), m.m1.data(), m.m2.data(), m.total}}, o, step, flag);
  m.update_unread = true, m.unread_step = step;
  m.ctx.profile_step_end();
}

void ModelGpu::predict(const float* images, int n, Spatial s, float* probs, float* cms, float* annotator_probs) {
  Impl& m = *impl_;
  m.ctx.make_current();
  Context& ctx = m.ctx;
  const ModelConfig& c = m.c;
  const int L = c.classes, R = c.annotators;
  const bool pixel_cm = c.cm_mode != CmMode::Global;
  m.set_levels(s);
  const int64_t V = s.size();
  const float* x0 = m.upload_images(images, n, s);
  // The pixel-wise CM heads run only when the caller asks for CMs or q_r (as on the CPU).
  m.forward(n, x0, pixel_cm && (cms || annotator_probs));
  const size_t pc = (size_t)n * L * V;
  float* p = ensure(ctx, m.probs, pc);
  softmax_forward(ctx, m.seg_logits.data(), p, n, L, V);
  float* dc = nullptr;
  float* dq = nullptr;
  if (cms || annotator_probs) {
    std::vector<const float*> raw;
    for (int r = 0; r < R; ++r) raw.push_back(pixel_cm ? m.cm_raw[r].data() : m.W(m.gcm[r]));
    if (cms) dc = ensure(ctx, m.cms, (size_t)n * R * L * L * V);
    if (annotator_probs) dq = ensure(ctx, m.q, (size_t)n * R * L * V);
    cm_predict(ctx, c.cm_mode, L, c.cm_rank, raw, p, n, R, V, dc, dq);
  }
  ctx.download(probs, p, pc * sizeof(float));
  if (cms) ctx.download(cms, dc, (size_t)n * R * L * L * V * sizeof(float));
  if (annotator_probs) ctx.download(annotator_probs, dq, (size_t)n * R * L * V * sizeof(float));
}

}  // namespace cuda
}  // namespace cmseg
