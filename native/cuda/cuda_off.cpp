// The CUDA API (cmseg/cuda.hpp) in a build without the CUDA backend: it reports
// itself unavailable and every other entry point throws. CMakeLists.txt compiles
// this file instead of native/cuda/*.cu when CUDA or cuDNN is missing, so code that
// calls the API (tests, bindings, backend_info) links either way.
#include "cmseg/cuda.hpp"
#include "cmseg/error.hpp"

namespace cmseg {
namespace cuda {
namespace {
[[noreturn]] void off() {
  throw Error("this build of cmseg has no CUDA backend (configure with -DCMSEG_WITH_CUDA=ON and a CUDA toolkit + cuDNN)");
}
}  // namespace

bool built() { return false; }
bool available() { return false; }
std::string unavailable_reason() { return "this build has no CUDA backend (CMSEG_WITH_CUDA=OFF, or no CUDA toolkit or cuDNN was found)"; }
DeviceInfo device_info(int) { off(); }
size_t cudnn_version() { return 0; }

struct Context::Impl {};
Context::Context(const ContextOptions&) { off(); }
Context::~Context() = default;
const ContextOptions& Context::options() const { off(); }
void Context::make_current() { off(); }
void Context::stage_begin(int, size_t) { off(); }
void Context::stage_copy(int, void*, const void*, size_t) { off(); }
void Context::stage_end(int) { off(); }
void Context::stage_release(int) noexcept {}
void Context::stage_abort(int) noexcept {}
void Context::stage_after_alloc() { off(); }
ContextOptions& Context::options_ref() { off(); }
int Context::device() const { off(); }
void* Context::alloc(size_t) { off(); }
void Context::free(void*) { off(); }
PoolStats Context::pool_stats() const { off(); }
void Context::trim(size_t) { off(); }
void Context::reset_peak() { off(); }
void Context::upload(void*, const void*, size_t) { off(); }
void Context::download(void*, const void*, size_t) { off(); }
void Context::copy(void*, const void*, size_t) { off(); }
void Context::zero(void*, size_t) { off(); }
void Context::synchronize() { off(); }
float Context::time_ms(const std::function<void()>&, int) { off(); }
void* Context::stream_handle() const { off(); }
std::string Context::profile_report(int) { off(); }
void Context::profile_step_begin() {}
void Context::profile_step_end() {}
size_t Context::conv_fallbacks() const { off(); }
size_t Context::conv_graph_runs() const { off(); }
size_t Context::conv_own_wgrad_runs() const { off(); }

void conv3_forward(Context&, const float*, const float*, float*, int, int, int, Spatial, int) { off(); }
void conv3_backward(Context&, const float*, const float*, const float*, float*, float*, int, int, int, Spatial, int) {
  off();
}
void conv3_backward_filter_own(Context&, const float*, const float*, float*, int, int, int, Spatial) { off(); }
void upconv2_forward(Context&, const float*, const float*, const float*, float*, int, int, int, Spatial, int, int64_t) { off(); }
void upconv2_backward(Context&, const float*, const float*, const float*, float*, float*, float*, int, int, int,
                      Spatial, int, int64_t) {
  off();
}
void instance_norm_forward(Context&, const float*, const float*, const float*, float*, float*, float*, int, int,
                           int64_t, bool) {
  off();
}
void instance_norm_backward(Context&, const float*, const float*, const float*, const float*, const float*,
                            const float*, float*, float*, float*, int, int, int64_t, bool) {
  off();
}
void instance_norm_apply(Context&, const float*, const float*, const float*, const float*, const float*, float*, int,
                         int, int64_t, bool) {
  off();
}
void maxpool2_forward(Context&, const float*, float*, uint8_t*, int, Spatial, int) { off(); }
void maxpool2_backward(Context&, const float*, const uint8_t*, float*, int, Spatial, int) { off(); }
void cm_loss(Context&, const CmLossInput&, CmLossOutput&) { off(); }
const char* last_cm_loss_kernel() { return "none"; }
void adam_step(Context&, const std::vector<AdamTensor>&, const OptimConfig&, int64_t, const unsigned long long*) { off(); }
void find_unsquarable(Context&, const float*, const float*, int64_t, float, float, unsigned long long*) { off(); }

void conv1_forward(Context&, const float*, const float*, const float*, float*, int, int, int, int64_t) { off(); }
void conv1_backward(Context&, const float*, const float*, const float*, float*, float*, float*, int, int, int,
                    int64_t) {
  off();
}
void conv1_forward_heads(Context&, const float*, const std::vector<Conv1Head>&, int, int, int64_t) { off(); }
void conv1_backward_heads(Context&, const float*, const std::vector<Conv1Head>&, float*, int, int, int64_t) { off(); }
void concat_forward(Context&, const float*, int, const float*, int, float*, int, int64_t) { off(); }
void concat_backward(Context&, const float*, float*, int, float*, int, int, int64_t, bool) { off(); }
void add_inplace(Context&, float*, const float*, int64_t) { off(); }
double ce_loss_hard(Context&, const float*, const uint8_t*, int, int, int64_t, float*) { off(); }
double ce_loss_soft(Context&, const float*, const float*, int, int, int64_t, float*) { off(); }
void softmax_forward(Context&, const float*, float*, int, int, int64_t) { off(); }
void cm_predict(Context&, CmMode, int, int, const std::vector<const float*>&, const float*, int, int, int64_t, float*,
                float*) {
  off();
}

struct ModelGpu::Impl {};
ModelGpu::ModelGpu(const ModelConfig&, const std::vector<Param>&) { off(); }
ModelGpu::~ModelGpu() = default;
Context& ModelGpu::context() { off(); }
void ModelGpu::set_tf32(bool) { off(); }
void ModelGpu::upload_params(const std::vector<Param>&) { off(); }
void ModelGpu::download_params(std::vector<Param>&) { off(); }
StepResult ModelGpu::run(const Batch&, bool, float) { off(); }
void ModelGpu::adam(const OptimConfig&, int64_t) { off(); }
void ModelGpu::predict(const float*, int, Spatial, float*, float*, float*) { off(); }
void ModelGpu::release_activations() { off(); }

namespace host {
void conv3_forward(Context&, const float*, const float*, float*, int, int, int, Spatial, int) { off(); }
void conv3_backward(Context&, const float*, const float*, const float*, float*, float*, int, int, int, Spatial, int) {
  off();
}
void conv3_backward_filter_own(Context&, const float*, const float*, float*, int, int, int, Spatial) { off(); }
void upconv2_forward(Context&, const float*, const float*, const float*, float*, int, int, int, Spatial, int) { off(); }
void upconv2_backward(Context&, const float*, const float*, const float*, float*, float*, float*, int, int, int,
                      Spatial, int) {
  off();
}
void instance_norm_forward(Context&, const float*, const float*, const float*, float*, float*, float*, int, int,
                           int64_t, bool) {
  off();
}
void instance_norm_backward(Context&, const float*, const float*, const float*, const float*, const float*,
                            const float*, float*, float*, float*, int, int, int64_t, bool) {
  off();
}
void maxpool2_forward(Context&, const float*, float*, uint8_t*, int, Spatial, int) { off(); }
void maxpool2_backward(Context&, const float*, const uint8_t*, float*, int, Spatial, int) { off(); }
void cm_loss(Context&, const CmLossInput&, CmLossOutput&) { off(); }
void adam_step(Context&, std::vector<Param>&, const OptimConfig&, int64_t) { off(); }
}  // namespace host

}  // namespace cuda
}  // namespace cmseg
