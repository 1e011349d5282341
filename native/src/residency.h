// The residency side of the module: sessions, caches, tensors and the paths they live on.
// Shared by session.c, cache.c, the path files (path_*.c), staging.c, pipeline.c, policy.c,
// gate.c and stats.c; nothing here is exported.
//
// Who calls whom (top to bottom, never back up):
//   cache.c (the fences, llama.cpp's entry points)
//     -> pipeline.c (which layer is next, what to stage ahead, what to retire; the worker thread)
//     -> the tensor's path (path_ram.c, path_mmap.c, path_direct.c: one small interface, below)
//     -> staging.c (the direct path's memory), the engine (engine.c) and the store (store.c)
//   policy.c (the auto policy) runs on the worker and only marks layers: a switch is applied by the
//   pipeline when the graph next enters the layer.
// Everything below the session lock is guarded by it unless it says otherwise.
#ifndef DUALBLADE_RESIDENCY_H
#define DUALBLADE_RESIDENCY_H

#include "internal.h"

#define NO_TAIL UINT64_MAX

struct dblade_session;
struct dblade_tensor;

// --- a path: where a tensor's bytes live, behind a fixed address (graph reuse depends on it) ---
//
// Every path keeps the tensor at t->addr for its whole life. The pipeline calls these in the graph's
// order; a path that needs nothing at some point leaves the hook NULL.
struct dblade_path_ops {
    const char * name;
    // the address range becomes this path's: at creation (fresh anonymous memory), or on a switch
    // (the previous path has detached: the store holds every row, the range is empty memory)
    int (*attach)(struct dblade_session * s, struct dblade_tensor * t);
    // make the store hold every row (dirty data, tails) and give the range back as empty memory
    int (*detach)(struct dblade_session * s, struct dblade_tensor * t);
    // attention is about to read [0, need)
    void (*make_resident)(struct dblade_session * s, struct dblade_tensor * t, uint64_t need);
    // rows [lo, hi) are about to be stored
    void (*take_rows)(struct dblade_session * s, struct dblade_tensor * t, uint64_t lo, uint64_t hi);
    // the graph will enter the layer soon: bring it in ahead (may queue work)
    void (*prefetch)(struct dblade_session * s, struct dblade_tensor * t);
    // the graph is done with the layer for this pass: write back and release (may queue work)
    void (*release)(struct dblade_session * s, struct dblade_tensor * t);
    // write back everything now, tails too (save_state, close): the store is complete
    void (*flush)(struct dblade_session * s, struct dblade_tensor * t);
    // the cells were emptied: forget the contents, write nothing
    void (*clear)(struct dblade_session * s, struct dblade_tensor * t);
    // state save/restore reads or writes the whole tensor outside any graph; at the end rows [0, hi)
    // were written (0: only read)
    void (*host_begin)(struct dblade_session * s, struct dblade_tensor * t);
    void (*host_end)(struct dblade_session * s, struct dblade_tensor * t, uint64_t hi);
    // bytes of the tensor in memory now
    uint64_t (*resident)(const struct dblade_tensor * t);
};

extern const struct dblade_path_ops dblade_path_ram, dblade_path_mmap, dblade_path_direct;
const struct dblade_path_ops * dblade_path_ops(uint32_t path);

// --- one K or V tensor of one layer of one cache ---
enum { JOB_NONE = 0, JOB_STAGE = 1, JOB_RETIRE = 2 };

