// llama.cpp's state save/restore of the caches (llama_state_*), which reads and writes the tensors
// outside any graph: the tensors staged around it, the metadata-only modes of session files (the
// module keeps the rows, the state carries the cells), where each tensor's rows come from or go to,
// and the format of the cells' placement in a metadata-only state.
//
// It calls the paths through their method table and the VRAM tier (a streamed layer's rows in VRAM
// go back to its host copy first).

#define _GNU_SOURCE
#include "kv.h"

#include "base.h"

#include <errno.h>
#include <string.h>

void dblade_cache_state_begin(struct dblade_cache * c) {
    if (!c) {
        return;
    }
    struct dblade_kv * kv = c->kv;
    if (kv->state_mode != DBLADE_STATE_STOCK) {
        return; // metadata only: no row is read or written by llama.cpp
    }
    dblade_vram_settle(kv->vram, true); // the rows the last streamed layer stored, before anything reads the copies
    pthread_mutex_lock(&kv->lock);
    // nothing is released here: with two caches (iSWA) the other one may hold restored rows that
    // llama.cpp has not copied in yet; staged dirty blocks simply stay staged
    for (uint32_t i = 0; i < c->n_tensors; i++) {
        struct dblade_tensor * t = &c->tensors[i];
        DBLADE_KV_PATH_CALL(kv, t, settle);
        DBLADE_KV_PATH_CALL(kv, t, host_begin);
    }
    pthread_mutex_unlock(&kv->lock);
}

void dblade_cache_state_end(struct dblade_cache * c, uint64_t rows_written) {
    if (!c) {
        return;
    }
    struct dblade_kv * kv = c->kv;
    pthread_mutex_lock(&kv->lock);
    if (kv->state_mode != DBLADE_STATE_STOCK) {
        rows_written = 0; // metadata only: the rows come from the session file (dblade_sessionfile_restore)
    }
    for (uint32_t i = 0; i < c->n_tensors; i++) {
        struct dblade_tensor * t = &c->tensors[i];
        if (rows_written == 0) {
            continue;
        }
        uint64_t hi = rows_written * t->row_bytes;
        hi          = hi > t->bytes ? t->bytes : hi;
        if (t->path == DBLADE_PATH_RAM) {
            t->hwm = hi > t->hwm ? hi : t->hwm; // what a streamed layer's copy into VRAM takes
            continue;
        }
        DBLADE_KV_PATH_CALL(kv, t, settle);
        DBLADE_KV_PATH_CALL(kv, t, host_end, hi);
        t->hwm = hi > t->hwm ? hi : t->hwm;
        dblade_tensor_changed(t, 0, hi);
        dblade_store_touch(&kv->store, t->store_off + dblade_align_up(hi, kv->store.align));
    }
    // not released here: llama.cpp copies the tensor data when its io object is destroyed, after
    // this returns; the next fence (or a flush) writes the rows back and releases the memory
    dblade_pipeline_leave(&kv->pipeline);
    pthread_mutex_unlock(&kv->lock);
}

int dblade_kv_state_mode(struct dblade_kv * kv, int mode) {
    if (!kv || mode < DBLADE_STATE_STOCK || mode > DBLADE_STATE_LOAD_META) {
        return -EINVAL;
    }
    // streamed layers need nothing of their own: their host copies hold the KV (a save flushes the
    // rows VRAM still holds first), and each graph copies the rows it reads into VRAM again
    pthread_mutex_lock(&kv->lock);
    kv->state_mode = mode;
    if (mode == DBLADE_STATE_LOAD_META) {
        dblade_vram_forget(kv->vram, NULL); // the rows the last graph stored are replaced: none go back
    }
    if (mode == DBLADE_STATE_SAVE_META) {
        for (struct dblade_cache * c = kv->caches; c; c = c->next) {
            c->state_rows = 0;
        }
    }
    pthread_mutex_unlock(&kv->lock);
    return 0;
}

