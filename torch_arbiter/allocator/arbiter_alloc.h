/*
 * torch_arbiter pluggable allocator: public C interface.
 *
 * torch.cuda.memory.CUDAPluggableAllocator loads torch_arbiter_alloc / torch_arbiter_free.
 * Every allocation is charged to the calling thread's current workload in a ledger that lives in
 * a POSIX shared-memory segment (one per user and device, mode 0600), so all processes of a user
 * that share a GPU enforce one set of per-workload limits. The backend (cudaMalloc,
 * cudaMallocAsync, or plain malloc for machines without a GPU) is chosen at run time; no CUDA
 * header or library is needed to build this file.
 *
 * Every function here is also called from Python through ctypes (torch_arbiter/allocator/_lib.py
 * mirrors the structs below: keep both in step and bump TA_ABI_VERSION on any change).
 */
#ifndef TORCH_ARBITER_ALLOC_H
#define TORCH_ARBITER_ALLOC_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define TA_ABI_VERSION 1

/* Backends. */
#define TA_BACKEND_HOST 0       /* malloc/free: tests and CPU machines */
#define TA_BACKEND_CUDA 1       /* cudaMalloc/cudaFree (default) */
#define TA_BACKEND_CUDA_ASYNC 2 /* cudaMallocAsync/cudaFreeAsync on the caller's stream */

#define TA_MAX_DEVICES 64
#define TA_LEDGER_SLOTS 256 /* workloads per device segment */
#define TA_LEDGER_PROCS 256 /* processes per device segment */
#define TA_UNLIMITED UINT64_MAX
#define TA_DEFAULT_WORKLOAD 0 /* key charged by threads that selected no workload */

typedef void *ta_stream_t; /* cudaStream_t without the CUDA headers */

typedef struct {
    uint64_t key;
    uint64_t limit;   /* TA_UNLIMITED when none was set */
    uint64_t used;    /* bytes charged now, all processes */
    uint64_t peak;    /* highest `used` seen */
    uint64_t refused; /* allocations refused because of the limit */
    int32_t owner_pid;
    int32_t reserved;
} ta_workload_info;

typedef struct {
    uint64_t live_allocs;      /* allocations of this process not yet freed */
    uint64_t live_bytes;
    uint64_t invalid_args;     /* negative size or device out of range (size 0 is a no-op) */
    uint64_t unknown_frees;    /* double frees and pointers this library never returned */
    uint64_t refused;          /* allocations refused by a ledger limit */
    uint64_t backend_failures; /* the backend (cudaMalloc/malloc) returned nothing */
    uint64_t ledger_errors;    /* segment could not be attached, or is full */
    uint64_t reaped_bytes;     /* bytes of dead processes this process returned to the ledger */
} ta_stats;

typedef struct {
    uint64_t key;       /* workload charged */
    uint64_t requested; /* bytes asked for */
    uint64_t used;      /* the workload's use at the refusal */
    uint64_t limit;     /* its limit at the refusal */
    int32_t device;
    int32_t reason;     /* 1 limit, 2 backend out of memory, 3 ledger error, 4 invalid argument */
} ta_refusal;

typedef struct {
    uint64_t successes;
    uint64_t refusals;
    uint64_t violations; /* times this thread saw used > limit right after its own allocation */
    uint64_t max_used_seen;
    int64_t elapsed_ns;
} ta_exercise_result;

/* The pair CUDAPluggableAllocator loads. */
void *torch_arbiter_alloc(ssize_t size, int device, ta_stream_t stream);
void torch_arbiter_free(void *ptr, size_t size, int device, ta_stream_t stream);

int torch_arbiter_abi_version(void);
const char *torch_arbiter_last_error(void);
int torch_arbiter_last_refusal(ta_refusal *out);
void torch_arbiter_clear_refusal(void);
void torch_arbiter_get_stats(ta_stats *out);

int torch_arbiter_set_backend(int backend);
int torch_arbiter_backend(void);
int torch_arbiter_set_enforce(int enforce);
int torch_arbiter_enforce(void);

/* Global mode: called (with the reason) instead of returning NULL from torch_arbiter_alloc for a
 * refused or failed allocation of size > 0; it must not return (oom.cpp throws
 * c10::OutOfMemoryError, which unwinds through the shim: built with -fexceptions). NULL: return
 * NULL (pool mode: PyTorch's caching allocator checks the pointer itself). */
typedef void (*ta_oom_handler)(const char *message);
void torch_arbiter_set_oom_handler(ta_oom_handler handler);

uint64_t torch_arbiter_set_thread_workload(uint64_t key);
uint64_t torch_arbiter_thread_workload(void);

int torch_arbiter_ledger_set_prefix(const char *prefix);
int torch_arbiter_ledger_name(int device, char *buf, size_t buflen);
int torch_arbiter_ledger_attach(int device);
int torch_arbiter_ledger_detach_all(void);
int torch_arbiter_ledger_unlink(int device);
int torch_arbiter_ledger_set_limit(int device, uint64_t key, uint64_t limit);
int torch_arbiter_ledger_get(int device, uint64_t key, ta_workload_info *out);
int torch_arbiter_ledger_list(int device, uint64_t *keys, int max_keys);
int torch_arbiter_ledger_process_bytes(int device, uint64_t key, int32_t *pids, uint64_t *bytes,
                                       int max_entries);
int64_t torch_arbiter_ledger_reap(int device);
int torch_arbiter_ledger_remove(int device, uint64_t key);

int torch_arbiter_exercise(int flags, int device, uint64_t iterations, uint32_t ring,
                           uint64_t min_size, uint64_t max_size, uint64_t seed,
                           ta_exercise_result *out);
#define TA_EXERCISE_LEDGER 1 /* through torch_arbiter_alloc/free; else bare malloc/free */
#define TA_EXERCISE_CHECK 2  /* after each allocation, compare the workload's use to its limit */
#define TA_EXERCISE_TOUCH 4  /* write one byte of each block (host memory only) */

#endif
