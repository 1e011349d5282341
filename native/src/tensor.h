// A KV cache llama.cpp opened and its K/V tensors, as every part of the residency side sees them:
// where a tensor's bytes are (its fixed address, its store extent, its path) and what it holds. The
// state a path keeps of its own is the path's (the direct path's behind `direct`).
#ifndef DUALBLADE_TENSOR_H
#define DUALBLADE_TENSOR_H

#include "base.h"
#include "dualblade.h"

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#define DBLADE_CACHED_UNKNOWN UINT64_MAX // dblade_tensor.cached of a layer not read since it came to the page cache

struct dblade_direct_tensor; // the direct path's state of a tensor (direct/direct-impl.h)

struct dblade_tensor {
    struct dblade_cache *  cache;
    struct dblade_tensor * pair; // the layer's other tensor (K <-> V)
    int32_t                il;
    uint32_t               which;        // 0 K, 1 V
    uint32_t               path;         // enum dblade_path
    uint32_t               want;         // path wanted (auto, set_path); applied when the layer is entered
    char                   want_why[100]; // why (K tensor)
    uint64_t               bytes;        // the ggml tensor
    uint64_t               map_bytes;    // its bytes in whole pages (what the store's extent holds)
    uint64_t               reserved;     // its address range: map_bytes, offloaded ones up to a huge page
    uint64_t               page;
    uint64_t               row_bytes;
    uint8_t *              addr;         // fixed for the tensor's life (graph reuse depends on it)
    uint64_t               store_off;    // absolute offset of the extent in the store (offloaded only)
    uint64_t               hwm;          // rows below this were written since the last clear
    uint64_t               cached;       // page cache: of [0, hwm), what the last read fence found cached
    uint64_t               missing;      // page cache: of what the last read fence looked at, the bytes not cached
    bool                   around;       // page cache: rows went to the store around it since the last read (that
                                         // read's misses are ours, not the cache's)
    uint32_t *             sums;         // offloaded: CRC-32C per block as last written by the direct path
    uint64_t *             changed;      // offloaded: a bit per block written since the session file last matched
    _Atomic uint64_t       bytes_read, bytes_written, io_wait_ns;
    struct dblade_direct_tensor * direct; // while on the direct path
    // the pipeline (K tensor): the layer the graph entered after this one in the last pass
    struct dblade_tensor * succ;
    // streamed into VRAM (vram/): its device address (0: not streamed); addr is its host copy
    uint64_t dev;
    uint32_t vslot;           // the VRAM slot behind dev
    bool     host_registered; // addr is page-locked for the copies
};

// the rows the next graph stores and reads, for layers streamed into VRAM (dblade_cache_ubatch)
struct dblade_ubatch {
    bool     set;
    uint32_t cuts;  // streamed layers of this cache the graph stopped at so far
    uint32_t expect; // ... and where it must stop: those of the layers it computes (all, or a segment)
    uint32_t n_kv;  // rows attention reads: [0, n_kv)
    uint64_t lo, hi; // rows stored
};

struct dblade_cache {
    struct dblade_kv *      kv; // what the cache belongs to (only the entry points look inside)
    struct dblade_cache *   next;
    uint32_t                n_tensors;
    struct dblade_tensor *  tensors; // 2 per layer: K, V
    int32_t                 max_il;
    struct dblade_tensor ** by_il;   // layer index -> its K tensor (NULL: not in this cache)
    uint32_t                n_streamed; // layers streamed into VRAM
    struct dblade_ubatch    ub;
    // what a session file records of the cache: its name tag, KV types, V layout, and the cells in use
    // when a metadata-only state save last ran
    char     name[16];
    uint32_t type_k, type_v, v_trans;
    uint32_t state_rows;
};

// the blocks of [lo, hi) (bytes) of an offloaded tensor hold new rows: a session append writes them
static inline void dblade_tensor_changed(struct dblade_tensor * t, uint64_t lo, uint64_t hi) {
    if (!t->changed || hi <= lo) {
        return;
    }
    const uint64_t n = t->map_bytes / DBLADE_BLOCK;
    hi               = (hi + DBLADE_BLOCK - 1) / DBLADE_BLOCK;
    for (uint64_t b = lo / DBLADE_BLOCK; b < hi && b < n; b++) {
        t->changed[b / 64] |= 1ull << (b % 64);
    }
}

// a path on which a layer lives in host memory or storage under the module's care
static inline bool dblade_path_offloaded(uint32_t path) {
    return path == DBLADE_PATH_MMAP || path == DBLADE_PATH_DIRECT;
}

// the K tensor of layer il of c, or NULL (O(1))
static inline struct dblade_tensor * dblade_layer_of(const struct dblade_cache * c, int32_t il) {
    return c && il >= 0 && il <= c->max_il ? c->by_il[il] : NULL;
}

#endif
