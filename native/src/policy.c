// The auto policy: from the memory actually available, which offloaded layers go on the page-cache
// path and which on the direct path, revised as the context fills and memory comes and goes.
//
// The decision (pure, tested on its own in test_monitor): offloaded layers stay on the page-cache
// path while the memory left for file pages holds them plus the model's weights (both are mmap'ed
// and compete for the same page cache: letting the KV push the weights out would make every token
// re-read them); the largest move to the direct path when it does not, or when tasks stall on
// memory; they come back, smallest first, only when they fit with a wide margin, nothing stalls,
// and the last switch is a while ago (hysteresis: no flapping).
//
// The KV object's side: the initial placement, placed again once the model and its context are loaded
// (what they took is known then, and no layer holds rows yet), and a sample taken on the policy's own
// thread (never on the graph's, and never queued behind the reads the KV object's worker runs back to
// back while decode waits on storage) that marks layers to switch; the pipeline applies a switch when
// the graph next enters the layer. This file owns the policy's state and its thread; it calls the
// monitor, the worker, the events and the direct path (what of its staging allowance is not memory yet).

#define _GNU_SOURCE
#include "policy.h"

#include "base.h"
#include "direct/direct.h"
#include "events.h"
#include "path.h"
#include "worker.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint64_t sub0(uint64_t a, uint64_t b) {
    return a > b ? a - b : 0;
}

uint64_t dblade_auto_capacity(const struct dblade_mem_sample * m, uint64_t reserve, uint64_t page_cached) {
    // system: what could be freed plus what our own layers already hold, less the weights
    uint64_t cap = UINT64_MAX;
    if (m->mem_available != UINT64_MAX && m->mem_total != UINT64_MAX && m->mem_total > 0) {
        const uint64_t margin = m->mem_total / 32 > (128ull << 20) ? m->mem_total / 32 : (128ull << 20);
        cap = sub0(m->mem_available + page_cached, reserve + margin);
    }
    if (m->cg_limit != UINT64_MAX) {
        // the group: its limit less what it cannot reclaim (ours: pinned KV, staging, compute buffers)
        const uint64_t margin = m->cg_limit / 16 > (32ull << 20) ? m->cg_limit / 16 : (32ull << 20);
        const uint64_t c      = sub0(m->cg_limit, m->cg_held + reserve + margin);
        cap = c < cap ? c : cap;
    }
    return cap;
}

uint64_t dblade_auto_place(uint64_t room, const uint64_t * full, uint32_t n, uint32_t * paths) {
    const uint64_t cap    = room == UINT64_MAX ? UINT64_MAX : room / 8 * 7;
    uint64_t       placed = 0;
    for (uint32_t i = 0; i < n; i++) {
        const bool fits = cap == UINT64_MAX || (placed + full[i] >= placed && placed + full[i] <= cap);
        paths[i]        = fits ? DBLADE_PATH_MMAP : DBLADE_PATH_DIRECT;
        placed += fits ? full[i] : 0;
    }
    return placed;
}

