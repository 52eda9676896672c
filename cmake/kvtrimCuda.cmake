# CUDA support: check_language, then a separate INTERFACE target kvtrim::cuda
# (CUDA::cudart, CCCL from the toolkit, KVTRIM_HAS_CUDA) so the core target
# never needs nvcc.
set(KVTRIM_HAS_CUDA OFF)
string(TOUPPER "${KVTRIM_CUDA}" _kvtrim_cuda_mode)
if(NOT _kvtrim_cuda_mode MATCHES "^(AUTO|ON|OFF)$")
  message(FATAL_ERROR "kvtrim: KVTRIM_CUDA must be AUTO, ON or OFF, got '${KVTRIM_CUDA}'")
endif()

if(NOT _kvtrim_cuda_mode STREQUAL "OFF")
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
      # Hopper (H100/H200) with its arch-specific features; override with
      # -DCMAKE_CUDA_ARCHITECTURES=80;90a etc.
      set(CMAKE_CUDA_ARCHITECTURES 90a)
    endif()
    enable_language(CUDA)
    find_package(CUDAToolkit REQUIRED)
    set(KVTRIM_HAS_CUDA ON)
  elseif(_kvtrim_cuda_mode STREQUAL "ON")
    message(FATAL_ERROR "kvtrim: KVTRIM_CUDA=ON but no CUDA compiler was found. Put nvcc on PATH, "
                        "set CMAKE_CUDA_COMPILER=/path/to/nvcc, or configure with -DKVTRIM_CUDA=AUTO/OFF.")
  else()
    message(STATUS "kvtrim: no CUDA compiler found; building the CPU backend only")
  endif()
endif()

if(KVTRIM_HAS_CUDA)
  add_library(kvtrim_cuda INTERFACE)
  add_library(kvtrim::cuda ALIAS kvtrim_cuda)
  set_target_properties(kvtrim_cuda PROPERTIES EXPORT_NAME cuda)
  # cuSOLVER: codec::low_rank's sequence bases are fitted on the device (backend/cuda/low_rank_fit.cuh).
  target_link_libraries(kvtrim_cuda INTERFACE kvtrim::kvtrim CUDA::cudart CUDA::cusolver)
  target_compile_definitions(kvtrim_cuda INTERFACE KVTRIM_HAS_CUDA=1)
  # Hopper's warpgroup MMA (backend/cuda/wgmma.cuh: the SnapKV/H2O passes) for targets
  # whose only CUDA architecture is sm_90a (90a, 90a-real, or 90a-virtual: CI's PTX-only
  # build, which still assembles nothing for other devices). The host pass cannot tell
  # sm_90 code from sm_90a code, so the build says it; KVTRIM_CUDA_WGMMA=OFF keeps the
  # mma.sync passes.
  option(KVTRIM_CUDA_WGMMA "Use wgmma kernels where a target's CUDA_ARCHITECTURES is 90a alone" ON)
  if(KVTRIM_CUDA_WGMMA)
    set(_kvtrim_archs "$<TARGET_PROPERTY:CUDA_ARCHITECTURES>")
    target_compile_definitions(kvtrim_cuda INTERFACE
      "$<$<AND:$<COMPILE_LANGUAGE:CUDA>,$<OR:$<STREQUAL:${_kvtrim_archs},90a>,$<STREQUAL:${_kvtrim_archs},90a-real>,$<STREQUAL:${_kvtrim_archs},90a-virtual>>>:KVTRIM_CUDA_WGMMA=1>")
  endif()
  if("cuda_std_20" IN_LIST CMAKE_CUDA_COMPILE_FEATURES)
    target_compile_features(kvtrim_cuda INTERFACE cuda_std_20)
  else()
    # CMake older than the toolkit (3.25 with nvcc 13) does not know nvcc's C++20 feature yet.
    target_compile_options(kvtrim_cuda INTERFACE $<$<COMPILE_LANGUAGE:CUDA>:-std=c++20>)
  endif()
  # Eigen's headers (for Eigen::half) under nvcc: constexpr host functions are
  # called from host-device ones, and defaulted members carry annotations nvcc
  # notes (20012-20015); tensor_view's const conversion, constrained away for
  # const views, is still noted as never called (554). All harmless.
  target_compile_options(kvtrim_cuda INTERFACE
    $<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr -diag-suppress=554,20012,20013,20015>)
endif()
