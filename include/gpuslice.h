/* gpuslice.h: what C (and Python, through ctypes) programs may rely on from gpuslice.
 *
 * That is: the version, the environment variables, and the layout of the controller's
 * shared-memory ledger (read-only for C readers: monitoring tools, exporters). Nothing else is
 * a stable interface.
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

#include <stdint.h>

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
#define GPUSLICE_ENV_SM_SHARE "GPUSLICE_SM_SHARE"       /* also _0, _1, ... per device */
#define GPUSLICE_ENV_GROUP "GPUSLICE_GROUP"
#define GPUSLICE_ENV_PRIORITY "GPUSLICE_PRIORITY"       /* high | normal | low */
#define GPUSLICE_ENV_SOCKET "GPUSLICE_SOCKET"
#define GPUSLICE_DEFAULT_SOCKET "/run/gpuslice/gpuslice.sock"
#define GPUSLICE_DEFAULT_LEDGER "/dev/shm/gpuslice/ledger"

/* ---------------------------------------------------------------------------------------------
 * The ledger's layout. Layout version 6:
 *
 *   offset 0                  struct gpuslice_ledger_header   (GPUSLICE_LEDGER_HEADER_SIZE bytes)
 *   header.devices_offset     struct gpuslice_device_slot     [GPUSLICE_LEDGER_MAX_DEVICES]
 *   header.groups_offset      struct gpuslice_group_slot      [header.max_groups] (one page each)
 *   header.procs_offset       struct gpuslice_process_slot    [header.max_procs]  (one page each)
 *   header.index_offset       the controller's index of group memory (private; not described)
 *
 * Since version 5 no single file holds the figures: each group's slot and its members' slots
 * live in a sealed memfd of that group (the same layout, other groups' pages zero), the device
 * table in a memfd shared by all, and each group's settings in a two-page memfd the controller
 * publishes and hands out read-only: a struct gpuslice_group_slot (settings only), then a
 * struct gpuslice_member_settings (since version 6: each member's own priority and the group's
 * cross-check penalty, which used to sit in the members' writable process slots). A registered process gets its group's three descriptors
 * over the socket; the file at GPUSLICE_DEFAULT_LEDGER is the controller's own (mode 0600: the
 * header, the index, the controller's record of the device table). Monitoring tools read the figures through
 * the controller: `gpuslice ls --json` or its Prometheus metrics, not by mapping the file.
 *
 * Check magic, layout_version and file_size before reading anything else. Every field is
 * written with atomic operations by other processes: read each with __atomic_load_n(&f,
 * __ATOMIC_RELAXED) (or std::atomic_ref in C++20). A slot is in use when its state is
 * GPUSLICE_SLOT_LIVE. Limits equal to GPUSLICE_UNLIMITED are unset. Times are CLOCK_MONOTONIC
 * nanoseconds. Writing to the ledger from outside gpuslice is not supported.
 * ------------------------------------------------------------------------------------------- */
#define GPUSLICE_LEDGER_MAGIC 0x5247444c53555047ULL /* "GPUSLDGR" little-endian */
#define GPUSLICE_LEDGER_LAYOUT_VERSION 7
#define GPUSLICE_LEDGER_PAGE 4096
#define GPUSLICE_LEDGER_HEADER_SIZE 4096
#define GPUSLICE_LEDGER_MAX_DEVICES 16
#define GPUSLICE_UNLIMITED UINT64_MAX
#define GPUSLICE_SLOT_FREE 0
#define GPUSLICE_SLOT_LIVE 1
#define GPUSLICE_PRIORITY_INHERIT 0 /* member settings only: the group's priority applies */
#define GPUSLICE_PRIORITY_LOW 1
#define GPUSLICE_PRIORITY_NORMAL 2
#define GPUSLICE_PRIORITY_HIGH 3
#define GPUSLICE_ORIGIN_UNRECORDED 0 /* group slot origin: unpinned, or pinned before the field */
#define GPUSLICE_ORIGIN_CONFIG 1     /* pinned by the config file: unpinned at a restart without it */
#define GPUSLICE_ORIGIN_LIVE 2       /* pinned by a live edit (gpuslice set --create) */
#define GPUSLICE_OWNER_UNRECORDED 0ULL       /* group slot owner: not recorded (not uid 0) */
#define GPUSLICE_OWNER_OPEN (1ULL << 32)     /* any uid may join (a configured group) */
#define GPUSLICE_OWNER_UID (2ULL << 32)      /* | uid: made from that uid's environment, its alone */

