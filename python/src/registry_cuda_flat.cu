// python/src/registry_cuda_flat.cu — the CUDA schemes on layout::flat (registry_cuda.cuh).
#include "registry_cuda.cuh"

namespace kvtrim::python::cuda_list {

void add_flat(registry& into) {
  add_budgets<layout::flat, budget::uniform, budget::adaptive, budget::pyramid>(into);
  add_external<layout::flat, budget::uniform, budget::adaptive>(into);
  add_razor<layout::flat>(into);
}

}  // namespace kvtrim::python::cuda_list
