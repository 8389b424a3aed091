// 3x3(x3) convolution, stride 1, zero padding 1, no bias (SPEC section 2) on
// oneDNN primitives: forward, backward-data and backward-weights. Reference:
// native/layers/conv3.cpp, which dispatches here when onednn::enabled().
//
// Layouts (CMSEG_ONEDNN_LAYOUT, measured on brats3d-cpu and mnist2d, AVX2, see
// the issue 7 notes): with format_tag::any oneDNN picks its direct jit:avx2
// kernels on 8-channel blocked layouts, about 2x faster than the reference even
// after reordering x, w, dy and y at every call; on our plain arrays it can
// only use im2col + GEMM, slower than the reference. 3D backward-weights has
// no direct AVX2 kernel in oneDNN: it runs as three 2D ones over depth slices
// (DepthSliced below, 2.3x faster than the reference on brats3d-cpu); where
// even that gives GEMM (tiny extents), the reference runs that direction.
// Weight gradients accumulate (dw +=) through a sum post-op on the reorder of
// the primitive's result.
#include <cstdlib>
#include <cstring>
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

enum Op { kConvFwd = 1, kConvBwd = 2 };

// CMSEG_ONEDNN_DEPTH_SLICES=0: 3D backward-weights by the reference (for measurements).
bool depth_slicing_off() {
  static const bool off = [] {
    const char* e = std::getenv("CMSEG_ONEDNN_DEPTH_SLICES");
    return e && std::string(e) == "0";
  }();
  return off;
}

memory::desc conv_weights(int cin, int cout, int ndim, bool plain) {
  memory::dims d = ndim == 3 ? memory::dims{cout, cin, 3, 3, 3} : memory::dims{cout, cin, 3, 3};
  tag t = plain ? (ndim == 3 ? tag::oidhw : tag::oihw) : tag::any;
  return memory::desc(d, memory::data_type::f32, t);
}

struct Geometry {
  memory::dims strides, pad;
  explicit Geometry(int ndim) : strides(ndim, 1), pad(ndim, 1) {}
};

dnnl::convolution_forward::primitive_desc fwd_pd(int n, int cin, int cout, Spatial s, int ndim, bool plain) {
  const Geometry g(ndim);
  plain = plain || layout() == Layout::Plain;
  return dnnl::convolution_forward::primitive_desc(
      engine(), prop_kind::forward_training, algorithm::convolution_direct, policy_act(n, cin, s, ndim, plain),
      conv_weights(cin, cout, ndim, plain), policy_act(n, cout, s, ndim, plain), g.strides, g.pad, g.pad,
      user_scratchpad());
}

struct ConvFwd {
  bool by_reference = false;
  dnnl::convolution_forward prim;
  Port x, w, y;
};

std::shared_ptr<ConvFwd> make_fwd(int n, int cin, int cout, Spatial s, int ndim, Blocks b) {
  auto pd = fwd_pd(n, cin, cout, s, ndim, false);
  auto e = std::make_shared<ConvFwd>();
  e->by_reference = use_reference(pd);
  if (e->by_reference) return e;
  e->prim = dnnl::convolution_forward(pd);
  e->x.init(user_act(n, cin, s, ndim, b.x), pd.src_desc(), true, false, false, true);
  e->w.init(conv_weights(cin, cout, ndim, true), pd.weights_desc(), true, false, false);
  e->y.init(user_act(n, cout, s, ndim, b.y), pd.dst_desc(), false, true, false, true);
  return e;
}

// 3D backward-weights as 2D ones, one per depth tap kd: with the depth slices
// of one image as the 2D batch, dW[:, :, kd] = sum_d bwd_w_2d(x[d + kd - 1], dy[d]).
// oneDNN has a direct AVX2 kernel for 2D backward-weights but only GEMM for 3D.
// x is laid out with a zero slice at each end, so all three taps run the same
// mb = D primitive on views shifted by kd slices; the 3x3 result of tap kd is
// added into dw[:, :, kd] by a strided reorder with a sum post-op.
// Blocked activations ([c / B][D][H][W][B] per image) are viewed the same way:
// depth as the batch, the channel blocks as a strided dimension.
struct DepthSliced {
  dnnl::convolution_backward_weights prim;
  memory::desc x_prim, dy_prim, dw_prim;
  memory::desc x_user, dy_user, dw_tap;  // one image, depth as batch; one depth tap of dw
  dnnl::reorder x_to, dy_to, dw_add;
  size_t x_slice_bytes = 0;
};

