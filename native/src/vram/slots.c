// The VRAM tier's resources: CUDA's driver (cuda.c), a fixed device address for every streamed K and V
// tensor (llama.cpp's reused graphs and CUDA graphs keep pointers), reserved once with cuMemAddressReserve,
// and a few physical slots (cuMemCreate) behind them: streamed layer number i (in layer order) is mapped
// onto slot i mod n_slots, so the slots cost what n_slots layers cost, whatever the context. Host memory the
// copies start from is page-locked: the ring the host paths are read into, the buffer new rows come back
// through, and pinned host copies (the RAM path). A lock that fails (RLIMIT_MEMLOCK, a container's limit)
// leaves the memory pageable: copies then go through CUDA's own staging, slower, and the stats say why.
//
// It calls the driver and the engine; stream.c moves the bytes.

#define _GNU_SOURCE
#include "vram-impl.h"

#include "../events.h"
#include "../store.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define CU_TRY(v, call, what)                                                                      \
    do {                                                                                           \
        const CUresult r_ = (call);                                                                \
        if (r_ != 0) {                                                                             \
            dblade_set_error("CUDA: %s failed: %s (%d)", what, dblade_cuda_error(&(v)->cu, r_), r_); \
            return -EIO;                                                                           \
        }                                                                                          \
    } while (0)

// the device llama.cpp named: a PCI bus id, or "CUDA<n>" (ggml's name) when it has none
static int find_device(struct dblade_vram * v, const char * name) {
    if (!strncmp(name, "CUDA", 4)) {
        CU_TRY(v, v->cu.DeviceGet(&v->dev, atoi(name + 4)), "cuDeviceGet");
    } else {
        CU_TRY(v, v->cu.DeviceGetByPCIBusId(&v->dev, name), "cuDeviceGetByPCIBusId");
    }
    return 0;
}

// streamed layers in layer order: their K and V ranges, each on the allocation granularity, with room for
// the padding a GPU buffer adds after a tensor of quantized rows (ggml-cuda: up to 512 values of a row)
#define DEVICE_PAD 4096u
static uint64_t tensor_span(const struct dblade_vram * v, uint64_t bytes) {
    return dblade_align_up(bytes + v->pad, v->gran);
}

// ggml types whose rows a GPU buffer pads: every block-quantized one (not f32, f16, bf16)
static bool padded_type(uint32_t type) {
    return type != 0 && type != 1 && type != 30;
}

static uint64_t layer_span(const struct dblade_vram * v, const struct dblade_layout_layer * l) {
    return tensor_span(v, l->k_bytes) + tensor_span(v, l->v_bytes);
}

static uint32_t slots_wanted(uint32_t n_streamed) {
    // DUALBLADE_VRAM_SLOTS=0: a slot per layer (nothing shared: the oracle for ordering bugs)
    const char * env = getenv("DUALBLADE_VRAM_SLOTS");
    uint32_t     n   = env && *env ? (uint32_t) strtoul(env, NULL, 10) : DBLADE_VRAM_SLOTS;
    n                = n == 0 || n > n_streamed ? n_streamed : n;
    return n;
}

uint64_t dblade_vram_tensor_len(const struct dblade_tensor * t) {
    const uint64_t len = dblade_align_up(t->hwm, DBLADE_BLOCK);
    return len < t->map_bytes ? len : t->map_bytes;
}

// bytes of host memory for copies, page-locked where the driver and the limits allow; *pinned says
static uint8_t * host_alloc(struct dblade_vram * v, uint64_t bytes, bool * pinned) {
    uint8_t * p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (p == MAP_FAILED) {
        return NULL;
    }
    // DUALBLADE_PIN=0: never page-locked (what a failing lock leaves; for tests and comparison)
    const bool off = dblade_env_off("DUALBLADE_PIN");
    CUresult   r   = off ? 1 : v->cu.MemHostRegister(p, bytes, 0);
    *pinned        = r == 0;
    if (r != 0 && !*v->pin_why) {
        snprintf(v->pin_why, sizeof(v->pin_why), "%s", off ? "DUALBLADE_PIN=0" : dblade_cuda_error(&v->cu, r));
    }
    return p;
}

