/*
 * torch_arbiter pluggable allocator: the alloc/free pair, the backends, and the table of live
 * pointers. See arbiter_alloc.h for the interface and ledger.c for the shared ledger.
 *
 * Which workload pays: the calling thread's current workload (thread-local, set from Python
 * around a MemPool scope). Frees credit the workload recorded at allocation time, whatever thread
 * frees, because PyTorch releases cached segments from wherever empty_cache() runs.
 */
#define _GNU_SOURCE
#include "arbiter_alloc.h"

#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ledger.h"

#define ERROR_LEN 512
#define SHARDS 64
#define SHARD_INITIAL_CAPACITY 64
#define REFUSE_LIMIT 1
#define REFUSE_BACKEND 2
#define REFUSE_LEDGER 3
#define REFUSE_INVALID 4

/* ---- errors and statistics ---- */

static _Thread_local char tl_error[ERROR_LEN];
static _Thread_local ta_refusal tl_refusal;
static _Thread_local int tl_has_refusal;

void ta_set_error(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(tl_error, sizeof tl_error, fmt, ap);
    va_end(ap);
}

/* Live allocations and bytes are counted per shard of the pointer table (under its lock). */
static struct {
    _Atomic uint64_t invalid_args, unknown_frees, refused, backend_failures, ledger_errors,
        reaped_bytes;
} g_stats;

static uint64_t live_allocs(void);
static uint64_t live_bytes(void);

static void record_refusal(uint64_t key, uint64_t requested, uint64_t used, uint64_t limit,
                           int device, int reason) {
    tl_refusal = (ta_refusal){key, requested, used, limit, device, reason};
    tl_has_refusal = 1;
}

const char *torch_arbiter_last_error(void) { return tl_error; }

int torch_arbiter_last_refusal(ta_refusal *out) {
    if (!tl_has_refusal || !out) return 0;
    *out = tl_refusal;
    return 1;
}

void torch_arbiter_clear_refusal(void) { tl_has_refusal = 0; }

void torch_arbiter_get_stats(ta_stats *out) {
    if (!out) return;
    out->live_allocs = live_allocs();
    out->live_bytes = live_bytes();
    out->invalid_args = atomic_load(&g_stats.invalid_args);
    out->unknown_frees = atomic_load(&g_stats.unknown_frees);
    out->refused = atomic_load(&g_stats.refused);
    out->backend_failures = atomic_load(&g_stats.backend_failures);
    out->ledger_errors = atomic_load(&g_stats.ledger_errors);
    out->reaped_bytes = atomic_load(&g_stats.reaped_bytes);
}

int torch_arbiter_abi_version(void) { return TA_ABI_VERSION; }

/* ---- configuration: backend and enforcement ---- */

static _Atomic int g_backend = -1; /* -1: not chosen yet, read TORCH_ARBITER_ALLOC_BACKEND */
static _Atomic int g_enforce = 1;

static int backend_from_env(void) {
    const char *env = getenv("TORCH_ARBITER_ALLOC_BACKEND");
    if (!env || !*env || strcmp(env, "cuda") == 0) return TA_BACKEND_CUDA;
    if (strcmp(env, "host") == 0) return TA_BACKEND_HOST;
    if (strcmp(env, "cuda_async") == 0) return TA_BACKEND_CUDA_ASYNC;
    return TA_BACKEND_CUDA;
}

int torch_arbiter_backend(void) {
    int backend = atomic_load(&g_backend);
    if (backend < 0) {
        int expected = -1;
        atomic_compare_exchange_strong(&g_backend, &expected, backend_from_env());
        backend = atomic_load(&g_backend);
    }
    return backend;
}

int torch_arbiter_set_backend(int backend) {
    if (backend < TA_BACKEND_HOST || backend > TA_BACKEND_CUDA_ASYNC) {
        ta_set_error("unknown backend %d: use 0 (host), 1 (cuda) or 2 (cuda_async)", backend);
        return -EINVAL;
    }
    if (backend != torch_arbiter_backend() && live_allocs() != 0) {
        ta_set_error("cannot switch backend while %llu allocations are live: free them first",
                     (unsigned long long)live_allocs());
        return -EBUSY;
    }
    atomic_store(&g_backend, backend);
    return 0;
}

