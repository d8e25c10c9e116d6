// The host tests' check: EXPECT(cond) reports a failed condition with its line and counts it; past
// 20 failures the test stops. main() returns `expect_failures != 0`.
#pragma once

#include <cstdio>
#include <cstdlib>

static long expect_failures = 0;

#define EXPECT(cond)                                                         \
  do {                                                                       \
    if (!(cond)) {                                                           \
      std::fprintf(stderr, "%s:%d: FAILED %s\n", __FILE__, __LINE__, #cond); \
      if (++expect_failures > 20) std::exit(1);                              \
    }                                                                        \
  } while (0)