static void host_free(struct dblade_vram * v, uint8_t * p, uint64_t bytes, bool pinned) {
    if (p) {
        if (pinned) {
            v->cu.MemHostUnregister(p);
        }
        munmap(p, bytes);
    }
}

int dblade_vram_wb_reserve(struct dblade_vram * v, uint64_t bytes) {
    if (bytes <= v->wb_bytes) {
        return 0;
    }
    bytes = dblade_align_up(bytes + bytes / 2, DBLADE_HUGE_PAGE);
    host_free(v, v->wb, v->wb_bytes, v->wb_pinned);
    v->wb       = host_alloc(v, bytes, &v->wb_pinned);
    v->wb_bytes = v->wb ? bytes : 0;
    return v->wb ? 0 : -ENOMEM;
}

// the engines reading the store for the ring, per lane: O_DIRECT (the direct path), and buffered (the page
// cache: the same file, opened again without O_DIRECT)
static int engines_open(struct dblade_vram * v) {
    if (!v->env.store) {
        return 0;
    }
    int rc = dblade_store_open_buffered(v->env.store, &v->buffered);
    if (rc < 0) {
        return rc;
    }
    for (uint32_t l = 0; l < v->n_lanes && rc >= 0; l++) {
        rc = dblade_io_open_map(&v->lanes[l].io_direct, &v->env.store->map);
        if (rc == 0) {
            dblade_io_tune(v->lanes[l].io_direct, v->env.store->shape); // the buffered one reads the page cache
        }
        rc = rc < 0 ? rc : dblade_io_open_map(&v->lanes[l].io_buffered, &v->buffered);
    }
    return rc;
}

// half the CPUs copy the page cache into the ring (the GPU computes: the host's threads wait meanwhile), the
// caller among them; at most 8 (memory bandwidth, not threads, bounds it from there)
static int copiers_open(struct dblade_vram * v) {
    const long     ncpu    = sysconf(_SC_NPROCESSORS_ONLN);
    const uint32_t helpers = ncpu >= 4 ? (uint32_t) (ncpu / 2 < 8 ? ncpu / 2 : 8) - 1 : ncpu >= 2 ? 1 : 0;
    return dblade_pcopy_open(&v->pcopy, helpers);
}

