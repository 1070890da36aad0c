/* procaddr_probe: what does the driver's cuGetProcAddress hand out, and is it an exported symbol?
 *
 * Built WITHOUT -lcuda and without cudart (gcc ... -ldl, or nvcc --cudart none ... -ldl); it
 * reaches the driver the way cudart does: dlopen("libcuda.so.1"), dlsym("cuGetProcAddress_v2"),
 * then asks that function for each base name at several cudaVersions and flags.
 *
 * For each answer it prints one line:
 *   PROBE via=<how gpa was obtained> base=<name> ver=<cudaVersion> flags=<0|2> -> <match>
 *         res=<CUresult> status=<symbolStatus> in_shim=<0|1> lib=<file> dladdr=<sym> real=<sym>
 *         addr=0x.. off=0x..
 * <match>: the first of name, name_v2, _v3, _v4, _ptsz, _ptds, _ptsa, _v2_ptsz, _v2_ptds whose
 *   dlsym(handle, candidate) equals the pointer (the dlsym the program sees: the shim's, when it is
 *   preloaded and overrides dlsym); else "real:<candidate>" when the real glibc dlsym gives that
 *   address (the shim handed out a real driver function although its dlsym gives something else);
 *   else NOMATCH (an address that no candidate export has); NULL when no pointer came back.
 * in_shim/lib: dladdr() of the pointer: does it lie inside libgpuslice.so?
 * off: offset of the pointer from its library's base (stable from run to run).
 * Two passes: via=dlsym uses the dlsym'd cuGetProcAddress_v2; via=gpa12000 uses the pointer the
 * first one returns for "cuGetProcAddress" at cudaVersion 12000 (what cudart does next).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int CUresult;
typedef unsigned long long cuuint64_t;
/* CUdriverProcAddressQueryResult is a C enum: int-sized. */
typedef CUresult (*gpa_v2_t)(const char *, void **, int, cuuint64_t, int *);
typedef CUresult (*cuInit_t)(unsigned int);
typedef void *(*dlsym_t)(void *, const char *);

static const char *BASES[] = {
    "cuMemAlloc",          "cuMemFree",
    "cuMemGetInfo",        "cuMemAllocPitch",
    "cuMemAllocManaged",   "cuMemAllocAsync",
    "cuMemAllocFromPoolAsync", "cuMemFreeAsync",
    "cuMemCreate",         "cuMemRelease",
    "cuArrayCreate",       "cuArray3DCreate",
    "cuMipmappedArrayCreate", "cuArrayDestroy",
    "cuMipmappedArrayDestroy", "cuDeviceTotalMem",
    "cuDevicePrimaryCtxRetain", "cuCtxCreate",
    "cuLaunchKernel",      "cuLaunchKernelEx",
    "cuLaunchCooperativeKernel", "cuGraphLaunch",
    "cuGetProcAddress",    "cuInit",
    "cuStreamSynchronize", "cuEventRecord",
};
static const int VERSIONS[] = {11030, 12000, 13000};
static const cuuint64_t FLAGS[] = {0, 2}; /* CU_GET_PROC_ADDRESS_DEFAULT, _PER_THREAD_DEFAULT_STREAM */
static const char *SUFFIXES[] = {"", "_v2", "_v3", "_v4", "_ptsz", "_ptds", "_ptsa", "_v2_ptsz", "_v2_ptds"};

#define N(a) (sizeof(a) / sizeof((a)[0]))

static dlsym_t real_dlsym;
static void *cuda;

static dlsym_t find_real_dlsym(void) {
  static const char *libs[] = {"libc.so.6", "libdl.so.2"};
  static const char *vers[] = {"GLIBC_2.34", "GLIBC_2.2.5", "GLIBC_2.17"};
  for (size_t i = 0; i < N(libs); i++) {
    void *h = dlopen(libs[i], RTLD_NOW | RTLD_NOLOAD);
    if (!h) continue;
    for (size_t j = 0; j < N(vers); j++) {
      void *f = dlvsym(h, "dlsym", vers[j]);
      if (f) return (dlsym_t)f;
    }
  }
  return NULL;
}

static const char *base_name(const char *path) {
  if (!path || !*path) return "?";
  const char *s = strrchr(path, '/');
  return s ? s + 1 : path;
}

/* Describe a pointer: library, exact symbol, offset. */
static void describe(void *p, int *in_shim, const char **lib, char *sym, size_t symlen,
                     unsigned long *off) {
  Dl_info info;
  memset(&info, 0, sizeof info);
  *in_shim = 0;
  *lib = "?";
  *off = 0;
  snprintf(sym, symlen, "?");
  if (!p || !dladdr(p, &info)) return;
  *lib = base_name(info.dli_fname);
  *in_shim = info.dli_fname && strstr(info.dli_fname, "gpuslice") != NULL;
  *off = (unsigned long)((uintptr_t)p - (uintptr_t)info.dli_fbase);
  if (info.dli_sname && info.dli_saddr == p)
    snprintf(sym, symlen, "%s", info.dli_sname);
  else if (info.dli_sname)
    snprintf(sym, symlen, "%s+0x%lx", info.dli_sname,
             (unsigned long)((uintptr_t)p - (uintptr_t)info.dli_saddr));
}

