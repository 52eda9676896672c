# install(TARGETS … EXPORT …), the package config with find_dependency(Eigen3),
# and a version file: find_package(kvtrim CONFIG) then works from any prefix.
include(CMakePackageConfigHelpers)

set(KVTRIM_CONFIG_DESTINATION "${CMAKE_INSTALL_DATADIR}/cmake/kvtrim")

install(DIRECTORY "${PROJECT_SOURCE_DIR}/include/kvtrim" DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}")
install(TARGETS kvtrim EXPORT kvtrimTargets)
install(EXPORT kvtrimTargets NAMESPACE kvtrim:: DESTINATION "${KVTRIM_CONFIG_DESTINATION}")
if(KVTRIM_HAS_CUDA)
  install(TARGETS kvtrim_cuda EXPORT kvtrimCudaTargets)
  install(EXPORT kvtrimCudaTargets NAMESPACE kvtrim:: DESTINATION "${KVTRIM_CONFIG_DESTINATION}")
endif()

configure_package_config_file("${PROJECT_SOURCE_DIR}/cmake/kvtrimConfig.cmake.in"
  "${PROJECT_BINARY_DIR}/kvtrimConfig.cmake" INSTALL_DESTINATION "${KVTRIM_CONFIG_DESTINATION}")
# Header-only: any architecture may use it.
write_basic_package_version_file("${PROJECT_BINARY_DIR}/kvtrimConfigVersion.cmake"
  COMPATIBILITY SameMinorVersion ARCH_INDEPENDENT)
install(FILES "${PROJECT_BINARY_DIR}/kvtrimConfig.cmake" "${PROJECT_BINARY_DIR}/kvtrimConfigVersion.cmake"
  DESTINATION "${KVTRIM_CONFIG_DESTINATION}")
