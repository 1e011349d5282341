/*
 * dualblade: KV-cache residency for llama.cpp (DUAL-BLADE, arXiv:2604.26557). The embedding program's
 * API (the Python package); dualblade-llama.h is the API the patched llama.cpp calls.
 *
 * Every layer's K/V lives in one of three places: pinned in RAM, on the page-cache path (a
 * MAP_SHARED file extent) or on the direct path (O_DIRECT to a block-aligned extent); on GPU builds a
 * layer may also stay in VRAM, or be streamed into VRAM from one of those three.
 *
 * Conventions (as liburing): opaque handles, functions return 0 or a negative errno (the calling
 * thread's dblade_last_error() says why), nothing but what the two headers declare is exported
 * (dualblade.map).
 *
 * The embedding program creates a KV object (struct dblade_kv) with a config and a layout, binds it
 * to the calling thread while it creates a llama_context (every llama_kv_cache built meanwhile
 * belongs to it), reads its statistics, flushes it, and saves and loads session files.
 */
#ifndef DUALBLADE_H
#define DUALBLADE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#    define DBLADE_API
#else
#    define DBLADE_API __attribute__((visibility("default")))
#endif

/* Bumped whenever a struct below changes layout or a function its meaning; the Python binding checks it. */
#define DBLADE_ABI_VERSION 14

enum dblade_path {
    DBLADE_PATH_RAM    = 0, /* pinned in anonymous memory, never dropped */
    DBLADE_PATH_MMAP   = 1, /* page-cache path: MAP_SHARED extent of a file */
    DBLADE_PATH_DIRECT = 2, /* direct path: O_DIRECT to a contiguous aligned extent */
    DBLADE_PATH_VRAM   = 3, /* GPU builds: in VRAM for good, allocated by llama.cpp as stock */
};

enum dblade_policy {
    DBLADE_POLICY_RAM    = 0, /* stock: every layer pinned */
    DBLADE_POLICY_MMAP   = 1, /* what does not fit the budget goes on the page-cache path */
    DBLADE_POLICY_DIRECT = 2, /* what does not fit the budget goes on the direct path */
    DBLADE_POLICY_AUTO   = 3, /* per layer, from the memory actually available */
};

#define DBLADE_BUDGET_UNLIMITED UINT64_MAX

enum dblade_config_flags {
    DBLADE_CONFIG_FORCE     = 1u << 0, /* take over a kv_device that holds something else */
    DBLADE_CONFIG_NO_VERIFY = 1u << 1, /* no CRC-32C per block on the direct path */
};

struct dblade_config {
    uint32_t     policy;       /* enum dblade_policy */
    uint32_t     flags;        /* enum dblade_config_flags */
    uint64_t     budget_bytes; /* pinned + staging bytes allowed; DBLADE_BUDGET_UNLIMITED for none */
    const char * kv_dir;       /* directory for the KV file, or NULL */
    const char * kv_device;    /* block device for the KV, or NULL */
    uint64_t     reserve_bytes; /* memory the auto policy leaves to what is not yet allocated or touched:
                                   the model's mmap'ed weights' page cache, the compute buffers a first
                                   prompt fills (the VRAM tier's ring is added by the module) */
};

/* The placement and counters of one layer, as reported to the user. */
struct dblade_layer_stats {
    int32_t  il;
    uint32_t path;           /* enum dblade_path */
    uint64_t bytes;          /* K + V */
    uint64_t resident_bytes; /* bytes in RAM now */
    uint64_t bytes_read;
    uint64_t bytes_written;
    uint64_t io_wait_ns;
    uint32_t flags;          /* enum dblade_layout_flags (DBLADE_LAYOUT_STREAMED: copied into VRAM per pass) */
    uint32_t reserved;
};

/* One request shape the store's O_DIRECT reads were measured with. */
struct dblade_io_shape_stats {
    uint32_t chunk_bytes;    /* each request's size */
    uint32_t depth;          /* requests in flight */
    uint64_t batches;        /* read batches measured with it */
    double   gib_s;          /* their recent average */
};

