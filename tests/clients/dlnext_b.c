/* libnext_b.so, for the dlsym(RTLD_NEXT) test: the `which` that comes after libnext_a.so's. */
int which(void) { return 2; }