// One image [c, D, H, W] (plain or blocked) viewed as a 2D batch [D, c, H, W].
memory::desc depth_as_batch(int c, Spatial s, int block) {
  const int64_t D = s.d, HW = (int64_t)s.h * s.w;
  const memory::dims d2{D, c, s.h, s.w};
  if (!block) return memory::desc(d2, memory::data_type::f32, memory::dims{HW, D * HW, s.w, 1});
  return blocked_act(1, c, s, 3, block).permute_axes({2, 1, 0, 3, 4}).reshape(d2);
}

std::shared_ptr<DepthSliced> make_sliced(int cin, int cout, Spatial s, Blocks b) {
  const int64_t D = s.d, H = s.h, W = s.w;
  const memory::dims x2{D, cin, H, W}, y2{D, cout, H, W}, w2{cout, cin, 3, 3}, one{1, 1};
  auto any = [](const memory::dims& d) { return memory::desc(d, memory::data_type::f32, tag::any); };
  const dnnl::convolution_forward::primitive_desc hint(engine(), prop_kind::forward_training,
                                                       algorithm::convolution_direct, any(x2), any(w2), any(y2), one,
                                                       one, one);
  const dnnl::convolution_backward_weights::primitive_desc pd(engine(), algorithm::convolution_direct, any(x2), any(w2),
                                                              any(y2), one, one, one, hint, user_scratchpad());
  if (is_gemm(pd)) return nullptr;
  auto e = std::make_shared<DepthSliced>();
  e->x_prim = pd.src_desc(), e->dy_prim = pd.diff_dst_desc(), e->dw_prim = pd.diff_weights_desc();
  // Shifting a view by whole slices needs the batch to be the outermost dimension.
  const memory::dims xs = e->x_prim.get_strides();
  if (xs.empty() || xs[0] * D * (int64_t)sizeof(float) != (int64_t)e->x_prim.get_size()) return nullptr;
  e->x_slice_bytes = e->x_prim.get_size() / D;
  e->prim = dnnl::convolution_backward_weights(pd);
  e->x_user = depth_as_batch(cin, s, b.x);
  e->dy_user = depth_as_batch(cout, s, b.y);
  e->dw_tap = memory::desc(w2, memory::data_type::f32, memory::dims{(int64_t)cin * 27, 27, 3, 1});
  e->x_to = dnnl::reorder(dnnl::reorder::primitive_desc(engine(), e->x_user, engine(), e->x_prim));
  e->dy_to = dnnl::reorder(dnnl::reorder::primitive_desc(engine(), e->dy_user, engine(), e->dy_prim));
  dnnl::post_ops po;
  po.append_sum(1.f);
  dnnl::primitive_attr attr;
  attr.set_post_ops(po);
  e->dw_add = dnnl::reorder(dnnl::reorder::primitive_desc(engine(), e->dw_prim, engine(), e->dw_tap, attr));
  return e;
}