int torch_arbiter_set_enforce(int enforce) {
    atomic_store(&g_enforce, enforce ? 1 : 0);
    return 0;
}

int torch_arbiter_enforce(void) { return atomic_load(&g_enforce); }

static _Atomic(ta_oom_handler) g_oom_handler;

void torch_arbiter_set_oom_handler(ta_oom_handler handler) { atomic_store(&g_oom_handler, handler); }

/* ---- CUDA runtime, resolved at run time ---- */

typedef int (*cuda_malloc_fn)(void **, size_t);
typedef int (*cuda_free_fn)(void *);
typedef int (*cuda_malloc_async_fn)(void **, size_t, ta_stream_t);
typedef int (*cuda_free_async_fn)(void *, ta_stream_t);
typedef int (*cuda_get_device_fn)(int *);
typedef int (*cuda_set_device_fn)(int);
typedef int (*cuda_get_last_error_fn)(void);

static struct {
    cuda_malloc_fn malloc;
    cuda_free_fn free;
    cuda_malloc_async_fn malloc_async;
    cuda_free_async_fn free_async;
    cuda_get_device_fn get_device;
    cuda_set_device_fn set_device;
    cuda_get_last_error_fn get_last_error;
    char error[ERROR_LEN];
} g_cuda;
static pthread_once_t g_cuda_once = PTHREAD_ONCE_INIT;

static void *find_cudart(void) {
    /* Prefer the runtime PyTorch already loaded (global symbols, or by soname without loading a
     * second copy); load one ourselves only when none is there. */
    if (dlsym(RTLD_DEFAULT, "cudaMalloc")) return RTLD_DEFAULT;
    const char *env = getenv("TORCH_ARBITER_CUDART");
    static const char *const sonames[] = {"libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0",
                                          "libcudart.so"};
    void *handle = NULL;
    if (env && *env && (handle = dlopen(env, RTLD_NOW | RTLD_NOLOAD))) return handle;
    for (size_t i = 0; i < sizeof sonames / sizeof *sonames; i++)
        if ((handle = dlopen(sonames[i], RTLD_NOW | RTLD_NOLOAD))) return handle;
    if (env && *env && (handle = dlopen(env, RTLD_NOW | RTLD_LOCAL))) return handle;
    for (size_t i = 0; i < sizeof sonames / sizeof *sonames; i++)
        if ((handle = dlopen(sonames[i], RTLD_NOW | RTLD_LOCAL))) return handle;
    return NULL;
}

static void resolve_cuda(void) {
    void *handle = find_cudart();
    if (!handle) {
        snprintf(g_cuda.error, sizeof g_cuda.error,
                 "libcudart not found (tried the process, libcudart.so.13/.12/.11.0/.so and "
                 "$TORCH_ARBITER_CUDART): import torch with CUDA first, or set "
                 "TORCH_ARBITER_CUDART to the library's path");
        return;
    }
    g_cuda.malloc = (cuda_malloc_fn)dlsym(handle, "cudaMalloc");
    g_cuda.free = (cuda_free_fn)dlsym(handle, "cudaFree");
    g_cuda.malloc_async = (cuda_malloc_async_fn)dlsym(handle, "cudaMallocAsync");
    g_cuda.free_async = (cuda_free_async_fn)dlsym(handle, "cudaFreeAsync");
    g_cuda.get_device = (cuda_get_device_fn)dlsym(handle, "cudaGetDevice");
    g_cuda.set_device = (cuda_set_device_fn)dlsym(handle, "cudaSetDevice");
    g_cuda.get_last_error = (cuda_get_last_error_fn)dlsym(handle, "cudaGetLastError");
    if (!g_cuda.malloc || !g_cuda.free || !g_cuda.get_device || !g_cuda.set_device ||
        !g_cuda.get_last_error)
        snprintf(g_cuda.error, sizeof g_cuda.error,
                 "libcudart lacks cudaMalloc/cudaFree/cudaGetDevice/cudaSetDevice/cudaGetLastError");
}