struct dblade_stats {
    uint32_t policy;
    uint32_t n_layers;
    uint32_t io_engine;      /* 0 none (nothing offloaded), 1 io_uring, 2 threads */
    uint32_t depth;          /* direct layers staged ahead of the one computing */
    char     io_engine_why[96];
    uint64_t n_switches;     /* path switches so far (see dblade_kv_switches) */
    uint64_t mem_limit;      /* auto: the tightest limit seen (cgroup), UINT64_MAX for none */
    uint64_t mem_available;  /* auto: MemAvailable at the last sample */
    uint64_t page_cache_room; /* auto: page cache the offloaded layers may use, at the last decision */
    uint64_t page_cache_need; /* auto: what the page-cache layers held then */
    uint64_t reserve_bytes;  /* auto: page cache left to the model's weights (their working set) */
    uint64_t chunk_bytes;    /* the direct path's staging moves in chunks of this size */
    uint32_t pool_moves;     /* 1: staging memory is reused (moved, not faulted in again) */
    uint32_t reserved0;
    uint64_t pool_bytes;     /* memory of the staging pool (at layers or idle) */
    uint64_t huge_page_bytes; /* the direct path stages into huge pages of this size (0: base pages) */
    uint64_t checksum_bytes; /* memory of the direct path's per-block CRC-32C (0: verification off) */
    uint64_t n_io_errors;    /* failed transfers so far (checksum mismatches included) */
    uint64_t staged_bytes;   /* memory of the direct path in use now */
    uint64_t staged_peak;    /* its peak */
    uint64_t budget_bytes;
    uint64_t kv_bytes_total;
    uint64_t resident_bytes;
    uint64_t bytes_read;
    uint64_t bytes_written;
    uint64_t io_wait_ns;
    /* GPU builds: layers streamed into VRAM (their host path above holds them between passes) */
    uint32_t vram_slots;     /* VRAM slots the streamed layers take turns in (0: none streamed) */
    uint32_t vram_streamed;  /* layers streamed */
    uint64_t vram_slot_bytes; /* bytes of one slot */
    uint64_t h2d_bytes;      /* copied host -> VRAM so far */
    uint64_t d2h_bytes;      /* new rows copied VRAM -> host so far */
    uint64_t copy_wait_ns;   /* time the graph waited for those copies */
    uint64_t h2d_pinned_bytes; /* of h2d_bytes, from page-locked host memory */
    uint64_t vram_ring_bytes; /* host memory the page cache and direct paths are read into ahead of the graph */
    uint64_t vram_ring_read_bytes; /* read into it so far */
    uint32_t vram_ring_pinned; /* 1: it is page-locked (copies start from it at the link's speed) */
    uint32_t reserved1;
    char     vram_why[96];   /* why nothing is streamed, or which driver and device streams */
    char     vram_pin_why[96]; /* why host memory for copies is not page-locked ("" when it is) */
    /* the store's O_DIRECT requests: the shape reads use now, picked by measuring them (the candidates
     * below), or fixed by DUALBLADE_IO_SHAPE */
    uint32_t io_chunk_bytes;
    uint32_t io_depth;
    uint32_t io_shape_fixed;
    uint32_t io_n_shapes;    /* of io_shapes filled (0: fixed, or no store) */
    struct dblade_io_shape_stats io_shapes[8];
    uint64_t vram_ring_around_bytes; /* of vram_ring_read_bytes: page-cache layers' rows a prompt wrote around the
                                        cache, read back around it (O_DIRECT) while the prompt computed */
    uint64_t vram_ring_overlapped; /* layers read into it whose reads started beside the last of another's (the
                                      device's queue kept full across layers) */
};

struct dblade_kv;

DBLADE_API int          dblade_abi_version(void);
DBLADE_API const char * dblade_path_name(uint32_t path);
DBLADE_API const char * dblade_policy_name(uint32_t policy);
/* The calling thread's last error text. */
DBLADE_API const char * dblade_last_error(void);

/* --- placement plan: geometry + budget -> a path per layer (also what `dualblade info` prints) --- */

/*
 * layer_bytes[i]: K+V bytes of layer i. Writes paths[i] and, if staging_bytes is not NULL, the
 * memory the direct path needs for its staging. Returns 0, -EINVAL, or -ENOMEM when the budget is
 * below the minimum working set (then *staging_bytes holds that minimum).
 */
