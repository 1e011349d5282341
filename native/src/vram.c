// The VRAM tier (GPU builds): layers whose KV lives on a host path and is copied into VRAM before the
// layer computes, through CUDA's driver API, loaded at run time (no CUDA toolkit needed to build).
//
// Every streamed K and V tensor has a device address of its own that never changes (llama.cpp's
// reused graphs and CUDA graphs keep pointers), reserved once with cuMemAddressReserve. Behind those
// addresses are a few physical slots (cuMemCreate): streamed layer number i (in layer order) is mapped
// onto slot i mod n_slots, so the slots cost what n_slots layers cost, whatever the context.
//
// The graph stops after each streamed layer's first node (`attn_norm-<il>`, through llama.cpp's eval
// callback) and after the last layer (`result_norm`); there the GPU is idle:
//  1. the rows the previous streamed layer stored go back to its host path (device -> host);
//  2. the layer about to compute is made resident on its host path (the fences of the CPU paths:
//     staging, I/O waits and the pipeline's prefetch work as on the CPU) and copied into its slot:
//     rows [0, n_kv) of K and V, the rows attention reads.
// Rows a slot holds beyond what was copied belong to another layer: finite, and masked.
//
// This file owns: the driver's function table, the context, the copy stream, the address
// reservation and the slots, the cut protocol and its counters. It calls the host fences (cache.c)
// and nothing else of the module.

#define _GNU_SOURCE
#include "residency.h"

#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// --- the few driver API declarations used (cuda.h, CUDA >= 11.2) ---
typedef int                          CUresult;
typedef int                          CUdevice;
typedef struct CUctx_st *            CUcontext;
typedef struct CUstream_st *         CUstream;
typedef unsigned long long           CUdeviceptr;
typedef unsigned long long           CUmemGenericAllocationHandle;

typedef struct {
    int type; // CU_MEM_LOCATION_TYPE_DEVICE = 1
    int id;
} CUmemLocation;

typedef struct {
    int           type;                 // CU_MEM_ALLOCATION_TYPE_PINNED = 1
    int           requestedHandleTypes; // CU_MEM_HANDLE_TYPE_NONE = 0
    CUmemLocation location;
    void *        win32HandleMetaData;
    struct {
        unsigned char  compressionType;
        unsigned char  gpuDirectRDMACapable;
        unsigned short usage;
        unsigned char  reserved[4];
    } allocFlags;
} CUmemAllocationProp;

typedef struct {
    CUmemLocation location;
    int           flags; // CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 3
} CUmemAccessDesc;

#define CU_STREAM_NON_BLOCKING 1u

struct cuda_api {
    CUresult (*Init)(unsigned);
    CUresult (*GetErrorString)(CUresult, const char **);
    CUresult (*DeviceGet)(CUdevice *, int);
    CUresult (*DeviceGetByPCIBusId)(CUdevice *, const char *);
    CUresult (*DevicePrimaryCtxRetain)(CUcontext *, CUdevice);
    CUresult (*DevicePrimaryCtxRelease)(CUdevice);
    CUresult (*CtxPushCurrent)(CUcontext);
    CUresult (*CtxPopCurrent)(CUcontext *);
    CUresult (*CtxSynchronize)(void);
    CUresult (*StreamCreate)(CUstream *, unsigned);
    CUresult (*StreamDestroy)(CUstream);
    CUresult (*StreamSynchronize)(CUstream);
    CUresult (*MemGetAllocationGranularity)(size_t *, const CUmemAllocationProp *, int);
    CUresult (*MemAddressReserve)(CUdeviceptr *, size_t, size_t, CUdeviceptr, unsigned long long);
    CUresult (*MemAddressFree)(CUdeviceptr, size_t);
    CUresult (*MemCreate)(CUmemGenericAllocationHandle *, size_t, const CUmemAllocationProp *, unsigned long long);
    CUresult (*MemRelease)(CUmemGenericAllocationHandle);
    CUresult (*MemMap)(CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle, unsigned long long);
    CUresult (*MemUnmap)(CUdeviceptr, size_t);
    CUresult (*MemSetAccess)(CUdeviceptr, size_t, const CUmemAccessDesc *, size_t);
    CUresult (*MemsetD8Async)(CUdeviceptr, unsigned char, size_t, CUstream);
    CUresult (*MemcpyHtoDAsync)(CUdeviceptr, const void *, size_t, CUstream);
    CUresult (*MemcpyDtoHAsync)(void *, CUdeviceptr, size_t, CUstream);
    CUresult (*MemHostRegister)(void *, size_t, unsigned);
    CUresult (*MemHostUnregister)(void *);
};

