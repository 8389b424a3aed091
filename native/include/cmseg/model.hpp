// The SPEC U-Net with a consensus head and R annotator CM heads (SPEC sections
// 2-4), its parameters (named as in SPEC section 2), and one training step.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "cmseg/layers.hpp"
#include "cmseg/loss.hpp"

namespace cmseg {

enum class CmInit { Identity, Uniform };
enum class OptimKind { Adam, AdamW };
// Where the training step and prediction run. Cuda: parameters, Adam moments and
// activations live on the GPU (native/cuda/unet_cuda.cpp); Model::params() syncs
// the host copy on demand (see there).
enum class Device { Cpu, Cuda };

struct ModelConfig {
  int ndim = 2;           // 2 or 3
  int in_channels = 1;
  int classes = 2;        // L, background is class 0
  int annotators = 1;     // R
  int depth = 4;
  int base = 32;          // channels of level 0
  CmMode cm_mode = CmMode::Full;
  int cm_rank = 1;        // lowrank only
  int cm_head_blocks = 0; // extra blocks in front of each CM head
  CmInit cm_init = CmInit::Identity;
  uint64_t seed = 0;
  Device device = Device::Cpu;
  // Device::Cuda only: convolutions and the 1x1 heads may use TF32 tensor cores
  // (10-bit mantissa products). false = strict fp32 (FMA math), for parity tests.
  bool tf32 = true;
  // Device::Cuda only: the 3x3(x3) convolutions take bfloat16 copies of their
  // inputs and weights and accumulate in fp32 (torch.autocast bf16 style); the
  // parameters, activations, loss and Adam stay fp32.
  bool bf16 = false;
  // Device::Cuda only: the most device memory this model may hold (bytes; 0 = as
  // much as the GPU has). Past it an allocation fails with cmseg::OutOfMemory, as a
  // full GPU would (PyTorch's per-process memory fraction plays the same role).
  size_t gpu_memory_limit = 0;
};

struct OptimConfig {
  OptimKind kind = OptimKind::Adam;
  float lr = 1e-3f, beta1 = 0.9f, beta2 = 0.999f, eps = 1e-8f, weight_decay = 0.f;
};

struct LossConfig {
  float lambda = 0.01f;         // trace weight
  float lambda_warmup = 0.01f;  // weight of the negated trace during the warm-up
  int64_t warmup_steps = 0;     // optimiser steps with the negated trace (paper 2.4)
};

struct Param {
  std::string name;
  std::vector<int64_t> shape;
  std::vector<float> value, grad, m, v;  // m, v: Adam moments
  int64_t numel() const { return (int64_t)value.size(); }
};

struct Batch {
  int n = 0;
  Spatial s;
  const float* images = nullptr;           // [n, C, V]
  std::vector<const uint8_t*> labels;      // R maps [n, V], 255 = unlabelled (CM loss)
  const uint8_t* present = nullptr;        // [n, R], null = all present
  const uint8_t* target = nullptr;         // [n, V]: plain CE on one map (naive / oracle)
  const float* soft_target = nullptr;      // [n, L, V]: plain CE on soft labels (naive mean)
};

struct StepResult {
  double loss = 0;
  std::vector<double> ce, trace;  // per annotator (empty for plain CE)
  float trace_weight = 0;         // lambda used (negative during the warm-up)
  int64_t step = 0;               // optimiser steps taken after this call
};

namespace cuda {
class ModelGpu;
}

class Model {
 public:
  explicit Model(const ModelConfig& config);
  ~Model();

  const ModelConfig& config() const { return config_; }
  // The parameters on the host. With Device::Cuda the GPU holds the working copy:
  // both accessors first download it when the GPU has newer values (after a step);
  // the non-const one (and find) also marks the host copy as edited, so the next
  // GPU call uploads it. A CPU model returns its vector without any of this.
  std::vector<Param>& params();
  const std::vector<Param>& params() const;
  // Names and shapes only, never synced (values may be stale on a GPU model).
  const std::vector<Param>& param_layout() const { return params_; }
  Param* find(const std::string& name);
  int64_t parameter_count() const;