static int setup(struct dblade_vram * v, const char * device, bool quantized) {
    v->pad         = quantized ? DEVICE_PAD : 0;
    // DUALBLADE_AHEAD_MAX_ROWS: the largest ubatch that reads ahead (tests, bisections; default: all);
    // DUALBLADE_READ_AHEAD=0: none does (a bisection's switch)
    const char * ahead = getenv("DUALBLADE_AHEAD_MAX_ROWS");
    v->ahead_max_rows  = ahead && atoi(ahead) > 0 ? (uint32_t) atoi(ahead) : VRAM_AHEAD_MAX_ROWS;
    if (dblade_env_off("DUALBLADE_READ_AHEAD")) {
        v->ahead_max_rows = 0;
    }
    v->ahead_held = v->ahead_max_rows == 0;
    // DUALBLADE_READ_LANES (VRAM_READ_LANES by default):
    //   1     one lane: a layer's reads never start beside another's (the queue drains between layers);
    //   tail  two: the next direct layer's reads start on the second lane once the last of the layer before
    //         have gone to the device (its engine's tail), so the queue stays full across layers;
    //   2     two: direct layers read whole side by side, which measured 1.04-1.20x one lane in some runs
    //         and 0.73-0.76x in others on virtio disks (bench_ring direct, interleaved rounds)
    const char * lanes = getenv("DUALBLADE_READ_LANES");
    const char * mode  = lanes && *lanes ? lanes : VRAM_READ_LANES;
    if (strcmp(mode, "1") && strcmp(mode, "tail") && strcmp(mode, "2")) {
        dblade_set_error("DUALBLADE_READ_LANES=%s is not a lane setting: use 1, tail or 2", mode);
        return -EINVAL;
    }
    v->n_lanes      = strcmp(mode, "1") ? VRAM_LANES : 1;
    v->side_by_side = !strcmp(mode, "2");
    v->pending     = -1;
    v->il0         = 0;
    v->il1         = INT32_MAX;
    int rc         = dblade_cuda_load(&v->cu);
    if (rc < 0) {
        return rc;
    }
    CU_TRY(v, v->cu.Init(0), "cuInit");
    if ((rc = find_device(v, device)) < 0) {
        return rc;
    }
    CU_TRY(v, v->cu.DevicePrimaryCtxRetain(&v->ctx, v->dev), "cuDevicePrimaryCtxRetain");
    CU_TRY(v, v->cu.CtxPushCurrent(v->ctx), "cuCtxPushCurrent");
    CUcontext           popped;
    CUmemAllocationProp prop = { 0 };
    prop.type                = 1;
    prop.location.type       = 1;
    prop.location.id         = v->dev;
    CUresult r               = v->cu.StreamCreate(&v->stream, CU_STREAM_NON_BLOCKING);
    if (r == 0) {
        r = v->cu.MemGetAllocationGranularity(&v->gran, &prop, 0);
    }
    if (r != 0) {
        dblade_set_error("CUDA: cannot set up VRAM streaming: %s (%d)", dblade_cuda_error(&v->cu, r), r);
        v->cu.CtxPopCurrent(&popped);
        return -EIO;
    }
    bool on_host_paths = false; // a streamed layer lives on the page cache or the direct path
    for (uint32_t i = 0; i < v->env.n_layout; i++) {
        const struct dblade_layout_layer * l = &v->env.layout[i];
        if (l->flags & DBLADE_LAYOUT_STREAMED) {
            const uint64_t span = layer_span(v, l);
            v->va_bytes += span;
            v->slot_bytes = span > v->slot_bytes ? span : v->slot_bytes;
            v->max_il     = l->il > v->max_il ? l->il : v->max_il;
            v->n_streamed++;
            on_host_paths |= l->path != DBLADE_PATH_RAM;
        }
    }
    v->n_slots    = slots_wanted(v->n_streamed);
    v->slots      = calloc(v->n_slots, sizeof(*v->slots));
    v->slot_ev    = calloc(v->n_slots, sizeof(*v->slot_ev));
    v->slot_owner = malloc(v->n_slots * sizeof(*v->slot_owner));
    v->sl         = calloc(v->n_streamed ? v->n_streamed : 1, sizeof(*v->sl));
    v->index_of   = malloc(((size_t) v->max_il + 1) * sizeof(*v->index_of));
    if (!v->slots || !v->slot_ev || !v->slot_owner || !v->sl || !v->index_of) {
        v->cu.CtxPopCurrent(&popped);
        return -ENOMEM;
    }
    for (int32_t il = 0; il <= v->max_il; il++) {
        v->index_of[il] = -1;
    }
    // the streamed layers in graph (layer) order; slots by that order
    uint32_t n = 0;
    for (int32_t il = 0; il <= v->max_il; il++) {
        for (uint32_t i = 0; i < v->env.n_layout; i++) {
            const struct dblade_layout_layer * l = &v->env.layout[i];
            if (l->il == il && (l->flags & DBLADE_LAYOUT_STREAMED)) {
                v->sl[n]     = (struct dblade_streamed) { .il = il, .slot = n % v->n_slots };
                v->index_of[il] = (int32_t) n++;
            }
        }
    }
    for (uint32_t i = 0; i < v->n_slots; i++) {
        v->slot_owner[i] = -1;
        if (r == 0) {
            r = v->cu.EventCreate(&v->slot_ev[i], CU_EVENT_DISABLE_TIMING);
        }
    }
    if (r == 0) {
        r = v->cu.MemAddressReserve(&v->va, v->va_bytes, v->gran, 0, 0);
    }
    for (uint32_t i = 0; r == 0 && i < v->n_slots; i++) {
        r = v->cu.MemCreate(&v->slots[i], v->slot_bytes, &prop, 0);
        if (r != 0) {
            v->slots[i] = 0;
        }
    }
    // each layer's range onto its slot, for good (layout order is the order of the address ranges)
    uint64_t off = 0;
    for (uint32_t i = 0; r == 0 && i < v->env.n_layout; i++) {
        const struct dblade_layout_layer * l = &v->env.layout[i];
        if (l->flags & DBLADE_LAYOUT_STREAMED) {
            const uint64_t span = layer_span(v, l);
            r                   = v->cu.MemMap(v->va + off, span, 0, v->slots[v->sl[v->index_of[l->il]].slot], 0);
            off += span;
        }
    }
    if (r == 0) {
        const CUmemAccessDesc access = { .location = { .type = 1, .id = v->dev }, .flags = 3 };
        r                            = v->cu.MemSetAccess(v->va, v->va_bytes, &access, 1);
    }
    if (r == 0) {
        // rows no layer has written yet are read (and masked) by attention: finite from the start
        r = v->cu.MemsetD8Async(v->va, 0, v->va_bytes, v->stream);
    }
    if (r == 0) {
        r = v->cu.StreamSynchronize(v->stream);
    }
    if (r != 0) {
        dblade_set_error("CUDA: cannot reserve %u VRAM slots of %llu bytes for %u streamed layers: %s (%d)",
                         v->n_slots, (unsigned long long) v->slot_bytes, v->n_streamed, dblade_cuda_error(&v->cu, r),
                         r);
        v->cu.CtxPopCurrent(&popped);
        return r == 2 /* CUDA_ERROR_OUT_OF_MEMORY */ ? -ENOMEM : -EIO;
    }
    rc = 0;
    if (on_host_paths && v->env.ring_bytes > 0) {
        v->ring = host_alloc(v, v->env.ring_bytes, &v->ring_pinned);
        v->ring_bytes = v->ring ? v->env.ring_bytes : 0;
        rc            = v->ring ? engines_open(v) : -ENOMEM;
        rc            = rc < 0 ? rc : copiers_open(v);
    }
    v->cu.CtxPopCurrent(&popped);
    return rc;
}

