// Transposed convolution, kernel 2, stride 2, with bias (SPEC section 2, `up.k`)
// on oneDNN deconvolution primitives. Reference: native/layers/upconv2.cpp.
// Our weights are PyTorch's [cin, cout, 2^ndim], which oneDNN names iodhw
// (iohw in 2D) for its [out, in, k] deconvolution weights; kernel 2 with
// stride 2 has no overlap, so no flip or padding is involved.
// Weight and bias gradients accumulate (+=) through a sum post-op on the
// reorder from the primitive's scratch result.
#include "cmseg/onednn.hpp"
#include "cmseg/profile.hpp"
#include "onednn_internal.hpp"

namespace cmseg {
namespace onednn {

using namespace detail;
using dnnl::algorithm;
using dnnl::prop_kind;

namespace {

enum Op { kUpFwd = 11, kUpBwd = 12 };

memory::desc up_weights(int cin, int cout, int ndim, bool plain) {
  memory::dims d = ndim == 3 ? memory::dims{cout, cin, 2, 2, 2} : memory::dims{cout, cin, 2, 2};
  tag t = plain ? (ndim == 3 ? tag::iodhw : tag::iohw) : tag::any;
  return memory::desc(d, memory::data_type::f32, t);
}

memory::desc bias_desc(int cout) { return memory::desc({cout}, memory::data_type::f32, tag::a); }

struct Geometry {
  memory::dims strides, pad;
  explicit Geometry(int ndim) : strides(ndim, 2), pad(ndim, 0) {}
};

dnnl::deconvolution_forward::primitive_desc fwd_pd(int n, int cin, int cout, Spatial s, int ndim, bool plain) {
  const Geometry g(ndim);
  plain = plain || layout() == Layout::Plain;
  return dnnl::deconvolution_forward::primitive_desc(
      engine(), prop_kind::forward_training, algorithm::deconvolution_direct, policy_act(n, cin, s, ndim, plain),
      up_weights(cin, cout, ndim, plain), bias_desc(cout), policy_act(n, cout, twice(s, ndim), ndim, plain), g.strides,
      g.pad, g.pad, user_scratchpad());
}

struct UpFwd {
  bool by_reference = false;
  dnnl::deconvolution_forward prim;
  Port x, w, y;
};

std::shared_ptr<UpFwd> make_fwd(int n, int cin, int cout, Spatial s, int ndim, Blocks b) {
  auto pd = fwd_pd(n, cin, cout, s, ndim, false);
  auto e = std::make_shared<UpFwd>();
  e->by_reference = use_reference(pd);
  if (e->by_reference) return e;
  e->prim = dnnl::deconvolution_forward(pd);
  e->x.init(user_act(n, cin, s, ndim, b.x), pd.src_desc(), true, false, false, true);
  e->w.init(up_weights(cin, cout, ndim, true), pd.weights_desc(), true, false, false);
  e->y.init(user_act(n, cout, twice(s, ndim), ndim, b.y), pd.dst_desc(), false, true, false, true);
  return e;
}

struct UpBwd {
  bool by_reference = false;  // either direction only has oneDNN's GEMM path: run the reference
  dnnl::deconvolution_backward_data data;
  dnnl::deconvolution_backward_weights weights;
  Port dy_d, w_d, dx;
  Port x_w, dy_w, dw, db;  // dw, db accumulate
};

std::shared_ptr<UpBwd> make_bwd(int n, int cin, int cout, Spatial s, int ndim, Blocks b) {
  const Geometry g(ndim);
  const Spatial so = twice(s, ndim);
  auto data_pd = [&](bool plain) {
    plain = plain || layout() == Layout::Plain;
    return dnnl::deconvolution_backward_data::primitive_desc(
        engine(), algorithm::deconvolution_direct, policy_act(n, cin, s, ndim, plain), up_weights(cin, cout, ndim, plain),
        policy_act(n, cout, so, ndim, plain), g.strides, g.pad, g.pad, fwd_pd(n, cin, cout, s, ndim, plain),
        user_scratchpad());
  };
  auto weights_pd = [&](bool plain) {
    plain = plain || layout() == Layout::Plain;
    return dnnl::deconvolution_backward_weights::primitive_desc(
        engine(), algorithm::deconvolution_direct, policy_act(n, cin, s, ndim, plain), up_weights(cin, cout, ndim, plain),
        bias_desc(cout), policy_act(n, cout, so, ndim, plain), g.strides, g.pad, g.pad,
        fwd_pd(n, cin, cout, s, ndim, plain), user_scratchpad());
  };
  const auto dpd = data_pd(false);
  const auto wpd = weights_pd(false);
  auto e = std::make_shared<UpBwd>();
  e->by_reference = use_reference(dpd) || use_reference(wpd);
  if (e->by_reference) return e;
  e->data = dnnl::deconvolution_backward_data(dpd);
  e->weights = dnnl::deconvolution_backward_weights(wpd);
  const memory::desc x_user = user_act(n, cin, s, ndim, b.x), y_user = user_act(n, cout, so, ndim, b.y),
                     w_user = up_weights(cin, cout, ndim, true);
  e->dy_d.init(y_user, dpd.diff_dst_desc(), true, false, false, true);
  e->w_d.init(w_user, dpd.weights_desc(), true, false, false);
  e->dx.init(x_user, dpd.diff_src_desc(), false, true, false, true);
  e->x_w.init(x_user, wpd.src_desc(), true, false, false, true);
  e->dy_w.init(y_user, wpd.diff_dst_desc(), true, false, false, true);
  e->dw.init(w_user, wpd.diff_weights_desc(), false, true, true);
  e->db.init(bias_desc(cout), wpd.diff_bias_desc(), false, true, true);
  return e;
}

}  // namespace

void upconv2_forward(const float* x, const float* w, const float* b, float* y, int n, int cin, int cout, Spatial s,
                     int ndim, Blocks blocks) {
  sync_threads();
  auto e = cached_as<UpFwd>(make_key(kUpFwd, n, cin, cout, s, ndim, blocks),
                            [&] { return make_fwd(n, cin, cout, s, ndim, blocks); });
  if (e->by_reference) {
    ReferenceScope ref;
    const Spatial so = twice(s, ndim);
    const float* xp = plain_in(x, n, cin, s, ndim, blocks.x, 0);
    float* yp = plain_out(y, n, cout, so, ndim, blocks.y, 2);
    cmseg::upconv2_forward(xp, w, b, yp, n, cin, cout, s, ndim);
    return plain_done(yp, y, n, cout, so, ndim, blocks.y);
  }
  memory xm = e->x.in(x, 0), wm = e->w.in(w, 1), ym = e->y.out(y, 2);
  memory bm(bias_desc(cout), engine(), const_cast<float*>(b));
  {
    ProfileScope prof("onednn_upconv2_forward");
    execute(e->prim, {{DNNL_ARG_SRC, xm}, {DNNL_ARG_WEIGHTS, wm}, {DNNL_ARG_BIAS, bm}, {DNNL_ARG_DST, ym}});
    profile_sync();
  }
  e->y.finish(ym, y);
  stream().wait();
}

void upconv2_backward(const float* x, const float* w, const float* dy, float* dx, float* dw, float* db, int n, int cin,
                      int cout, Spatial s, int ndim, Blocks blocks) {
  sync_threads();
  auto e = cached_as<UpBwd>(make_key(kUpBwd, n, cin, cout, s, ndim, blocks),
                            [&] { return make_bwd(n, cin, cout, s, ndim, blocks); });
  if (e->by_reference) {
    ReferenceScope ref;
    const Spatial so = twice(s, ndim);
    const float* xp = plain_in(x, n, cin, s, ndim, blocks.x, 0);
    const float* dyp = plain_in(dy, n, cout, so, ndim, blocks.y, 1);
    float* dxp = plain_out(dx, n, cin, s, ndim, blocks.x, 2);
    cmseg::upconv2_backward(xp, w, dyp, dxp, dw, db, n, cin, cout, s, ndim);
    return plain_done(dxp, dx, n, cin, s, ndim, blocks.x);
  }
  memory dy_d;
  if (dx) {
    dy_d = e->dy_d.in(dy, 0);
    memory wm = e->w_d.in(w, 1), dxm = e->dx.out(dx, 2);
    {
      ProfileScope prof("onednn_upconv2_backward_data");
      execute(e->data, {{DNNL_ARG_DIFF_DST, dy_d}, {DNNL_ARG_WEIGHTS, wm}, {DNNL_ARG_DIFF_SRC, dxm}});
      profile_sync();
    }
    e->dx.finish(dxm, dx);
  }
  memory dy_w = dx && e->dy_w.prim == e->dy_d.prim ? dy_d : e->dy_w.in(dy, 3);
  memory xm = e->x_w.in(x, 4), dwm = e->dw.out(dw, 5), dbm = e->db.out(db, 6);
  {
    ProfileScope prof("onednn_upconv2_backward_weights");
    execute(e->weights, {{DNNL_ARG_DIFF_DST, dy_w},
                                  {DNNL_ARG_SRC, xm},
                                  {DNNL_ARG_DIFF_WEIGHTS, dwm},
                                  {DNNL_ARG_DIFF_BIAS, dbm}});
    profile_sync();
  }
  e->dw.finish(dwm, dw);
  e->db.finish(dbm, db);
  stream().wait();
}

}  // namespace onednn
}  // namespace cmseg
