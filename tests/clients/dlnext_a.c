/* libnext_a.so, for the dlsym(RTLD_NEXT) test in tests/integration/tests/interposition.rs.
 *
 * `which` returns 1 here and 2 in libnext_b.so. `call_next` asks for the *next* `which` after
 * this library: glibc finds "this library" from dlsym's return address, so the answer is 2 only
 * if whatever sits between us and glibc's dlsym (the shim's trampoline) leaves that address alone.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>

int which(void) { return 1; }

int call_next(void) {
    int (*next)(void) = (int (*)(void))dlsym(RTLD_NEXT, "which");
    return next ? next() : -1;
}