void dblade_vram_destroy(struct dblade_vram * v) {
    if (!v) {
        return;
    }
    dblade_worker_destroy(&v->lane_worker); // lane 0's worker (the KV object's) has stopped already
    pthread_cond_destroy(&v->read_done);
    for (int l = 0; l < VRAM_LANES; l++) {
        dblade_io_close(v->lanes[l].io_direct);
        dblade_io_close(v->lanes[l].io_buffered);
    }
    dblade_pcopy_close(v->pcopy);
    dblade_store_close_buffered(&v->buffered);
    if (v->ctx) {
        CUcontext popped;
        v->cu.CtxPushCurrent(v->ctx);
        if (v->stream) {
            v->cu.StreamSynchronize(v->stream);
            v->cu.StreamDestroy(v->stream);
        }
        host_free(v, v->ring, v->ring_bytes, v->ring_pinned);
        host_free(v, v->wb, v->wb_bytes, v->wb_pinned);
        for (uint32_t i = 0; v->slot_ev && i < v->n_slots; i++) {
            if (v->slot_ev[i]) {
                v->cu.EventDestroy(v->slot_ev[i]);
            }
        }
        if (v->va) {
            v->cu.MemUnmap(v->va, v->va_bytes);
            v->cu.MemAddressFree(v->va, v->va_bytes);
        }
        for (uint32_t i = 0; v->slots && i < v->n_slots; i++) {
            if (v->slots[i]) {
                v->cu.MemRelease(v->slots[i]);
            }
        }
        v->cu.CtxPopCurrent(&popped);
        v->cu.DevicePrimaryCtxRelease(v->dev);
    }
    free(v->slots);
    free(v->slot_ev);
    free(v->slot_owner);
    free(v->sl);
    free(v->index_of);
    dblade_cuda_unload(&v->cu);
    free(v);
}

