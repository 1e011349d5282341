// Private to direct/: the direct path's state, its tensors' state, the staging pool and its jobs.
//
// Who calls whom inside direct/ (top to bottom):
//   direct.c (open, close, stats)  ->  path.c (the path's hooks)
//     -> jobs.c (transfers: queued for the worker in batches, or now on the graph's own engine)
//     -> rows.c (a tensor's rows: what is staged, dirty, kept as a tail; the plans of its transfers)
//     -> staging.c (the memory pool)
#ifndef DUALBLADE_DIRECT_IMPL_H
#define DUALBLADE_DIRECT_IMPL_H

#include "direct.h"

#include "../base.h"
#include "../engine.h"
#include "../worker.h"

#include <pthread.h>

#define NO_TAIL            UINT64_MAX
#define DBLADE_MAX_DEPTH   8u
#define WORKER_BATCH       64u

// --- the staging pool (staging.c): memory the direct path stages layers into, reused ---
//
// Staged memory moves between the pool and the tensors' fixed addresses in chunks, with mremap: page
// tables move, pages are neither freed nor zeroed nor faulted in again. Where the kernel cannot move
// them (no MREMAP_DONTUNMAP) or the pool is empty (a state copy stages everything), a chunk is plain
// anonymous memory that is faulted in and given back (MADV_DONTNEED).
#define DBLADE_CHUNK_NONE   UINT32_MAX
#define DBLADE_CHUNK_FRESH  (UINT32_MAX - 1) // anonymous memory of the tensor's own
#define DBLADE_STAGING_VMAS 8192u            // chunks at most: each may become a mapping of its own

struct dblade_staging {
    uint64_t        chunk;    // bytes per chunk: a power of two, a page up to a huge page
    uint32_t        n_slots;  // pool capacity in chunks (0: no pool)
    uint8_t *       base;     // the pool's address range
    uint8_t *       state;    // per slot: SLOT_EMPTY, SLOT_PAGES, SLOT_TAKEN
    uint32_t        n_free;
    uint64_t        populated; // bytes of the pool that hold pages (at tensors or idle)
    bool            moves;     // the kernel moves chunks (mremap with MREMAP_DONTUNMAP)
    pthread_mutex_t lock;      // taken by the worker outside the KV object's lock
};

int  dblade_staging_init(struct dblade_staging * p, uint64_t chunk, uint64_t pool_bytes, bool huge);
void dblade_staging_destroy(struct dblade_staging * p);
// chunk-granular memory behind [0, upto) of the tensor (contents of new chunks: undefined)
int  dblade_staging_grow(struct dblade_staging * p, struct dblade_tensor * t, uint64_t upto);
// every chunk of the tensor back to the pool; the range becomes empty memory
void dblade_staging_release(struct dblade_staging * p, struct dblade_tensor * t);
// the pages of the idle slots back to the system; returns the bytes given back
uint64_t dblade_staging_trim(struct dblade_staging * p);
// the tensor dies: forget its chunks (its range is unmapped by the caller)
void dblade_staging_forget(struct dblade_staging * p, struct dblade_tensor * t);

// --- a tensor on the direct path ---
//
//  - [0, valid) in memory is authoritative; memory above valid is not (recycled staging);
//  - the store holds every row below hwm that is not dirty; rows at or above hwm were never written
//    since the last clear: whatever the store holds there is finite and masked;
//  - the dirty range lies inside [0, valid) or is the tail page; valid is store-aligned;
//  - the tail page (at tail, NO_TAIL for none) is kept in tail_buf while the rest is released.
enum { JOB_NONE = 0, JOB_STAGE = 1, JOB_RETIRE = 2 };

struct dblade_direct_tensor {
    uint64_t   valid, dirty_lo, dirty_hi, tail;
    uint8_t *  tail_buf;
    uint32_t * chunks; // staging.c: where each chunk of the range comes from
    // its I/O job, run by the worker
    int                    job; // JOB_NONE, JOB_STAGE, JOB_RETIRE
    bool                   job_running, job_has_req;
    uint32_t               job_req;
    uint64_t               job_upto, job_keep, job_pending;
    struct dblade_tensor * job_next;  // queue link
    struct dblade_tensor * job_batch; // the worker's batch
    struct dblade_tensor * member_next; // the direct path's tensors
};

