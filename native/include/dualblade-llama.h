/*
 * dualblade: the API the patched llama.cpp calls (patches/). The embedding program's API is
 * dualblade.h, which this header includes for the shared types.
 *
 * Each llama_kv_cache opens a cache handle with its geometry while a KV object is bound to the
 * thread, places every K/V tensor at the address the module gives it, fences every use of an
 * offloaded tensor in its graphs, reports clears and state save/restore, and on GPU builds stops the
 * graph where a layer streamed into VRAM begins. An unbound thread gets no handle and llama.cpp
 * behaves exactly as stock.
 */
#ifndef DUALBLADE_LLAMA_H
#define DUALBLADE_LLAMA_H

#include "dualblade.h"

#ifdef __cplusplus
extern "C" {
#endif

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

struct dblade_cache;
struct dblade_tensor;

/* --- caches --- */

/* With no KV object bound to this thread, returns 0 and sets *out to NULL: stock behaviour. */
DBLADE_API int  dblade_cache_open(const struct dblade_cache_desc * desc, struct dblade_cache ** out);
DBLADE_API void dblade_cache_close(struct dblade_cache * c);

/* One K (which = 0) or V (which = 1) tensor of layer il; its address never changes. NULL for a layer
 * the module leaves to llama.cpp (in VRAM as stock). */
DBLADE_API struct dblade_tensor * dblade_cache_tensor(struct dblade_cache * c, int32_t il, uint32_t which);
/* Its host memory (for a streamed tensor: the copy on its host path). */
DBLADE_API void *                 dblade_tensor_data(struct dblade_tensor * t);
/* A streamed tensor's VRAM address (fixed; several layers' addresses share a slot), else NULL. */
DBLADE_API void *                 dblade_tensor_device_data(struct dblade_tensor * t);
/* Whether the graph must fence the tensor (it is offloaded on the host: the CPU reads it). */
DBLADE_API int                    dblade_tensor_fenced(struct dblade_tensor * t);

/* The cache's cells were emptied: forget the contents without writing them anywhere. */
DBLADE_API void dblade_cache_clear(struct dblade_cache * c);
/* Whether K can be shifted in place (context shift): not when layers are offloaded or streamed. */
DBLADE_API int  dblade_cache_can_shift(struct dblade_cache * c);

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

/* --- state save/restore (llama_state_*), which touch the tensors outside any graph --- */

/* Around a save or restore: stage everything; at the end mark rows [0, rows_written) dirty (0 after
 * a save). The memory stays staged until the next fence or dblade_kv_flush() writes it back. */
DBLADE_API void dblade_cache_state_begin(struct dblade_cache * c);
DBLADE_API void dblade_cache_state_end(struct dblade_cache * c, uint64_t rows_written);
/* At the start of a whole-context save (rows: the cells in use, [0, rows), recorded for the session
 * file) or restore (rows 0): the KV object's enum dblade_state_mode. */
DBLADE_API int  dblade_cache_state_mode(struct dblade_cache * c, uint32_t rows);

/* Where the rows of tensor `which` (0 K, 1 V) of layer il come from or go to in a state save/restore. */
enum dblade_state_rows {
    DBLADE_STATE_ROWS_TENSOR = 0, /* the tensor, as stock (llama_io's read_tensor/write_tensor) */
    DBLADE_STATE_ROWS_HOST   = 1, /* *host: the module's host copy (a layer streamed into VRAM, whose
                                     device memory other layers share): copy those bytes now */
    DBLADE_STATE_ROWS_NONE   = 2, /* a metadata-only mode: the module keeps the rows, the state none */
};
DBLADE_API int dblade_cache_state_rows(struct dblade_cache * c, int32_t il, uint32_t which, void ** host);

/*
 * The placement of the cells in a metadata-only state (DBLADE_STATE_SAVE_META / LOAD_META): where the
 * cells are and the head, so that a restore puts them back at the indices whose rows the module kept.
 * Its bytes in the state: a fixed part of DBLADE_CELLS_HEAD bytes, then what dblade_cells_rest says.
 *  - save: dblade_cells_bytes(n_ranges) bytes written by dblade_cells_encode (ranges: [first, second)
 *    pairs of cell indices, ascending);
 *  - restore: dblade_cells_rest() checks the fixed part against the cells and the cell count of the
 *    stream and says how many bytes follow;
 *    dblade_cells_decode() checks everything and gives the head and the cell_count indices.
 * -EBADMSG (with dblade_last_error()) for anything that is not a placement of this many cells.
 */
#define DBLADE_CELLS_HEAD 12u
DBLADE_API size_t  dblade_cells_bytes(uint32_t n_ranges);
DBLADE_API void    dblade_cells_encode(uint32_t head, const uint32_t * ranges, uint32_t n_ranges, void * out);
DBLADE_API int64_t dblade_cells_rest(const void * fixed, uint32_t n_cells, uint32_t cell_count);
DBLADE_API int     dblade_cells_decode(const void * fixed, const void * rest, uint32_t n_cells, uint32_t cell_count,
                                       uint32_t * head, uint32_t * idxs);

/* --- GPU builds: layers streamed into VRAM --- */

/* The rows the next graph stores (its ubatch) and the rows attention reads ([0, n_kv)): called when
 * the graph's inputs are set, before it computes. */
DBLADE_API void dblade_cache_ubatch(struct dblade_cache * c, const int64_t * rows, int64_t n, uint32_t n_kv);
/* The KV object bound to the calling thread (NULL for none), with a reference the caller drops with
 * dblade_kv_put(). */
DBLADE_API struct dblade_kv * dblade_kv_current(void);
DBLADE_API void               dblade_kv_put(struct dblade_kv * kv);
/* The outputs a ubatch asks for at most, as the embedding program set it (dblade_kv_set_outputs_max), 0 for
 * llama.cpp's default: the context caps its n_outputs_max with it before reserving its compute buffers. */
DBLADE_API uint32_t dblade_kv_outputs_max(struct dblade_kv * kv);
/* Whether the KV object streams any layer into VRAM (the context then installs the graph callback). */
DBLADE_API int dblade_kv_streams(struct dblade_kv * kv);
/*
 * The KV object's graph callback (llama.cpp's eval callback, chained before the user's).
 * ask != 0: whether the graph must stop after the node named `name` (the scheduler then waits for the
 * GPU); ask == 0: the graph stopped there, the GPU is idle: the previous streamed layer's new rows go
 * back to its host path, the next one is copied into its slot. Returns 0 on a failure (the KV
 * object's sticky error says why).
 */
DBLADE_API int dblade_kv_graph_cut(struct dblade_kv * kv, const char * name, int ask);

/* --- prompts computed layer by layer --- */
/*
 * A batch of n_ubatches ubatches of one sequence (positions ascending) may be computed layer-major: every
 * ubatch through a segment of the layers before any ubatch enters the next segment, so that the rows of
 * a layer on the direct path (or streamed into VRAM) are staged once per batch instead of once per ubatch.
 * Writes the first layer of each segment to starts (ascending, starts[0] == 0; each segment holds at most
 * one such layer) and returns how many (at most max); 0 or 1: the stock order. Only where
 * dblade_prefill_layer_major says so.
 */
/* Whether a prompt is computed layer by layer in a context that streams layers into VRAM (streamed != 0) or
 * not: by default only where none is streamed; DUALBLADE_LAYER_MAJOR=1 in the environment asks for it there
 * too, =0 nowhere. (The Python package sizes its prompt batches by it.) */
DBLADE_API int      dblade_prefill_layer_major(int streamed);
DBLADE_API uint32_t dblade_kv_prefill_segments(struct dblade_kv * kv, uint32_t n_ubatches, uint32_t n_layer,
                                               int32_t * starts, uint32_t max);
/* The next graphs compute layers [il0, il1) only (0, INT32_MAX: all, as stock): the cuts a graph stops
 * at are checked against that range. */
DBLADE_API void     dblade_kv_graph_layers(struct dblade_kv * kv, int32_t il0, int32_t il1);

#ifdef __cplusplus
}
#endif

#endif /* DUALBLADE_LLAMA_H */
