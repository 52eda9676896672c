# NCCL for tensor parallelism (kvtrim/comm/nccl.cuh): an optional INTERFACE
# target kvtrim::nccl = kvtrim::cuda + NCCL's header and library, found where the
# CUDA toolkit keeps them (NVIDIA's images install NCCL there) or on the system
# (libnccl-dev), or under NCCL_ROOT. Without NCCL everything else builds; the
# simulated communicators (kvtrim/comm/) need no NCCL.
set(KVTRIM_NCCL "AUTO" CACHE STRING "Build the kvtrim::nccl target: AUTO (when NCCL is found), ON (required), OFF")
set_property(CACHE KVTRIM_NCCL PROPERTY STRINGS AUTO ON OFF)
set(KVTRIM_HAS_NCCL OFF)
string(TOUPPER "${KVTRIM_NCCL}" _kvtrim_nccl_mode)
if(KVTRIM_HAS_CUDA AND NOT _kvtrim_nccl_mode STREQUAL "OFF")
  find_path(KVTRIM_NCCL_INCLUDE_DIR nccl.h
            HINTS ${NCCL_ROOT} $ENV{NCCL_ROOT} ${CUDAToolkit_INCLUDE_DIRS} PATH_SUFFIXES include)
  find_library(KVTRIM_NCCL_LIBRARY nccl
               HINTS ${NCCL_ROOT} $ENV{NCCL_ROOT} ${CUDAToolkit_LIBRARY_DIR} PATH_SUFFIXES lib lib64)
  if(KVTRIM_NCCL_INCLUDE_DIR AND KVTRIM_NCCL_LIBRARY)
    set(KVTRIM_HAS_NCCL ON)
    add_library(kvtrim_nccl INTERFACE)
    add_library(kvtrim::nccl ALIAS kvtrim_nccl)
    target_include_directories(kvtrim_nccl INTERFACE "${KVTRIM_NCCL_INCLUDE_DIR}")
    target_link_libraries(kvtrim_nccl INTERFACE kvtrim::cuda "${KVTRIM_NCCL_LIBRARY}")
    target_compile_definitions(kvtrim_nccl INTERFACE KVTRIM_HAS_NCCL=1)
  elseif(_kvtrim_nccl_mode STREQUAL "ON")
    message(FATAL_ERROR "kvtrim: KVTRIM_NCCL=ON but nccl.h / libnccl were not found (set NCCL_ROOT)")
  endif()
endif()
message(STATUS "kvtrim: NCCL (target kvtrim::nccl): ${KVTRIM_HAS_NCCL}")
