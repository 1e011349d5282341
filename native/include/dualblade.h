/*
 * dualblade: KV-cache residency for llama.cpp (DUAL-BLADE, arXiv:2604.26557).
 *
 * Every layer's K/V lives in one of three places: pinned in RAM, on the page-cache path (a
 * MAP_SHARED file extent) or on the direct path (O_DIRECT to a block-aligned extent).
 *
 * Conventions (as liburing): opaque handles, functions return 0 or a negative errno,
 * nothing but what this header declares is exported.
 *
 * Two sides use this API:
 *  - the embedding program (the Python package): creates a session with a config, binds it to
 *    the calling thread while it creates a llama_context, reads statistics;
 *  - the patched llama.cpp: each llama_kv_cache opens a cache handle with its geometry while the
 *    session is bound, and closes it when destroyed. An unbound thread gets no handle and
 *    llama.cpp behaves exactly as stock.
 */
#ifndef DUALBLADE_H
#define DUALBLADE_H

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

/* Bumped whenever a struct below changes layout; the Python binding checks it. */
#define DBLADE_ABI_VERSION 9

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
    uint64_t     reserve_bytes; /* memory the model's weights need (mmap'ed: the auto policy leaves them
                                   this much page cache) */
};

/* One layer of one llama_kv_cache, as the cache allocates it. */
enum dblade_layer_flags {
    DBLADE_LAYER_SWA = 1u << 0, /* sliding-window layer */
};

struct dblade_layer_desc {
    int32_t  il;          /* layer index in the model */
    uint32_t flags;       /* enum dblade_layer_flags */
    uint32_t n_rows;      /* cells (kv_size) */
    uint32_t n_stream;
    uint64_t k_bytes;     /* whole K tensor */
    uint64_t v_bytes;     /* whole V tensor (0 for MLA) */
    uint64_t k_row_bytes; /* one cell of K */
    uint64_t v_row_bytes; /* one cell of V (row of the untransposed layout) */
    const char * device;  /* the GPU llama.cpp put the layer's KV on (its PCI bus id, or "CUDA<n>"),
                             NULL for host memory */
};

