# Lowers one CUDA source file to C++ for test_cuda_simt (simt_cuda.hpp supplies the
# rest): kernel launches `k<<<grid, block, smem, stream>>>(args)` become
# `::simt::launch(k, ::simt::LaunchConfig(grid, block, smem, stream), args)`, an
# `extern __shared__ T name[];` array the launch's dynamic shared memory, and inline
# PTX (cp.async: the staged CM loss, which the emulation refuses) a trap.
# cmake -DIN=file.cu -DOUT=file.cpp -P lower_cuda.cmake
file(READ "${IN}" src)
string(REGEX REPLACE "([A-Za-z_][A-Za-z0-9_:]*(<[^<>;]*>)?)<<<([^>]*)>>>\\(\\)"
       "::simt::launch(\\1, ::simt::LaunchConfig(\\3))" src "${src}")
string(REGEX REPLACE "([A-Za-z_][A-Za-z0-9_:]*(<[^<>;]*>)?)<<<([^>]*)>>>\\("
       "::simt::launch(\\1, ::simt::LaunchConfig(\\3), " src "${src}")
string(REGEX REPLACE "extern __shared__ ([A-Za-z0-9_]+) ([A-Za-z0-9_]+)\\[\\];"
       "\\1* \\2 = ::simt::dynamic_shared_ptr<\\1>::get();" src "${src}")
string(REGEX REPLACE "asm volatile\\(\"[^\n]*\\);" "::simt::trap(\"inline PTX\");" src "${src}")
if(src MATCHES "<<<|asm volatile|extern __shared__")
  message(FATAL_ERROR "lower_cuda.cmake: ${IN} has a launch, inline PTX or extern __shared__ it could not lower")
endif()
file(WRITE "${OUT}.tmp" "#line 1 \"${IN}\"\n${src}")
file(RENAME "${OUT}.tmp" "${OUT}")