static int cuda_ready(int backend) {
    pthread_once(&g_cuda_once, resolve_cuda);
    if (g_cuda.error[0]) {
        ta_set_error("%s", g_cuda.error);
        return 0;
    }
    if (backend == TA_BACKEND_CUDA_ASYNC && (!g_cuda.malloc_async || !g_cuda.free_async)) {
        ta_set_error("libcudart lacks cudaMallocAsync (CUDA < 11.2): use the cuda backend");
        return 0;
    }
    return 1;
}

static void *backend_alloc(int backend, size_t size, int device, ta_stream_t stream) {
    if (backend == TA_BACKEND_HOST) return malloc(size);
    if (!cuda_ready(backend)) return NULL;
    int current = -1;
    g_cuda.get_device(&current);
    int err = current == device ? 0 : g_cuda.set_device(device);
    if (err != 0) {
        g_cuda.get_last_error();
        ta_set_error("cudaSetDevice(%d) failed (cudaError %d): no usable CUDA device or driver", device,
                     err);
        return NULL;
    }
    void *ptr = NULL;
    err = backend == TA_BACKEND_CUDA_ASYNC ? g_cuda.malloc_async(&ptr, size, stream)
                                           : g_cuda.malloc(&ptr, size);
    if (current != device && current >= 0) g_cuda.set_device(current);
    if (err != 0) {
        /* Clear the runtime's last error, as PyTorch does after its own failed cudaMalloc, so
         * the next kernel launch check does not report this allocation's failure. */
        g_cuda.get_last_error();
        ta_set_error("cuda allocation of %zu bytes on device %d failed (cudaError %d)", size,
                     device, err);
        return NULL;
    }
    return ptr;
}

static void backend_free(int backend, void *ptr, int device, ta_stream_t stream) {
    if (backend == TA_BACKEND_HOST) {
        free(ptr);
        return;
    }
    if (!cuda_ready(backend)) return;
    int current = -1;
    g_cuda.get_device(&current);
    if (current != device) g_cuda.set_device(device);
    if (backend == TA_BACKEND_CUDA_ASYNC)
        g_cuda.free_async(ptr, stream);
    else
        g_cuda.free(ptr);
    if (current != device && current >= 0) g_cuda.set_device(current);
}

/* ---- live pointers: ptr -> (size, device, slot), sharded open addressing ---- */

typedef struct {
    uintptr_t ptr; /* 0: empty */
    uint64_t size;
    int32_t slot;
    int16_t device;
    int16_t backend;
} live_entry;

typedef struct {
    _Atomic int locked; /* a spinlock: held for a few dozen instructions, never across calls */
    live_entry *table;
    size_t capacity; /* power of two */
    size_t count;
    uint64_t bytes;
} __attribute__((aligned(64))) live_shard;

static live_shard g_shards[SHARDS];

static void shard_lock(live_shard *shard) {
    unsigned spins = 0;
    while (atomic_exchange_explicit(&shard->locked, 1, memory_order_acquire)) {
        while (atomic_load_explicit(&shard->locked, memory_order_relaxed)) {
            if (++spins > 100) sched_yield(); /* the holder was preempted: let it run */
        }
    }
}

static void shard_unlock(live_shard *shard) {
    atomic_store_explicit(&shard->locked, 0, memory_order_release);
}

static uint64_t hash_ptr(uintptr_t p) {
    uint64_t h = (uint64_t)p * 0x9E3779B97F4A7C15ULL;
    return h ^ (h >> 31);
}

static live_shard *shard_of(uint64_t h) { return &g_shards[h >> 58]; }

static int shard_grow(live_shard *shard) {
    size_t capacity = shard->capacity ? shard->capacity * 2 : SHARD_INITIAL_CAPACITY;
    live_entry *table = calloc(capacity, sizeof *table);
    if (!table) return 0;
    for (size_t i = 0; i < shard->capacity; i++) {
        live_entry e = shard->table[i];
        if (!e.ptr) continue;
        size_t j = hash_ptr(e.ptr) & (capacity - 1);
        while (table[j].ptr) j = (j + 1) & (capacity - 1);
        table[j] = e;
    }
    free(shard->table);
    shard->table = table;
    shard->capacity = capacity;
    return 1;
}

