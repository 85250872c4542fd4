/*
 * The ledger: per-workload limit and use, per-process attribution, in one POSIX shared-memory
 * segment per user and device (mode 0600).
 *
 * Hot path (charge/uncharge) is lock-free: a compare-and-swap loop on the slot's `used` keeps it
 * at or under the limit whatever the number of threads and processes; the charging process then
 * records the bytes under its own entry so that, if it dies, a reaper returns exactly them.
 * Rare operations (creating a slot, registering a process, reaping) take one robust,
 * process-shared mutex, which survives the death of a holder.
 *
 * Known window: a process killed between the CAS on `used` and the add to its own entry (in an
 * allocation), or between the subtraction from its own entry and the one from `used` (in a
 * free), leaks exactly that one allocation's bytes in `used` (the safe direction: limits get
 * stricter, never looser). The two stores are a few instructions apart, so it takes a SIGKILL
 * landing there; torch_arbiter_ledger_reclaim() returns such bytes (those no live process
 * accounts for) once the workload is quiet.
 *
 * A segment is shared with every process of the user, so nothing in it is trusted to be sane:
 * the lock is taken with a timeout and a dead owner's lock is recovered even when the kernel did
 * not mark it (a mutex word naming a thread that no longer exists); a segment truncated under
 * this process turns the next touch of a missing page into private zero pages (a SIGBUS handler
 * that only handles addresses inside a ledger mapping) and the ledger is then refused with an
 * error; a segment that was replaced (unlinked and recreated) or truncated is also noticed by
 * fstat/stat on the rare paths; and a segment that failed its checks once fails again at once
 * (no second wait) until it is replaced.
 */
#define _GNU_SOURCE
#include "ledger.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#if ATOMIC_LLONG_LOCK_FREE != 2 || ATOMIC_INT_LOCK_FREE != 2
#error "the shared ledger needs lock-free 64-bit atomics"
#endif

#define LEDGER_MAGIC 0x5245544942524154ULL /* "TARBITER" */
#define LEDGER_LAYOUT 3
#define SLOT_FREE 0u
#define SLOT_ACTIVE 1u
#define PROC_FREE 0
#define PREFIX_MAX 96
#define NAME_MAX_LEN 160
#define ATTACH_WAIT_NS 2000000000LL
#define REAP_INTERVAL_NS 50000000LL
#define LOCK_SLICE_NS 50000000LL
#define LOCK_WAIT_NS 5000000000LL
#define RECLAIM_SETTLE_NS 50000000LL

typedef struct {
    _Atomic uint32_t state;
    _Atomic int32_t owner_pid;
    _Atomic uint64_t key;
    _Atomic uint64_t limit;
    _Atomic uint64_t used;
    _Atomic uint64_t peak;
    _Atomic uint64_t refused;
    uint64_t owner_start;
    uint64_t pad;
} ledger_slot;

/* Compact on purpose (the whole segment is reserved in /dev/shm up front): a process's threads
 * charging neighbouring workloads share cache lines here, which costs little next to the CAS on
 * each workload's own line, and allocations reach this library at segment rate on CUDA. */
typedef struct {
    _Atomic int32_t pid;
    uint32_t pad;
    uint64_t start_time;
    _Atomic uint64_t bytes[TA_LEDGER_SLOTS];
} ledger_proc;

typedef struct {
    uint64_t magic;
    uint32_t layout;
    uint32_t total_size;
    uint32_t nslots;
    uint32_t nprocs;
    _Atomic uint32_t ready;
    uint32_t pad;
    pthread_mutex_t lock;
    _Atomic uint64_t reaped_bytes;
    _Atomic uint64_t reaped_procs;
    ledger_slot slots[TA_LEDGER_SLOTS] __attribute__((aligned(64)));
    ledger_proc procs[TA_LEDGER_PROCS];
} ledger_shm;

_Static_assert(sizeof(ledger_slot) == 64, "one slot per cache line");

struct ta_ledger {
    ledger_shm *shm;
    _Atomic int proc; /* this process's entry, -1 until registered (read without the lock) */
    int device;
    int fd;           /* kept open: fstat tells a truncated segment, its inode a replaced one */
    dev_t st_dev;
    ino_t st_ino;
    _Atomic int broken; /* the segment was truncated or replaced: refuse, until detach */
    _Atomic int64_t last_reap_ns;
    char name[NAME_MAX_LEN];
};

/* A segment that failed its checks: the next attach fails at once while it is the same file. */
typedef struct {
    dev_t st_dev;
    ino_t st_ino;
    int valid;
    char error[320];
} bad_segment;

static bad_segment g_bad[TA_MAX_DEVICES];