struct dblade_tensor {
    struct dblade_cache *  cache;
    struct dblade_tensor * pair; // the layer's other tensor (K <-> V)
    int32_t                il;
    uint32_t               which; // 0 K, 1 V
    uint32_t               path;
    uint32_t               want;         // path wanted (auto, set_path); applied when the layer is entered
    char                   want_why[100]; // why (K tensor)
    uint64_t               bytes;        // the ggml tensor
    uint64_t               map_bytes;    // its bytes in whole pages (what the store's extent holds)
    uint64_t               reserved;     // its address range: map_bytes, offloaded ones up to a huge page
    uint64_t               page;
    uint64_t               row_bytes;
    uint8_t *              addr;
    uint64_t               store_off;    // absolute offset of the extent in the store (offloaded only)
    uint64_t               hwm;          // rows below this were written since the last clear
    uint64_t               cached;       // page cache: of [0, hwm), what the last read fence found cached
    uint32_t *             sums;         // offloaded: CRC-32C per block as last written by the direct path
    _Atomic uint64_t       bytes_read, bytes_written, io_wait_ns;
    // the direct path (path_direct.c):
    //  - [0, valid) in memory is authoritative; memory above valid is not (recycled staging);
    //  - the store holds every row below hwm that is not dirty; rows at or above hwm were never
    //    written since the last clear: whatever the store holds there is finite and masked;
    //  - the dirty range lies inside [0, valid) or is the tail page; valid is store-aligned;
    //  - the tail page (at tail, NO_TAIL for none) is kept in tail_buf while the rest is released.
    uint64_t  valid, dirty_lo, dirty_hi, tail;
    uint8_t * tail_buf;
    uint32_t * chunks; // staging.c: where each chunk of the range comes from
    // its I/O job, run by the pipeline's worker
    int                    job; // JOB_NONE, JOB_STAGE, JOB_RETIRE
    bool                   job_running, job_has_req;
    uint32_t               job_req;
    uint64_t               job_upto, job_keep, job_pending;
    struct dblade_tensor * job_next;  // queue link
    struct dblade_tensor * job_batch; // the worker's batch
    // the pipeline (K tensor): the layer the graph entered after this one in the last pass
    struct dblade_tensor * succ;
    // streamed into VRAM (vram.c): its device address (0: not streamed); addr is its host copy
    uint64_t dev;
    uint32_t vslot;           // the VRAM slot behind dev
    bool     host_registered; // addr is page-locked for the copies
};

struct dblade_cache {
    struct dblade_session *  session;
    struct dblade_cache *    next;
    uint32_t                 n_tensors;
    struct dblade_tensor *   tensors; // 2 per layer: K, V
    int32_t                  max_il;
    struct dblade_tensor **  by_il;   // layer index -> its K tensor (NULL: not in this cache)
    // streamed layers (vram.c): the rows the current graph stores and reads, and its cuts so far
    uint32_t n_streamed;
    // what a session file records of the cache (sessionfile.c): its name tag, KV types, V layout, and the
    // cells in use when a metadata-only state save last ran
    char     name[16];
    uint32_t type_k, type_v, v_trans;
    uint32_t state_rows;
    bool     ub_set;
    uint32_t ub_cuts, ub_n_kv;
    uint64_t ub_lo, ub_hi;
};

// a path on which a layer lives in host memory or storage under the module's care
static inline bool dblade_path_offloaded(uint32_t path) {
    return path == DBLADE_PATH_MMAP || path == DBLADE_PATH_DIRECT;
}

// the K tensor of layer il of c, or NULL (O(1))
static inline struct dblade_tensor * dblade_layer_of(const struct dblade_cache * c, int32_t il) {
    return c && il >= 0 && il <= c->max_il ? c->by_il[il] : NULL;
}

// --- the staging pool (staging.c): memory the direct path stages layers into, reused ---
//
// Staged memory moves between the pool and the tensors' fixed addresses in chunks, with mremap:
// page tables move, pages are neither freed nor zeroed nor faulted in again. Where the kernel cannot
// move them (no MREMAP_DONTUNMAP) or the pool is empty (a state copy stages everything), a chunk
// is plain anonymous memory that is faulted in and given back (MADV_DONTNEED).
#define DBLADE_CHUNK_NONE     UINT32_MAX
#define DBLADE_CHUNK_FRESH    (UINT32_MAX - 1) // anonymous memory of the tensor's own
#define DBLADE_STAGING_VMAS   8192u           // chunks at most: each may become a mapping of its own

struct dblade_staging {
    uint64_t        chunk;    // bytes per chunk: a power of two, a page up to a huge page
    uint32_t        n_slots;  // pool capacity in chunks (0: no pool)
    uint8_t *       base;     // the pool's address range
    uint8_t *       state;    // per slot: SLOT_FREE_EMPTY, SLOT_FREE_PAGES, SLOT_TAKEN
    uint32_t        n_free;
    uint64_t        populated; // bytes of the pool that hold pages (at tensors or idle)
    bool            moves;     // the kernel moves chunks (mremap with MREMAP_DONTUNMAP)
    pthread_mutex_t lock;      // taken by the worker outside the session lock
};