static int live_insert(live_entry entry) {
    uint64_t h = hash_ptr(entry.ptr);
    live_shard *shard = shard_of(h);
    shard_lock(shard);
    if ((shard->count + 1) * 2 > shard->capacity && !shard_grow(shard)) {
        shard_unlock(shard);
        return 0;
    }
    size_t mask = shard->capacity - 1;
    size_t i = h & mask;
    while (shard->table[i].ptr) i = (i + 1) & mask;
    shard->table[i] = entry;
    shard->count++;
    shard->bytes += entry.size;
    shard_unlock(shard);
    return 1;
}

/* Remove `ptr`, returning its entry; 0 when it is not live (double free or foreign pointer). */
static int live_remove(uintptr_t ptr, live_entry *out) {
    uint64_t h = hash_ptr(ptr);
    live_shard *shard = shard_of(h);
    shard_lock(shard);
    if (!shard->capacity) {
        shard_unlock(shard);
        return 0;
    }
    size_t mask = shard->capacity - 1;
    size_t i = h & mask;
    while (shard->table[i].ptr && shard->table[i].ptr != ptr) i = (i + 1) & mask;
    if (!shard->table[i].ptr) {
        shard_unlock(shard);
        return 0;
    }
    *out = shard->table[i];
    /* Backward-shift deletion keeps every probe chain unbroken without tombstones. */
    size_t hole = i, j = i;
    for (;;) {
        j = (j + 1) & mask;
        if (!shard->table[j].ptr) break;
        size_t home = hash_ptr(shard->table[j].ptr) & mask;
        int stays = hole <= j ? (hole < home && home <= j) : (hole < home || home <= j);
        if (stays) continue;
        shard->table[hole] = shard->table[j];
        hole = j;
    }
    shard->table[hole].ptr = 0;
    shard->count--;
    shard->bytes -= out->size;
    shard_unlock(shard);
    return 1;
}

static uint64_t live_total(int want_bytes) {
    uint64_t total = 0;
    for (int i = 0; i < SHARDS; i++) {
        shard_lock(&g_shards[i]);
        total += want_bytes ? g_shards[i].bytes : g_shards[i].count;
        shard_unlock(&g_shards[i]);
    }
    return total;
}

static uint64_t live_allocs(void) { return live_total(0); }

static uint64_t live_bytes(void) { return live_total(1); }

/* ---- the current workload of the calling thread ---- */

static _Thread_local uint64_t tl_key = TA_DEFAULT_WORKLOAD;
static _Thread_local struct {
    int device;
    int slot;
    uint64_t key;
    unsigned generation;
} tl_slot_cache = {-1, -1, 0, 0};

uint64_t torch_arbiter_set_thread_workload(uint64_t key) {
    uint64_t previous = tl_key;
    tl_key = key;
    return previous;
}

uint64_t torch_arbiter_thread_workload(void) { return tl_key; }

static int thread_slot(ta_ledger *ledger, int device, int refresh) {
    unsigned generation = ta_ledger_generation();
    if (!refresh && tl_slot_cache.device == device && tl_slot_cache.key == tl_key &&
        tl_slot_cache.generation == generation)
        return tl_slot_cache.slot;
    int slot = ta_ledger_slot(ledger, tl_key, 1);
    if (slot >= 0) {
        tl_slot_cache.device = device;
        tl_slot_cache.slot = slot;
        tl_slot_cache.key = tl_key;
        tl_slot_cache.generation = generation;
    }
    return slot;
}

/* ---- the pair PyTorch calls ---- */

