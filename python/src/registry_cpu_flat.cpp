// python/src/registry_cpu_flat.cpp — the CPU schemes on layout::flat (registry_cpu.cpp).
#include "registry_cpu.hpp"

namespace kvtrim::python::cpu_list {

void add_flat(registry& into) {
  add_layout<layout::flat>(into);
  add_external<layout::flat, budget::uniform, budget::adaptive>(into);
}

}  // namespace kvtrim::python::cpu_list