int  dblade_staging_init(struct dblade_staging * p, uint64_t chunk, uint64_t pool_bytes, bool huge);
void dblade_staging_destroy(struct dblade_staging * p);
// chunk-granular memory behind [0, upto) of the tensor (contents of new chunks: undefined)
int  dblade_staging_grow(struct dblade_staging * p, struct dblade_tensor * t, uint64_t upto);
// every chunk of the tensor back to the pool; the range becomes empty memory
void dblade_staging_release(struct dblade_staging * p, struct dblade_tensor * t);
// the pages of the idle slots back to the system (the next layer staged there faults fresh ones in,
// as on first use); returns the bytes given back
uint64_t dblade_staging_trim(struct dblade_staging * p);
// the tensor dies: forget its chunks (its range is unmapped by the caller)
void dblade_staging_forget(struct dblade_staging * p, struct dblade_tensor * t);

// --- the gate (gate.c): ggml's compute threads meet at every fence of an offloaded tensor ---
//
// ggml calls a custom op on every compute thread; thread 0 runs the fence, the others wait for it
// here instead of spinning at ggml's barrier. While the fence waits for I/O (it says so with
// dblade_gate_block) they sleep on a futex: a core busy-waiting for the disk is half of a 2-core
// machine.
struct dblade_gate {
    _Atomic uint32_t gen;      // bumped when every thread has arrived
    _Atomic uint32_t arrived;
    _Atomic uint32_t blocking; // the fence is waiting for I/O: sleep, do not spin
    _Atomic uint32_t sleepers;
};

void dblade_gate_arrive(struct dblade_gate * g, uint32_t nth);
static inline void dblade_gate_block(struct dblade_gate * g) {
    atomic_store_explicit(&g->blocking, 1, memory_order_release);
}
// the fence no longer waits (its I/O is in, or it is done): sleeping waiters get up
void dblade_gate_unblock(struct dblade_gate * g);

// --- the session: what one llama_context's KV caches belong to ---
#define DBLADE_SWITCH_LOG 64u
#define DBLADE_MAX_DEPTH  8u
#define WORKER_BATCH      64u

struct layout_entry {
    struct dblade_layout_layer l;
    uint64_t                   k_off, v_off; // relative to the store's data offset
};

struct dblade_session {
    struct dblade_config  config;
    char *                kv_dir;
    char *                kv_device;
    _Atomic int           refs;
    uint64_t              t0_ns;
    pthread_mutex_t       lock; // guards everything below unless noted
    struct dblade_cache * caches;
    uint32_t              n_layout;
    uint32_t              n_offloaded; // layers not pinned
    struct layout_entry * layout;
    uint64_t              allowance;     // what the direct path may stage: the budget less the pinned layers
    uint64_t              stage_pending; // bytes queued STAGE jobs will add
    bool                  thp;           // the kernel has transparent huge pages
    bool                  populate_page_cache; // auto found room for every offloaded layer in the page cache
    struct dblade_staging staging;
    struct dblade_store   store;
    struct dblade_io *    io;     // the worker's engine: prefetches and write-backs, in batches
    struct dblade_io *    io_now; // the graph's own: a demand read never waits behind the worker's batch
    uint64_t              staged_bytes, staged_peak;
    struct dblade_tensor * active; // K tensor of the layer the graph is at
    int                   error;
    char                  error_msg[256];
    uint64_t              n_io_errors;
    uint64_t              touched_end; // the store was written below this offset
    struct dblade_gate    gate;        // lock-free
    // the worker: runs the direct path's jobs while the graph computes, and samples memory
    pthread_t              worker;
    bool                   worker_started, worker_stop;
    pthread_cond_t         work, done;
    struct dblade_tensor * q_head, * q_tail;
    struct dblade_io_req   batch_reqs[WORKER_BATCH];
    // the pipeline
    uint32_t depth;
    double   bw_ema;         // bytes per ns the device gave the worker
    double   compute_ema_ns; // between entering two offloaded layers, stalls excluded
    uint64_t last_enter_ns, stall_since_enter;
    // the auto policy (policy.c)
    struct dblade_monitor      monitor;
    struct dblade_mem_sample   last_sample;
    struct dblade_auto_state   auto_state;
    struct dblade_auto_layer * auto_layers;
    uint64_t                   next_sample_ns;
    bool                       sample_due; // the worker takes a sample when it can
    struct dblade_switch       switches[DBLADE_SWITCH_LOG];
    uint64_t                   n_switches;
    // GPU builds: the VRAM slots streamed layers take turns in (vram.c); NULL when none is streamed
    struct dblade_vram *       vram;
    // enum dblade_state_mode: a llama_state save/restore carries the cells only (session files)
    int state_mode;
};