struct dblade_direct {
    struct dblade_tier     base;
    struct dblade_worker * worker;
    struct dblade_work     work; // its batches on the worker
    struct dblade_staging  staging;
    struct dblade_io *     io;     // the worker's engine: prefetches and write-backs, in batches
    struct dblade_io *     io_now; // the graph's own: a demand read never waits behind the worker's batch
    uint64_t               allowance;     // what may be staged: the budget less the pinned layers
    uint64_t               stage_pending; // bytes queued STAGE jobs will add
    uint64_t               staged_bytes, staged_peak;
    uint32_t               depth;  // layers staged ahead (the last lookahead)
    double                 bw_ema; // bytes per ns the device gave the worker
    struct dblade_tensor * q_head, * q_tail;
    struct dblade_tensor * members; // every tensor on this path
    struct dblade_io_req   batch_reqs[WORKER_BATCH];
};

static inline struct dblade_direct * direct_of(struct dblade_tier * p) {
    return (struct dblade_direct *) p;
}

// --- rows.c: a tensor's rows and the plans of its transfers ---
uint64_t dblade_direct_staged(const struct dblade_direct * d, const struct dblade_tensor * t); // memory it holds
uint64_t dblade_direct_growth(const struct dblade_direct * d, const struct dblade_tensor * t, uint64_t upto);
uint64_t dblade_direct_stage_end(const struct dblade_direct * d, const struct dblade_tensor * t, uint64_t upto);
// the staged memory changed from `before` bytes of t: the totals follow
void dblade_direct_staged_set(struct dblade_direct * d, const struct dblade_tensor * t, uint64_t before);
bool dblade_direct_stage_plan(struct dblade_direct * d, struct dblade_tensor * t, uint64_t upto,
                              struct dblade_io_req * r);
void dblade_direct_stage_finish(struct dblade_direct * d, struct dblade_tensor * t, uint64_t upto);
bool dblade_direct_retire_plan(struct dblade_direct * d, struct dblade_tensor * t, bool full, struct dblade_io_req * r,
                               uint64_t * keep);
void dblade_direct_retire_release(struct dblade_direct * d, struct dblade_tensor * t, uint64_t keep);
void dblade_direct_retire_finish(struct dblade_direct * d, struct dblade_tensor * t, uint64_t keep);
void dblade_direct_io_done(struct dblade_direct * d, struct dblade_tensor * t, const struct dblade_io_req * r);

// --- jobs.c: the tensor's transfers ---
// queued for the worker; false when there is no worker (the caller then does the transfer itself)
bool dblade_direct_enqueue(struct dblade_direct * d, struct dblade_tensor * t, int job, uint64_t upto);
void dblade_direct_withdraw(struct dblade_direct * d, struct dblade_tensor * t); // a queued job
void dblade_direct_settle(struct dblade_direct * d, struct dblade_tensor * t);   // no job left
// staging `bytes` more stays inside the allowance (prefetches withdrawn, other layers released)
void dblade_direct_make_room(struct dblade_direct * d, uint64_t bytes);
// now, on the graph's own engine: t staged up to upto (budgeted: inside the allowance); write back
// (all of it when full, the tail too) and release
void dblade_direct_stage_now(struct dblade_direct * d, struct dblade_tensor * t, uint64_t upto, bool budgeted);
void dblade_direct_retire_now(struct dblade_direct * d, struct dblade_tensor * t, bool full);
// bytes [lo, hi) of t's extent (store-aligned) written from buf now, on the graph's own engine; 0 or -errno
int  dblade_direct_write_now(struct dblade_direct * d, struct dblade_tensor * t, const uint8_t * buf, uint64_t lo,
                             uint64_t hi);
// the worker's side: runs queued jobs in batches
void dblade_direct_run_batch(struct dblade_work * w);
// how many direct layers to stage ahead for a layer of layer_bytes
uint32_t dblade_direct_depth(struct dblade_direct * d, uint64_t layer_bytes);

// --- path.c ---
extern const struct dblade_path_ops dblade_direct_ops;

#endif
