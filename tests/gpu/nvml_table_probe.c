/* Diagnostic preload (issue 15): what nvidia-smi gets from nvmlInternalGetExportTable.
 * nvidia-smi looks NVML's functions up with dlsym on the library's handle, so this wraps dlsym
 * (the real one through dlvsym, as the shim does) and hands out a wrapper for that one name. The
 * wrapper prints the table id (16 bytes), the first word and, for each following pointer-sized
 * slot, the symbol whose address it is exactly (dladdr), to see whether the public process-list
 * functions sit in a table nvidia-smi calls through.
 *   gcc -shared -fPIC -O1 -o probe.so tests/gpu/nvml_table_probe.c -ldl
 *   LD_PRELOAD=./probe.so nvidia-smi --query-compute-apps=pid,used_memory --format=csv */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

typedef int (*table_fn)(const void **, const unsigned char *);
typedef void *(*dlsym_fn)(void *, const char *);
static table_fn real_table;

static int probe_table(const void **table, const unsigned char *id) {
    int rc = real_table ? real_table(table, id) : 999;
    fprintf(stderr, "PROBE table id=");
    for (int i = 0; id && i < 16; i++) fprintf(stderr, "%02x", id[i]);
    fprintf(stderr, " rc=%d", rc);
    if (rc != 0 || !table || !*table) { fprintf(stderr, "\n"); return rc; }
    const uintptr_t *t = (const uintptr_t *)*table;
    fprintf(stderr, " first=0x%lx\n", (unsigned long)t[0]);
    size_t n = t[0] > 8 && t[0] < 4096 ? t[0] / 8 : 64;
    for (size_t i = 1; i < n && i < 256; i++) {
        Dl_info info;
        memset(&info, 0, sizeof info);
        int ok = t[i] ? dladdr((void *)t[i], &info) : 0;
        fprintf(stderr, "PROBE   slot %zu 0x%lx %s%s\n", i, (unsigned long)t[i],
                ok && info.dli_sname ? info.dli_sname : "-",
                ok && info.dli_saddr == (void *)t[i] ? " (exact)" : "");
    }
    return rc;
}

void *dlsym(void *handle, const char *name) {
    static dlsym_fn real;
    if (!real) real = (dlsym_fn)dlvsym(RTLD_NEXT, "dlsym", "GLIBC_2.2.5");
    void *p = real(handle, name);
    if (name && strncmp(name, "nvml", 4) == 0) fprintf(stderr, "PROBE dlsym %s\n", name);
    if (p && name && strcmp(name, "nvmlInternalGetExportTable") == 0) {
        real_table = (table_fn)p;
        return (void *)probe_table;
    }
    return p;
}
