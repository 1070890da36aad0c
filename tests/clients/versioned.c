/* A library whose driver-named symbols carry a symbol version (versioned.map), so that
 * dlvsym(handle, "cuMemAlloc_v2", "VERSIONED_1") finds them: the shim must hand out its
 * wrapper for a versioned lookup just as it does for dlsym. (The simulated libcuda.so.1 is
 * linked by rustc, whose linker cannot version every export.) */
int cuMemAlloc_v2(unsigned long long *dptr, unsigned long size) {
    (void)dptr;
    (void)size;
    return 999;
}
int cuModuleLoadData(void **module, const void *image) {
    (void)module;
    (void)image;
    return 999;
}
int cuCtxSynchronize(void) { return 999; }