void sliced_backward_weights(const DepthSliced& e, const float* x, const float* dy, float* dw, int n, int cin,
                             int cout, Spatial s) {
  ProfileScope prof("onednn_conv3_backward_weights_sliced");
  const int64_t V = s.size();
  const size_t slice = e.x_slice_bytes;
  char* xb = static_cast<char*>(scratch(4, slice * (s.d + 2)));
  std::memset(xb, 0, slice);
  std::memset(xb + slice * (s.d + 1), 0, slice);
  auto& st = stream();
  for (int i = 0; i < n; ++i) {
    memory xu(e.x_user, engine(), const_cast<float*>(x + (int64_t)i * cin * V));
    memory xp(e.x_prim, engine(), xb + slice);
    e.x_to.execute(st, xu, xp);
    memory du(e.dy_user, engine(), const_cast<float*>(dy + (int64_t)i * cout * V));
    memory dp(e.dy_prim, engine(), scratch(3, e.dy_prim.get_size()));
    e.dy_to.execute(st, du, dp);
    for (int kd = 0; kd < 3; ++kd) {
      memory xv(e.x_prim, engine(), xb + slice * kd);
      memory wm(e.dw_prim, engine(), scratch(5, e.dw_prim.get_size()));
      execute(e.prim, {{DNNL_ARG_SRC, xv}, {DNNL_ARG_DIFF_DST, dp}, {DNNL_ARG_DIFF_WEIGHTS, wm}});
      memory tap(e.dw_tap, engine(), dw + kd * 9);
      e.dw_add.execute(st, wm, tap);
    }
  }
  profile_sync();
}

struct ConvBwd {
  std::shared_ptr<DepthSliced> sliced;  // 3D backward-weights through 2D kernels
  bool data_by_reference = false, weights_by_reference = false;
  dnnl::convolution_backward_data data;
  dnnl::convolution_backward_weights weights;
  Port dy_d, w_d, dx;   // backward-data
  Port x_w, dy_w, dw;   // backward-weights (dw accumulates)
};

std::shared_ptr<ConvBwd> make_bwd(int n, int cin, int cout, Spatial s, int ndim, Blocks b) {
  const Geometry g(ndim);
  auto data_pd = [&](bool plain) {
    plain = plain || layout() == Layout::Plain;
    return dnnl::convolution_backward_data::primitive_desc(
        engine(), algorithm::convolution_direct, policy_act(n, cin, s, ndim, plain), conv_weights(cin, cout, ndim, plain),
        policy_act(n, cout, s, ndim, plain), g.strides, g.pad, g.pad, fwd_pd(n, cin, cout, s, ndim, plain),
        user_scratchpad());
  };
  auto weights_pd = [&](bool plain) {
    plain = plain || layout() == Layout::Plain;
    return dnnl::convolution_backward_weights::primitive_desc(
        engine(), algorithm::convolution_direct, policy_act(n, cin, s, ndim, plain), conv_weights(cin, cout, ndim, plain),
        policy_act(n, cout, s, ndim, plain), g.strides, g.pad, g.pad, fwd_pd(n, cin, cout, s, ndim, plain),
        user_scratchpad());
  };
  const auto dpd = data_pd(false);
  const auto wpd = weights_pd(false);
  auto e = std::make_shared<ConvBwd>();
  const memory::desc x_user = user_act(n, cin, s, ndim, b.x), y_user = user_act(n, cout, s, ndim, b.y),
                     w_user = conv_weights(cin, cout, ndim, true);
  e->data_by_reference = use_reference(dpd);
  if (!e->data_by_reference) {
    e->data = dnnl::convolution_backward_data(dpd);
    e->dy_d.init(y_user, dpd.diff_dst_desc(), true, false, false, true);
    e->w_d.init(w_user, dpd.weights_desc(), true, false, false);
    e->dx.init(x_user, dpd.diff_src_desc(), false, true, false, true);
  }
  e->weights_by_reference = use_reference(wpd);
  if (e->weights_by_reference && ndim == 3 && !depth_slicing_off()) {
    e->sliced = make_sliced(cin, cout, s, b);
    e->weights_by_reference = !e->sliced;
  }
  if (!e->weights_by_reference && !e->sliced) {
    e->weights = dnnl::convolution_backward_weights(wpd);
    e->x_w.init(x_user, wpd.src_desc(), true, false, false, true);
    e->dy_w.init(y_user, wpd.diff_dst_desc(), true, false, false, true);
    e->dw.init(w_user, wpd.diff_weights_desc(), false, true, true);
  }
  return e;
}

}  // namespace

