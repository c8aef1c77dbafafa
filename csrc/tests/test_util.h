// A minimal test harness for the ctest executables: CHECK records failures, main returns them.
#pragma once
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <iostream>
#include <string>

namespace exgramed_test {
inline int failures = 0;
}

#define EXPECT(cond)                                                                   \
  do {                                                                                 \
    if (!(cond)) {                                                                     \
      std::cerr << __FILE__ << ":" << __LINE__ << ": expectation failed: " #cond "\n"; \
      ++exgramed_test::failures;                                                       \
    }                                                                                  \
  } while (0)

#define EXPECT_THROWS_WITH(stmt, text)                                                           \
  do {                                                                                           \
    bool thrown = false;                                                                         \
    try {                                                                                        \
      stmt;                                                                                      \
    } catch (const c10::Error& e) {                                                              \
      thrown = std::string(e.what()).find(text) != std::string::npos;                            \
    }                                                                                            \
    if (!thrown) {                                                                               \
      std::cerr << __FILE__ << ":" << __LINE__ << ": expected an error containing '" << text << "'\n"; \
      ++exgramed_test::failures;                                                                 \
    }                                                                                            \
  } while (0)
