// test_cuda_simt's stand-in for cuDNN's graph API (conv_graph.cu): it is not emulated,
// so every graph-API call says "no usable engine" and conv_cudnn.cu takes the legacy API
// (emulated on the host, simt_cudnn.cpp), as it does on a GPU where the graph API has no
// engine for a shape. Everything else test_cuda_simt runs is the backend's own code.
#include "common.cuh"

namespace cmseg {
namespace cuda {

bool graph_conv3(Context&, GraphPart, const GraphShape&, const void*, const void*, const void*) { return false; }

}  // namespace cuda
}  // namespace cmseg