static _Atomic(ta_ledger *) g_ledgers[TA_MAX_DEVICES];
static pthread_mutex_t g_attach_lock = PTHREAD_MUTEX_INITIALIZER;
static char g_prefix[PREFIX_MAX + 1];
static _Atomic unsigned g_generation = 1;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Start time (clock ticks since boot) and state of `pid` from /proc; 0 when unreadable. */
static uint64_t read_proc_stat(pid_t pid, char *state_out) {
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    FILE *f = fopen(path, "re");
    if (!f) return 0;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    char *p = strrchr(buf, ')'); /* the command name may contain spaces and parentheses */
    if (!p) return 0;
    p++;
    char *save = NULL;
    unsigned long long start = 0;
    int field = 3;
    for (char *tok = strtok_r(p, " ", &save); tok; tok = strtok_r(NULL, " ", &save), field++) {
        if (field == 3 && state_out) *state_out = tok[0];
        if (field == 22) {
            start = strtoull(tok, NULL, 10);
            break;
        }
    }
    return start;
}

/* A process is dead when it is gone, a zombie, or its pid now names a younger process. */
static int process_dead(pid_t pid, uint64_t start_time) {
    if (pid <= 0) return 1;
    if (kill(pid, 0) == -1 && errno == ESRCH) return 1;
    char state = '?';
    uint64_t start = read_proc_stat(pid, &state);
    if (start == 0) {
        char path[64];
        snprintf(path, sizeof path, "/proc/%d", (int)pid);
        return access(path, F_OK) == -1 && errno == ENOENT;
    }
    if (state == 'Z' || state == 'X') return 1;
    return start_time != 0 && start != start_time;
}

#ifdef __GLIBC__
/* glibc keeps the futex word (owner tid | FUTEX_WAITERS | FUTEX_OWNER_DIED) as the first int of a
 * pthread_mutex_t; a robust lock whose word has FUTEX_OWNER_DIED set is acquired with EOWNERDEAD. */
static int thread_gone(pid_t tid) { return kill(tid, 0) == -1 && errno == ESRCH; }

/* The lock names a thread that no longer exists and the kernel did not mark it (a segment
 * copied or written by hand, a holder outside this pid namespace's robust-list handling): mark
 * it owner-died as the kernel would, and wake the waiters. Returns 1 when the word changed. */