// The streamed tensor t gets its device address (the slots are set up by the first one).
int dblade_vram_attach(struct dblade_vram ** vp, const struct dblade_vram_env * env, struct dblade_tensor * t,
                       const char * device, uint32_t type_k, uint32_t type_v) {
    if (!device) {
        dblade_set_error("layer %d is to be streamed into VRAM, but llama.cpp keeps its KV in host memory "
                         "(is the layer on the GPU? n_gpu_layers, offload_kqv)", t->il);
        return -EINVAL;
    }
    if (!*vp) {
        struct dblade_vram * v = calloc(1, sizeof(*v));
        if (!v) {
            return -ENOMEM;
        }
        v->env = *env;
        dblade_worker_init(&v->lane_worker, env->lock);
        pthread_cond_init(&v->read_done, NULL);
        for (int l = 0; l < VRAM_LANES; l++) {
            v->lanes[l].v      = v;
            v->lanes[l].worker = l == 0 ? env->worker : &v->lane_worker;
        }
        const int rc = setup(v, device, padded_type(type_k) || padded_type(type_v));
        if (rc < 0) {
            char why[256];
            snprintf(why, sizeof(why), "%s", dblade_get_error());
            dblade_vram_destroy(v);
            dblade_set_error("%s", why);
            return rc;
        }
        *vp = v;
    }
    struct dblade_vram * v   = *vp;
    uint64_t             off = 0;
    for (uint32_t i = 0; i < v->env.n_layout; i++) {
        const struct dblade_layout_layer * l = &v->env.layout[i];
        if (!(l->flags & DBLADE_LAYOUT_STREAMED)) {
            continue;
        }
        if (l->il == t->il) {
            struct dblade_streamed * s = &v->sl[v->index_of[t->il]];
            t->dev                     = (uint64_t) v->va + off + (t->which ? tensor_span(v, l->k_bytes) : 0);
            t->vslot                   = s->slot;
            if (!t->which) {
                s->k = t;
            }
            break;
        }
        off += layer_span(v, l);
    }
    if (!t->dev) {
        dblade_set_error("layer %d is not a streamed layer of the plan", t->il);
        return -EINVAL;
    }
    // a pinned host copy is page-locked: copies from it run at the link's full speed (it is counted in
    // the budget already, and never moves)
    if (t->path == DBLADE_PATH_RAM) {
        CUcontext popped;
        v->cu.CtxPushCurrent(v->ctx);
        t->host_registered = !dblade_env_off("DUALBLADE_PIN") && v->cu.MemHostRegister(t->addr, t->map_bytes, 0) == 0;
        v->cu.CtxPopCurrent(&popped);
    }
    return 0;
}

void dblade_vram_detach(struct dblade_vram * v, struct dblade_tensor * t) {
    if (v && t->host_registered) {
        CUcontext popped;
        v->cu.CtxPushCurrent(v->ctx);
        v->cu.MemHostUnregister(t->addr);
        v->cu.CtxPopCurrent(&popped);
        t->host_registered = false;
    }
    if (v && t->dev && t->il <= v->max_il && v->index_of[t->il] >= 0) {
        struct dblade_streamed * s = &v->sl[v->index_of[t->il]];
        if (v->pending == v->index_of[t->il]) {
            v->pending = -1;
        }
        if (!t->which && s->k == t) {
            s->k = NULL;
        }
    }
    t->dev = 0;
}

void dblade_vram_stats(const struct dblade_vram * v, struct dblade_stats * out) {
    if (!v) {
        snprintf(out->vram_why, sizeof(out->vram_why), "%s", "no layer streamed into VRAM");
        return;
    }
    out->vram_slots       = v->n_slots;
    out->vram_streamed    = v->n_streamed;
    out->vram_slot_bytes  = v->slot_bytes;
    out->h2d_bytes        = v->h2d_bytes;
    out->h2d_pinned_bytes = v->h2d_pinned_bytes;
    out->d2h_bytes        = v->d2h_bytes;
    out->copy_wait_ns     = v->copy_wait_ns;
    out->vram_ring_bytes  = v->ring_bytes;
    out->vram_ring_pinned = v->ring ? v->ring_pinned : 0;
    out->vram_ring_read_bytes = v->ring_read_bytes;
    out->vram_ring_around_bytes = v->ring_around_bytes;
    out->vram_ring_overlapped   = v->ring_overlapped;
    snprintf(out->vram_pin_why, sizeof(out->vram_pin_why), "%s", v->pin_why);
    snprintf(out->vram_why, sizeof(out->vram_why), "%u layers take turns in %u slots of %.1f MiB (device %d)",
             v->n_streamed, v->n_slots, (double) v->slot_bytes / (1 << 20), v->dev);
}
