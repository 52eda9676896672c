// python/src/registry_cpu_contiguous.cpp — the CPU schemes on layout::contiguous (registry_cpu.cpp).
#include "registry_cpu.hpp"

namespace kvtrim::python::cpu_list {

void add_contiguous(registry& into) {
  add_layout<layout::contiguous>(into);
  add_external<layout::contiguous, budget::uniform>(into);
}

}  // namespace kvtrim::python::cpu_list
