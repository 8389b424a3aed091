// The Device::Cuda side of cmseg::Model: dispatch to the GPU U-Net
// (native/cuda/unet_cuda.cpp) and the lazy sync of the host parameter copy.
//
// Sync rule. The GPU holds the working copy of every parameter's value, gradient
// and Adam moments. Two flags describe the host copy (params_):
//   host_stale_    set by every GPU call that writes parameters (a backward pass:
//                  gradients; an optimiser step: values and moments). Any params()
//                  or find() downloads all four fields once and clears it.
//   device_stale_  set by the non-const params() and find(): the caller may edit
//                  the host copy. The next GPU call uploads all four fields first.
// The two are never set together (params() downloads before it hands out a
// reference). The normal training loop (trainStep, setOptimizer, setLoss) touches
// neither, so a step moves only the batch and the loss values across the bus.
// A reference kept from params() is not re-synced by later steps: call params()
// again after a step before reading or editing through it.
#include "cmseg/cuda.hpp"
#include "cmseg/error.hpp"
#include "cmseg/model.hpp"
#include "cmseg/profile.hpp"

namespace cmseg {

void Model::attach_device() {
  if (config_.device != Device::Cuda) return;
  if (!cuda::available())
    throw Error(str("device 'cuda' requested, but no CUDA device can be used: ", cuda::unavailable_reason()));
  gpu_.reset(new cuda::ModelGpu(config_, params_));
  host_stale_ = device_stale_ = false;
}

std::vector<Param>& Model::params() {
  if (gpu_) {
    sync_to_host();
    device_stale_ = true;
  }
  return params_;
}

const std::vector<Param>& Model::params() const {
  if (gpu_) sync_to_host();
  return params_;
}

void Model::sync_to_host() const {
  if (!host_stale_) return;
  reporting_refusal([&] { gpu_->download_params(params_); });
  host_stale_ = false;
}

// A GPU update refused by the device (ModelGpu::adam) is reported by a later call:
// the step count goes back to before it (unless someone has set it since), then the
// error goes on to the caller.
template <class F>
void Model::reporting_refusal(F&& call) const {
  try {
    call();
  } catch (const cuda::RefusedUpdate& e) {
    if (step == e.step) step = e.step - 1;
    throw;
  }
}

void Model::sync_to_device() {
  if (!device_stale_) return;
  gpu_->upload_params(params_);
  device_stale_ = false;
}

StepResult Model::run_device(const Batch& batch, bool backward) {
  validate(batch);
  sync_to_device();
  // The device's gradients are overwritten from here on, also if the step fails.
  if (backward) host_stale_ = true;
  StepResult r;
  try {
    reporting_refusal([&] { r = gpu_->run(batch, backward, current_trace_weight()); });
  } catch (const OutOfMemory&) {
    gpu_->release_activations();  // give the pool back: a smaller batch may fit next
    throw;
  }
  r.step = step;
  return r;
}

void Model::predict_device(const float* images, int n, Spatial s, float* probs, float* cms, float* annotator_probs) {
  validate_images(images, n, s);
  sync_to_device();
  try {
    gpu_->predict(images, n, s, probs, cms, annotator_probs);
  } catch (const OutOfMemory&) {
    gpu_->release_activations();
    throw;
  }
}

void Model::apply_optimizer_device() {
  ProfileScope prof("adam");
  sync_to_device();
  host_stale_ = true;
  reporting_refusal([&] { gpu_->adam(optim, step + 1); });
  ++step;  // counted now, though the device may still refuse it (reported later)
}

}  // namespace cmseg