static int recover_dead_owner(ledger_shm *shm) {
    _Atomic int *word = (_Atomic int *)(void *)&shm->lock;
    int value = atomic_load(word);
    pid_t tid = value & FUTEX_TID_MASK;
    if (tid == 0 || (value & FUTEX_OWNER_DIED) || !thread_gone(tid)) return 0;
    int dead = (value & FUTEX_WAITERS) | FUTEX_OWNER_DIED;
    if (atomic_compare_exchange_strong(word, &value, dead))
        syscall(SYS_futex, word, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
    return 1;
}
#else
static int recover_dead_owner(ledger_shm *shm) {
    (void)shm;
    return 0;
}
#endif

/* Take the segment's lock within LOCK_WAIT_NS, recovering it from a dead holder; 0 or an errno
 * with the error text set. */
static int shm_lock(ledger_shm *shm) {
    int64_t deadline = now_ns() + LOCK_WAIT_NS;
    for (;;) {
        /* timedlock (CLOCK_REALTIME) rather than clocklock, which ThreadSanitizer does not know;
         * a clock jump only changes one slice's length: the deadline is monotonic. */
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_nsec += LOCK_SLICE_NS;
        if (until.tv_nsec >= 1000000000L) {
            until.tv_sec += 1;
            until.tv_nsec -= 1000000000L;
        }
        int rc = pthread_mutex_timedlock(&shm->lock, &until);
        if (rc == EOWNERDEAD) {
            /* The holder died inside a critical section; every multi-step change below publishes
             * its last store with release order, so the state is consistent enough to continue. */
            pthread_mutex_consistent(&shm->lock);
            return 0;
        }
        if (rc == 0) return 0;
        if (rc != ETIMEDOUT) {
            ta_set_error("ledger lock failed: %s (the segment is damaged: remove it from /dev/shm when "
                         "no process uses it)", strerror(rc));
            return rc;
        }
        if (recover_dead_owner(shm)) continue;
        if (now_ns() > deadline) {
            ta_set_error("ledger lock held for over %lld s by thread %d, which is alive (a stopped or "
                         "hung process?): resume or end it, and retry",
                         LOCK_WAIT_NS / 1000000000LL, *(int *)(void *)&shm->lock & FUTEX_TID_MASK);
            return ETIMEDOUT;
        }
    }
}

/* ---- a segment truncated under us: SIGBUS on a missing page becomes private zero pages ---- */

static struct sigaction g_previous_sigbus;
static _Atomic int g_sigbus_installed;

static void on_sigbus(int sig, siginfo_t *info, void *context) {
    uintptr_t address = (uintptr_t)info->si_addr;
    for (int d = 0; d < TA_MAX_DEVICES; d++) {
        ta_ledger *ledger = atomic_load_explicit(&g_ledgers[d], memory_order_acquire);
        if (!ledger) continue;
        uintptr_t start = (uintptr_t)ledger->shm;
        if (address < start || address >= start + sizeof(ledger_shm)) continue;
        /* The faulting access completes on zeros; nothing written there reaches other processes,
         * and the ledger is refused from now on (ta_ledger_get). */
        mmap(ledger->shm, sizeof(ledger_shm), PROT_READ | PROT_WRITE,
             MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
        atomic_store(&ledger->broken, 1);
        return;
    }
    if (g_previous_sigbus.sa_flags & SA_SIGINFO) {
        if (g_previous_sigbus.sa_sigaction) {
            g_previous_sigbus.sa_sigaction(sig, info, context);
            return;
        }
    } else if (g_previous_sigbus.sa_handler == SIG_IGN) {
        return;
    } else if (g_previous_sigbus.sa_handler != SIG_DFL) {
        g_previous_sigbus.sa_handler(sig);
        return;
    }
    signal(SIGBUS, SIG_DFL); /* not ours: the re-executed access dies as it would have */
}

static void install_sigbus_guard(void) {
    if (atomic_exchange(&g_sigbus_installed, 1)) return;
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = on_sigbus;
    action.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&action.sa_mask);
    sigaction(SIGBUS, &action, &g_previous_sigbus);
}

/* Whether the segment is still whole and still the one under its name; marks it broken if not
 * (called on the rare paths: slot creation, reaping, attach). */
static int segment_intact(ta_ledger *ledger) {
    if (atomic_load_explicit(&ledger->broken, memory_order_acquire)) return 0;
    struct stat own, named;
    char path[NAME_MAX_LEN + 16];
    snprintf(path, sizeof path, "/dev/shm%s", ledger->name);
    int whole = fstat(ledger->fd, &own) == 0 && (size_t)own.st_size >= sizeof(ledger_shm);
    int same = stat(path, &named) == 0 && named.st_dev == ledger->st_dev && named.st_ino == ledger->st_ino;
    if (whole && same) return 1;
    atomic_store(&ledger->broken, 1);
    return 0;
}

static void set_broken_error(ta_ledger *ledger) {
    ta_set_error("ledger segment %s was truncated or replaced under this process: its budgets are "
                 "refused here; free this process's allocations and call detach_ledgers() to attach "
                 "the current segment (or restart the process)",
                 ledger->name);
}

static void ensure_prefix(void) {
    if (g_prefix[0]) return;
    const char *env = getenv("TORCH_ARBITER_LEDGER_PREFIX");
    snprintf(g_prefix, sizeof g_prefix, "%s", (env && *env) ? env : "torch_arbiter");
}

static int valid_prefix(const char *prefix) {
    size_t n = strlen(prefix);
    if (n == 0 || n > PREFIX_MAX) return 0;
    for (size_t i = 0; i < n; i++) {
        char c = prefix[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '_' || c == '-' || c == '.'))
            return 0;
    }
    return 1;
}

static void segment_name(int device, char *buf, size_t buflen) {
    ensure_prefix();
    snprintf(buf, buflen, "/%s.u%u.d%d", g_prefix, (unsigned)geteuid(), device);
}

/* A new segment is zero-filled by posix_fallocate; only the header needs writing. */
static void init_segment(ledger_shm *shm) {
    shm->magic = LEDGER_MAGIC;
    shm->layout = LEDGER_LAYOUT;
    shm->total_size = (uint32_t)sizeof(ledger_shm);
    shm->nslots = TA_LEDGER_SLOTS;
    shm->nprocs = TA_LEDGER_PROCS;
    pthread_mutexattr_t attr;
    pthread_mutexattr_init(&attr);
    pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
    pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
    pthread_mutex_init(&shm->lock, &attr);
    pthread_mutexattr_destroy(&attr);
    atomic_store_explicit(&shm->ready, 1, memory_order_release);
}

static int wait_until(int (*cond)(void *), void *arg) {
    int64_t deadline = now_ns() + ATTACH_WAIT_NS;
    while (!cond(arg)) {
        if (now_ns() > deadline) return 0;
        struct timespec pause = {0, 1000000};
        nanosleep(&pause, NULL);
    }
    return 1;
}

