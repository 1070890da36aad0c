/* Compiled as C11 and as C++ (-Wall -Werror) by tests/integration/tests/interposition.rs: the
 * public header include/gpuslice.h must build cleanly, and the version the loaded shim reports
 * must be the one the header names.
 *
 * Prints `ok version header=H loaded=V match=0|1` when gpuslice is loaded, else
 * `ok version header=H loaded=- match=0`.
 */
#ifndef __cplusplus
#define _GNU_SOURCE
#endif
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>

#include <gpuslice.h>

#define STR2(x) #x
#define STR(x) STR2(x)

int main(void) {
    /* the numeric macros spell the same version as the string */
    const char *parts = STR(GPUSLICE_VERSION_MAJOR) "." STR(GPUSLICE_VERSION_MINOR) "." STR(GPUSLICE_VERSION_PATCH);
    if (strcmp(parts, GPUSLICE_VERSION_STRING) != 0) {
        printf("err version code=-1 header=%s parts=%s\n", GPUSLICE_VERSION_STRING, parts);
        return 1;
    }
    gpuslice_version_fn v = (gpuslice_version_fn)dlsym(RTLD_DEFAULT, "gpuslice_version");
    /* the declaration and the typedef agree */
    const char *(*declared)(void) = v;
    (void)declared;
    const char *loaded = v ? v() : NULL;
    printf("ok version header=%s loaded=%s match=%d env=%s\n", GPUSLICE_VERSION_STRING, loaded ? loaded : "-",
           loaded != NULL && strcmp(loaded, GPUSLICE_VERSION_STRING) == 0, GPUSLICE_ENV_MEMORY_LIMIT);
    return 0;
}