static int charge_thread(ta_ledger *ledger, int device, uint64_t n, int *slot_out) {
    uint64_t used = 0, limit = 0;
    int enforce = atomic_load_explicit(&g_enforce, memory_order_relaxed);
    for (int attempt = 0; attempt < 4; attempt++) {
        int slot = thread_slot(ledger, device, attempt > 0);
        if (slot < 0) {
            atomic_fetch_add(&g_stats.ledger_errors, 1);
            record_refusal(tl_key, n, 0, 0, device, REFUSE_LEDGER);
            return 0;
        }
        int rc = ta_ledger_charge(ledger, slot, tl_key, n, enforce, &used, &limit);
        if (rc == 1) {
            *slot_out = slot;
            return 1;
        }
        if (rc == 0) {
            /* Bytes of a dead process may be what stands in the way: reap (at most every 50 ms
             * per process), and retry once if anything came back. */
            int64_t reaped = ta_ledger_reap(ledger, 1);
            if (reaped > 0) {
                atomic_fetch_add(&g_stats.reaped_bytes, (uint64_t)reaped);
                continue;
            }
            break;
        }
    }
    atomic_fetch_add_explicit(&g_stats.refused, 1, memory_order_relaxed);
    record_refusal(tl_key, n, used, limit, device, REFUSE_LIMIT);
    ta_set_error("workload %llu refused %llu bytes on device %d: %llu of its %llu bytes in use",
                 (unsigned long long)tl_key, (unsigned long long)n, device,
                 (unsigned long long)used, (unsigned long long)limit);
    return 0;
}

static void *alloc_or_null(ssize_t size, int device, ta_stream_t stream) {
    if (size <= 0 || device < 0 || device >= TA_MAX_DEVICES) {
        if (size < 0 || device < 0 || device >= TA_MAX_DEVICES) {
            atomic_fetch_add(&g_stats.invalid_args, 1);
            record_refusal(tl_key, (uint64_t)size, 0, 0, device, REFUSE_INVALID);
            ta_set_error("invalid allocation: size %zd on device %d", size, device);
        }
        return NULL;
    }
    ta_ledger *ledger = ta_ledger_get(device);
    if (!ledger) {
        atomic_fetch_add(&g_stats.ledger_errors, 1);
        record_refusal(tl_key, (uint64_t)size, 0, 0, device, REFUSE_LEDGER);
        return NULL;
    }
    int slot = -1;
    if (!charge_thread(ledger, device, (uint64_t)size, &slot)) return NULL;
    int backend = torch_arbiter_backend();
    void *ptr = backend_alloc(backend, (size_t)size, device, stream);
    live_entry entry = {(uintptr_t)ptr, (uint64_t)size, slot, (int16_t)device, (int16_t)backend};
    if (!ptr || !live_insert(entry)) {
        if (ptr) backend_free(backend, ptr, device, stream);
        ta_ledger_uncharge(ledger, slot, (uint64_t)size);
        atomic_fetch_add(&g_stats.backend_failures, 1);
        record_refusal(tl_key, (uint64_t)size, 0, 0, device, REFUSE_BACKEND);
        return NULL;
    }
    return ptr;
}

void *torch_arbiter_alloc(ssize_t size, int device, ta_stream_t stream) {
    ta_oom_handler handler = atomic_load_explicit(&g_oom_handler, memory_order_acquire);
    if (handler) tl_error[0] = 0; /* the message handed on must be this allocation's */
    void *ptr = alloc_or_null(size, device, stream);
    if (!ptr && size > 0 && handler) {
        if (!tl_error[0]) ta_set_error("%zd bytes on device %d refused", size, device);
        handler(tl_error); /* does not return */
    }
    return ptr;
}

void torch_arbiter_free(void *ptr, size_t size, int device, ta_stream_t stream) {
    (void)size;   /* the recorded size is the truth; PyTorch passes the same one */
    (void)device; /* likewise the recorded device */
    if (!ptr) return;
    live_entry entry;
    if (!live_remove((uintptr_t)ptr, &entry)) {
        atomic_fetch_add(&g_stats.unknown_frees, 1);
        return;
    }
    backend_free(entry.backend, ptr, entry.device, stream);
    ta_ledger *ledger = ta_ledger_get(entry.device);
    if (ledger) ta_ledger_uncharge(ledger, entry.slot, entry.size);
}

