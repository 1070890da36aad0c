/* dlnext: linked against libnext_a.so then libnext_b.so; run with and without the shim by
 * tests/integration/tests/interposition.rs. One line per check, in cuclient's style:
 *
 *   ok call_next value=N       libnext_a's dlsym(RTLD_NEXT, "which")() (2: libnext_b's)
 *   ok which value=N           the `which` the program itself binds to (1: libnext_a's)
 *   ok malloc obj=PATH off=0xN sym=NAME direct=0|1
 *                              dlsym(RTLD_NEXT, "malloc") from the main program, as dladdr
 *                              describes it (object and offset in it: independent of ASLR), and
 *                              whether it is the malloc the program calls directly
 *   ok gpuslice_version found=0|1 value=STR
 *                              dlsym(RTLD_DEFAULT, "gpuslice_version")
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int which(void);
int call_next(void);

int main(void) {
    printf("ok call_next value=%d\n", call_next());
    printf("ok which value=%d\n", which());

    void *m = dlsym(RTLD_NEXT, "malloc");
    Dl_info info;
    if (m && dladdr(m, &info) && info.dli_fname) {
        printf("ok malloc obj=%s off=0x%lx sym=%s direct=%d\n", info.dli_fname,
               (unsigned long)((uintptr_t)m - (uintptr_t)info.dli_fbase),
               info.dli_sname ? info.dli_sname : "?", m == (void *)&malloc);
    } else {
        printf("err malloc code=-1 ptr=%p\n", m);
    }

    const char *(*version)(void) = (const char *(*)(void))dlsym(RTLD_DEFAULT, "gpuslice_version");
    printf("ok gpuslice_version found=%d value=%s\n", version != NULL, version ? version() : "-");
    return 0;
}
