// Max-pool 2, stride 2 (SPEC section 2: between encoder levels) on oneDNN's
// pooling primitives, for the model's channel-blocked trunk. Reference:
// native/layers/maxpool2.cpp (plain layout, our own argmax bytes).
//
// The forward writes oneDNN's workspace (one byte per output element on these
// kernels: the winning tap), which the backward reads to route dy. Ties pick
// a tap that may differ from the reference's first maximum; in the model every
// tie is between ReLU zeros, whose gradient the norm's ReLU mask drops, so the
// step's gradients do not depend on it.
#include <stdexcept>
#include <string>

#include "cmseg/onednn.hpp"
#include "cmseg/profile.hpp"
#include "onednn_internal.hpp"

namespace cmseg {
namespace onednn {

using namespace detail;
using dnnl::algorithm;
using dnnl::prop_kind;

namespace {

enum Op { kPoolFwd = 31, kPoolBwd = 32 };

struct Window {
  memory::dims strides, kernel, dilation, pad;
  explicit Window(int ndim) : strides(ndim, 2), kernel(ndim, 2), dilation(ndim, 0), pad(ndim, 0) {}
};

dnnl::pooling_forward::primitive_desc fwd_pd(int n, int c, Spatial s, int ndim, int block) {
  const Window g(ndim);
  return dnnl::pooling_forward::primitive_desc(engine(), prop_kind::forward_training, algorithm::pooling_max,
                                               blocked_act(n, c, s, ndim, block),
                                               blocked_act(n, c, halve(s, ndim), ndim, block), g.strides, g.kernel,
                                               g.dilation, g.pad, g.pad, user_scratchpad());
}

struct PoolFwd {
  dnnl::pooling_forward prim;
  memory::desc src, dst, ws;
};

struct PoolBwd {
  dnnl::pooling_backward prim;
  memory::desc diff_src, diff_dst, ws;
};

std::shared_ptr<PoolFwd> forward_of(int n, int c, Spatial s, int ndim, int block) {
  return cached_as<PoolFwd>(make_key(kPoolFwd, n, c, c, s, ndim, Blocks{block, block}), [&] {
    const auto pd = fwd_pd(n, c, s, ndim, block);
    auto e = std::make_shared<PoolFwd>();
    e->prim = dnnl::pooling_forward(pd);
    e->src = pd.src_desc(), e->dst = pd.dst_desc(), e->ws = pd.workspace_desc();
    return e;
  });
}

void check_blocked(int c, int block) {
  if (block <= 0 || c % block)
    throw std::invalid_argument("cmseg: oneDNN max-pool needs channels (" + std::to_string(c) +
                                ") in blocks of a positive size (" + std::to_string(block) + ")");
}

}  // namespace

size_t maxpool2_workspace_bytes(int n, int c, Spatial s, int ndim, int block) {
  check_blocked(c, block);
  return forward_of(n, c, s, ndim, block)->ws.get_size();
}

void maxpool2_forward(const float* x, float* y, void* workspace, int n, int c, Spatial s, int ndim, int block) {
  check_blocked(c, block);
  sync_threads();
  auto e = forward_of(n, c, s, ndim, block);
  memory xm(e->src, engine(), const_cast<float*>(x)), ym(e->dst, engine(), y), wm(e->ws, engine(), workspace);
  ProfileScope prof("onednn_maxpool2_forward");
  execute(e->prim, {{DNNL_ARG_SRC, xm}, {DNNL_ARG_DST, ym}, {DNNL_ARG_WORKSPACE, wm}});
  stream().wait();
}

void maxpool2_backward(const float* dy, const void* workspace, float* dx, int n, int c, Spatial s, int ndim,
                       int block) {
  check_blocked(c, block);
  sync_threads();
  auto e = cached_as<PoolBwd>(make_key(kPoolBwd, n, c, c, s, ndim, Blocks{block, block}), [&] {
    const Window g(ndim);
    const auto hint = fwd_pd(n, c, s, ndim, block);
    const dnnl::pooling_backward::primitive_desc pd(engine(), algorithm::pooling_max, blocked_act(n, c, s, ndim, block),
                                                    blocked_act(n, c, halve(s, ndim), ndim, block), g.strides,
                                                    g.kernel, g.dilation, g.pad, g.pad, hint, user_scratchpad());
    auto b = std::make_shared<PoolBwd>();
    b->prim = dnnl::pooling_backward(pd);
    b->diff_src = pd.diff_src_desc(), b->diff_dst = pd.diff_dst_desc(), b->ws = pd.workspace_desc();
    return b;
  });
  memory dym(e->diff_dst, engine(), const_cast<float*>(dy)), dxm(e->diff_src, engine(), dx),
      wm(e->ws, engine(), const_cast<void*>(workspace));
  ProfileScope prof("onednn_maxpool2_backward");
  execute(e->prim, {{DNNL_ARG_DIFF_DST, dym}, {DNNL_ARG_DIFF_SRC, dxm}, {DNNL_ARG_WORKSPACE, wm}});
  stream().wait();
}

}  // namespace onednn
}  // namespace cmseg