int torch_arbiter_ledger_detach_all(void) {
    if (live_allocs() != 0) {
        ta_set_error("cannot detach while %llu allocations are live: free them first",
                     (unsigned long long)live_allocs());
        return -EBUSY;
    }
    return ta_ledger_detach_all();
}

/* ---- test and benchmark driver: the same exported pair, looped in C ---- */

static uint64_t next_random(uint64_t *state) {
    uint64_t x = *state; /* xorshift64* */
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    return x * 0x2545F4914F6CDD1DULL;
}

int torch_arbiter_exercise(int flags, int device, uint64_t iterations, uint32_t ring,
                           uint64_t min_size, uint64_t max_size, uint64_t seed,
                           ta_exercise_result *out) {
    if (!out || ring == 0 || ring > (1u << 20) || min_size == 0 || max_size < min_size) {
        ta_set_error("exercise: need out, 1 <= ring <= 2^20 and 0 < min_size <= max_size");
        return -EINVAL;
    }
    int through_ledger = flags & TA_EXERCISE_LEDGER;
    int check = (flags & TA_EXERCISE_CHECK) && through_ledger;
    int touch = (flags & TA_EXERCISE_TOUCH) &&
                (!through_ledger || torch_arbiter_backend() == TA_BACKEND_HOST);
    void **live = calloc(ring, sizeof *live);
    uint64_t *sizes = calloc(ring, sizeof *sizes);
    if (!live || !sizes) {
        free(live);
        free(sizes);
        ta_set_error("exercise: out of host memory");
        return -ENOMEM;
    }
    ta_ledger *ledger = through_ledger ? ta_ledger_get(device) : NULL;
    if (through_ledger && !ledger) {
        free(live);
        free(sizes);
        return -EIO;
    }
    memset(out, 0, sizeof *out);
    uint64_t state = seed ? seed : 0x9E3779B97F4A7C15ULL;
    uint64_t span = max_size - min_size + 1;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (uint64_t i = 0; i < iterations; i++) {
        uint32_t k = (uint32_t)(i % ring);
        if (live[k]) {
            if (through_ledger)
                torch_arbiter_free(live[k], sizes[k], device, NULL);
            else
                free(live[k]);
            live[k] = NULL;
        }
        uint64_t size = span == 1 ? min_size : min_size + next_random(&state) % span;
        void *p = through_ledger ? torch_arbiter_alloc((ssize_t)size, device, NULL) : malloc(size);
        if (!p) {
            out->refusals++;
            continue;
        }
        if (touch) *(volatile char *)p = (char)i;
        live[k] = p;
        sizes[k] = size;
        out->successes++;
        if (check) {
            uint64_t used, limit;
            ta_ledger_peek(ledger, tl_slot_cache.slot, &used, &limit);
            if (used > limit) out->violations++;
            if (used > out->max_used_seen) out->max_used_seen = used;
        }
    }
    for (uint32_t k = 0; k < ring; k++) {
        if (!live[k]) continue;
        if (through_ledger)
            torch_arbiter_free(live[k], sizes[k], device, NULL);
        else
            free(live[k]);
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    out->elapsed_ns = (int64_t)(t1.tv_sec - t0.tv_sec) * 1000000000LL + (t1.tv_nsec - t0.tv_nsec);
    free(live);
    free(sizes);
    return 0;
}

/* ---- fork: the child is a new process for the ledger and owns none of the parent's blocks ---- */

static void before_fork(void) {
    for (int i = 0; i < SHARDS; i++) shard_lock(&g_shards[i]);
}

static void after_fork_parent(void) {
    for (int i = SHARDS - 1; i >= 0; i--) shard_unlock(&g_shards[i]);
}

static void after_fork_child(void) {
    for (int i = 0; i < SHARDS; i++) {
        free(g_shards[i].table);
        g_shards[i].table = NULL;
        g_shards[i].capacity = g_shards[i].count = 0;
        g_shards[i].bytes = 0;
        atomic_store(&g_shards[i].locked, 0);
    }
    ta_ledger_after_fork_child();
}

__attribute__((constructor)) static void register_fork_handlers(void) {
    pthread_atfork(before_fork, after_fork_parent, after_fork_child);
}