// session.c
void dblade_fail(struct dblade_session * s, int rc, const char * fmt, ...) __attribute__((format(printf, 3, 4)));
void dblade_log_switch(struct dblade_session * s, int32_t il, uint32_t from, uint32_t to, const char * why);
void dblade_session_unref(struct dblade_session * s);
struct dblade_session * dblade_session_bound(void);
// a wait of the graph on I/O begins (its threads may sleep) / ends (counted as the layer's stall)
uint64_t dblade_stall_begin(struct dblade_session * s);
void     dblade_stall_end(struct dblade_session * s, struct dblade_tensor * t, uint64_t t0);

// cache.c
// apply a pending switch of the layer of k (both tensors); the graph has not touched it yet
void dblade_layer_switch(struct dblade_session * s, struct dblade_tensor * k);

// path_direct.c: what the pipeline's jobs do
uint64_t dblade_direct_staged(const struct dblade_tensor * t); // memory the tensor holds
uint64_t dblade_direct_growth(const struct dblade_tensor * t, uint64_t upto);
uint64_t dblade_direct_stage_end(const struct dblade_session * s, const struct dblade_tensor * t, uint64_t upto);
bool dblade_direct_stage_plan(struct dblade_session * s, struct dblade_tensor * t, uint64_t upto, struct dblade_io_req * r);
void dblade_direct_stage_finish(struct dblade_session * s, struct dblade_tensor * t, uint64_t upto);
bool dblade_direct_retire_plan(struct dblade_session * s, struct dblade_tensor * t, bool full, struct dblade_io_req * r,
                               uint64_t * keep);
void dblade_direct_retire_release(struct dblade_session * s, struct dblade_tensor * t, uint64_t keep);
void dblade_direct_retire_finish(struct dblade_session * s, struct dblade_tensor * t, uint64_t keep);
void dblade_direct_io_failed(struct dblade_session * s, struct dblade_tensor * t, const struct dblade_io_req * r);
void dblade_direct_io_account(struct dblade_tensor * t, const struct dblade_io_req * r);

// pipeline.c
void dblade_pipeline_enter(struct dblade_session * s, struct dblade_tensor * t);
bool dblade_pipeline_enqueue(struct dblade_session * s, struct dblade_tensor * t, int job, uint64_t upto);
void dblade_pipeline_withdraw(struct dblade_session * s, struct dblade_tensor * t); // a queued job
void dblade_pipeline_settle(struct dblade_session * s, struct dblade_tensor * t);   // no job left
void dblade_pipeline_make_room(struct dblade_session * s, uint64_t bytes);
void dblade_pipeline_stop(struct dblade_session * s);
bool dblade_pipeline_is_active(const struct dblade_session * s, const struct dblade_tensor * t);

// vram.c (GPU builds; the driver is loaded when the first streamed tensor attaches)
#define DBLADE_VRAM_SLOTS 2u
// types: the cache's ggml K and V types (a GPU buffer pads quantized rows)
int  dblade_vram_attach(struct dblade_session * s, struct dblade_tensor * t, const char * device, uint32_t type_k,
                        uint32_t type_v);
void dblade_vram_detach(struct dblade_session * s, struct dblade_tensor * t);
void dblade_vram_destroy(struct dblade_session * s);
// the last computed layer's new rows back to its host path (sync_gpu: outside a cut); no lock held
int  dblade_vram_settle(struct dblade_session * s, bool sync_gpu);
void dblade_vram_forget(struct dblade_session * s, const struct dblade_cache * c); // NULL: every cache
void dblade_vram_stats(const struct dblade_session * s, struct dblade_stats * out);

// policy.c
void dblade_policy_start(struct dblade_session * s);
void dblade_policy_sample(struct dblade_session * s); // the worker, session lock held (dropped while reading)

#endif