struct dblade_vram {
    struct cuda_api cu;
    void *          lib;
    CUdevice        dev;
    CUcontext       ctx;
    CUstream        stream;
    size_t          gran;
    CUdeviceptr     va;       // every streamed tensor's address, one reservation
    uint64_t        va_bytes;
    uint32_t        n_slots;
    uint64_t        slot_bytes;
    CUmemGenericAllocationHandle * slots;
    uint32_t        n_streamed;
    int32_t         max_il;   // the last streamed layer
    // the streamed layers in graph order, built at setup: the cuts look them up, never scan
    struct dblade_tensor ** by_il;    // [il]: K of streamed layer il once attached, else NULL
    int32_t *               next_il;  // [il]: the next streamed layer after il, -1 after the last
    int32_t                 first_il; // the first streamed layer
    uint64_t        pad;      // room after each tensor for the GPU buffer's padding
    // the cut protocol
    struct dblade_tensor * pending;         // K of the layer that computed since the last cut: its rows go back
    uint64_t               pending_lo, pending_hi; // rows it stored
    struct dblade_tensor * prefetched;      // K of the next layer, whose copy into its slot is under way
    uint32_t               prefetched_n_kv;
    bool                   busy;            // a streamed layer may compute: the last graph passed no result_norm
    // counters (session lock)
    _Atomic uint64_t h2d_bytes, h2d_pinned_bytes, d2h_bytes, copy_wait_ns; // read by stats without the graph's lock
};

static const char * cu_err(const struct dblade_vram * v, CUresult r) {
    const char * s = NULL;
    if (v->cu.GetErrorString) {
        v->cu.GetErrorString(r, &s);
    }
    return s ? s : "unknown CUDA error";
}