struct dblade_cache_desc {
    const char *                     name;     /* "" or the llama.cpp name tag ("swa_") */
    uint32_t                         type_k;   /* ggml_type */
    uint32_t                         type_v;   /* ggml_type */
    uint32_t                         v_trans;  /* V stored transposed (flash attention off) */
    uint32_t                         n_layers;
    const struct dblade_layer_desc * layers;
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

struct dblade_stats {
    uint32_t policy;
    uint32_t n_layers;
    uint32_t io_engine;      /* 0 none (nothing offloaded), 1 io_uring, 2 threads */
    uint32_t depth;          /* direct layers staged ahead of the one computing */
    char     io_engine_why[96];
    uint64_t n_switches;     /* path switches so far (see dblade_session_switches) */
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
    char     vram_why[96];   /* why nothing is streamed, or which driver and device streams */
};

struct dblade_session;
struct dblade_cache;

DBLADE_API int          dblade_abi_version(void);
DBLADE_API const char * dblade_path_name(uint32_t path);
DBLADE_API const char * dblade_policy_name(uint32_t policy);

/* --- placement plan: geometry + budget -> a path per layer (also what `dualblade info` prints) --- */

/*
 * layer_bytes[i]: K+V bytes of layer i. Writes paths[i] and, if staging_bytes is not NULL, the
 * memory the direct path needs for its staging. Returns 0, -EINVAL, or -ENOMEM when the budget is
 * below the minimum working set (then *staging_bytes holds that minimum).
 */
DBLADE_API int dblade_plan(uint32_t policy, uint64_t budget_bytes, uint32_t n_layers,
                           const uint64_t * layer_bytes, uint32_t * paths, uint64_t * staging_bytes);

/* --- session: what one llama_context's KV caches belong to --- */

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
DBLADE_API int  dblade_session_create(const struct dblade_config * cfg, uint32_t n_layers,
                                      const struct dblade_layout_layer * layers, struct dblade_session ** out);
/* The memory the model's weights keep in the page cache (what the auto policy leaves them), once
 * it is known (after the model is loaded); replaces cfg->reserve_bytes. */
DBLADE_API int  dblade_session_set_reserve(struct dblade_session * s, uint64_t reserve_bytes);
/* Drops the caller's reference; caches still open keep the session alive until they close. */
DBLADE_API void dblade_session_release(struct dblade_session * s);
/* Caches opened by this thread from now on belong to s (NULL unbinds). */
DBLADE_API int  dblade_session_bind(struct dblade_session * s);

DBLADE_API int dblade_session_stats(struct dblade_session * s, struct dblade_stats * out);
/* One change of path of a layer (il -1: the initial placement), with its reason in words. */
struct dblade_switch {
    uint64_t t_ms; /* since the session was created */
    int32_t  il;
    uint32_t from, to; /* enum dblade_path */
    char     reason[100];
};
/* The last (at most 64) switches, oldest first, up to cap; returns how many there were in all. */
DBLADE_API int dblade_session_switches(struct dblade_session * s, struct dblade_switch * out, uint32_t cap);
/* Moves an offloaded layer between the page-cache and the direct path (applied when the graph next
 * enters it; same address, same data). -EINVAL for a pinned or unknown layer. The auto policy may
 * move it again. */
DBLADE_API int dblade_session_set_path(struct dblade_session * s, int32_t il, uint32_t path);

/* The first I/O error of the session (sticky): 0, or -errno with its text in msg (-EBADMSG: data
 * read back failed its checksum). */
DBLADE_API int dblade_session_error(struct dblade_session * s, char * msg, size_t cap);
/* Forgets the error, once the caller has cleared the caches (nothing read since is trusted). */
DBLADE_API int dblade_session_clear_error(struct dblade_session * s);
/* Discards (zero = 0) or overwrites with zeros (zero = 1) every part of the store written so far:
 * nothing of the conversation stays on it. -EOPNOTSUPP where the store cannot discard. */
DBLADE_API int dblade_session_wipe(struct dblade_session * s, int zero);
/* Writes back every dirty block and releases every staged layer. */
DBLADE_API int dblade_session_flush(struct dblade_session * s);
/* For an idle process: flushes (as above), then gives the pages of the idle staging pool back to the
 * system; the pool keeps them otherwise, so that staging a layer costs no page faults. The next layer
 * staged faults fresh pages in, as on first use. Returns the bytes given back, or -errno. */
DBLADE_API int64_t dblade_session_trim(struct dblade_session * s);

struct dblade_store_info {
    uint32_t kind;        /* 0 none, 1 file, 2 device */
    uint32_t align;       /* O_DIRECT alignment in use */
    uint32_t n_extents;   /* file extents of the reservation (1 = contiguous; 0 = unknown) */
    uint32_t reserved;
    uint64_t data_bytes;  /* bytes reserved */
    char     path[512];
};
DBLADE_API int dblade_session_store(struct dblade_session * s, struct dblade_store_info * out);

/* Whether the store for this layout (its offloaded layers) can be opened under cfg, writing nothing;
 * on failure msg says why. */
DBLADE_API int dblade_store_check(const struct dblade_config * cfg, uint32_t n_layers,
                                  const struct dblade_layout_layer * layers, char * msg, size_t cap);
/* The hash a device header records for a layout (also what dblade_store_check compares). */
DBLADE_API uint64_t dblade_layout_geometry(uint32_t n_layers, const struct dblade_layout_layer * layers);
/* The calling thread's last error text. */
DBLADE_API const char * dblade_last_error(void);
/* Fills up to cap layers sorted by il; returns the number of layers the session has. */
DBLADE_API int dblade_session_layers(struct dblade_session * s, struct dblade_layer_stats * out, uint32_t cap);
/* Both at one moment (the worker keeps staging and writing back between calls): fills out and up to
 * cap layers sorted by il; returns the number of layers. */
DBLADE_API int dblade_session_snapshot(struct dblade_session * s, struct dblade_stats * out,
                                       struct dblade_layer_stats * layers, uint32_t cap);

/* --- cache: called by the patched llama.cpp --- */

/* With no session bound to this thread, returns 0 and sets *out to NULL: stock behaviour. */
DBLADE_API int  dblade_cache_open(const struct dblade_cache_desc * desc, struct dblade_cache ** out);
DBLADE_API void dblade_cache_close(struct dblade_cache * c);

/* One K (which = 0) or V (which = 1) tensor of layer il; its address never changes. NULL for a layer
 * the module leaves to llama.cpp (in VRAM as stock). */
struct dblade_tensor;
DBLADE_API struct dblade_tensor * dblade_cache_tensor(struct dblade_cache * c, int32_t il, uint32_t which);
/* Its host memory (for a streamed tensor: the copy on its host path, what state save/restore use). */
DBLADE_API void *                 dblade_tensor_data(struct dblade_tensor * t);
/* A streamed tensor's VRAM address (fixed; several layers' addresses share a slot), else NULL. */
DBLADE_API void *                 dblade_tensor_device_data(struct dblade_tensor * t);
/* Whether the graph must fence the tensor (it is offloaded on the host: the CPU reads it). */
DBLADE_API int                    dblade_tensor_fenced(struct dblade_tensor * t);

/* The rows the next graph stores (its ubatch) and the rows attention reads ([0, n_kv)): called when
 * the graph's inputs are set, before it computes. */
DBLADE_API void dblade_cache_ubatch(struct dblade_cache * c, const int64_t * rows, int64_t n, uint32_t n_kv);

/*
 * GPU builds: the session's graph callback (llama.cpp's eval callback, chained before the user's).
 * ask != 0: whether the graph must stop after the node named `name` (the scheduler then waits for the
 * GPU); ask == 0: the graph stopped there, the GPU is idle: the previous streamed layer's new rows go
 * back to its host path, the next one is copied into its slot. Returns 0 on a failure (the session's
 * sticky error says why). s: dblade_session_bound() when the context was created (may be NULL).
 */
DBLADE_API int dblade_session_graph_cut(struct dblade_session * s, const char * name, int ask);
/* The session bound to the calling thread (NULL for none), with a reference the caller drops with
 * dblade_session_put(). */
DBLADE_API struct dblade_session * dblade_session_current(void);
DBLADE_API void                    dblade_session_put(struct dblade_session * s);
/* Whether the session streams any layer into VRAM (the context then installs the graph callback). */
DBLADE_API int dblade_session_streams(struct dblade_session * s);

/*
 * Fences, called from the graph (one thread) around every use of a tensor:
 *  - write: before rows[0..n) (of row_bytes each) are stored into t;
 *  - read:  before the nbytes at data (inside t) are read by attention.
 * They stage the tensor's blocks, write back and release the previous layer's.
 */
DBLADE_API void dblade_fence_write(struct dblade_tensor * t, const int64_t * rows, int64_t n, uint64_t row_bytes);
DBLADE_API void dblade_fence_read(struct dblade_tensor * t, const void * data, uint64_t nbytes);
/* Every compute thread of the graph (nth of them) calls this after thread 0's fence: it returns
 * once the fence is done, and sleeps while the fence waits for I/O instead of spinning. */
DBLADE_API void dblade_fence_join(struct dblade_tensor * t, int nth);

/* The cache's cells were emptied: forget the contents without writing them anywhere. */
DBLADE_API void dblade_cache_clear(struct dblade_cache * c);
/* Whether K can be shifted in place (context shift): not when layers are offloaded. */
DBLADE_API int  dblade_cache_can_shift(struct dblade_cache * c);
/* Around state save/restore, which touch tensors outside graphs: stage everything; at the end mark
 * rows [0, rows_written) dirty (0 after a save). llama.cpp copies the data after state_end returns,
 * so the memory stays staged until the next fence or dblade_session_flush() writes it back. */
DBLADE_API void dblade_cache_state_begin(struct dblade_cache * c);
DBLADE_API void dblade_cache_state_end(struct dblade_cache * c, uint64_t rows_written);

/* --- metadata-only state and session files (sessionfile.c) --- */

/* The state mode of a session: in the two metadata-only modes a whole-context llama_state save or
 * restore carries the cells (at their indices, with the head) and not the rows of the tensors the
 * module owns; state_begin stages nothing and state_end marks nothing. */
enum dblade_state_mode {
    DBLADE_STATE_STOCK     = 0,
    DBLADE_STATE_SAVE_META = 1,
    DBLADE_STATE_LOAD_META = 2,
};
DBLADE_API int dblade_session_state_mode(struct dblade_session * s, int mode);
/* Called by the patched llama.cpp at the start of a whole-context state save (rows: the cells in use,
 * [0, rows), recorded for the session file) or restore (rows 0): the session's mode. */
DBLADE_API int dblade_cache_state_mode(struct dblade_cache * c, uint32_t rows);
/* 1 when the module keeps the bytes of this K (which = 0) or V (1) tensor in a metadata-only mode. */
DBLADE_API int dblade_cache_state_skips(struct dblade_cache * c, int32_t il, uint32_t which);

/* A metadata section of a session file: an opaque blob of the embedding program, by kind. */
struct dblade_section {
    uint32_t     kind;
    uint32_t     reserved;
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
};

/*
 * Writes the session's KV (every layer: offloaded ones from the store, pinned ones from memory) and
 * the sections into one file at path, atomically: an unnamed file in path's directory, fsync, linked
 * under a temporary name, renamed over path, the directory fsynced. Must follow a llama_state save in
 * DBLADE_STATE_SAVE_META mode (the rows per cache) and dblade_session_flush(). The file is 0600; a
 * symlink at path (-ELOOP) or a file that is not a session file (-EEXIST) is never replaced.
 */
DBLADE_API int dblade_sessionfile_save(struct dblade_session * s, const char * path,
                                       const struct dblade_section * sections, uint32_t n_sections,
                                       struct dblade_sessionfile_stats * stats);

struct dblade_sessionfile;
/* Opens and checks a session file (header, sections: CRC-32C, size, format version); reads no KV. */
DBLADE_API int  dblade_sessionfile_open(const char * path, struct dblade_sessionfile ** out);
DBLADE_API void dblade_sessionfile_close(struct dblade_sessionfile * f);
/* The section of this kind (its bytes stay owned by f), or -ENOENT. */
DBLADE_API int  dblade_sessionfile_section(struct dblade_sessionfile * f, uint32_t kind, const void ** data,
                                           uint64_t * bytes);
/* After a llama_state restore in DBLADE_STATE_LOAD_META mode: every tensor of the session gets its rows
 * from the file (offloaded ones: copied into the session's own store, checked at first read by the
 * direct path; pinned ones: read and checked now). The file is only read. */
DBLADE_API int  dblade_sessionfile_restore(struct dblade_session * s, struct dblade_sessionfile * f,
                                           struct dblade_sessionfile_stats * stats);
/* Reads every KV block of the file once and checks it against its CRC-32C: -EBADMSG names the first bad one. */
DBLADE_API int  dblade_sessionfile_verify(struct dblade_sessionfile * f, struct dblade_sessionfile_stats * stats);

#ifdef __cplusplus
}
#endif

#endif /* DUALBLADE_H */
