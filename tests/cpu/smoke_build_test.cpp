#include <gtest/gtest.h>

#include "common/oracle.hpp"
#include "common/tensors.hpp"

TEST(Build, TestHelpersCompile) {
  auto keys = kvtrim::testing::random_tensor<kvtrim::half, 4>({1, 1, 3, 4}, 1, 1.0f, {0, 0, 1, 2});
  EXPECT_FALSE(keys.view.is_contiguous());
}