int dblade_auto_decide(struct dblade_auto_state * st, const struct dblade_mem_sample * m, uint64_t reserve,
                       struct dblade_auto_layer * layers, uint32_t n, char * why, size_t why_cap) {
    uint64_t need = 0, cached = 0, missing = 0;
    for (uint32_t i = 0; i < n; i++) {
        if (layers[i].want == DBLADE_PATH_MMAP) {
            need += layers[i].need_bytes;
            cached += layers[i].resident_bytes;
            missing += layers[i].missing_bytes;
        }
    }
    const uint64_t cap = dblade_auto_capacity(m, reserve, cached);

    // stall share since the previous sample
    double stall = 0;
    if (m->psi_us != UINT64_MAX && st->last_psi_us != UINT64_MAX && st->last_t_ns && m->t_ns > st->last_t_ns &&
        m->psi_us >= st->last_psi_us) {
        stall = (double) (m->psi_us - st->last_psi_us) * 1000.0 / (double) (m->t_ns - st->last_t_ns);
    }
    // how fast the context fills: a prefill writes rows much faster than decoding does
    uint64_t all = 0;
    for (uint32_t i = 0; i < n; i++) {
        all += layers[i].need_bytes;
    }
    if (st->fill_t_ns == 0 || all < st->fill_bytes) {
        st->fill_t_ns = m->t_ns, st->fill_bytes = all, st->fill_rate = -1; // the start, or a clear: not known yet
    } else if (m->t_ns - st->fill_t_ns >= DBLADE_AUTO_FILL_WINDOW_NS) {
        st->fill_rate = (double) (all - st->fill_bytes) * 1e9 / (double) (m->t_ns - st->fill_t_ns);
        st->fill_t_ns = m->t_ns, st->fill_bytes = all;
    }

    const bool had_prev = st->last_t_ns != 0;
    st->last_psi_us     = m->psi_us;
    st->last_t_ns       = m->t_ns;
    st->cap_bytes       = cap;
    st->need_bytes      = need;

    if (st->hold_ns == 0 || m->t_ns - st->last_switch_ns > DBLADE_AUTO_HOLD_MAX_NS) {
        st->hold_ns = DBLADE_AUTO_HOLD_NS; // calm for a long while: back to the short hold
    }
    int changed = 0;
    const bool over = need > cap;
    // stalls show the effect of a demotion only once the layers have moved and the kernel has
    // reclaimed: a spike that stays is one demotion, not one per sample while it lasts
    const bool calm     = m->t_ns - st->last_switch_ns >= st->hold_ns;
    const bool stalling = had_prev && stall > DBLADE_AUTO_STALL_HIGH && need > 0 && calm;
    // A resident set that does not stay resident: decoding (the context not filling), the page-cache layers'
    // last reads found pages missing. A cyclic scan is LRU's worst case: each pass evicts what the next needs,
    // and a missing page comes in at the page cache's pace and is copied after, where the direct path reads it
    // once at the device's. Keep in the cache what it held, with a margin; the rest goes direct.
    const uint64_t held     = need > missing ? need - missing : 0;
    const bool     thrash   = had_prev && calm && st->fill_rate >= 0 && st->fill_rate < (double) DBLADE_AUTO_FILL_RATE &&
                        missing > need / DBLADE_AUTO_MISS_SHARE && missing > DBLADE_AUTO_MISS_MIN;
    if (over || stalling || thrash) {
        // largest first: the most memory back per switch
        uint64_t target = over ? cap - cap / 8 : thrash ? held - held / 8 : need - need / 4;
        while (need > target) {
            int best = -1;
            for (uint32_t i = 0; i < n; i++) {
                if (layers[i].want == DBLADE_PATH_MMAP &&
                    (best < 0 || layers[i].need_bytes > layers[best].need_bytes)) {
                    best = (int) i;
                }
            }
            if (best < 0) {
                break;
            }
            layers[best].want = DBLADE_PATH_DIRECT;
            need -= layers[best].need_bytes;
            changed++;
        }
        if (changed) {
            // demoted again soon after a promotion: that promotion was a mistake, wait longer next time
            if (st->last_promote_ns && m->t_ns - st->last_promote_ns < 4 * st->hold_ns) {
                st->hold_ns = st->hold_ns * 2 < DBLADE_AUTO_HOLD_MAX_NS ? st->hold_ns * 2 : DBLADE_AUTO_HOLD_MAX_NS;
            }
            if (over) {
                snprintf(why, why_cap, "page cache short: layers need %llu MiB, %llu MiB available",
                         (unsigned long long) (st->need_bytes >> 20), (unsigned long long) (cap >> 20));
            } else if (thrash) {
                st->held_bytes = target, st->held_cap = cap;
                snprintf(why, why_cap, "page cache thrashing: %llu of %llu MiB missing at the last reads",
                         (unsigned long long) (missing >> 20), (unsigned long long) (st->need_bytes >> 20));
            } else {
                snprintf(why, why_cap, "memory pressure: %.0f%% of the time stalled", stall * 100);
            }
            st->last_switch_ns = m->t_ns;
        }
        return changed;
    }
    // back to the page cache: calm, room with a wide margin, and not right after a switch. The
    // context grows: a layer comes back only if the page-cache layers still fit once full, and not
    // while a prefill fills it (its pages would be dirtied faster than written back, and reclaim
    // stalls: it would promote early and demote again, paying both ways)
    if (stall < DBLADE_AUTO_STALL_LOW && m->t_ns - st->last_switch_ns >= st->hold_ns &&
        st->fill_rate >= 0 && st->fill_rate < (double) DBLADE_AUTO_FILL_RATE) {
        if (st->held_bytes && cap > st->held_cap + st->held_cap / 4) {
            st->held_bytes = 0; // memory grew since the cache thrashed: the capacity rules again
        }
        const uint64_t room = st->held_bytes && st->held_bytes < cap / 10 * 7 ? st->held_bytes : cap / 10 * 7;
        uint64_t       full = 0;
        for (uint32_t i = 0; i < n; i++) {
            if (layers[i].want == DBLADE_PATH_MMAP) {
                full += layers[i].full_bytes > layers[i].need_bytes ? layers[i].full_bytes : layers[i].need_bytes;
            }
        }
        for (;;) {
            int best = -1;
            for (uint32_t i = 0; i < n; i++) {
                const uint64_t f = layers[i].full_bytes > layers[i].need_bytes ? layers[i].full_bytes : layers[i].need_bytes;
                if (layers[i].want == DBLADE_PATH_DIRECT && full + f <= room &&
                    (best < 0 || f < layers[best].full_bytes)) {
                    best = (int) i;
                }
            }
            if (best < 0) {
                break;
            }
            layers[best].want = DBLADE_PATH_MMAP;
            need += layers[best].need_bytes;
            full += layers[best].full_bytes > layers[best].need_bytes ? layers[best].full_bytes : layers[best].need_bytes;
            changed++;
        }
        if (changed) {
            snprintf(why, why_cap, "memory available again: layers need %llu MiB (full: %llu), %llu MiB available",
                     (unsigned long long) (need >> 20), (unsigned long long) (full >> 20),
                     (unsigned long long) (cap >> 20));
            st->last_switch_ns  = m->t_ns;
            st->last_promote_ns = m->t_ns;
        }
    }
    return changed;
}