struct gpuslice_ledger_header {
    uint64_t magic;
    uint32_t layout_version;
    uint32_t header_size;
    uint64_t file_size;
    uint32_t max_devices;
    uint32_t max_groups;
    uint32_t max_procs;
    uint32_t device_slot_size;
    uint32_t group_slot_size;
    uint32_t proc_slot_size;
    uint64_t devices_offset;
    uint64_t groups_offset;
    uint64_t procs_offset;
    uint32_t controller_pid;          /* 0 when no controller has the ledger open */
    uint32_t _pad0;
    uint64_t controller_heartbeat_ns; /* updated every 100 ms by a running controller */
    uint64_t controller_starts;       /* controllers that have started on this ledger */
    uint64_t created_ns;
    uint64_t registrations;           /* processes registered since creation */
    uint64_t devices_inode;           /* the device memory's inode, for a restarted controller */
    uint64_t index_offset;            /* where the controller's index begins */
};

#define GPUSLICE_MAX_HIGH 8

struct gpuslice_high_slot {           /* one high-priority process on a device */
    uint64_t owner;                   /* drawn at random by the process; 0 = free */
    uint32_t pid;                     /* its own pid (in its own namespace) */
    uint32_t busy;                    /* non-zero (1) while it has work queued or running */
    uint64_t alive_until;             /* lease; a dead process's slot lapses */
    uint64_t next_from;               /* its next request expected not before (ns); 0 = no prediction */
    uint64_t next_until;              /* ... and not after (layout 7) */
};

struct gpuslice_turn {                /* whose burst is on the device, among throttled processes */
    uint64_t holder;                  /* the holder's random token; 0 = nobody's */
    uint64_t last_holder;             /* the latest holder's token */
    uint64_t lease_until;             /* after this the turn may be taken */
    uint64_t last_handover;           /* when the turn last passed between live processes */
    uint32_t holder_pid;              /* holder's own pid (no controller only); 0 = unknown */
    uint32_t last_holder_pid;
    uint64_t head;                    /* ticket served (low 32 bits, futex word), claimed (bit 32), moved at (ms, bits 33..) */
    uint32_t next_ticket;             /* the next ticket a waiter draws */
    uint32_t returning;               /* waiters back from idle (a hint for lending holders) */
};

struct gpuslice_device_sched {
    uint64_t high_alive_until;        /* some high-priority process lives on the device until */
    uint32_t wake;                    /* futex word, bumped when a high process's work is done */
    uint32_t host_bound;              /* bit i: highs[i] says its requests are host-bound (was _pad) */
    struct gpuslice_high_slot highs[GPUSLICE_MAX_HIGH];
    struct gpuslice_turn turn;
};

struct gpuslice_device_slot {
    uint32_t state;
    uint32_t _pad;
    uint64_t total_memory;
    char uuid[48];                    /* NUL-padded, "GPU-xxxxxxxx-xxxx-..." */
    struct gpuslice_device_sched sched;
};

struct gpuslice_group_device {
    uint64_t limit;                   /* bytes, or GPUSLICE_UNLIMITED */
    uint64_t used;                    /* bytes held by all members */
    uint32_t share;                   /* guaranteed percent of device time; 0 = not throttled */
    uint32_t cap;                     /* most it may get: 0 = the share, 100 = no cap (issue 18) */
    uint64_t debt_until;              /* the group's token bucket (GCRA) */
    uint64_t charged_ns;              /* device time charged to throttled launches */
    uint64_t throttled_ns;            /* wall time launches waited */
    uint64_t refusals;                /* allocations refused over a limit */
    uint64_t peak_used;
};

