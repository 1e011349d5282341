// What every save of a session file writes (format.h has the layout), whole or appended: a tensor's
// blocks and their checksums, the checksum slots at home, the tail's sections and the header slot
// that commits them.

#define _GNU_SOURCE
#include "save.h"

#include "../base.h"
#include "../crc32c.h"
#include "../io.h"
#include "../kv.h"
#include "copy.h"

#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

void sf_plan_layer(const struct dblade_tensor * t, struct sf_layer * l) {
    const struct dblade_cache * c = t->cache;
    memset(l->name, 0, sizeof(l->name));
    memcpy(l->name, c->name, strnlen(c->name, sizeof(l->name) - 1));
    l->il         = t->il;
    l->which      = t->which;
    l->type       = t->which ? c->type_v : c->type_k;
    l->v_trans    = c->v_trans;
    l->row_bytes  = t->row_bytes;
    l->bytes      = t->bytes;
    uint64_t used = t->which && c->v_trans ? t->bytes : (uint64_t) c->state_rows * t->row_bytes;
    used          = used < t->bytes ? used : t->bytes;
    if (t->path != DBLADE_PATH_RAM) {
        used = used < t->hwm ? used : t->hwm; // the store holds nothing above hwm
    }
    l->used     = used;
    l->saved    = dblade_align_up(used, DBLADE_BLOCK);
    l->saved    = l->saved < t->map_bytes ? l->saved : t->map_bytes;
    l->capacity = t->map_bytes;
}

int sf_put_blocks(struct save * sv, const struct dblade_tensor * t, uint64_t b0, uint64_t n, uint64_t at,
                  uint32_t * out) {
    const uint64_t len = n * DBLADE_BLOCK, lo = b0 * DBLADE_BLOCK;
    if (n == 0) {
        return 0;
    }
    sv->st.written_bytes += len;
    if (t->path == DBLADE_PATH_RAM) {
        const int rc = dblade_io_rw(sv->fd, 1, t->addr + lo, len, at, sv->fault);
        dblade_sums_of_memory(t->addr + lo, len, out);
        sv->st.memory_bytes += len;
        return rc;
    }
    int rc = dblade_copy_store(&sv->kv->store.map, t->store_off + lo, sv->fd, at, len, false, sv->fault, &sv->how);
    sv->moved += len;
    if (rc < 0) {
        return rc;
    }
    // the direct path's record where it has one for every block, else the page cache's mapping, else
    // the blocks read back once
    bool known = t->path == DBLADE_PATH_DIRECT && t->sums;
    for (uint64_t b = 0; known && b < n; b++) {
        known = t->sums[b0 + b] != 0;
    }
    if (known) {
        memcpy(out, t->sums + b0, n * sizeof(*out));
    } else if (t->path == DBLADE_PATH_MMAP) {
        dblade_sums_of_memory(t->addr + lo, len, out);
        sv->st.checked_bytes += len;
    } else {
        rc = dblade_sums_of_file(sv->fd, at, len, out);
        sv->st.checked_bytes += len;
    }
    return rc;
}

int sf_put(struct save * sv, const void * data, uint64_t bytes, uint64_t off) {
    sv->st.written_bytes += bytes;
    return bytes ? dblade_io_rw(sv->fd, 1, (void *) data, bytes, off, sv->fault) : 0;
}

int sf_put_sums(struct save * sv, uint32_t li, uint64_t b0, uint64_t b1) {
    const struct sf_layer * l = &sv->layers[li];
    const uint64_t          s = l->sums_at + b0;
    return b1 > b0 ? sf_put(sv, sv->sums + s, (b1 - b0) * 4, sv->h.sections[0].off + s * 4) : 0;
}

uint64_t sf_tail_meta_bytes(const struct save * sv) {
    uint64_t b = dblade_align_up((uint64_t) sv->n_layers * sizeof(struct sf_layer), 8) +
                 dblade_align_up((uint64_t) sv->n_patches * sizeof(struct sf_patch), 8);
    for (uint32_t i = 0; i < sv->n_secs; i++) {
        b += dblade_align_up(sv->secs[i].bytes, 8);
    }
    return b;
}

// the header's section table: SUMS first (at home, set by the layout), then LAYERS and PATCHES and the
// tail's sections from at, then the sections at home (their entries set by the caller after index 3)
int sf_put_tail(struct save * sv, uint64_t at, uint64_t * end) {
    for (uint32_t i = 0; i < sv->n_layers; i++) {
        struct sf_layer * l = &sv->layers[i];
        l->sums_crc         = dblade_crc32c(sv->sums + l->sums_at, l->saved / DBLADE_BLOCK * 4);
    }
    const struct dblade_section mine[2] = {
        { SEC_LAYERS, 0, sv->layers, (uint64_t) sv->n_layers * sizeof(*sv->layers) },
        { SEC_PATCHES, 0, sv->patches, (uint64_t) sv->n_patches * sizeof(*sv->patches) },
    };
    int rc = 0;
    for (uint32_t i = 0; i < 2 + sv->n_secs && rc == 0; i++) {
        const struct dblade_section * s = i < 2 ? &mine[i] : &sv->secs[i - 2];
        struct sf_section *           e = &sv->h.sections[sv->h.n_sections++];
        at                              = dblade_align_up(at, 8);
        *e = (struct sf_section) { s->kind, dblade_crc32c(s->data, s->bytes), at, s->bytes };
        rc = sf_put(sv, s->data, s->bytes, at);
        at += s->bytes;
    }
    *end = at;
    return rc;
}

int sf_commit(struct save * sv, uint32_t slot) {
    // everything the header names is durable before the header
    if (fdatasync(sv->fd) < 0) {
        return -errno;
    }
    memcpy(sv->h.magic, SF_MAGIC, sizeof(sv->h.magic));
    sv->h.version      = SF_VERSION;
    sv->h.header_bytes = DBLADE_HEADER_BYTES;
    sv->h.created      = (uint64_t) time(NULL);
    uint8_t * blk      = malloc(DBLADE_HEADER_BYTES);
    if (!blk) {
        return -ENOMEM;
    }
    memset(blk, 0, DBLADE_HEADER_BYTES);
    memcpy(blk, &sv->h, sizeof(sv->h));
    const uint32_t crc = dblade_crc32c(blk, SF_CRC_AT);
    memcpy(blk + SF_CRC_AT, &crc, 4);
    int rc = sf_put(sv, blk, DBLADE_HEADER_BYTES, (uint64_t) slot * DBLADE_HEADER_BYTES);
    free(blk);
    if (rc == 0 && fdatasync(sv->fd) < 0) {
        rc = -errno;
    }
    return rc;
}

void dblade_sessionfile_matched(struct dblade_kv * kv, uint64_t dev, uint64_t ino, uint64_t gen, uint64_t lineage) {
    for (struct dblade_cache * c = kv->caches; c; c = c->next) {
        for (uint32_t i = 0; i < c->n_tensors; i++) {
            struct dblade_tensor * t = &c->tensors[i];
            if (t->changed) {
                memset(t->changed, 0, (t->map_bytes / DBLADE_BLOCK + 63) / 64 * sizeof(*t->changed));
            }
        }
    }
    kv->session.valid = dev || ino;
    kv->session.dev = dev, kv->session.ino = ino, kv->session.gen = gen, kv->session.lineage = lineage;
}

void sf_test_pause(const char * phase) {
    const char * e = getenv("DUALBLADE_TEST_PAUSE");
    if (e && !strncmp(e, "save:", 5) && !strcmp(e + 5, phase)) {
        raise(SIGSTOP);
    }
}