struct dblade_auto {
    struct dblade_work         work; // its samples, on the sampler
    struct dblade_worker       sampler;
    struct dblade_path_env *   env;
    struct dblade_cache **     caches;
    struct dblade_tier *       direct;
    uint64_t                   reserve_bytes;
    struct dblade_monitor      monitor;
    struct dblade_mem_sample   last_sample;
    struct dblade_auto_state   state;
    struct dblade_auto_layer * layers;
    uint32_t                   n_layers; // offloaded layers
    uint64_t                   next_sample_ns;
};

// what of the direct path's staging allowance is not memory yet: its staging comes and goes (its
// pool fills on first use), and a sample taken before it has must not read it as room
static uint64_t reserve(const struct dblade_auto * p) {
    return p->reserve_bytes + (p->direct ? dblade_direct_unheld(p->direct) : 0);
}

// path_mmap.c writes a prompt's rows around the page cache while auto wants some offloaded layer on the direct
// path (a limit: the cache does not hold them all). The lock held.
static void set_write_around(struct dblade_auto * p) {
    bool some_direct = false;
    for (struct dblade_cache * c = *p->caches; c; c = c->next) {
        for (uint32_t i = 0; i + 1 < c->n_tensors; i += 2) {
            some_direct |= c->tensors[i].path != DBLADE_PATH_RAM && c->tensors[i].want == DBLADE_PATH_DIRECT;
        }
    }
    p->env->write_around = some_direct;
}

// On the worker, the lock held: read memory without the lock, decide with it. What the page-cache
// layers hold in memory is what their last read fence found (no second mincore).
static void sample(struct dblade_work * w) {
    struct dblade_auto *   p = (struct dblade_auto *) w;
    struct dblade_mem_sample m;
    pthread_mutex_unlock(p->env->lock);
    dblade_monitor_sample(&p->monitor, &m);
    pthread_mutex_lock(p->env->lock);
    p->last_sample = m;

    uint32_t n = 0;
    for (struct dblade_cache * c = *p->caches; c; c = c->next) {
        for (uint32_t i = 0; i + 1 < c->n_tensors; i += 2) {
            const struct dblade_tensor * k = &c->tensors[i], * v = k->pair;
            if (k->path == DBLADE_PATH_RAM || n >= p->n_layers) {
                continue;
            }
            struct dblade_auto_layer * a = &p->layers[n++];
            a->want                      = k->want;
            a->need_bytes                = dblade_align_up(k->hwm, k->page) + dblade_align_up(v->hwm, v->page);
            a->full_bytes                = k->map_bytes + v->map_bytes;
            const bool unknown           = k->cached == DBLADE_CACHED_UNKNOWN || v->cached == DBLADE_CACHED_UNKNOWN;
            a->resident_bytes            = k->path != DBLADE_PATH_MMAP ? 0 : unknown ? a->need_bytes : k->cached + v->cached;
            // (not need less resident: rows written since the last read were not there to be missed)
            a->missing_bytes             = k->path != DBLADE_PATH_MMAP || unknown ? 0 : k->missing + v->missing;
        }
    }
    char      why[sizeof(((struct dblade_switch *) 0)->reason)];
    const int changed = dblade_auto_decide(&p->state, &m, reserve(p), p->layers, n, why, sizeof(why));
    if (changed <= 0) {
        return;
    }
    uint32_t j = 0;
    for (struct dblade_cache * c = *p->caches; c; c = c->next) {
        for (uint32_t i = 0; i + 1 < c->n_tensors; i += 2) {
            struct dblade_tensor * k = &c->tensors[i];
            if (k->path == DBLADE_PATH_RAM || j >= n) {
                continue;
            }
            const uint32_t want = p->layers[j++].want;
            if (want != k->want) {
                k->want = k->pair->want = want;
                snprintf(k->want_why, sizeof(k->want_why), "%s", why);
            }
        }
    }
    set_write_around(p);
}

