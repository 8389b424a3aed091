// test_cuda_simt: the host stand-in (../simt_cuda.hpp) for the toolkit header of this name.
#pragma once
#include "../simt_cuda.hpp"
