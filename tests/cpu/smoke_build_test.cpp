#include <gtest/gtest.h>
#include <kvtrim/kvtrim.hpp>
TEST(Build, Compiles) { EXPECT_EQ(kvtrim::version_major, 0); }