int dblade_policy_open(struct dblade_auto ** out, struct dblade_path_env * env, struct dblade_cache ** caches,
                       struct dblade_tier * direct, uint64_t reserve_bytes, struct dblade_layout_layer * layout,
                       uint32_t n_layout) {
    struct dblade_auto * p = calloc(1, sizeof(*p));
    if (!p) {
        return -ENOMEM;
    }
    for (uint32_t i = 0; i < n_layout; i++) {
        p->n_layers += dblade_path_offloaded(layout[i].path);
    }
    p->layers = calloc(p->n_layers ? p->n_layers : 1, sizeof(*p->layers));
    if (!p->layers) {
        free(p);
        return -ENOMEM;
    }
    p->work.run      = sample;
    p->env           = env;
    p->caches        = caches;
    p->direct        = direct;
    dblade_worker_init(&p->sampler, env->lock);
    p->reserve_bytes = reserve_bytes;
    dblade_monitor_init(&p->monitor);
    dblade_monitor_sample(&p->monitor, &p->last_sample);

    // the initial placement: a stable resident set in the page cache (what memory holds of the offloaded
    // layers with the context full, next to the weights), the rest on the direct path
    uint64_t   offloaded = 0;
    uint64_t * full      = calloc(p->n_layers ? p->n_layers : 1, sizeof(*full));
    uint32_t * paths     = calloc(p->n_layers ? p->n_layers : 1, sizeof(*paths));
    if (!full || !paths) {
        free(full), free(paths), free(p->layers), free(p);
        return -ENOMEM;
    }
    uint32_t n = 0;
    for (uint32_t i = 0; i < n_layout; i++) {
        if (dblade_path_offloaded(layout[i].path)) {
            full[n] = dblade_align_up(layout[i].k_bytes, DBLADE_BLOCK) + dblade_align_up(layout[i].v_bytes, DBLADE_BLOCK);
            offloaded += full[n++];
        }
    }
    const uint64_t room   = dblade_auto_capacity(&p->last_sample, reserve(p), 0);
    const uint64_t cached = dblade_auto_place(room, full, n, paths);
    uint32_t       n_mmap = 0;
    n                     = 0;
    for (uint32_t i = 0; i < n_layout; i++) {
        if (dblade_path_offloaded(layout[i].path)) {
            layout[i].path = paths[n++];
            n_mmap += layout[i].path == DBLADE_PATH_MMAP;
        }
    }
    free(full), free(paths);
    const uint32_t path = n_mmap == n ? DBLADE_PATH_MMAP : DBLADE_PATH_DIRECT;
    // the page-cache layers' pages are filled at load, as pinned ones are: a prompt then writes into pages that are
    // there, not a fault and a zeroed page per 4 KiB. Measured both ways: filling them only where every offloaded
    // layer fits lost prefill under a limit (GPU run 10, 30K: TTFT 5.7 s against run 9's 2.48; the CPU's kv-heavy
    // 25%: auto vs mmap prefill 1.00-1.02x against 1.06-1.09x, four interleaved rounds)
    env->populate_page_cache = n_mmap > 0;
    env->write_around        = n_mmap < n; // a limit: path_mmap.c writes a prompt's rows from VRAM around the cache
    p->state.cap_bytes       = room;
    p->state.last_switch_ns  = dblade_now_ns();
    p->state.last_psi_us     = UINT64_MAX;
    char why[100];
    if (room == UINT64_MAX) {
        snprintf(why, sizeof(why), "start: no memory limit known, %llu MiB offloaded",
                 (unsigned long long) (offloaded >> 20));
    } else {
        snprintf(why, sizeof(why), "start: %llu of %llu MiB offloaded in the page cache (room %llu MiB)",
                 (unsigned long long) (cached >> 20), (unsigned long long) (offloaded >> 20),
                 (unsigned long long) (room >> 20));
    }
    dblade_log_switch(env->events, -1, DBLADE_PATH_DIRECT, path, why);
    *out = p;
    return 0;
}