DBLADE_API int dblade_plan(uint32_t policy, uint64_t budget_bytes, uint32_t n_layers,
                           const uint64_t * layer_bytes, uint32_t * paths, uint64_t * staging_bytes);

/* --- the KV object: what one llama_context's KV caches belong to --- */

/* Where one layer of the model's KV goes, planned before the context is created. */
enum dblade_layout_flags {
    /* a layer on a GPU whose KV lives on its host path (RAM, page cache or direct) and is copied into
     * a VRAM slot before the layer computes; new rows go back to the host path after it */
    DBLADE_LAYOUT_STREAMED = 1u << 0,
};

struct dblade_layout_layer {
    int32_t  il;
    uint32_t path;    /* enum dblade_path */
    uint64_t k_bytes;
    uint64_t v_bytes;
    uint32_t flags;   /* enum dblade_layout_flags */
    uint32_t reserved;
};

/*
 * With n_layers == 0 every layer of every cache is pinned in RAM. Otherwise the layout names every
 * KV layer the context will allocate (checked when the caches open) and the backing store for the
 * offloaded ones is opened here, before any weight is loaded. On failure dblade_last_error() says why.
 */
DBLADE_API int  dblade_kv_create(const struct dblade_config * cfg, uint32_t n_layers,
                                 const struct dblade_layout_layer * layers, struct dblade_kv ** out);
/* The memory the auto policy leaves to others, once known (after the model is loaded, and as prompts
 * touch the compute buffers): replaces cfg->reserve_bytes and the VRAM ring's share (allocated by then). */
DBLADE_API int  dblade_kv_set_reserve(struct dblade_kv * kv, uint64_t reserve_bytes);
/* The outputs (logits rows) a ubatch of the context created while kv is bound asks for at most: llama.cpp then
 * reserves its compute buffers for that many, not for every token of the largest ubatch (n_vocab floats a
 * token: what makes a large prefill ubatch costly). 0: llama.cpp's default (n_batch). Before the context. */
DBLADE_API int  dblade_kv_set_outputs_max(struct dblade_kv * kv, uint32_t n_outputs);
/* Asks the evaluation in progress to stop (on != 0; from any thread), or withdraws the request (0). With
 * dblade_kv_aborting installed as the context's abort callback (llama_set_abort_callback, data: kv), llama.cpp's
 * CPU backend stops between two nodes of a graph and llama_decode returns 2, the batch's positions removed.
 * The request stays until withdrawn. */
DBLADE_API int  dblade_kv_abort(struct dblade_kv * kv, int on);
/* The abort callback (ggml_abort_callback): whether dblade_kv_abort asked kv's evaluation to stop. */
DBLADE_API bool dblade_kv_aborting(void * kv);
/* Drops the caller's reference; caches still open keep the KV object alive until they close. */
DBLADE_API void dblade_kv_release(struct dblade_kv * kv);
/* Caches opened by this thread from now on belong to kv (NULL unbinds). */
DBLADE_API int  dblade_kv_bind(struct dblade_kv * kv);

/* Counters and every layer's placement at one moment (the worker keeps staging and writing back
 * between calls): fills out and up to cap layers sorted by il; returns the number of layers. */
DBLADE_API int dblade_kv_snapshot(struct dblade_kv * kv, struct dblade_stats * out, struct dblade_layer_stats * layers,
                                  uint32_t cap);
DBLADE_API int dblade_kv_stats(struct dblade_kv * kv, struct dblade_stats * out);
/* Bytes read from storage so far, every layer's (dblade_stats.bytes_read), without the rest of a snapshot: cheap
 * enough to read around every generation step. */
DBLADE_API uint64_t dblade_kv_bytes_read(struct dblade_kv * kv);
DBLADE_API int dblade_kv_layers(struct dblade_kv * kv, struct dblade_layer_stats * out, uint32_t cap);
/* One change of path of a layer (il -1: the initial placement), with its reason in words. */
struct dblade_switch {
    uint64_t t_ms; /* since the KV object was created */
    int32_t  il;
    uint32_t from, to; /* enum dblade_path */
    char     reason[100];
};
/* The last (at most 64) switches, oldest first, up to cap; returns how many there were in all. */
DBLADE_API int dblade_kv_switches(struct dblade_kv * kv, struct dblade_switch * out, uint32_t cap);
/* Moves an offloaded layer between the page-cache and the direct path (applied when the graph next
 * enters it; same address, same data). -EINVAL for a pinned or unknown layer. The auto policy may
 * move it again. */
