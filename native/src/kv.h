// The KV object: what one llama_context's KV caches belong to (kv.c). Private to the module's entry
// points (kv.c, cache.c, state.c, stats.c, sessionfile/): the parts below them are handed what they
// need (path.h's environment, the pipeline, the VRAM tier's environment), never this struct.
#ifndef DUALBLADE_KV_H
#define DUALBLADE_KV_H

#include "dualblade-llama.h"
#include "dualblade.h"
#include "events.h"
#include "path.h"
#include "pipeline.h"
#include "store.h"
#include "vram/vram.h"
#include "worker.h"

#include <pthread.h>
#include <stdatomic.h>

struct dblade_auto;

// where an offloaded layer's K and V extents start, relative to the store's data offset
struct dblade_extent {
    uint64_t k_off, v_off;
};

struct dblade_kv {
    struct dblade_config         config;
    char *                       kv_dir;
    char *                       kv_device;
    _Atomic int                  refs;
    pthread_mutex_t              lock; // guards everything below unless noted
    struct dblade_cache *        caches;
    uint32_t                     n_layout;
    struct dblade_layout_layer * layout;  // the plan: a path per layer
    struct dblade_extent *       extents; // the offloaded layers' extents, by layout entry
    uint32_t                     n_offloaded; // layers not pinned
    struct dblade_store          store;
    struct dblade_events         events;
    struct dblade_path_env       env;
    struct dblade_tier           ram, mmap; // the paths without state of their own
    struct dblade_tier *         direct;    // NULL: nothing offloaded
    struct dblade_worker         worker;
    struct dblade_pipeline       pipeline;
    struct dblade_auto *       policy;    // auto, with offloaded layers
    struct dblade_vram *         vram;      // GPU builds: NULL when no layer is streamed
    struct dblade_vram_env       vram_env;
    uint64_t                     ring_bytes; // the VRAM tier's share of the allowance
    int                          state_mode; // enum dblade_state_mode
    uint32_t                     outputs_max; // what a context's ubatch asks for at most (0: llama.cpp's default)
    _Atomic int                  abort;       // dblade_kv_abort: the evaluation in progress stops (not under lock)
    // the session file whose last commit this KV matched when it was saved or restored (sessionfile/):
    // a save to it writes only what changed since (the offloaded tensors' changed bits, pinned ones' sums)
    struct {
        bool     valid;
        uint64_t dev, ino, gen, lineage;
    } session;
};

// the KV object bound to the calling thread (caches opened now belong to it), or NULL
struct dblade_kv * dblade_kv_bound(void);
// a cache holds a reference; the last one taken down frees the KV object
void dblade_kv_ref(struct dblade_kv * kv);
void dblade_kv_unref(struct dblade_kv * kv);
// the planned layer il (its index in layout), or -1
int32_t dblade_kv_find_layout(const struct dblade_kv * kv, int32_t il);

// the path a tensor is on
static inline struct dblade_tier * dblade_kv_path(const struct dblade_kv * kv, const struct dblade_tensor * t) {
    return dblade_pipeline_path(&kv->pipeline, t->path);
}

// calls hook `op` of the path tensor t is on, if that path has one
#define DBLADE_KV_PATH_CALL(kv, t, op, ...)                                  \
    do {                                                                     \
        struct dblade_tier * p_ = dblade_kv_path((kv), (t));                 \
        if (p_ && p_->ops->op) {                                             \
            p_->ops->op(p_, (t), ##__VA_ARGS__);                             \
        }                                                                    \
    } while (0)

#endif