void dblade_policy_close(struct dblade_auto * p) {
    if (p) {
        dblade_worker_destroy(&p->sampler);
        free(p->layers);
        free(p);
    }
}

// The layers that hold no rows yet are placed again, by the rule of the first placement, from memory as it
// is now: the first was made when the KV object opened, before llama.cpp loaded the weights and made the
// context (a GPU build's driver, its buffers), so its room was larger than what is left. A layer placed in a
// page cache that cannot hold it costs twice: its rows are written through a page cache under reclaim, and
// every token reads it back at the page cache's pace. (The lock held.)
static void place_again(struct dblade_auto * p) {
    uint32_t n = 0, empty = 0;
    for (struct dblade_cache * c = *p->caches; c; c = c->next) {
        for (uint32_t i = 0; i + 1 < c->n_tensors; i += 2) {
            const struct dblade_tensor * k = &c->tensors[i];
            if (k->path != DBLADE_PATH_RAM && n < p->n_layers) {
                p->layers[n++].full_bytes = k->map_bytes + k->pair->map_bytes;
                empty += k->hwm == 0 && k->pair->hwm == 0;
            }
        }
    }
    if (empty == 0) {
        return; // (after every prompt: the reserve shrinks as prompts touch the compute buffers)
    }
    uint64_t * full  = calloc(n ? n : 1, sizeof(*full));
    uint32_t * paths = calloc(n ? n : 1, sizeof(*paths));
    if (!full || !paths) {
        free(full), free(paths);
        return;
    }
    for (uint32_t i = 0; i < n; i++) {
        full[i] = p->layers[i].full_bytes;
    }
    struct dblade_mem_sample m;
    dblade_monitor_sample(&p->monitor, &m); // (stateless: the sampler may be sampling too)
    const uint64_t room   = dblade_auto_capacity(&m, reserve(p), 0);
    const uint64_t cached = dblade_auto_place(room, full, n, paths);
    uint32_t       j = 0, moved = 0;
    char           why[sizeof(((struct dblade_switch *) 0)->reason)];
    snprintf(why, sizeof(why), "loaded: %llu MiB of the offloaded layers fit the page cache (room %llu MiB)",
             (unsigned long long) (cached >> 20), (unsigned long long) (room == UINT64_MAX ? 0 : room >> 20));
    for (struct dblade_cache * c = *p->caches; c; c = c->next) {
        for (uint32_t i = 0; i + 1 < c->n_tensors; i += 2) {
            struct dblade_tensor * k = &c->tensors[i];
            if (k->path == DBLADE_PATH_RAM || j >= n) {
                continue;
            }
            const uint32_t want = paths[j++];
            if (k->hwm == 0 && k->pair->hwm == 0 && want != k->want) {
                k->want = k->pair->want = want; // switched when the graph enters it (no rows: nothing moves)
                snprintf(k->want_why, sizeof(k->want_why), "%s", why);
                moved++;
            }
        }
    }
    set_write_around(p);
    free(full), free(paths);
    if (moved && room != UINT64_MAX) {
        p->state.cap_bytes      = room;
        p->state.last_switch_ns = dblade_now_ns();
    }
}

void dblade_policy_set_reserve(struct dblade_auto * p, uint64_t reserve_bytes) {
    p->reserve_bytes = reserve_bytes;
    place_again(p);
}

void dblade_policy_tick(struct dblade_auto * p, uint64_t now_ns) {
    if (now_ns >= p->next_sample_ns && dblade_worker_queue(&p->sampler, &p->work, false)) {
        p->next_sample_ns = now_ns + DBLADE_MONITOR_PERIOD_NS; // the worker reads memory; the graph goes on
    }
}

void dblade_policy_stats(const struct dblade_auto * p, struct dblade_policy_stats * out) {
    out->mem_limit       = p->last_sample.t_ns ? p->last_sample.cg_limit : UINT64_MAX;
    out->mem_available   = p->last_sample.t_ns ? p->last_sample.mem_available : 0;
    out->page_cache_room = p->state.cap_bytes;
    out->page_cache_need = p->state.need_bytes;
}
