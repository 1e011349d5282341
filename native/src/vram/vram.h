// The VRAM tier (vram/, GPU builds): layers whose KV lives on a host path and is copied into a VRAM
// slot before the layer computes. What the rest of the module sees of it.
#ifndef DUALBLADE_VRAM_H
#define DUALBLADE_VRAM_H

#include "../tensor.h"

struct dblade_store;

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#define DBLADE_VRAM_SLOTS 2u

struct dblade_vram;
struct dblade_events;
struct dblade_pipeline;

// What the VRAM tier works with, owned by the KV object.
struct dblade_vram_env {
    pthread_mutex_t *                  lock;     // the KV object's
    struct dblade_events *             events;
    struct dblade_pipeline *           pipeline; // the host paths a streamed layer's bytes live on
    struct dblade_worker *             worker;   // reads ahead run there
    struct dblade_cache **             caches;
    const struct dblade_layout_layer * layout;   // the plan: which layers are streamed
    uint32_t                           n_layout;
    const struct dblade_store *        store; // the store (O_DIRECT), NULL for none
    uint64_t                           ring_bytes; // page-locked memory to read host paths ahead into (0: none)
};

// The lock held: the streamed tensor t gets its device address (the first one sets the slots up in
// *vp: the driver, the address reservation, the slots). types: the cache's ggml K and V types (a GPU
// buffer pads quantized rows). -errno with dblade_get_error() set.
int  dblade_vram_attach(struct dblade_vram ** vp, const struct dblade_vram_env * env, struct dblade_tensor * t,
                        const char * device, uint32_t type_k, uint32_t type_v);
void dblade_vram_detach(struct dblade_vram * v, struct dblade_tensor * t);
void dblade_vram_destroy(struct dblade_vram * v);
// The lock not held: the last computed layer's new rows back to its host path (sync_gpu: outside a cut,
// where the graph's last kernels may still run); what was read ahead is dropped (the host copies may change
// before the next graph: a state restore).
int  dblade_vram_settle(struct dblade_vram * v, bool sync_gpu);
// the lock held: c's cells were emptied (NULL: every cache's): nothing of the last graph goes back
void dblade_vram_forget(struct dblade_vram * v, const struct dblade_cache * c);
void dblade_vram_stats(const struct dblade_vram * v, struct dblade_stats * out);
// llama.cpp's graph callback (dblade_kv_graph_cut) and the rows of the next graph (dblade_cache_ubatch)
int  dblade_vram_cut(struct dblade_vram * v, const char * name, int ask);
void dblade_vram_ubatch(struct dblade_vram * v, struct dblade_cache * c, const int64_t * rows, int64_t n,
                        uint32_t n_kv);
// the next graphs compute layers [il0, il1) only (dblade_kv_graph_layers)
void dblade_vram_layers(struct dblade_vram * v, int32_t il0, int32_t il1);

#endif