struct gpuslice_group_slot {
    uint32_t state;
    uint32_t priority;
    uint32_t members;
    uint32_t reconciling;
    uint32_t throttled;               /* non-zero when any device has a share */
    uint32_t pinned;                  /* kept when the last member leaves */
    uint64_t generation;              /* bumped each time the slot is reused */
    char name[64];                    /* NUL-padded; "pid-N" for a process alone */
    uint32_t origin;                  /* what pinned it: GPUSLICE_ORIGIN_* (was _reserved) */
    uint32_t _origin_pad;
    uint64_t owner;                   /* who may join: GPUSLICE_OWNER_* (settings page only; was _reserved) */
    uint64_t config_hash;             /* a config group's file section as last applied; 0 = none (settings page only; was _reserved) */
    uint64_t _reserved[1];
    struct gpuslice_group_device devices[GPUSLICE_LEDGER_MAX_DEVICES];
    uint64_t _page[(GPUSLICE_LEDGER_PAGE - 128 - 64 * GPUSLICE_LEDGER_MAX_DEVICES) / 8];
};

struct gpuslice_process_device {
    uint64_t used;                    /* bytes this process holds, overhead included */
    uint64_t overhead;                /* context reserve and other driver-held memory */
    uint64_t limit;                   /* this process's own cap, or GPUSLICE_UNLIMITED */
    uint64_t charged_ns;
    uint64_t throttled_ns;
    uint64_t refusals;
    uint64_t peak_used;
    uint64_t _was_penalty;            /* unused since version 6 (struct gpuslice_member_settings) */
    uint64_t turn_wait_ns;            /* wall time waited for the turn among throttled processes */
    uint64_t _reserved[7];
};

/* Issue 22: an agent's suspension and resume time split (struct gpuslice_process_slot's suspend_phase_us, µs). */
#define GPUSLICE_PHASE_GATE 0           /* suspension: closing the gate */
#define GPUSLICE_PHASE_SYNC 1           /* suspension: cuCtxSynchronize */
#define GPUSLICE_PHASE_PIN 2            /* suspension: cuMemHostAlloc of the host copies */
#define GPUSLICE_PHASE_COPY_OUT 3       /* suspension: device-to-host copies, less PIN */
#define GPUSLICE_PHASE_RELEASE 4        /* suspension: cuMemUnmap + cuMemRelease */
#define GPUSLICE_PHASE_MAP 5            /* resume: cuMemCreate + cuMemMap + cuMemSetAccess */
#define GPUSLICE_PHASE_COPY_IN 6        /* resume: host-to-device copies */
#define GPUSLICE_PHASE_HOST_FREE 7      /* resume: freeing the host copies (pageable: handed to a thread) */
#define GPUSLICE_PHASE_RING 8           /* suspension: pinning the staging ring (first time only) */
#define GPUSLICE_PHASE_HOST_ALLOC 9     /* suspension: mmap + madvise of the pageable host copies */
#define GPUSLICE_PHASE_MEMCPY_OUT 10    /* suspension: workers' memcpy ring -> host, per worker */
#define GPUSLICE_PHASE_MEMCPY_IN 11     /* resume: workers' memcpy host -> ring, per worker */
#define GPUSLICE_SUSPEND_PHASES 12

