/*
 * The shared ledger: internal interface between ledger.c and arbiter_alloc.c.
 */
#ifndef TORCH_ARBITER_LEDGER_H
#define TORCH_ARBITER_LEDGER_H

#include "arbiter_alloc.h"

typedef struct ta_ledger ta_ledger;

#pragma GCC visibility push(hidden)

/* Thread-local error text, set by whoever fails; read by torch_arbiter_last_error(). */
void ta_set_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Attached ledger of `device`, attaching (creating the segment) on first use; NULL + error. */
ta_ledger *ta_ledger_get(int device);

/* Slot index of workload `key`, created with no limit when `create` and missing; -1 + error. */
int ta_ledger_slot(ta_ledger *ledger, uint64_t key, int create);

/* Charge `n` bytes to slot `slot` (which must still hold `key`) and to this process.
 * Returns 1 when charged, 0 when the limit refuses it (used/limit reported), -1 when the slot no
 * longer holds `key` (recycled by a reaper: look it up again). Never lets used exceed the limit
 * when `enforce` is set. */
int ta_ledger_charge(ta_ledger *ledger, int slot, uint64_t key, uint64_t n, int enforce,
                     uint64_t *used_out, uint64_t *limit_out);

/* Return `n` bytes charged by this process to `slot`. */
void ta_ledger_uncharge(ta_ledger *ledger, int slot, uint64_t n);

/* Read the slot's use and limit (for the exercise helper's violation check). */
void ta_ledger_peek(ta_ledger *ledger, int slot, uint64_t *used, uint64_t *limit);

/* Return to the ledger the bytes of dead processes; bytes reaped or -1 + error.
 * `rate_limited` skips the work when this process reaped less than 50 ms ago. */
int64_t ta_ledger_reap(ta_ledger *ledger, int rate_limited);

/* Generation of the attachments: changes on detach and fork, so cached slot indices expire. */
unsigned ta_ledger_generation(void);

/* Detach every segment of this process (its own charges, which must be zero, are returned). */
int ta_ledger_detach_all(void);

/* Called in the child after fork(): the child is a new process for the ledger. */
void ta_ledger_after_fork_child(void);

#pragma GCC visibility pop

#endif
