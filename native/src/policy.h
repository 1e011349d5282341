// The auto policy (policy.c): from the memory actually available, which offloaded layers go on the
// page-cache path and which on the direct path, revised as the context fills and memory comes and goes.
#ifndef DUALBLADE_POLICY_H
#define DUALBLADE_POLICY_H

#include "monitor.h"

#include <stddef.h>
#include <stdint.h>

#define DBLADE_AUTO_STALL_HIGH     0.10                         // share of time stalled on memory: demote
#define DBLADE_AUTO_STALL_LOW      0.01                         // below this (and room to spare): promote
#define DBLADE_AUTO_HOLD_NS        (2ull * 1000 * 1000 * 1000)  // no promotion within 2 s of a switch
#define DBLADE_AUTO_HOLD_MAX_NS    (64ull * 1000 * 1000 * 1000) // the hold doubles on flaps, up to this
#define DBLADE_AUTO_FILL_RATE      (4ull << 20) // new rows per second above which the context is filling
                                                // (a prefill): no promotion
#define DBLADE_AUTO_FILL_WINDOW_NS (200ull * 1000 * 1000) // the rate is measured over this
#define DBLADE_AUTO_MISS_SHARE     16                           // decoding, over 1/16 of the page-cache layers
#define DBLADE_AUTO_MISS_MIN       (8ull << 20)                 // (and 8 MiB) missing at their reads: demote

// --- the decision: pure, tested on its own (test_monitor) ---

struct dblade_auto_state {
    uint64_t last_t_ns, last_psi_us, last_switch_ns, last_promote_ns;
    uint64_t hold_ns;               // current hold before a promotion; doubles when promotions flap
    uint64_t cap_bytes, need_bytes; // of the last decision
    uint64_t fill_t_ns, fill_bytes; // the rows of all offloaded layers at the start of the rate window
    double   fill_rate;             // bytes per second they grew by in the last window (< 0: not known yet)
    uint64_t held_bytes, held_cap;  // after thrashing: what the page cache proved to hold, at that capacity;
                                    // promotions stay within it until the capacity grows by a quarter
};

struct dblade_auto_layer {
    uint32_t want;           // DBLADE_PATH_MMAP or DBLADE_PATH_DIRECT; updated by the decision
    uint64_t need_bytes;     // what the layer holds now (rows written)
    uint64_t full_bytes;     // what it holds when the context is full
    uint64_t resident_bytes; // of it in the page cache now (mmap layers)
    uint64_t missing_bytes;  // of what its last reads looked at, not in the page cache (mmap layers)
};

// bytes of page cache the offloaded layers may use; reserve = the weights' working set
uint64_t dblade_auto_capacity(const struct dblade_mem_sample * m, uint64_t reserve, uint64_t page_cached);
// The initial placement: a stable resident set in the page cache, the rest on the direct path. In layer order,
// layers go on the page-cache path while their size with the context full (full[i]) fits 7/8 of room (the
// page cache the offloaded layers may use, dblade_auto_capacity), so that the set does not outgrow the memory
// as the context fills and is not cycled through by every token (a cyclic scan is LRU's worst case); paths[i]
// gets DBLADE_PATH_MMAP or DBLADE_PATH_DIRECT. Returns the bytes placed in the page cache.
uint64_t dblade_auto_place(uint64_t room, const uint64_t * full, uint32_t n, uint32_t * paths);
// updates layers[].want; returns how many changed, with the reason in why
int      dblade_auto_decide(struct dblade_auto_state * st, const struct dblade_mem_sample * m, uint64_t reserve,
                            struct dblade_auto_layer * layers, uint32_t n, char * why, size_t why_cap);

// --- the policy of a KV object ---

struct dblade_auto;
struct dblade_tier;
struct dblade_path_env;
struct dblade_cache;
struct dblade_worker;
struct dblade_layout_layer;

// Samples memory, and places the offloaded layers of the layout (their path: the page cache when
// what is available holds all of them whole next to the weights, else the direct path). direct: the
// direct path (its unheld staging is not room); samples are taken on the policy's own thread.
int  dblade_policy_open(struct dblade_auto ** out, struct dblade_path_env * env, struct dblade_cache ** caches,
                        struct dblade_tier * direct, uint64_t reserve_bytes, struct dblade_layout_layer * layout,
                        uint32_t n_layout);
// stops its thread (the lock not held) and frees it
void dblade_policy_close(struct dblade_auto * p);
// the lock held: the reserve changed (the weights' working set, the compute buffers no prompt touched yet);
// the layers that hold no rows yet are placed again from memory as it is now (the model and context loaded)
void dblade_policy_set_reserve(struct dblade_auto * p, uint64_t reserve_bytes);
// the lock held, from the pipeline: the graph progresses; a sample is queued when one is due
void dblade_policy_tick(struct dblade_auto * p, uint64_t now_ns);
// the lock held: the last sample and decision
struct dblade_policy_stats {
    uint64_t mem_limit, mem_available; // UINT64_MAX / 0 before the first sample
    uint64_t page_cache_room, page_cache_need;
};
void dblade_policy_stats(const struct dblade_auto * p, struct dblade_policy_stats * out);

#endif
