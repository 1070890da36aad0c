/* gpuslice.h: what C (and Python, through ctypes) programs may rely on from gpuslice.
 *
 * Today that is the version. The controller's shared-memory ledger layout will be described
 * here too; until then nothing else is a stable interface.
 *
 * To tell whether gpuslice is loaded in the current process:
 *
 *     #include <dlfcn.h>
 *     #include <gpuslice.h>
 *     gpuslice_version_fn v = (gpuslice_version_fn)dlsym(RTLD_DEFAULT, "gpuslice_version");
 *     if (v) printf("gpuslice %s\n", v());
 */
#ifndef GPUSLICE_H
#define GPUSLICE_H

#ifdef __cplusplus
extern "C" {
#endif

#define GPUSLICE_VERSION_MAJOR 0
#define GPUSLICE_VERSION_MINOR 1
#define GPUSLICE_VERSION_PATCH 0
#define GPUSLICE_VERSION_STRING "0.1.0"

/* The environment variables the shim reads (see LD_PRELOAD.md). */
#define GPUSLICE_ENV_MEMORY_LIMIT "GPUSLICE_MEMORY_LIMIT"   /* also _0, _1, ... per device */
#define GPUSLICE_ENV_CONFIG "GPUSLICE_CONFIG"
#define GPUSLICE_ENV_LOG "GPUSLICE_LOG"
#define GPUSLICE_ENV_LOG_FILE "GPUSLICE_LOG_FILE"

/* Returns the loaded shim's version, e.g. "0.1.0"; a static string, never NULL. */
const char *gpuslice_version(void);
typedef const char *(*gpuslice_version_fn)(void);

#ifdef __cplusplus
}
#endif

#endif /* GPUSLICE_H */
