// A path: where a tensor's bytes live behind its fixed address (RAM, the page cache, the direct path),
// as one versioned method table, the way SQLite's VFS calls a file through sqlite3_io_methods. The
// pipeline and the entry points call a tensor's path only through this table; they never name one.
//
// A path instance is `struct dblade_tier` (first member of a path's own state, where it has any). Its
// hooks are called with the KV object's lock held, in the graph's order; a hook a path does not need
// is NULL.
#ifndef DUALBLADE_PATH_H
#define DUALBLADE_PATH_H

#include "tensor.h"

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#define DBLADE_PATH_OPS_VERSION 2 // the hooks below; a later version only appends (2: snapshot)

struct dblade_tier;
struct dblade_store;
struct dblade_events;
struct dblade_io_req;

struct dblade_path_ops {
    int          version; // DBLADE_PATH_OPS_VERSION
    const char * name;
    // the address range becomes this path's: at creation (fresh anonymous memory), or on a switch
    // (the previous path has detached: the store holds every row, the range is empty memory)
    int (*attach)(struct dblade_tier * p, struct dblade_tensor * t);
    // make the store hold every row (dirty data, tails) and give the range back as empty memory
    int (*detach)(struct dblade_tier * p, struct dblade_tensor * t);
    // attention is about to read [0, need)
    void (*make_resident)(struct dblade_tier * p, struct dblade_tensor * t, uint64_t need);
    // rows [lo, hi) are about to be stored
    void (*take_rows)(struct dblade_tier * p, struct dblade_tensor * t, uint64_t lo, uint64_t hi);
    // how many of this path's layers to keep brought in ahead of the graph, from the layer k (0: none)
    uint32_t (*lookahead)(struct dblade_tier * p, const struct dblade_tensor * k);
    // the graph will enter the layer soon: bring it in ahead (may queue work)
    void (*prefetch)(struct dblade_tier * p, struct dblade_tensor * t);
    // the graph is done with the layer for this pass: write back and release (may queue work)
    void (*release)(struct dblade_tier * p, struct dblade_tensor * t);
    // no work of the tensor left queued or in flight (withdrawn, or waited for: the graph's stall)
    void (*settle)(struct dblade_tier * p, struct dblade_tensor * t);
    // write back everything now, tails too (save_state, close): the store is complete
    void (*flush)(struct dblade_tier * p, struct dblade_tensor * t);
    // the cells were emptied: forget the contents, write nothing
    void (*clear)(struct dblade_tier * p, struct dblade_tensor * t);
    // the tensor dies: drop what the path holds of it, write nothing (its range is unmapped after)
    void (*forget)(struct dblade_tier * p, struct dblade_tensor * t);
    // state save/restore reads or writes the whole tensor outside any graph; at the end rows [0, hi)
    // were written (0: only read)
    void (*host_begin)(struct dblade_tier * p, struct dblade_tensor * t);
    void (*host_end)(struct dblade_tier * p, struct dblade_tensor * t, uint64_t hi);
    // bytes of the tensor in memory now
    uint64_t (*resident)(struct dblade_tier * p, const struct dblade_tensor * t);

    // --- version 2 ---
    // The tensor's bytes [0, len) as they are now, into dst (page- and block-aligned, len a multiple of the
    // store's alignment), for a copy elsewhere (a VRAM slot): what only memory holds is copied at once; what
    // the store holds is described in reqs (at most cap), for the caller to run on an engine of the store:
    // an O_DIRECT one, or a buffered one where *buffered (the page cache holds the newest bytes). Or, where
    // *copy_from is set (memory that holds all of [0, len) and stays mapped: the page cache, every page of it
    // cached), the caller copies from there itself, without the lock and with as many threads as it likes.
    // Returns how many requests, or -errno. The tensor's bytes do not change until the caller's requests or
    // copy are done if nobody takes rows of it meanwhile.
    int (*snapshot)(struct dblade_tier * p, struct dblade_tensor * t, uint64_t len, uint8_t * dst,
                    struct dblade_io_req * reqs, uint32_t cap, bool * buffered, const uint8_t ** copy_from);
    // Rows [lo, hi) (bytes; t->hwm already counts them) were computed elsewhere (a VRAM slot) and are in src:
    // the tensor's byte x is at src[x - src_lo], for x in [src_lo, align_up(hi, page)), src_lo =
    // align_down(lo, page) (whole pages: the bytes around the rows are the tensor's current ones). The path
    // stores them as it keeps its bytes (src is page-locked and O_DIRECT-aligned).
    void (*store_from)(struct dblade_tier * p, struct dblade_tensor * t, uint64_t lo, uint64_t hi, const uint8_t * src,
                       uint64_t src_lo);
};

// What every path works with, owned by the KV object.
struct dblade_path_env {
    pthread_mutex_t *      lock;   // the KV object's: held around every hook
    struct dblade_store *  store;  // the offloaded tensors' extents
    struct dblade_events * events; // failures, stalls
    bool                   thp;    // the kernel has transparent huge pages
    bool                   populate_page_cache; // auto put offloaded layers in the page cache: fill their pages at load
    bool                   write_around; // auto under a limit (not every offloaded layer fits the page cache): a
                                         // prompt's rows from VRAM go to the store around the page cache
    int8_t write_around_env; // DUALBLADE_WRITE_AROUND when the KV object opened: -1 unset, 0 never, 1 every store
    bool   read_around;      // mid-prompt, rows written around are read back around the cache (DUALBLADE_READ_AROUND=0: no)
    bool                   verify; // the direct path checks a CRC-32C per block
    // written by the pipeline, read by the paths
    const struct dblade_tensor * active;         // K tensor of the layer the graph is at
    bool                         prompt;         // the ubatch computing has more than one row (the VRAM tier's)
    double                       compute_ema_ns; // between two offloaded layers, stalls excluded
};

struct dblade_tier {
    const struct dblade_path_ops * ops;
    struct dblade_path_env *       env;
};

// whether the graph is at t's layer
static inline bool dblade_path_is_active(const struct dblade_tier * p, const struct dblade_tensor * t) {
    return p->env->active && (p->env->active == t || p->env->active == t->pair);
}

// the two paths that keep no state of their own (path_ram.c, path_mmap.c)
extern const struct dblade_path_ops dblade_path_ram_ops, dblade_path_mmap_ops;

#endif
