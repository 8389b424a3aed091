// Shared plumbing of the oneDNN fast paths: the process-wide engine, a stream
// per thread, thread-count control, the primitive cache, thread-local scratch,
// and Port, which moves one tensor between our plain N, C, *S arrays and the
// layout a primitive asked for. Not a public header (not globbed: .hpp).
#pragma once
#include <oneapi/dnnl/dnnl.hpp>

#include <array>
#include <functional>
#include <memory>
#include <unordered_map>

#include "cmseg/layers.hpp"
#include "cmseg/onednn.hpp"

namespace cmseg {
namespace onednn {
namespace detail {

using dnnl::memory;
using tag = dnnl::memory::format_tag;

// Layout policy (CMSEG_ONEDNN_LAYOUT, read once; for measurements):
//   auto  (default) format_tag::any; where oneDNN can only offer its im2col +
//         GEMM implementation for a primitive, a workaround (3D backward-weights
//         as 2D over depth slices, conv3_onednn.cpp) or else the cmseg reference
//         runs that direction: GEMM was slower than the reference in every
//         measurement (issue 7 notes), and the reference needs no reorders;
//   any   format_tag::any everywhere, reorders at every layer boundary;
//   nhwc  channels-last activations (oneDNN's brgemm kernels), weights any;
//   plain our plain arrays everywhere, no reorders (mostly oneDNN's GEMM path).
enum class Layout { Auto, Any, Nhwc, Plain };
Layout layout();
const char* layout_name(Layout l);

dnnl::engine& engine();
dnnl::stream& stream();  // one per calling thread (two models in two Node workers)
void sync_threads();     // oneDNN's pool follows cmseg::num_threads()

// Thread-local, 64-byte aligned, grow-only buffer; slots are independent.
// Growing waits for this thread's stream first (queued work may use the old one).
void* scratch(int slot, size_t bytes);
constexpr int kScratchSlots = 8;

// Cache of primitive bundles, keyed by op and shape; make() runs once per key while
// the key stays cached. At most cache_capacity() entries: past it the least recently
// used goes (context.cpp). Callers keep the returned pointer for the whole call, until
// the stream has finished with its primitives: an entry evicted meanwhile lives on.
// make() runs under the cache's lock: it must not call cached() itself.
using Key = std::array<int, 12>;
std::shared_ptr<void> cached(const Key& key, const std::function<std::shared_ptr<void>()>& make);
// 256 entries (CMSEG_ONEDNN_CACHE_ENTRIES overrides it). Counted on the largest model here
// (3D, depth 4, base 16, CM heads with head blocks; 2D the same): one image size makes 36
// entries for a training step at one batch size (forward + backward) and 18 more for predict
// at another batch size, 54 in all. 256 holds 4-5 such sets, e.g. a training patch at its two
// batch sizes (an epoch's last batch is smaller), a sliding window's and a whole volume's
// predictions; past that an entry is rebuilt in milliseconds when it comes back.
// A 2D predict over many sizes then levels off about 40 MB above its first sizes (most of it
// oneDNN's own primitive cache, 1024 kernels by default), instead of growing 1 MB a size.
constexpr size_t kCacheCapacity = 256;
size_t cache_capacity();
void set_cache_capacity(size_t entries);  // tests; 0 counts as 1
size_t cache_builds();                    // entries made so far (misses), this process
template <class T>
std::shared_ptr<T> cached_as(const Key& key, const std::function<std::shared_ptr<T>()>& make) {
  return std::static_pointer_cast<T>(cached(key, [&] { return std::static_pointer_cast<void>(make()); }));
}
Key make_key(int op, int n, int cin, int cout, Spatial s, int ndim, Blocks b = {});

memory::dims act_dims(int n, int c, Spatial s, int ndim);
tag plain_act_tag(int ndim);  // ncdhw / nchw
tag nhwc_act_tag(int ndim);   // ndhwc / nhwc
memory::desc plain_act(int n, int c, Spatial s, int ndim);
memory::desc blocked_act(int n, int c, Spatial s, int ndim, int block);  // nCdhw8c, nChw16c, ...
memory::desc user_act(int n, int c, Spatial s, int ndim, int block);     // the caller's layout (0: plain)
// Activation desc for a primitive under the current layout policy (any / nhwc / plain).
memory::desc policy_act(int n, int c, Spatial s, int ndim, bool plain);
bool is_gemm(const dnnl::primitive_desc_base& pd);  // oneDNN chose its im2col + GEMM path

// One tensor at a primitive boundary: user = our plain array, prim = what the
// primitive wants. in() reorders into scratch when they differ; out() hands a
// scratch buffer (or the user array) and finish() reorders back, optionally
// accumulating (dst += result) through a sum post-op on the reorder.
struct Port {
  memory::desc user, prim;
  bool same = true;
  dnnl::reorder to_prim, to_user;
  // activation: count this port's reorders in activation_reorders().
  void init(const memory::desc& user_md, const memory::desc& prim_md, bool input, bool output, bool accumulate,
            bool activation = false);
  memory in(const float* p, int slot) const;
  memory out(float* p, int slot) const;
  void finish(const memory& m, float* p) const;
  bool accumulate = false;
  bool activation = false;
};

// The reference layers take plain arrays. For a blocked tensor (block > 0)
// these convert it into scratch slot `slot` and back; for a plain one they
// return the caller's pointer and do nothing.
const float* plain_in(const float* p, int n, int c, Spatial s, int ndim, int block, int slot);
float* plain_out(float* p, int n, int c, Spatial s, int ndim, int block, int slot);
void plain_done(const float* plain, float* p, int n, int c, Spatial s, int ndim, int block);
void count_activation_reorder();

// While alive, onednn::enabled() is false on this thread: the fast path calls
// the reference layers for a direction that oneDNN has no direct kernel for.
struct ReferenceScope {
  ReferenceScope();
  ~ReferenceScope();
};
bool use_reference(const dnnl::primitive_desc_base& pd);  // auto layout and pd is GEMM

// Primitives use a caller-owned scratchpad (thread-local slot kScratchpadSlot)
// so that two threads can run the same cached primitive at once.
dnnl::primitive_attr user_scratchpad();
constexpr int kScratchpadSlot = kScratchSlots - 1;
void execute(const dnnl::primitive& p, std::unordered_map<int, memory> args);

// Whether the reorders are timed separately (CMSEG_PROFILE=1): waits on the stream.
void profile_sync();

}  // namespace detail
}  // namespace onednn
}  // namespace cmseg
