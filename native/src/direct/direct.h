// The direct path (direct/): a tensor's extent of the store read and written with O_DIRECT, bypassing
// the page cache; the tensor's address holds memory only while its layer is staged. What the rest of
// the module sees of it: a path (path.h) and the calls below. Its state, jobs and memory pool are
// private to direct/ (direct-impl.h).
#ifndef DUALBLADE_DIRECT_H
#define DUALBLADE_DIRECT_H

#include "../path.h"

#include <stdint.h>

struct dblade_worker;

// One offloaded tensor's extent, for sizing the staging pool.
struct dblade_direct_extent {
    uint64_t k_bytes, v_bytes;
};

// The direct path of a KV object: its staging pool sized from the offloaded layers and the allowance
// (the budget less the pinned layers; UINT64_MAX for none), its two I/O engines on the store (the
// worker's batches, and the graph's own demand reads). -errno with dblade_get_error() set.
int  dblade_direct_open(struct dblade_tier ** out, struct dblade_path_env * env, struct dblade_worker * worker,
                        const struct dblade_direct_extent * layers, uint32_t n_layers, uint64_t allowance);
// the worker is stopped and every tensor forgotten
void dblade_direct_close(struct dblade_tier * p);

struct dblade_direct_stats {
    uint32_t    io_engine;     // DBLADE_IO_URING, DBLADE_IO_THREADS (0: no store)
    const char * io_engine_why;
    uint32_t    depth;         // layers staged ahead of the one computing
    uint64_t    chunk_bytes;   // staging moves in chunks of this size
    bool        huge_pages;    // ... which are huge pages
    bool        pool_moves;    // staging memory is reused (moved, not faulted in again)
    uint64_t    pool_bytes;    // memory of the pool (at tensors or idle)
    uint64_t    staged_bytes, staged_peak;
};
// the lock held
void     dblade_direct_stats(struct dblade_tier * p, struct dblade_direct_stats * out);
// the pages of the idle pool back to the system; the bytes given back (the lock held, after a flush)
uint64_t dblade_direct_trim(struct dblade_tier * p);
// what of the allowance is not memory yet (the pool fills on first use): room the auto policy must not
// count as free. The lock held.
uint64_t dblade_direct_unheld(struct dblade_tier * p);
// for tests: the lock not held; returns once nothing is queued or running
void     dblade_direct_quiesce(struct dblade_tier * p);

#endif