static int fd_sized(void *arg) {
    struct stat st;
    int fd = *(int *)arg;
    return fstat(fd, &st) == 0 && (size_t)st.st_size >= sizeof(ledger_shm);
}

static int segment_ready(void *arg) {
    return atomic_load_explicit(&((ledger_shm *)arg)->ready, memory_order_acquire) == 1;
}

static int same_file(const bad_segment *bad, const struct stat *st) {
    return bad->valid && bad->st_dev == st->st_dev && bad->st_ino == st->st_ino;
}

/* Map the segment `name` of `device` into `ledger` (shm, fd, identity); 0 or -1 + error. */
static int map_segment(ta_ledger *ledger, const char *name, int device) {
    int created = 1;
    int fd = shm_open(name, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0 && errno == EEXIST) {
        created = 0;
        fd = shm_open(name, O_RDWR | O_CLOEXEC, 0);
    }
    if (fd < 0) {
        ta_set_error("cannot open ledger segment %s: %s (is /dev/shm mounted and writable?)", name,
                     strerror(errno));
        return -1;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || st.st_uid != geteuid() || (st.st_mode & 0077) != 0) {
        ta_set_error("ledger segment %s is not private to this user (owner uid %u, mode %03o): "
                     "remove /dev/shm%s and retry",
                     name, (unsigned)st.st_uid, (unsigned)(st.st_mode & 0777), name);
        close(fd);
        return -1;
    }
    bad_segment *bad = &g_bad[device];
    if (!created && same_file(bad, &st)) { /* failed before: no second wait */
        ta_set_error("%s", bad->error);
        close(fd);
        return -1;
    }
    /* Reserve every page now: touching a page of a sparse segment on a full /dev/shm would kill
     * the process with SIGBUS in the middle of an allocation. */
    int rc = 0;
    if (created) rc = fchmod(fd, 0600) != 0 ? errno : posix_fallocate(fd, 0, sizeof(ledger_shm));
    if (rc != 0) {
        ta_set_error("cannot reserve %zu bytes for ledger segment %s: %s (is /dev/shm full?)",
                     sizeof(ledger_shm), name, strerror(rc));
        close(fd);
        shm_unlink(name);
        return -1;
    }
    const char *problem = NULL;
    void *mem = MAP_FAILED;
    if (!created && !wait_until(fd_sized, &fd)) {
        problem = "is too small (created by an older version, truncated, or its creator died)";
    } else {
        mem = mmap(NULL, sizeof(ledger_shm), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (mem == MAP_FAILED) {
            ta_set_error("cannot map ledger segment %s: %s", name, strerror(errno));
            close(fd);
            return -1;
        }
        ledger_shm *shm = mem;
        if (created) {
            init_segment(shm);
        } else if (!wait_until(segment_ready, shm) || shm->magic != LEDGER_MAGIC ||
                   shm->layout != LEDGER_LAYOUT || shm->total_size != sizeof(ledger_shm)) {
            problem = "has another layout or was never initialised";
        }
    }
    if (problem) {
        snprintf(bad->error, sizeof bad->error,
                 "ledger segment %s %s: remove /dev/shm%s when no process uses it, and retry", name,
                 problem, name);
        bad->st_dev = st.st_dev;
        bad->st_ino = st.st_ino;
        bad->valid = 1;
        ta_set_error("%s", bad->error);
        if (mem != MAP_FAILED) munmap(mem, sizeof(ledger_shm));
        close(fd);
        return -1;
    }
    ledger->shm = mem;
    ledger->fd = fd;
    ledger->st_dev = st.st_dev;
    ledger->st_ino = st.st_ino;
    install_sigbus_guard();
    return 0;
}

/* Return every byte a dead process's entry holds; caller holds the shm lock. */
static uint64_t reap_entry(ledger_shm *shm, ledger_proc *proc) {
    uint64_t total = 0;
    for (int s = 0; s < TA_LEDGER_SLOTS; s++) {
        uint64_t b = atomic_exchange_explicit(&proc->bytes[s], 0, memory_order_acq_rel);
        if (b) {
            atomic_fetch_sub_explicit(&shm->slots[s].used, b, memory_order_acq_rel);
            total += b;
        }
    }
    atomic_store_explicit(&proc->pid, PROC_FREE, memory_order_release);
    if (total) atomic_fetch_add(&shm->reaped_bytes, total);
    atomic_fetch_add(&shm->reaped_procs, 1);
    return total;
}

static int slot_has_bytes(ledger_shm *shm, int s) {
    for (int p = 0; p < TA_LEDGER_PROCS; p++)
        if (atomic_load_explicit(&shm->procs[p].bytes[s], memory_order_acquire)) return 1;
    return 0;
}

/* Free the slots whose creator is dead and that nobody is charged to; caller holds the lock. */
static void recycle_slots(ledger_shm *shm) {
    for (int s = 0; s < TA_LEDGER_SLOTS; s++) {
        ledger_slot *slot = &shm->slots[s];
        if (atomic_load(&slot->state) != SLOT_ACTIVE) continue;
        if (!process_dead(atomic_load(&slot->owner_pid), slot->owner_start)) continue;
        if (atomic_load(&slot->used) != 0 || slot_has_bytes(shm, s)) continue;
        atomic_store_explicit(&slot->state, SLOT_FREE, memory_order_release);
        atomic_store(&slot->key, 0);
    }
}

static uint64_t reap_locked(ledger_shm *shm) {
    uint64_t total = 0;
    for (int p = 0; p < TA_LEDGER_PROCS; p++) {
        ledger_proc *proc = &shm->procs[p];
        int32_t pid = atomic_load_explicit(&proc->pid, memory_order_acquire);
        if (pid == PROC_FREE || pid == getpid()) continue;
        if (process_dead(pid, proc->start_time)) total += reap_entry(shm, proc);
    }
    recycle_slots(shm);
    return total;
}

static int register_process(ta_ledger *ledger) {
    ledger_shm *shm = ledger->shm;
    if (shm_lock(shm) != 0) return -1;
    reap_locked(shm);
    int found = -1;
    for (int p = 0; p < TA_LEDGER_PROCS && found < 0; p++)
        if (atomic_load(&shm->procs[p].pid) == PROC_FREE) found = p;
    if (found >= 0) {
        ledger_proc *proc = &shm->procs[found];
        for (int s = 0; s < TA_LEDGER_SLOTS; s++) atomic_store(&proc->bytes[s], 0);
        proc->start_time = read_proc_stat(getpid(), NULL);
        atomic_store_explicit(&proc->pid, getpid(), memory_order_release);
    }
    pthread_mutex_unlock(&shm->lock);
    if (found < 0) {
        ta_set_error("ledger %s already tracks %d live processes: end some, or raise "
                     "TA_LEDGER_PROCS and rebuild",
                     ledger->name, TA_LEDGER_PROCS);
        return -1;
    }
    atomic_store_explicit(&ledger->proc, found, memory_order_release);
    return 0;
}

ta_ledger *ta_ledger_get(int device) {
    if (device < 0 || device >= TA_MAX_DEVICES) {
        ta_set_error("device %d is out of range 0..%d", device, TA_MAX_DEVICES - 1);
        return NULL;
    }
    ta_ledger *ledger = atomic_load_explicit(&g_ledgers[device], memory_order_acquire);
    if (ledger && atomic_load_explicit(&ledger->proc, memory_order_acquire) >= 0) {
        if (!atomic_load_explicit(&ledger->broken, memory_order_relaxed)) return ledger;
        set_broken_error(ledger);
        return NULL;
    }
    pthread_mutex_lock(&g_attach_lock);
    ledger = atomic_load(&g_ledgers[device]);
    if (ledger && !segment_intact(ledger)) {
        set_broken_error(ledger);
        pthread_mutex_unlock(&g_attach_lock);
        return NULL;
    }
    if (!ledger) {
        ledger = calloc(1, sizeof *ledger);
        if (!ledger) {
            ta_set_error("out of host memory attaching the ledger");
            pthread_mutex_unlock(&g_attach_lock);
            return NULL;
        }
        ledger->device = device;
        atomic_store(&ledger->proc, -1);
        segment_name(device, ledger->name, sizeof ledger->name);
        if (map_segment(ledger, ledger->name, device) != 0) {
            free(ledger);
            pthread_mutex_unlock(&g_attach_lock);
            return NULL;
        }
        atomic_store_explicit(&g_ledgers[device], ledger, memory_order_release);
    }
    int rc = atomic_load(&ledger->proc) >= 0 ? 0 : register_process(ledger);
    pthread_mutex_unlock(&g_attach_lock);
    return rc == 0 ? ledger : NULL;
}

static int find_slot(ledger_shm *shm, uint64_t key) {
    for (int s = 0; s < TA_LEDGER_SLOTS; s++) {
        ledger_slot *slot = &shm->slots[s];
        if (atomic_load_explicit(&slot->state, memory_order_acquire) == SLOT_ACTIVE &&
            atomic_load_explicit(&slot->key, memory_order_relaxed) == key)
            return s;
    }
    return -1;
}

int ta_ledger_slot(ta_ledger *ledger, uint64_t key, int create) {
    ledger_shm *shm = ledger->shm;
    int s = find_slot(shm, key);
    if (s >= 0 || !create) {
        if (s < 0) ta_set_error("workload %llu has no slot in ledger %s", (unsigned long long)key,
                                ledger->name);
        return s;
    }
    if (!segment_intact(ledger)) {
        set_broken_error(ledger);
        return -1;
    }
    if (shm_lock(shm) != 0) return -1;
    s = find_slot(shm, key);
    for (int pass = 0; s < 0 && pass < 2; pass++) {
        if (pass == 1) recycle_slots(shm);
        for (int i = 0; i < TA_LEDGER_SLOTS && s < 0; i++) {
            ledger_slot *slot = &shm->slots[i];
            /* A free slot can carry a transient charge from a process that cached it before it
             * was recycled (it backs the charge out at once): leave such a slot alone. */
            if (atomic_load(&slot->state) != SLOT_FREE || atomic_load(&slot->used) != 0) continue;
            atomic_store(&slot->key, key);
            atomic_store(&slot->limit, TA_UNLIMITED);
            atomic_store(&slot->peak, 0);
            atomic_store(&slot->refused, 0);
            atomic_store(&slot->owner_pid, getpid());
            slot->owner_start = read_proc_stat(getpid(), NULL);
            atomic_store_explicit(&slot->state, SLOT_ACTIVE, memory_order_release);
            s = i;
        }
    }
    pthread_mutex_unlock(&shm->lock);
    if (s < 0)
        ta_set_error("ledger %s is full (%d workloads): remove workloads that are done",
                     ledger->name, TA_LEDGER_SLOTS);
    return s;
}

int ta_ledger_charge(ta_ledger *ledger, int slot_index, uint64_t key, uint64_t n, int enforce,
                     uint64_t *used_out, uint64_t *limit_out) {
    ledger_shm *shm = ledger->shm;
    ledger_slot *slot = &shm->slots[slot_index];
    uint64_t limit = atomic_load_explicit(&slot->limit, memory_order_acquire);
    uint64_t used = atomic_load_explicit(&slot->used, memory_order_relaxed);
    uint64_t next;
    do {
        if (enforce && (n > limit || used > limit - n)) {
            atomic_fetch_add_explicit(&slot->refused, 1, memory_order_relaxed);
            *used_out = used;
            *limit_out = limit;
            return 0;
        }
        next = used + n;
    } while (!atomic_compare_exchange_weak_explicit(&slot->used, &used, next,
                                                    memory_order_acq_rel, memory_order_relaxed));
    int proc = atomic_load_explicit(&ledger->proc, memory_order_relaxed);
    atomic_fetch_add_explicit(&shm->procs[proc].bytes[slot_index], n,
                              memory_order_acq_rel);
    if (atomic_load_explicit(&slot->key, memory_order_acquire) != key ||
        atomic_load_explicit(&slot->state, memory_order_acquire) != SLOT_ACTIVE) {
        ta_ledger_uncharge(ledger, slot_index, n);
        return -1;
    }
    uint64_t peak = atomic_load_explicit(&slot->peak, memory_order_relaxed);
    while (next > peak && !atomic_compare_exchange_weak_explicit(
                              &slot->peak, &peak, next, memory_order_relaxed, memory_order_relaxed)) {
    }
    *used_out = next;
    *limit_out = limit;
    return 1;
}

void ta_ledger_uncharge(ta_ledger *ledger, int slot_index, uint64_t n) {
    ledger_shm *shm = ledger->shm;
    int proc = atomic_load_explicit(&ledger->proc, memory_order_relaxed);
    atomic_fetch_sub_explicit(&shm->procs[proc].bytes[slot_index], n,
                              memory_order_acq_rel);
    atomic_fetch_sub_explicit(&shm->slots[slot_index].used, n, memory_order_acq_rel);
}

void ta_ledger_peek(ta_ledger *ledger, int slot_index, uint64_t *used, uint64_t *limit) {
    ledger_slot *slot = &ledger->shm->slots[slot_index];
    *used = atomic_load_explicit(&slot->used, memory_order_acquire);
    *limit = atomic_load_explicit(&slot->limit, memory_order_acquire);
}

int64_t ta_ledger_reap(ta_ledger *ledger, int rate_limited) {
    int64_t now = now_ns();
    if (rate_limited) {
        int64_t last = atomic_load_explicit(&ledger->last_reap_ns, memory_order_relaxed);
        if (now - last < REAP_INTERVAL_NS ||
            !atomic_compare_exchange_strong(&ledger->last_reap_ns, &last, now))
            return 0;
    } else {
        atomic_store(&ledger->last_reap_ns, now);
    }
    if (!segment_intact(ledger)) {
        set_broken_error(ledger);
        return -1;
    }
    if (shm_lock(ledger->shm) != 0) return -1;
    uint64_t total = reap_locked(ledger->shm);
    pthread_mutex_unlock(&ledger->shm->lock);
    return (int64_t)total;
}

unsigned ta_ledger_generation(void) { return atomic_load_explicit(&g_generation, memory_order_acquire); }

int ta_ledger_detach_all(void) {
    pthread_mutex_lock(&g_attach_lock);
    atomic_fetch_add(&g_generation, 1);
    for (int d = 0; d < TA_MAX_DEVICES; d++) {
        ta_ledger *ledger = atomic_exchange(&g_ledgers[d], NULL);
        if (!ledger) continue;
        int proc = atomic_load(&ledger->proc);
        if (proc >= 0 && segment_intact(ledger) && shm_lock(ledger->shm) == 0) {
            reap_entry(ledger->shm, &ledger->shm->procs[proc]);
            pthread_mutex_unlock(&ledger->shm->lock);
        }
        munmap(ledger->shm, sizeof(ledger_shm));
        close(ledger->fd);
        free(ledger);
    }
    pthread_mutex_unlock(&g_attach_lock);
    return 0;
}

void ta_ledger_after_fork_child(void) {
    pthread_mutex_init(&g_attach_lock, NULL);
    memset(g_bad, 0, sizeof g_bad);
    atomic_fetch_add(&g_generation, 1);
    for (int d = 0; d < TA_MAX_DEVICES; d++) {
        ta_ledger *ledger = atomic_load(&g_ledgers[d]);
        if (ledger) atomic_store(&ledger->proc, -1); /* the parent's entry is not ours */
    }
}

/* ---- exported ledger administration (called from Python) ---- */

int torch_arbiter_ledger_set_prefix(const char *prefix) {
    if (!prefix || !valid_prefix(prefix)) {
        ta_set_error("ledger prefix must be 1-%d characters of [A-Za-z0-9_.-]", PREFIX_MAX);
        return -EINVAL;
    }
    pthread_mutex_lock(&g_attach_lock);
    int attached = 0;
    for (int d = 0; d < TA_MAX_DEVICES; d++) attached |= atomic_load(&g_ledgers[d]) != NULL;
    if (!attached) snprintf(g_prefix, sizeof g_prefix, "%s", prefix);
    pthread_mutex_unlock(&g_attach_lock);
    if (attached) {
        ta_set_error("a ledger is already attached: free this process's allocations and call "
                     "detach first");
        return -EBUSY;
    }
    return 0;
}

int torch_arbiter_ledger_name(int device, char *buf, size_t buflen) {
    if (device < 0 || device >= TA_MAX_DEVICES || !buf || buflen == 0) {
        ta_set_error("invalid device or buffer");
        return -EINVAL;
    }
    pthread_mutex_lock(&g_attach_lock);
    segment_name(device, buf, buflen);
    pthread_mutex_unlock(&g_attach_lock);
    return 0;
}

int torch_arbiter_ledger_attach(int device) { return ta_ledger_get(device) ? 0 : -EIO; }

int torch_arbiter_ledger_unlink(int device) {
    char name[NAME_MAX_LEN];
    if (torch_arbiter_ledger_name(device, name, sizeof name) != 0) return -EINVAL;
    if (shm_unlink(name) != 0 && errno != ENOENT) {
        ta_set_error("cannot remove ledger segment %s: %s", name, strerror(errno));
        return -errno;
    }
    return 0;
}

int torch_arbiter_ledger_set_limit(int device, uint64_t key, uint64_t limit) {
    ta_ledger *ledger = ta_ledger_get(device);
    if (!ledger) return -EIO;
    int s = ta_ledger_slot(ledger, key, 1);
    if (s < 0) return -ENOSPC;
    atomic_store_explicit(&ledger->shm->slots[s].limit, limit, memory_order_release);
    return 0;
}

int torch_arbiter_ledger_get(int device, uint64_t key, ta_workload_info *out) {
    ta_ledger *ledger = ta_ledger_get(device);
    if (!ledger) return -EIO;
    if (!out) {
        ta_set_error("null output");
        return -EINVAL;
    }
    int s = ta_ledger_slot(ledger, key, 0);
    if (s < 0) return -ENOENT;
    ledger_slot *slot = &ledger->shm->slots[s];
    out->key = key;
    out->limit = atomic_load(&slot->limit);
    out->used = atomic_load(&slot->used);
    out->peak = atomic_load(&slot->peak);
    out->refused = atomic_load(&slot->refused);
    out->owner_pid = atomic_load(&slot->owner_pid);
    out->reserved = 0;
    return 0;
}

int torch_arbiter_ledger_list(int device, uint64_t *keys, int max_keys) {
    ta_ledger *ledger = ta_ledger_get(device);
    if (!ledger) return -EIO;
    int count = 0;
    for (int s = 0; s < TA_LEDGER_SLOTS; s++) {
        ledger_slot *slot = &ledger->shm->slots[s];
        if (atomic_load_explicit(&slot->state, memory_order_acquire) != SLOT_ACTIVE) continue;
        if (keys && count < max_keys) keys[count] = atomic_load(&slot->key);
        count++;
    }
    return count;
}

int torch_arbiter_ledger_process_bytes(int device, uint64_t key, int32_t *pids, uint64_t *bytes,
                                       int max_entries) {
    ta_ledger *ledger = ta_ledger_get(device);
    if (!ledger) return -EIO;
    int s = ta_ledger_slot(ledger, key, 0);
    if (s < 0) return -ENOENT;
    int count = 0;
    for (int p = 0; p < TA_LEDGER_PROCS; p++) {
        ledger_proc *proc = &ledger->shm->procs[p];
        int32_t pid = atomic_load(&proc->pid);
        uint64_t b = atomic_load(&proc->bytes[s]);
        if (pid == PROC_FREE || b == 0) continue;
        if (count < max_entries && pids && bytes) {
            pids[count] = pid;
            bytes[count] = b;
        }
        count++;
    }
    return count;
}

int64_t torch_arbiter_ledger_reap(int device) {
    ta_ledger *ledger = ta_ledger_get(device);
    if (!ledger) return -EIO;
    return ta_ledger_reap(ledger, 0);
}

int torch_arbiter_ledger_remove(int device, uint64_t key) {
    ta_ledger *ledger = ta_ledger_get(device);
    if (!ledger) return -EIO;
    ledger_shm *shm = ledger->shm;
    if (shm_lock(shm) != 0) return -EIO;
    int s = find_slot(shm, key);
    int rc = 0;
    if (s < 0) {
        rc = -ENOENT;
    } else if (atomic_load(&shm->slots[s].used) != 0 || slot_has_bytes(shm, s)) {
        ta_set_error("workload %llu still holds %llu bytes: free them before removing it",
                     (unsigned long long)key, (unsigned long long)atomic_load(&shm->slots[s].used));
        rc = -EBUSY;
    } else {
        atomic_store_explicit(&shm->slots[s].state, SLOT_FREE, memory_order_release);
        atomic_store(&shm->slots[s].key, 0);
    }
    pthread_mutex_unlock(&shm->lock);
    if (rc == -ENOENT) ta_set_error("workload %llu is not in the ledger", (unsigned long long)key);
    return rc;
}

static uint64_t accounted_bytes(ledger_shm *shm, int s) {
    uint64_t total = 0;
    for (int p = 0; p < TA_LEDGER_PROCS; p++)
        if (atomic_load_explicit(&shm->procs[p].pid, memory_order_acquire) != PROC_FREE)
            total += atomic_load_explicit(&shm->procs[p].bytes[s], memory_order_acquire);
    return total;
}

int64_t torch_arbiter_ledger_reclaim(int device, uint64_t key) {
    ta_ledger *ledger = ta_ledger_get(device);
    if (!ledger) return -EIO;
    if (ta_ledger_reap(ledger, 0) < 0) return -EIO;
    ledger_shm *shm = ledger->shm;
    int s = find_slot(shm, key);
    if (s < 0) {
        ta_set_error("workload %llu is not in the ledger", (unsigned long long)key);
        return -ENOENT;
    }
    ledger_slot *slot = &shm->slots[s];
    /* A live charge sits between its two stores for a few instructions: only bytes that stay
     * unaccounted, with `used` unchanged, across a settle time are leaked. */
    uint64_t used = atomic_load(&slot->used), accounted = accounted_bytes(shm, s);
    struct timespec pause = {0, RECLAIM_SETTLE_NS};
    nanosleep(&pause, NULL);
    if (atomic_load(&slot->used) != used || accounted_bytes(shm, s) != accounted || used <= accounted)
        return 0;
    uint64_t leaked = used - accounted;
    if (!atomic_compare_exchange_strong(&slot->used, &used, used - leaked)) return 0;
    atomic_fetch_add(&shm->reaped_bytes, leaked);
    return (int64_t)leaked;
}