void conv3_forward(const float* x, const float* w, float* y, int n, int cin, int cout, Spatial s, int ndim,
                   Blocks b) {
  sync_threads();
  auto e = cached_as<ConvFwd>(make_key(kConvFwd, n, cin, cout, s, ndim, b),
                              [&] { return make_fwd(n, cin, cout, s, ndim, b); });
  if (e->by_reference) {
    ReferenceScope ref;
    const float* xp = plain_in(x, n, cin, s, ndim, b.x, 0);
    float* yp = plain_out(y, n, cout, s, ndim, b.y, 2);
    cmseg::conv3_forward(xp, w, yp, n, cin, cout, s, ndim);
    return plain_done(yp, y, n, cout, s, ndim, b.y);
  }
  memory xm = e->x.in(x, 0), wm = e->w.in(w, 1), ym = e->y.out(y, 2);
  {
    ProfileScope prof("onednn_conv3_forward");
    execute(e->prim, {{DNNL_ARG_SRC, xm}, {DNNL_ARG_WEIGHTS, wm}, {DNNL_ARG_DST, ym}});
    profile_sync();
  }
  e->y.finish(ym, y);
  stream().wait();
}

// The reference backward on plain copies of blocked tensors.
void reference_backward(const float* x, const float* w, const float* dy, float* dx, float* dw, int n, int cin,
                        int cout, Spatial s, int ndim, Blocks b) {
  ReferenceScope ref;
  const float* xp = plain_in(x, n, cin, s, ndim, b.x, 4);
  const float* dyp = plain_in(dy, n, cout, s, ndim, b.y, 5);
  float* dxp = plain_out(dx, n, cin, s, ndim, b.x, 6);
  cmseg::conv3_backward(xp, w, dyp, dxp, dw, n, cin, cout, s, ndim);
  plain_done(dxp, dx, n, cin, s, ndim, b.x);
}

void conv3_backward(const float* x, const float* w, const float* dy, float* dx, float* dw, int n, int cin, int cout,
                    Spatial s, int ndim, Blocks b) {
  sync_threads();
  auto e = cached_as<ConvBwd>(make_key(kConvBwd, n, cin, cout, s, ndim, b),
                              [&] { return make_bwd(n, cin, cout, s, ndim, b); });
  // The reference computes dw alongside dx, so a GEMM-only backward-data (not
  // seen on AVX2) sends the whole backward there.
  if ((dx && e->data_by_reference) || (!dx && e->weights_by_reference))
    return reference_backward(x, w, dy, dx, dw, n, cin, cout, s, ndim, b);
  memory dy_d;
  if (dx) {
    dy_d = e->dy_d.in(dy, 0);
    memory wm = e->w_d.in(w, 1), dxm = e->dx.out(dx, 2);
    {
      ProfileScope prof("onednn_conv3_backward_data");
      execute(e->data, {{DNNL_ARG_DIFF_DST, dy_d}, {DNNL_ARG_WEIGHTS, wm}, {DNNL_ARG_DIFF_SRC, dxm}});
      profile_sync();
    }
    e->dx.finish(dxm, dx);
  }
  if (e->sliced) {
    sliced_backward_weights(*e->sliced, x, dy, dw, n, cin, cout, s);
    stream().wait();
    return;
  }
  if (e->weights_by_reference) {
    stream().wait();
    return reference_backward(x, w, dy, nullptr, dw, n, cin, cout, s, ndim, b);
  }
  // Both directions usually want dy in the same layout: reorder it once.
  memory dy_w = dx && e->dy_w.prim == e->dy_d.prim ? dy_d : e->dy_w.in(dy, 3);
  memory xm = e->x_w.in(x, 4), dwm = e->dw.out(dw, 5);
  {
    ProfileScope prof("onednn_conv3_backward_weights");
    execute(e->weights, {{DNNL_ARG_DIFF_DST, dy_w}, {DNNL_ARG_SRC, xm}, {DNNL_ARG_DIFF_WEIGHTS, dwm}});
    profile_sync();
  }
  e->dw.finish(dwm, dw);
  stream().wait();
}

}  // namespace onednn
}  // namespace cmseg