DBLADE_API int dblade_kv_set_path(struct dblade_kv * kv, int32_t il, uint32_t path);

/* The first I/O error (sticky): 0, or -errno with its text in msg (-EBADMSG: data read back failed
 * its checksum). */
DBLADE_API int dblade_kv_error(struct dblade_kv * kv, char * msg, size_t cap);
/* Forgets the error, once the caller has cleared the caches (nothing read since is trusted). */
DBLADE_API int dblade_kv_clear_error(struct dblade_kv * kv);
/* Discards (zero = 0) or overwrites with zeros (zero = 1) every part of the store written so far:
 * nothing of the conversation stays on it. -EOPNOTSUPP where the store cannot discard. */
DBLADE_API int dblade_kv_wipe(struct dblade_kv * kv, int zero);
/* Writes back every dirty block and releases every staged layer. */
DBLADE_API int dblade_kv_flush(struct dblade_kv * kv);
/* For an idle process: flushes (as above), then gives the pages of the idle staging pool back to the
 * system; the pool keeps them otherwise, so that staging a layer costs no page faults. The next layer
 * staged faults fresh pages in, as on first use. Returns the bytes given back, or -errno. */
DBLADE_API int64_t dblade_kv_trim(struct dblade_kv * kv);

struct dblade_store_info {
    uint32_t kind;        /* 0 none, 1 file, 2 device */
    uint32_t align;       /* O_DIRECT alignment in use */
    uint32_t n_extents;   /* file extents of the reservation (1 = contiguous; 0 = unknown; the most of any member) */
    uint32_t n_members;   /* members the KV is striped over (1: not striped) */
    uint64_t data_bytes;  /* bytes reserved (a member: its share) */
    char     path[512];   /* the member, or all of them joined by ", " */
    uint64_t stripe_unit; /* bytes of one stripe (0: not striped) */
    uint64_t read_bps;    /* a member: its probed O_DIRECT read bandwidth, bytes/s (0: not probed) */
    uint32_t share;       /* a member: its stripes per pattern */
    uint32_t n_pattern;   /* stripes of one pattern */
};
/* The store: kv_dir and kv_device of struct dblade_config may each name several members, one per line
 * ("a\nb"): the KV is then striped over them, each member's share following its probed read bandwidth
 * (DUALBLADE_STRIPE_SHARES=a,b,... sets the shares, DUALBLADE_STRIPE_UNIT the stripe's bytes). */
DBLADE_API int dblade_kv_store(struct dblade_kv * kv, struct dblade_store_info * out);
/* Member m of the store (0 <= m < n_members). */
DBLADE_API int dblade_kv_store_member(struct dblade_kv * kv, uint32_t m, struct dblade_store_info * out);

/* Whether the store for this layout (its offloaded layers) can be opened under cfg, writing nothing;
 * on failure msg says why. */
DBLADE_API int dblade_store_check(const struct dblade_config * cfg, uint32_t n_layers,
                                  const struct dblade_layout_layer * layers, char * msg, size_t cap);
/* The hash a device header records for a layout (also what dblade_store_check compares). */
DBLADE_API uint64_t dblade_layout_geometry(uint32_t n_layers, const struct dblade_layout_layer * layers);

/* --- session files: a context's KV and metadata in one file (sessionfile/) --- */

/* The state mode of a KV object: in the two metadata-only modes a whole-context llama_state save or
 * restore carries the cells (at their indices, with the head) and not the rows of the tensors the
 * module owns; the module's session file holds those. */
enum dblade_state_mode {
    DBLADE_STATE_STOCK     = 0,
    DBLADE_STATE_SAVE_META = 1,
    DBLADE_STATE_LOAD_META = 2,
};
DBLADE_API int dblade_kv_state_mode(struct dblade_kv * kv, int mode);

