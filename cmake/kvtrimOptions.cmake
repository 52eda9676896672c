# Options of the kvtrim build. Tests, benchmarks, examples and install rules are
# on by default only when kvtrim is the top-level project (as Eigen, fmt and
# mdspan do), so add_subdirectory / FetchContent users get just the target.
include(GNUInstallDirs)

option(KVTRIM_BUILD_TESTS "Build kvtrim's tests" ${PROJECT_IS_TOP_LEVEL})
option(KVTRIM_BUILD_CPU_TESTS "Build the CPU test suite (off in CUDA-only builds)" ON)
option(KVTRIM_BUILD_CPU_PROGRAMS "Build the CPU-only benchmarks and examples (off in the cuda preset: the cpu presets build them)" ON)
option(KVTRIM_SANITIZER_SUBSET "Sanitizer builds: compile the CPU suites that drive memory, not the value-only ones (tests/CMakeLists.txt)" OFF)
option(KVTRIM_BUILD_BENCH "Build kvtrim's benchmarks" ${PROJECT_IS_TOP_LEVEL})
option(KVTRIM_BUILD_EXAMPLES "Build kvtrim's examples" ${PROJECT_IS_TOP_LEVEL})
option(KVTRIM_INSTALL "Generate kvtrim's install rules" ${PROJECT_IS_TOP_LEVEL})
option(KVTRIM_OPENMP "Thread the CPU backend over (sequence, head) with OpenMP when the compiler has it (results do not depend on it)" ON)
set(KVTRIM_CUDA "AUTO" CACHE STRING "Use CUDA: AUTO (when nvcc is found), ON (required), OFF")
set_property(CACHE KVTRIM_CUDA PROPERTY STRINGS AUTO ON OFF)

# Warnings for kvtrim's own targets (never imposed on, or visible to, users of
# the library).
if(KVTRIM_BUILD_TESTS OR KVTRIM_BUILD_BENCH OR KVTRIM_BUILD_EXAMPLES)
  add_library(kvtrim_warnings INTERFACE)
  target_compile_options(kvtrim_warnings INTERFACE
    $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wpedantic -Wshadow -Wconversion -Wno-sign-conversion>
    $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-Wall,-Wextra>)
endif()
