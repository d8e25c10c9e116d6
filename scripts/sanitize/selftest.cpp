// Planted bugs for scripts/sanitize.sh: compiled with the sanitized extension's flags into a shared
// library and called from Python (ctypes) under the same LD_PRELOAD and options as the test run.
// Each entry point must make the run abort with a sanitizer report; if one returns normally, the
// sanitizer set-up is broken and the script fails before it trusts a clean test run.
#include <climits>
#include <cstdlib>
#include <cstring>

extern "C" {

// AddressSanitizer: a read one element past the end of a heap buffer.
int heap_overflow(int n) {
  int* buf = static_cast<int*>(std::malloc(sizeof(int) * n));
  std::memset(buf, 0, sizeof(int) * n);
  volatile int* p = buf;
  int v = p[n];
  std::free(buf);
  return v;
}

// AddressSanitizer: use after free.
int use_after_free(int n) {
  int* buf = new int[n]();
  delete[] buf;
  volatile int* p = buf;
  return p[0];
}

// UndefinedBehaviorSanitizer: signed integer overflow.
int signed_overflow(int x) {
  volatile int big = INT_MAX;
  return big + x;
}

// UndefinedBehaviorSanitizer: a null pointer read (what a null tag pointer would do in a kernel).
int null_read(int i) {
  volatile const int* p = nullptr;
  return p[i];
}
}
