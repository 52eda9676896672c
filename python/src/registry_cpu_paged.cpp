// python/src/registry_cpu_paged.cpp — the CPU schemes on layout::paged (registry_cpu.cpp).
#include "registry_cpu.hpp"

namespace kvtrim::python::cpu_list {

void add_paged(registry& into) {
  add_layout<layout::paged>(into);
  add_external<layout::paged, budget::uniform, budget::adaptive>(into);
}

}  // namespace kvtrim::python::cpu_list