  OptimConfig optim;
  LossConfig loss;
  // Optimiser steps taken. mutable: a GPU model learns that the device refused its
  // last update (ModelGpu::adam) only at its next read of the device, which may be
  // a const params(); the count then goes back to before that update.
  mutable int64_t step = 0;

  // Throws InvalidArgument naming the problem (spatial size, NaN, label range, ...).
  void validate(const Batch& batch) const;
  void validate_images(const float* images, int n, Spatial s) const;
  // Forward + loss + backward into Param::grad (overwritten). No update.
  StepResult compute_gradients(const Batch& batch);
  // Forward + loss only.
  StepResult evaluate(const Batch& batch);
  // compute_gradients, then one optimiser step.
  StepResult train_step(const Batch& batch);
  void apply_optimizer();

  // probs: [n, L, V]. cms (optional): [n, R, L, L, V] with A[i][j] at i*L + j.
  // annotator_probs (optional): [n, R, L, V], q_r = A_r p.
  void predict(const float* images, int n, Spatial s, float* probs, float* cms, float* annotator_probs);
  // Frees the activation and scratch buffers that calls keep for the next (they only grow:
  // a 3D model holds about what its largest call needed, hundreds of MB); the parameters
  // and optimiser state stay. The next call allocates them again. GPU: the device buffers
  // go back to the device's pool. Between the members of an ensemble, so that only one
  // member's buffers are held at a time.
  void release_buffers();
  // A lower bound of the host memory (bytes) a CPU call on n images of size s holds besides
  // its outputs, the figure a call is refused by when it exceeds physical_memory_bytes();
  // heads: the pixel-wise CM heads run. 0 for a GPU model (its maps live on the device).
  double host_bytes_lower_bound(int n, Spatial s, bool backward, bool heads) const;

  float current_trace_weight() const { return step < loss.warmup_steps ? -loss.lambda_warmup : loss.lambda; }

  // The GPU side of a Device::Cuda model (null on the CPU): its context gives pool
  // statistics and synchronize() for timing. A step returns once its loss is known;
  // the backward pass and the update may still be running on the device.
  cuda::ModelGpu* gpu() { return gpu_.get(); }

 private:
  struct Impl;
  // loss: false for predict (the forward and heads only; the batch's labels unread).
  // cm_heads (predict only): run the pixel-wise CM heads (the prediction returns CMs or q_r).
  StepResult run(const Batch& batch, bool backward, bool loss = true, bool cm_heads = true);
  // native/model/model_device.cpp: the Device::Cuda paths and the host/device sync.
  void check_gradients_squarable() const;  // adam.cpp
  void attach_device();
  StepResult run_device(const Batch& batch, bool backward);
  void predict_device(const float* images, int n, Spatial s, float* probs, float* cms, float* annotator_probs);
  void apply_optimizer_device();
  template <class F>
  void reporting_refusal(F&& call) const;  // model_device.cpp
  void sync_to_host() const;
  void sync_to_device();
  ModelConfig config_;
  mutable std::vector<Param> params_;  // mutable: a const params() may download from the GPU
  std::unique_ptr<Impl> impl_;
  std::unique_ptr<cuda::ModelGpu> gpu_;
  mutable bool host_stale_ = false;  // the GPU holds newer values, grads or moments than params_
  bool device_stale_ = false;        // params_ may have been edited since the last upload
};

void validate_config(const ModelConfig& c);

// Adam's overflow guard (adam.cpp): the largest gradient (with the L2 term) whose square
// a float holds, and the words for a gradient beyond it, shared by the CPU and GPU models.
constexpr float kLargestSquarable = 1.8e19f;
std::string unsquarable_gradient_message(const std::string& param, int64_t index, float grad);

}  // namespace cmseg