static int load_driver(struct dblade_vram * v) {
    // DUALBLADE_CUDA_LIB: another driver library (test_vram's stand-in on machines without a GPU)
    const char * name = getenv("DUALBLADE_CUDA_LIB") ? getenv("DUALBLADE_CUDA_LIB") : "libcuda.so.1";
    v->lib            = dlopen(name, RTLD_NOW | RTLD_LOCAL);
    if (!v->lib) {
        dblade_set_error("cannot load the CUDA driver (%s): %s", name, dlerror());
        return -ENOENT;
    }
    // versioned names where the ABI changed (what cuda.h's macros select)
    static const struct { size_t off; const char * name; } syms[] = {
#define SYM(f, n) { offsetof(struct cuda_api, f), n }
        SYM(Init, "cuInit"),
        SYM(GetErrorString, "cuGetErrorString"),
        SYM(DeviceGet, "cuDeviceGet"),
        SYM(DeviceGetByPCIBusId, "cuDeviceGetByPCIBusId"),
        SYM(DevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain"),
        SYM(DevicePrimaryCtxRelease, "cuDevicePrimaryCtxRelease_v2"),
        SYM(CtxPushCurrent, "cuCtxPushCurrent_v2"),
        SYM(CtxPopCurrent, "cuCtxPopCurrent_v2"),
        SYM(CtxSynchronize, "cuCtxSynchronize"),
        SYM(StreamCreate, "cuStreamCreate"),
        SYM(StreamDestroy, "cuStreamDestroy_v2"),
        SYM(StreamSynchronize, "cuStreamSynchronize"),
        SYM(MemGetAllocationGranularity, "cuMemGetAllocationGranularity"),
        SYM(MemAddressReserve, "cuMemAddressReserve"),
        SYM(MemAddressFree, "cuMemAddressFree"),
        SYM(MemCreate, "cuMemCreate"),
        SYM(MemRelease, "cuMemRelease"),
        SYM(MemMap, "cuMemMap"),
        SYM(MemUnmap, "cuMemUnmap"),
        SYM(MemSetAccess, "cuMemSetAccess"),
        SYM(MemsetD8Async, "cuMemsetD8Async"),
        SYM(MemcpyHtoDAsync, "cuMemcpyHtoDAsync_v2"),
        SYM(MemcpyDtoHAsync, "cuMemcpyDtoHAsync_v2"),
        SYM(MemHostRegister, "cuMemHostRegister_v2"),
        SYM(MemHostUnregister, "cuMemHostUnregister"),
#undef SYM
    };
    for (size_t i = 0; i < sizeof(syms) / sizeof(syms[0]); i++) {
        void * f = dlsym(v->lib, syms[i].name);
        if (!f) {
            dblade_set_error("the CUDA driver has no %s (too old for VRAM streaming: CUDA 11.2 or later)",
                             syms[i].name);
            return -ENOSYS;
        }
        memcpy((char *) &v->cu + syms[i].off, &f, sizeof(f));
    }
    return 0;
}

#define CU_TRY(v, call, what)                                                                   \
    do {                                                                                        \
        const CUresult r_ = (call);                                                             \
        if (r_ != 0) {                                                                          \
            dblade_set_error("CUDA: %s failed: %s (%d)", what, cu_err(v, r_), r_);              \
            return -EIO;                                                                        \
        }                                                                                       \
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

static int vram_setup(struct dblade_session * s, struct dblade_vram * v, const char * device, bool quantized) {
    v->pad = quantized ? DEVICE_PAD : 0;
    int rc = load_driver(v);
    if (rc < 0) {
        return rc;
    }
    CU_TRY(v, v->cu.Init(0), "cuInit");
    if ((rc = find_device(v, device)) < 0) {
        return rc;
    }
    CU_TRY(v, v->cu.DevicePrimaryCtxRetain(&v->ctx, v->dev), "cuDevicePrimaryCtxRetain");
    CU_TRY(v, v->cu.CtxPushCurrent(v->ctx), "cuCtxPushCurrent");
    CUcontext popped;
    rc = 0;
    CUmemAllocationProp prop = { 0 };
    prop.type                = 1;
    prop.location.type       = 1;
    prop.location.id         = v->dev;
    CUresult r = v->cu.StreamCreate(&v->stream, CU_STREAM_NON_BLOCKING);
    if (r == 0) {
        r = v->cu.MemGetAllocationGranularity(&v->gran, &prop, 0);
    }
    if (r != 0) {
        dblade_set_error("CUDA: cannot set up VRAM streaming: %s (%d)", cu_err(v, r), r);
        v->cu.CtxPopCurrent(&popped);
        return -EIO;
    }
    for (uint32_t i = 0; i < s->n_layout; i++) {
        const struct dblade_layout_layer * l = &s->layout[i].l;
        if (l->flags & DBLADE_LAYOUT_STREAMED) {
            const uint64_t span = layer_span(v, l);
            v->va_bytes += span;
            v->slot_bytes = span > v->slot_bytes ? span : v->slot_bytes;
            v->max_il     = l->il > v->max_il ? l->il : v->max_il;
            v->n_streamed++;
        }
    }
    v->n_slots = slots_wanted(v->n_streamed);
    v->slots   = calloc(v->n_slots, sizeof(*v->slots));
    v->by_il   = calloc((size_t) v->max_il + 1, sizeof(*v->by_il));
    v->next_il = malloc(((size_t) v->max_il + 1) * sizeof(*v->next_il));
    if (!v->slots || !v->by_il || !v->next_il) {
        v->cu.CtxPopCurrent(&popped);
        return -ENOMEM;
    }
    for (int32_t il = 0; il <= v->max_il; il++) {
        v->next_il[il] = -1;
    }
    v->first_il = -1;
    for (uint32_t i = s->n_layout; i-- > 0;) { // backwards: each layer learns the next streamed one
        const struct dblade_layout_layer * l = &s->layout[i].l;
        if ((l->flags & DBLADE_LAYOUT_STREAMED) && l->il >= 0) {
            for (int32_t il = l->il - 1; il >= 0 && (v->next_il[il] < 0 || v->next_il[il] > l->il); il--) {
                v->next_il[il] = l->il;
            }
            v->first_il = v->first_il < 0 || l->il < v->first_il ? l->il : v->first_il;
        }
    }
    r = v->cu.MemAddressReserve(&v->va, v->va_bytes, v->gran, 0, 0);
    for (uint32_t i = 0; r == 0 && i < v->n_slots; i++) {
        r = v->cu.MemCreate(&v->slots[i], v->slot_bytes, &prop, 0);
        if (r != 0) {
            v->slots[i] = 0;
        }
    }
    // each layer's range onto its slot, for good
    uint64_t off = 0;
    uint32_t n   = 0;
    for (uint32_t i = 0; r == 0 && i < s->n_layout; i++) {
        const struct dblade_layout_layer * l = &s->layout[i].l;
        if (l->flags & DBLADE_LAYOUT_STREAMED) {
            const uint64_t span = layer_span(v, l);
            r = v->cu.MemMap(v->va + off, span, 0, v->slots[n % v->n_slots], 0);
            off += span;
            n++;
        }
    }
    if (r == 0) {
        const CUmemAccessDesc access = { .location = { .type = 1, .id = v->dev }, .flags = 3 };
        r = v->cu.MemSetAccess(v->va, v->va_bytes, &access, 1);
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
                         v->n_slots, (unsigned long long) v->slot_bytes, v->n_streamed, cu_err(v, r), r);
        rc = r == 2 /* CUDA_ERROR_OUT_OF_MEMORY */ ? -ENOMEM : -EIO;
    }
    v->cu.CtxPopCurrent(&popped);
    return rc;
}

void dblade_vram_destroy(struct dblade_session * s) {
    struct dblade_vram * v = s->vram;
    if (!v) {
        return;
    }
    s->vram = NULL;
    if (v->ctx) {
        CUcontext popped;
        v->cu.CtxPushCurrent(v->ctx);
        if (v->stream) {
            v->cu.StreamSynchronize(v->stream);
            v->cu.StreamDestroy(v->stream);
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
    free(v->by_il);
    free(v->next_il);
    if (v->lib) {
        dlclose(v->lib);
    }
    free(v);
}

// The streamed tensor t gets its device address (the session's slots are set up by the first one).
int dblade_vram_attach(struct dblade_session * s, struct dblade_tensor * t, const char * device, uint32_t type_k,
                       uint32_t type_v) {
    if (!device) {
        dblade_set_error("layer %d is to be streamed into VRAM, but llama.cpp keeps its KV in host memory "
                         "(is the layer on the GPU? n_gpu_layers, offload_kqv)", t->il);
        return -EINVAL;
    }
    if (!s->vram) {
        struct dblade_vram * v = calloc(1, sizeof(*v));
        if (!v) {
            return -ENOMEM;
        }
        s->vram      = v;
        const int rc = vram_setup(s, v, device, padded_type(type_k) || padded_type(type_v));
        if (rc < 0) {
            char why[256];
            snprintf(why, sizeof(why), "%s", dblade_get_error());
            dblade_vram_destroy(s);
            dblade_set_error("%s", why);
            return rc;
        }
    }
    struct dblade_vram * v   = s->vram;
    uint64_t             off = 0;
    uint32_t             n   = 0;
    for (uint32_t i = 0; i < s->n_layout; i++) {
        const struct dblade_layout_layer * l = &s->layout[i].l;
        if (!(l->flags & DBLADE_LAYOUT_STREAMED)) {
            continue;
        }
        if (l->il == t->il) {
            t->dev   = (uint64_t) v->va + off + (t->which ? tensor_span(v, l->k_bytes) : 0);
            t->vslot = n % v->n_slots;
            if (!t->which) {
                v->by_il[t->il] = t;
            }
            break;
        }
        off += layer_span(v, l);
        n++;
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
        t->host_registered = v->cu.MemHostRegister(t->addr, t->map_bytes, 0) == 0;
        v->cu.CtxPopCurrent(&popped);
    }
    return 0;
}

void dblade_vram_detach(struct dblade_session * s, struct dblade_tensor * t) {
    struct dblade_vram * v = s->vram;
    if (v && v->pending && (v->pending == t || v->pending->pair == t)) {
        v->pending = NULL;
    }
    if (v && t->host_registered) {
        CUcontext popped;
        v->cu.CtxPushCurrent(v->ctx);
        v->cu.MemHostUnregister(t->addr);
        v->cu.CtxPopCurrent(&popped);
        t->host_registered = false;
    }
    if (v && t->dev && !t->which && t->il <= v->max_il && v->by_il[t->il] == t) {
        v->by_il[t->il] = NULL;
    }
    t->dev = 0;
}

// queues the copies of rows [lo, hi) of both tensors of a layer, into VRAM or back to the host
static CUresult enqueue_copy(struct dblade_vram * v, struct dblade_tensor * k, uint64_t lo, uint64_t hi, bool to_host) {
    CUresult r = 0;
    for (struct dblade_tensor * t = k; t && r == 0; t = t == k ? k->pair : NULL) {
        const uint64_t a = lo * t->row_bytes, b = hi * t->row_bytes > t->bytes ? t->bytes : hi * t->row_bytes;
        if (b <= a) {
            continue;
        }
        if (to_host) {
            r = v->cu.MemcpyDtoHAsync(t->addr + a, t->dev + a, b - a, v->stream);
            atomic_fetch_add(&v->d2h_bytes, b - a);
        } else {
            r = v->cu.MemcpyHtoDAsync(t->dev + a, t->addr + a, b - a, v->stream);
            atomic_fetch_add(&v->h2d_bytes, b - a);
            atomic_fetch_add(&v->h2d_pinned_bytes, t->host_registered ? b - a : 0);
        }
    }
    return r;
}

// waits for every copy queued so far (the GPU needs them before the layer computes): the copy stall
static int wait_copies(struct dblade_session * s, struct dblade_vram * v, struct dblade_tensor * k, CUresult r,
                       const char * what) {
    const uint64_t t0 = dblade_now_ns();
    if (r == 0) {
        r = v->cu.StreamSynchronize(v->stream);
    }
    const uint64_t dt = dblade_now_ns() - t0;
    atomic_fetch_add(&v->copy_wait_ns, dt);
    atomic_fetch_add(&k->io_wait_ns, dt);
    if (r != 0) {
        pthread_mutex_lock(&s->lock);
        dblade_fail(s, -EIO, "CUDA: copying layer %d %s failed: %s (%d)", k->il, what, cu_err(v, r), r);
        pthread_mutex_unlock(&s->lock);
        return -EIO;
    }
    return 0;
}

static int copy_layer(struct dblade_session * s, struct dblade_vram * v, struct dblade_tensor * k, uint64_t lo,
                      uint64_t hi, bool to_host) {
    return wait_copies(s, v, k, enqueue_copy(v, k, lo, hi, to_host), to_host ? "out of VRAM" : "into VRAM");
}

// the rows the layer that computed last stored go back to its host path
static int settle(struct dblade_session * s, struct dblade_vram * v) {
    struct dblade_tensor * k = v->pending;
    v->pending               = NULL;

    return k ? copy_layer(s, v, k, v->pending_lo, v->pending_hi, true) : 0;
}

int dblade_vram_settle(struct dblade_session * s, bool sync_gpu) {
    struct dblade_vram * v = s->vram;
    if (v) {
        v->prefetched = NULL; // outside a graph: host copies may change before the next one
    }
    if (!v || !v->pending) {
        return 0;
    }
    CUcontext popped;
    v->cu.CtxPushCurrent(v->ctx);
    if (sync_gpu) {
        v->cu.CtxSynchronize(); // outside a cut the graph's last kernels may still run
        v->busy = false;
    }
    const int rc = settle(s, v);
    v->cu.CtxPopCurrent(&popped);
    return rc;
}

void dblade_vram_forget(struct dblade_session * s, const struct dblade_cache * c) {
    if (s->vram && s->vram->pending && (!c || s->vram->pending->cache == c)) {
        s->vram->pending = NULL; // the cells were emptied: nothing to bring back
    }
    if (s->vram) {
        s->vram->prefetched = NULL;
    }
    // a graph cut short (cleared in between) is not checked for its cuts
    for (struct dblade_cache * o = s->caches; o; o = o->next) {
        if (!c || o == c) {
            o->ub_set = false;
        }
    }
}

void dblade_vram_stats(const struct dblade_session * s, struct dblade_stats * out) {
    const struct dblade_vram * v = s->vram;
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
    snprintf(out->vram_why, sizeof(out->vram_why), "%u layers take turns in %u slots of %.1f MiB (device %d)",
             v->n_streamed, v->n_slots, (double) v->slot_bytes / (1 << 20), v->dev);
}

// --- the cut protocol ---

// "attn_norm-<il>" -> il; "result_norm" -> INT32_MAX; anything else -> -1
static int32_t cut_layer(const char * name) {
    if (name[0] == 'a' && !strncmp(name, "attn_norm-", 10)) {
        char *     end;
        const long il = strtol(name + 10, &end, 10);
        return *end == 0 && il >= 0 && il < INT32_MAX ? (int32_t) il : -1;
    }
    return name[0] == 'r' && !strcmp(name, "result_norm") ? INT32_MAX : -1;
}

static struct dblade_tensor * streamed_layer(const struct dblade_vram * v, int32_t il) {
    return il >= 0 && il <= v->max_il ? v->by_il[il] : NULL;
}

// A pinned layer's copy is queued ahead, while the GPU computes other layers: its host copy needs no
// fence (pinned RAM: always there, nothing to stage or mark).
static void prefetch(struct dblade_vram * v, struct dblade_tensor * k) {
    if (k->path != DBLADE_PATH_RAM || k->pair->path != DBLADE_PATH_RAM || !k->cache->ub_set) {
        return;
    }
    if (enqueue_copy(v, k, 0, k->cache->ub_n_kv, false) == 0) {
        v->prefetched      = k;
        v->prefetched_n_kv = k->cache->ub_n_kv;
    }
}

// The next streamed layer's copy runs while this one (and any resident layers between) compute. Its
// slot is free: the layer that held it last computed before this cut, and its rows went back (same
// stream, earlier).
static void prefetch_next(struct dblade_vram * v, struct dblade_tensor * k) {
    struct dblade_tensor * next = streamed_layer(v, v->next_il[k->il]);
    if (next && next->vslot != k->vslot) {
        prefetch(v, next);
    }
}

int dblade_session_graph_cut(struct dblade_session * s, const char * name, int ask) {
    struct dblade_vram * v = s ? s->vram : NULL;
    if (!v || !name) {
        return ask ? 0 : 1;
    }
    const int32_t il = cut_layer(name);
    if (il < 0) {
        return ask ? 0 : 1;
    }
    struct dblade_tensor * k = streamed_layer(v, il);
    if (ask) {
        return k || v->pending;
    }
    CUcontext popped;
    v->cu.CtxPushCurrent(v->ctx);
    int rc   = settle(s, v);
    v->busy = k != NULL; // result_norm: every layer of this graph has computed
    if (rc == 0 && k) {
        struct dblade_cache * c = k->cache;
        if (!c->ub_set) {
            pthread_mutex_lock(&s->lock);
            dblade_fail(s, -EPROTO, "layer %d computed without its rows being known (dblade_cache_ubatch)", il);
            pthread_mutex_unlock(&s->lock);
            rc = -EPROTO;
        } else {
            c->ub_cuts++;
            if (v->prefetched == k && v->prefetched_n_kv == c->ub_n_kv) {
                // queued at the previous cut, while the layers before computed (settle waited for it)
                rc = wait_copies(s, v, k, 0, "into VRAM");
            } else {
                for (struct dblade_tensor * t = k; t; t = t == k ? k->pair : NULL) {
                    // the host path's own fences: stage, wait for I/O, mark the rows the layer stores dirty
                    const int64_t rows[2] = { (int64_t) c->ub_lo, (int64_t) c->ub_hi - 1 };
                    dblade_fence_write(t, rows, 2, t->row_bytes);
                    dblade_fence_read(t, t->addr, (uint64_t) c->ub_n_kv * t->row_bytes);
                }
                rc = s->error ? s->error : copy_layer(s, v, k, 0, c->ub_n_kv, false);
            }
            v->prefetched = NULL;
            if (rc == 0) {
                v->pending    = k;
                v->pending_lo = c->ub_lo;
                v->pending_hi = c->ub_hi;
                prefetch_next(v, k);
            }
        }
    }
    v->cu.CtxPopCurrent(&popped);
    return rc == 0 && !s->error;
}

void dblade_cache_ubatch(struct dblade_cache * c, const int64_t * rows, int64_t n, uint32_t n_kv) {
    if (!c || !c->session->vram || n <= 0 || !rows) {
        return;
    }
    struct dblade_session * s = c->session;
    // every streamed layer of the last graph stopped at its cut, or its slot held another layer
    if (c->ub_set && c->ub_cuts < c->n_streamed) {
        pthread_mutex_lock(&s->lock);
        dblade_fail(s, -EPROTO, "the graph stopped before %u of %u streamed layers: this model's graph does not "
                    "name its layers' attention norms (attn_norm-<il>); VRAM streaming cannot run it",
                    c->n_streamed - c->ub_cuts, c->n_streamed);
        pthread_mutex_unlock(&s->lock);
    }
    int64_t lo = rows[0], hi = rows[0];
    for (int64_t i = 1; i < n; i++) {
        lo = rows[i] < lo ? rows[i] : lo;
        hi = rows[i] > hi ? rows[i] : hi;
    }
    c->ub_lo   = (uint64_t) lo;
    c->ub_hi   = (uint64_t) hi + 1;
    c->ub_n_kv = n_kv;
    c->ub_cuts = 0;
    c->ub_set  = true;
    // The graph's first streamed layer is copied while the layers before it compute (and the inputs
    // travel), when the last graph is done with every slot (it passed result_norm, or a flush waited).
    struct dblade_vram * v = s->vram;
    if (v->busy || v->pending || v->prefetched) {
        return;
    }
    struct dblade_tensor * first = streamed_layer(v, v->first_il);
    if (first && first->cache == c) { // its rows are this ubatch's (another cache's come with its own call)
        CUcontext popped;
        v->cu.CtxPushCurrent(v->ctx);
        prefetch(v, first);
        v->cu.CtxPopCurrent(&popped);
    }
}