/* A metadata section of a session file: an opaque blob of the embedding program, by kind. */
struct dblade_section {
    uint32_t     kind;
    uint32_t     reserved; /* a save: bytes of room for it to grow into (0: none) */
    const void * data;
    uint64_t     bytes;
};

/* Counters of one save or load. */
struct dblade_sessionfile_stats {
    uint64_t kv_bytes;      /* KV bytes the file holds */
    uint64_t cloned_bytes;  /* of them, put in place by FICLONERANGE (no data moved) */
    uint64_t copied_bytes;  /* by copy_file_range (in the kernel) */
    uint64_t direct_bytes;  /* by an O_DIRECT copy through a bounded buffer */
    uint64_t memory_bytes;  /* from or into pinned layers' memory */
    uint64_t checked_bytes; /* read back once to compute or check CRC-32C */
    uint64_t file_bytes;    /* size of the session file */
    char     strategy[32];  /* "clone", "copy_file_range", "direct" or a mix */
    uint64_t written_bytes; /* a save: bytes it wrote into the file (KV, checksums, metadata, header) */
    uint32_t appended;      /* a save: 1 if it appended to the file's last commit, 0 if it wrote the file whole */
    uint32_t n_patches;     /* the file's blocks held outside their home (format.h) */
    char     whole_why[96]; /* a save written whole: why it did not append */
};

/*
 * Saves the KV of every layer (offloaded ones from the store, pinned ones from memory) and the
 * sections into one file at path. Must follow a llama_state save in DBLADE_STATE_SAVE_META mode (the
 * rows per cache) and dblade_kv_flush(). A section whose `reserved` is not 0 gets that many bytes of
 * room in the file to grow into (the token history).
 *  - If path holds the commit this KV last saved or restored, the save appends: only the blocks
 *    changed since, their checksums and the tail's metadata are written, the commit made by one
 *    header write after everything it names is durable. Nothing the last commit names is overwritten:
 *    a crash at any instant leaves it whole.
 *  - Else (or with DBLADE_SAVE_WHOLE) the file is written whole and atomically: an unnamed file in
 *    path's directory, fsync, linked under a temporary name, renamed over path, the directory fsynced.
 * The file is 0600; a symlink at path (-ELOOP) or a file that is not a session file (-EEXIST) is never
 * replaced.
 */
enum { DBLADE_SAVE_WHOLE = 1 };
DBLADE_API int dblade_sessionfile_save(struct dblade_kv * kv, const char * path, const struct dblade_section * sections,
                                       uint32_t n_sections, struct dblade_sessionfile_stats * stats);
DBLADE_API int dblade_sessionfile_save_flags(struct dblade_kv * kv, const char * path,
                                             const struct dblade_section * sections, uint32_t n_sections,
                                             uint32_t flags, struct dblade_sessionfile_stats * stats);

struct dblade_sessionfile;
/* Opens and checks a session file (header, sections: CRC-32C, size, format version); reads no KV. */
DBLADE_API int  dblade_sessionfile_open(const char * path, struct dblade_sessionfile ** out);
DBLADE_API void dblade_sessionfile_close(struct dblade_sessionfile * f);
/* The section of this kind (its bytes stay owned by f), or -ENOENT. */
DBLADE_API int  dblade_sessionfile_section(struct dblade_sessionfile * f, uint32_t kind, const void ** data,
                                           uint64_t * bytes);
/* After a llama_state restore in DBLADE_STATE_LOAD_META mode: every tensor gets its rows from the file
 * (offloaded ones: copied into the KV object's own store, checked at first read by the direct path;
 * pinned ones: read and checked now). The file is only read. */
DBLADE_API int  dblade_sessionfile_restore(struct dblade_kv * kv, struct dblade_sessionfile * f,
                                           struct dblade_sessionfile_stats * stats);
/* Reads every KV block of the file once and checks it against its CRC-32C: -EBADMSG names the first bad one. */
DBLADE_API int  dblade_sessionfile_verify(struct dblade_sessionfile * f, struct dblade_sessionfile_stats * stats);

#ifdef __cplusplus
}
#endif

#endif /* DUALBLADE_H */
