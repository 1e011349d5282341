// The pipeline (pipeline.c): which layer the graph is at, what to bring in ahead of it and what to let
// go behind it, through each tensor's path (path.h): it never names a path.
#ifndef DUALBLADE_PIPELINE_H
#define DUALBLADE_PIPELINE_H

#include "path.h"

struct dblade_auto;

struct dblade_pipeline {
    struct dblade_path_env * env;
    struct dblade_tier *     paths[3];  // by enum dblade_path: RAM, MMAP, DIRECT (NULL: not in use)
    struct dblade_cache **   caches;    // the KV object's caches
    struct dblade_auto *   policy;    // auto: told of the graph's progress (NULL: none)
    struct dblade_tensor *   active;    // K tensor of the layer the graph is at
    uint64_t                 last_enter_ns;
};

static inline struct dblade_tier * dblade_pipeline_path(const struct dblade_pipeline * pl, uint32_t path) {
    return path < 3 ? pl->paths[path] : NULL;
}

// The lock held. The graph is about to store rows [lo, hi) (bytes) of t / to read [0, need) of t: the
// pipeline enters t's layer (a pending switch is applied, layers ahead are brought in, the others let
// go), then t's path takes the rows / makes them resident.
void dblade_pipeline_take_rows(struct dblade_pipeline * pl, struct dblade_tensor * t, uint64_t lo, uint64_t hi);
void dblade_pipeline_make_resident(struct dblade_pipeline * pl, struct dblade_tensor * t, uint64_t need);
// The lock held: the graph is at t's layer, which it does not read on the host (a layer streamed into VRAM):
// a pending switch is applied, the layers behind let go, the policy told of the progress.
void dblade_pipeline_enter(struct dblade_pipeline * pl, struct dblade_tensor * t);
// The lock held. Rows [lo, hi) (bytes) of t were computed elsewhere (a VRAM slot); src holds whole pages of
// the tensor from src_lo = align_down(lo, page) (path.h's store_from): t's path stores them. The pipeline does
// not enter the layer: the graph never reads it on the host.
void dblade_pipeline_store_rows(struct dblade_pipeline * pl, struct dblade_tensor * t, uint64_t lo, uint64_t hi,
                                const uint8_t * src, uint64_t src_lo);
// the lock held: the graph left its layers (a clear, a state copy, a flush): no layer is active
void dblade_pipeline_leave(struct dblade_pipeline * pl);
// the lock held: forget predictions that lead into c (it closes)
void dblade_pipeline_forget(struct dblade_pipeline * pl, const struct dblade_cache * c);

#endif
