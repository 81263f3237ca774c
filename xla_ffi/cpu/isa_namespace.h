// The namespace of one ISA level's kernels. setup.py compiles the kernel
// sources (every .cc here but the handlers and dispatch.cc) once per level
// (AVX2, AVX-512, AVX-512+BF16, AMX) with that level's -m flags and
// -DFASTATTN_ISA_NS=isa_<level>. Every kernel function and every inline
// helper of the kernel headers lives in that namespace, so the levels'
// copies keep distinct symbols: the linker can never merge an AVX-512 copy
// of a helper into the AVX2 kernels (an illegal instruction on an AVX2-only
// CPU). Inline, so that code built for one level only (the C++ unit test,
// a FASTATTN_CPU_ARCH build) still writes fastattn::cpu::flash_forward.
#pragma once

#ifndef FASTATTN_ISA_NS
#define FASTATTN_ISA_NS isa_native
#endif