struct gpuslice_process_slot {
    uint32_t state;
    uint32_t pid;                     /* in the controller's pid namespace */
    uint32_t group;                   /* index of its group slot */
    uint32_t _was_priority;           /* unused since version 6 (struct gpuslice_member_settings) */
    uint64_t ops;                     /* odd while an accounting operation is open */
    uint64_t start_time;              /* /proc/PID/stat field 22, to detect pid reuse */
    uint64_t heartbeat_ns;
    uint32_t uid;
    uint32_t own_pid;                 /* the pid inside the process's own namespace */
    uint64_t generation;
    char name[32];
    uint64_t token;                   /* the process's token, drawn by the controller (struct gpuslice_turn) */
    uint32_t suspend_ack;             /* issue 22: generation << 4 | GPUSLICE_SUSPEND_* (a futex word) */
    uint32_t suspend_error;           /* GPUSLICE_SUSPEND_ERR_* | CUDA code << 16 */
    uint64_t suspend_bytes;           /* bytes the last suspension moved */
    uint32_t suspend_ms;              /* how long the last suspension or resume took */
    uint32_t suspend_caps;            /* GPUSLICE_CAP_* */
    uint64_t suspend_keep;            /* bytes the agent expects to keep on the device while suspended */
    struct gpuslice_process_device devices[GPUSLICE_LEDGER_MAX_DEVICES];
    uint32_t suspend_request;         /* the controller's request to this agent: generation << 1 | wanted */
    uint32_t suspend_held;            /* 1 while the agent holds the process suspended */
    uint32_t suspend_ranges;          /* allocations the last suspension or resume moved */
    uint32_t _suspend_pad;
    uint32_t suspend_phase_us[GPUSLICE_SUSPEND_PHASES]; /* time split, GPUSLICE_PHASE_* */
    uint64_t _page[(GPUSLICE_LEDGER_PAGE - 128 - 128 * GPUSLICE_LEDGER_MAX_DEVICES - 16 - 4 * GPUSLICE_SUSPEND_PHASES) / 8];
};

/* The second page of a group's settings memfd (read-only to members; written by the controller). */
#define GPUSLICE_MEMBER_PRIORITIES (GPUSLICE_LEDGER_PAGE - 8 * GPUSLICE_LEDGER_MAX_DEVICES - 8)
#define GPUSLICE_MARK_EDITED 1         /* the marks below were set live (gpuslice set --suspendable) */
#define GPUSLICE_MARK_SUSPENDABLE 2
#define GPUSLICE_MARK_ALLOW_EXPORTS 4
#define GPUSLICE_MARK_SHIM_PATH 8       /* members' memory VMM-backed, suspended by their own agents */
#define GPUSLICE_MARK_PATH_AUTO 16      /* with SHIM_PATH: suspend_path = "auto" */
#define GPUSLICE_SUSPEND_SUSPENDING 1   /* struct gpuslice_process_slot's suspend_ack, low 4 bits */
#define GPUSLICE_SUSPEND_SUSPENDED 2
#define GPUSLICE_SUSPEND_RESUMING 3
#define GPUSLICE_SUSPEND_RUNNING 4
#define GPUSLICE_SUSPEND_FAILED 5
#define GPUSLICE_SUSPEND_ERR_NO_ROOM 1
#define GPUSLICE_SUSPEND_ERR_BUSY 2
#define GPUSLICE_SUSPEND_ERR_DRIVER 3
#define GPUSLICE_SUSPEND_ERR_HOLE 4
#define GPUSLICE_CAP_AGENT 1
#define GPUSLICE_CAP_FAST 2
#define GPUSLICE_CAP_OTHER_MEMORY 4
struct gpuslice_member_settings {
    uint64_t penalty[GPUSLICE_LEDGER_MAX_DEVICES]; /* bytes charged to the group beyond its members' reports */
    uint32_t marks;                                /* GPUSLICE_MARK_* */
    uint32_t suspend;                              /* issue 22: the agents' ring, the latest request: generation << 1 | wanted (a futex word; 0: never asked) */
    uint8_t priority[GPUSLICE_MEMBER_PRIORITIES];  /* by process slot: own priority, or GPUSLICE_PRIORITY_INHERIT */
};

/* Returns the loaded shim's version, e.g. "0.1.0"; a static string, never NULL. */
const char *gpuslice_version(void);
typedef const char *(*gpuslice_version_fn)(void);

#ifdef __cplusplus
}
#endif

#endif /* GPUSLICE_H */
