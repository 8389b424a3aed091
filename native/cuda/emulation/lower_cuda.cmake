# Lowers one CUDA source file to C++ for test_cuda_simt (simt_cuda.hpp supplies the
# rest): kernel launches `k<<<grid, block, smem, stream>>>(args)` become
# `::simt::launch(k, ::simt::LaunchConfig(grid, block, smem, stream), args)`, an
# `extern __shared__ T name[];` array the launch's dynamic shared memory, a static
# `__shared__` declaration is followed by a call that poisons it once per block, the inline
# PTX of cp.async, cvt.rna.tf32 and mma.sync (the staged CM loss, the own filter gradient)
# simt calls, and `__CUDA_ARCH__` a macro of the emulated device's 9.0.
# cmake -DIN=file.cu -DOUT=file.cpp -P lower_cuda.cmake
file(READ "${IN}" src)
string(REGEX REPLACE "([A-Za-z_][A-Za-z0-9_:]*(<[^<>;]*>)?)<<<([^>]*)>>>\\(\\)"
       "::simt::launch(\\1, ::simt::LaunchConfig(\\3))" src "${src}")
string(REGEX REPLACE "([A-Za-z_][A-Za-z0-9_:]*(<[^<>;]*>)?)<<<([^>]*)>>>\\("
       "::simt::launch(\\1, ::simt::LaunchConfig(\\3), " src "${src}")
string(REGEX REPLACE "extern __shared__ (__align__\\([0-9]+\\) )?([A-Za-z0-9_]+) ([A-Za-z0-9_]+)\\[\\];"
       "\\2* \\3 = ::simt::dynamic_shared_ptr<\\2>::get();" src "${src}")
# A static `__shared__ T name[...];` is one object for every block here (simt_cuda.hpp
# makes it a function-local static): each block's first thread to reach it poisons it.
string(REGEX REPLACE "__shared__ ([A-Za-z0-9_]+) ([A-Za-z0-9_]+)((\\[[^];]*\\])*);"
       "__shared__ \\1 \\2\\3; ::simt::poison_shared(&\\2, sizeof(\\2));" src "${src}")
# The PTX the kernels use, as simt calls (simt_cuda.hpp): cp.async and its groups,
# the TF32 rounding, the TF32 tensor-core product. Other inline PTX becomes a trap.
set(ws "[ \t\n]*")
string(REGEX REPLACE "asm volatile\\(\"cp\\.async\\.c[ag]\\.shared\\.global \\[%0\\], \\[%1\\], ([0-9]+), %2;\\\\n\"${ws}::${ws}\"r\"\\(([^()]*)\\),${ws}\"l\"\\(([^()]*)\\),${ws}\"r\"\\(([^()]*)\\)${ws}:${ws}\"memory\"\\);"
       "::simt::cp_async(\\2, \\3, \\1, \\4);" src "${src}")
string(REGEX REPLACE "asm volatile\\(\"cp\\.async\\.commit_group;\\\\n\"${ws}::\\);" "::simt::cp_async_commit();" src "${src}")
string(REGEX REPLACE "asm volatile\\(\"cp\\.async\\.wait_group %0;\\\\n\"${ws}::\"n\"\\(([^()]*)\\)${ws}:${ws}\"memory\"\\);"
       "::simt::cp_async_wait(\\1);" src "${src}")
string(REGEX REPLACE "asm volatile\\(\"cp\\.async\\.wait_group ([0-9]+);\\\\n\"${ws}:::${ws}\"memory\"\\);"
       "::simt::cp_async_wait(\\1);" src "${src}")
string(REGEX REPLACE "asm\\(\"cvt\\.rna\\.tf32\\.f32 %0, %1;\\\\n\"${ws}:${ws}\"=r\"\\(([^()]*)\\)${ws}:${ws}\"f\"\\(([^()]*)\\)\\);"
       "\\1 = ::simt::cvt_rna_tf32(\\2);" src "${src}")
string(REGEX REPLACE "asm volatile\\(${ws}\"mma\\.sync\\.aligned\\.m16n8k8\\.row\\.col\\.f32\\.tf32\\.tf32\\.f32 [^:]*:${ws}\"\\+f\"\\(([A-Za-z_][A-Za-z0-9_]*)\\[0\\]\\)[^:]*:${ws}\"r\"\\(([A-Za-z_][A-Za-z0-9_.]*)\\[0\\]\\)[^;]*\"r\"\\(([A-Za-z_][A-Za-z0-9_.]*)\\[1\\]\\)\\);"
       "::simt::mma_m16n8k8_tf32(\\1, \\2, \\3);" src "${src}")
string(REGEX REPLACE "asm( volatile)?\\([^;]*\\);" "::simt::trap(\"inline PTX\");" src "${src}")
# Code for compute capability 8.0 and newer runs: the emulated device is a 9.0.
string(REPLACE "__CUDA_ARCH__" "CMSEG_SIMT_CUDA_ARCH" src "${src}")
if(src MATCHES "<<<|asm( volatile)?\\(|extern __shared__")
  message(FATAL_ERROR "lower_cuda.cmake: ${IN} has a launch, inline PTX or extern __shared__ it could not lower")
endif()
file(WRITE "${OUT}.tmp" "#line 1 \"${IN}\"\n${src}")
file(RENAME "${OUT}.tmp" "${OUT}")