int dblade_cache_state_mode(struct dblade_cache * c, uint32_t rows) {
    if (!c) {
        return DBLADE_STATE_STOCK;
    }
    struct dblade_kv * kv = c->kv;
    pthread_mutex_lock(&kv->lock);
    const int mode = kv->state_mode;
    if (mode == DBLADE_STATE_SAVE_META) {
        c->state_rows = rows;
    }
    pthread_mutex_unlock(&kv->lock);
    return mode;
}

int dblade_cache_state_rows(struct dblade_cache * c, int32_t il, uint32_t which, void ** host) {
    struct dblade_tensor * t = c && which <= 1 ? dblade_layer_of(c, il) : NULL;
    t                        = t && which ? t->pair : t;
    if (!t) {
        return DBLADE_STATE_ROWS_TENSOR; // a layer llama.cpp keeps (in VRAM as stock)
    }
    // read without the lock: the mode only changes between llama_state calls, on the caller's thread
    if (c->kv->state_mode != DBLADE_STATE_STOCK) {
        return DBLADE_STATE_ROWS_NONE;
    }
    if (t->dev) {
        // a streamed layer's VRAM holds other layers between passes: its host copy is the tensor
        *host = t->addr;
        return DBLADE_STATE_ROWS_HOST;
    }
    return DBLADE_STATE_ROWS_TENSOR;
}

// --- the cells' placement in a metadata-only state: "DBKM", head, n_ranges, then the ranges ---

#define CELLS_MAGIC 0x4d4b4244u // "DBKM"

size_t dblade_cells_bytes(uint32_t n_ranges) {
    return DBLADE_CELLS_HEAD + (size_t) n_ranges * 2 * sizeof(uint32_t);
}

void dblade_cells_encode(uint32_t head, const uint32_t * ranges, uint32_t n_ranges, void * out) {
    const uint32_t fixed[3] = { CELLS_MAGIC, head, n_ranges };
    memcpy(out, fixed, sizeof(fixed));
    memcpy((uint8_t *) out + DBLADE_CELLS_HEAD, ranges, (size_t) n_ranges * 2 * sizeof(uint32_t));
}

int64_t dblade_cells_rest(const void * fixed, uint32_t n_cells, uint32_t cell_count) {
    uint32_t f[3];
    memcpy(f, fixed, sizeof(f));
    if (f[0] != CELLS_MAGIC || f[1] > n_cells || f[2] > n_cells || cell_count > n_cells) {
        dblade_set_error("not a dualblade metadata state");
        return -EBADMSG;
    }
    return (int64_t) f[2] * 2 * (int64_t) sizeof(uint32_t);
}

int dblade_cells_decode(const void * fixed, const void * rest, uint32_t n_cells, uint32_t cell_count, uint32_t * head,
                        uint32_t * idxs) {
    if (dblade_cells_rest(fixed, n_cells, cell_count) < 0) {
        return -EBADMSG;
    }
    uint32_t f[3];
    memcpy(f, fixed, sizeof(f));
    uint32_t n = 0;
    for (uint32_t r = 0; r < f[2]; r++) {
        uint32_t range[2];
        memcpy(range, (const uint8_t *) rest + (size_t) r * sizeof(range), sizeof(range));
        if (range[0] >= range[1] || range[1] > n_cells || (n > 0 && range[0] <= idxs[n - 1])) {
            dblade_set_error("bad cell ranges");
            return -EBADMSG;
        }
        if (range[1] - range[0] > cell_count - n) {
            dblade_set_error("cell ranges do not match the cell count");
            return -EBADMSG;
        }
        for (uint32_t i = range[0]; i < range[1]; i++) {
            idxs[n++] = i;
        }
    }
    if (n != cell_count) {
        dblade_set_error("cell ranges do not match the cell count");
        return -EBADMSG;
    }
    *head = f[1];
    return 0;
}