struct totals {
  int lookups, found, matched, real_only, nomatch, in_shim;
};

static void probe_one(const char *via, gpa_v2_t gpa, const char *base, int ver, cuuint64_t flags,
                      struct totals *t) {
  void *p = NULL;
  int status = -1;
  CUresult r = gpa(base, &p, ver, flags, &status);
  char vis[160] = "", real[160] = "", cand[160];
  for (size_t i = 0; p && i < N(SUFFIXES); i++) {
    snprintf(cand, sizeof cand, "%s%s", base, SUFFIXES[i]);
    if (!vis[0]) {
      void *a = dlsym(cuda, cand);
      if (a && a == p) snprintf(vis, sizeof vis, "%s", cand);
    }
    if (!real[0] && real_dlsym) {
      void *b = real_dlsym(cuda, cand);
      if (b && b == p) snprintf(real, sizeof real, "%s", cand);
    }
  }
  (void)dlerror(); /* clear the errors of failed lookups */
  char match[200];
  if (!p)
    snprintf(match, sizeof match, "NULL");
  else if (vis[0])
    snprintf(match, sizeof match, "%s", vis);
  else if (real[0])
    snprintf(match, sizeof match, "real:%s", real);
  else
    snprintf(match, sizeof match, "NOMATCH");
  int in_shim;
  const char *lib;
  char sym[200];
  unsigned long off;
  describe(p, &in_shim, &lib, sym, sizeof sym, &off);
  printf("PROBE via=%s base=%s ver=%d flags=%llu -> %s res=%d status=%d in_shim=%d lib=%s "
         "dladdr=%s real=%s addr=%p off=0x%lx\n",
         via, base, ver, (unsigned long long)flags, match, r, status, p ? in_shim : 0,
         p ? lib : "-", p ? sym : "-", real[0] ? real : "-", p, off);
  t->lookups++;
  if (p) {
    t->found++;
    if (vis[0]) t->matched++;
    else if (real[0]) t->real_only++;
    else t->nomatch++;
    if (in_shim) t->in_shim++;
  }
}

static void run_pass(const char *via, gpa_v2_t gpa) {
  struct totals t;
  memset(&t, 0, sizeof t);
  for (size_t b = 0; b < N(BASES); b++)
    for (size_t v = 0; v < N(VERSIONS); v++)
      for (size_t f = 0; f < N(FLAGS); f++) probe_one(via, gpa, BASES[b], VERSIONS[v], FLAGS[f], &t);
  printf("SUMMARY via=%s lookups=%d found=%d matched_export=%d real_only=%d nomatch=%d in_shim=%d\n",
         via, t.lookups, t.found, t.matched, t.real_only, t.nomatch, t.in_shim);
  fflush(stdout);
}

int main(void) {
  real_dlsym = find_real_dlsym();
  printf("real_dlsym_found=%d\n", real_dlsym != NULL);
  printf("dlsym_intercepted=%d\n", real_dlsym != NULL && (void *)real_dlsym != (void *)&dlsym);

  cuda = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (!cuda) {
    printf("libcuda_error=%s\n", dlerror());
    return 2;
  }
  int in_shim;
  const char *lib;
  char sym[200];
  unsigned long off;

  gpa_v2_t gpa = (gpa_v2_t)dlsym(cuda, "cuGetProcAddress_v2");
  if (!gpa) {
    printf("gpa_v2_error=%s\n", dlerror());
    return 2;
  }
  describe((void *)gpa, &in_shim, &lib, sym, sizeof sym, &off);
  void *real_gpa = real_dlsym ? real_dlsym(cuda, "cuGetProcAddress_v2") : NULL;
  printf("gpa_v2 in_shim=%d lib=%s dladdr=%s is_real_export=%d\n", in_shim, lib, sym,
         real_gpa != NULL && real_gpa == (void *)gpa);

  cuInit_t init = (cuInit_t)dlsym(cuda, "cuInit");
  if (init) {
    describe((void *)init, &in_shim, &lib, sym, sizeof sym, &off);
    printf("cuInit in_shim=%d lib=%s dladdr=%s\n", in_shim, lib, sym);
    printf("cuInit_res=%d\n", init(0));
  } else {
    printf("cuInit_res=missing\n");
  }
  fflush(stdout);

  run_pass("dlsym", gpa);

  void *p = NULL;
  int status = -1;
  CUresult r = gpa("cuGetProcAddress", &p, 12000, 0, &status);
  describe(p, &in_shim, &lib, sym, sizeof sym, &off);
  printf("gpa12000 res=%d status=%d same_as_dlsym=%d in_shim=%d lib=%s dladdr=%s\n", r, status,
         p == (void *)gpa, p ? in_shim : 0, p ? lib : "-", p ? sym : "-");
  fflush(stdout);
  if (r == 0 && p) run_pass("gpa12000", (gpa_v2_t)p);
  printf("done=1\n");
  return 0;
}
