// python/src/registry_cuda_paged.cu — the CUDA schemes on layout::paged (registry_cuda.cuh).
#include "registry_cuda.cuh"

namespace kvtrim::python::cuda_list {

void add_paged(registry& into) {
  add_budgets<layout::paged, budget::uniform, budget::adaptive, budget::pyramid>(into);
  add_external<layout::paged, budget::uniform, budget::adaptive>(into);
  add_razor<layout::paged>(into);
}

}  // namespace kvtrim::python::cuda_list
