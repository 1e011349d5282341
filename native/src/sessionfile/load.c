// Opening, checking, restoring and verifying a session file (format.h has the layout). The file is
// only read: any number of processes may load it at once. Restoring copies the offloaded tensors'
// extents into the loader's own store with the copy engine (copy.c), so the direct path reads them at
// first use and checks each block against SUMS; pinned tensors are read and checked here.

#define _GNU_SOURCE
#include "file.h"

#include "../base.h"
#include "../crc32c.h"
#include "../io.h"
#include "../kv.h"
#include "copy.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

void dblade_sessionfile_close(struct dblade_sessionfile * f) {
    if (!f) {
        return;
    }
    for (uint32_t i = 0; i < SF_MAX_SECTIONS; i++) {
        free(f->sec_data[i]);
    }
    free(f->layers);
    free(f->sums);
    if (f->dfd >= 0 && f->dfd != f->fd) {
        close(f->dfd);
    }
    if (f->fd >= 0 && f->own_fd) {
        close(f->fd);
    }
    free(f);
}

static const char * section_name(uint32_t kind) {
    switch (kind) {
        case SEC_LAYERS:  return "layer table";
        case SEC_SUMS:    return "block checksums";
        case SEC_PATCHES: return "block table";
        default:          return "metadata";
    }
}

// a header slot: 1 valid (h filled), 0 not a session header, -1 damaged, -2 newer than this reader, -3 cut short
static int read_slot(int fd, uint32_t slot, struct sf_header * h) {
    uint8_t       blk[DBLADE_HEADER_BYTES];
    const ssize_t n = pread(fd, blk, sizeof(blk), (off_t) slot * DBLADE_HEADER_BYTES);
    if (n < 16 || memcmp(blk, SF_MAGIC, 16) != 0) {
        return 0;
    }
    if (n < (ssize_t) sizeof(blk)) {
        return -3;
    }
    memcpy(h, blk, sizeof(*h));
    uint32_t crc;
    memcpy(&crc, blk + SF_CRC_AT, 4);
    if (h->version > SF_VERSION || h->flags != 0) {
        return -2;
    }
    if (crc != dblade_crc32c(blk, SF_CRC_AT) || h->header_bytes != DBLADE_HEADER_BYTES ||
        h->n_sections > SF_MAX_SECTIONS || h->version == 0 || (slot > 0 && h->version < 2)) {
        return -1;
    }
    if (h->version < 2) {
        h->gen = 0, h->lineage = 0, h->home_end = 0, h->tail_off = 0, h->tail_bytes = 0;
        memset(h->rooms, 0, sizeof(h->rooms));
    }
    return 1;
}

static int damaged(const char * path, const char * what) {
    dblade_set_error("%s is damaged (%s)", path, what);
    return -EBADMSG;
}

static int cmp_patch(const void * a, const void * b) {
    const struct sf_patch * x = a, * y = b;
    if (x->layer != y->layer) {
        return x->layer < y->layer ? -1 : 1;
    }
    return x->block < y->block ? -1 : x->block > y->block;
}

uint64_t dblade_sessionfile_block_at(const struct dblade_sessionfile * f, uint32_t l, uint64_t b) {
    const struct sf_patch key = { .layer = l, .block = b };
    const struct sf_patch * p = f->n_patches ? bsearch(&key, f->patches, f->n_patches, sizeof(key), cmp_patch) : NULL;
    return p ? p->file_off : f->layers[l].file_off + b * DBLADE_BLOCK;
}

// format 2's checksums: each layer's used slots from home, the patches' over them, each layer's sum checked
static int read_sums(struct dblade_sessionfile * f, const struct sf_section * sec) {
    f->n_sums = sec->bytes / sizeof(uint32_t);
    f->sums   = calloc(f->n_sums ? f->n_sums : 1, sizeof(uint32_t));
    if (!f->sums) {
        return -ENOMEM;
    }
    for (uint32_t i = 0; i < f->n_layers; i++) {
        const struct sf_layer * l = &f->layers[i];
        const uint64_t nblk = l->saved / DBLADE_BLOCK;
        if (l->sums_at > f->n_sums || l->capacity / DBLADE_BLOCK > f->n_sums - l->sums_at) {
            return damaged(f->path, "layer table");
        }
        const int rc = nblk ? dblade_io_read(f->fd, f->sums + l->sums_at, nblk * 4, sec->off + l->sums_at * 4) : 0;
        if (rc < 0) {
            dblade_set_error("reading the session %s: %s", f->path, strerror(-rc));
            return rc;
        }
    }
    // each layer's patches: as many as its entry says (they are sorted by layer)
    for (uint32_t i = 0, at = 0; i < f->n_layers; i++) {
        const uint32_t n = f->layers[i].n_patches;
        if (n > f->n_patches - at || (n && f->patches[at].layer != i) || (n && f->patches[at + n - 1].layer != i)) {
            return damaged(f->path, "block table");
        }
        at += n;
        if (i + 1 == f->n_layers && at != f->n_patches) {
            return damaged(f->path, "block table");
        }
    }
    for (uint32_t i = 0; i < f->n_patches; i++) {
        const struct sf_patch * p = &f->patches[i];
        if (p->layer >= f->n_layers || p->block >= f->layers[p->layer].saved / DBLADE_BLOCK || p->file_off % DBLADE_BLOCK ||
            p->file_off < f->h.home_end || p->file_off > f->h.file_bytes - DBLADE_BLOCK ||
            (i && cmp_patch(&f->patches[i - 1], p) >= 0)) {
            return damaged(f->path, "block table");
        }
        f->sums[f->layers[p->layer].sums_at + p->block] = p->sum;
    }
    for (uint32_t i = 0; i < f->n_layers; i++) {
        const struct sf_layer * l = &f->layers[i];
        if (dblade_crc32c(f->sums + l->sums_at, l->saved / DBLADE_BLOCK * 4) != l->sums_crc) {
            return damaged(f->path, "block checksums");
        }
    }
    return 0;
}

int dblade_sessionfile_read(int fd, const char * path, struct dblade_sessionfile ** out) {
    *out                          = NULL;
    struct dblade_sessionfile * f = calloc(1, sizeof(*f));
    if (!f) {
        close(fd);
        return -ENOMEM;
    }
    f->fd = fd, f->own_fd = true, f->dfd = -1;
    snprintf(f->path, sizeof(f->path), "%s", path);
    int         rc = 0;
    struct stat st;
    if (fstat(f->fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        dblade_set_error("%s is not a dualblade session (not a regular file)", path);
        rc = -EINVAL;
        goto fail;
    }
    f->dev = (uint64_t) st.st_dev, f->ino = (uint64_t) st.st_ino;
    // the valid slot with the higher generation (format 1 has one)
    struct sf_header hs[SF_SLOTS];
    int              got[SF_SLOTS];
    for (uint32_t s = 0; s < SF_SLOTS; s++) {
        got[s] = read_slot(f->fd, s, &hs[s]);
    }
    if (got[0] == 1 && hs[0].version < 2) {
        got[1] = 0;
    }
    int best = -1;
    for (uint32_t s = 0; s < SF_SLOTS; s++) {
        if (got[s] == 1 && (best < 0 || hs[s].gen > hs[best].gen)) {
            best = (int) s;
        }
    }
    // a newer dualblade wrote a commit: its format is the file's now
    if (best < 0 || got[0] == -2 || got[1] == -2) {
        if (got[0] == -2 || got[1] == -2) {
            const struct sf_header * n = got[0] == -2 ? &hs[0] : &hs[1];
            dblade_set_error("%s was saved by a newer dualblade (session format %u, this one reads %u); upgrade dualblade",
                             path, n->version, SF_VERSION);
            rc = -EPROTONOSUPPORT;
        } else if (got[0] == -3) {
            dblade_set_error("%s is truncated (%llu bytes; a session has at least %u)", path,
                             (unsigned long long) st.st_size, DBLADE_HEADER_BYTES);
            rc = -EIO;
        } else if (got[0] == 0 && got[1] == 0) {
            dblade_set_error("%s is not a dualblade session", path);
            rc = -EINVAL;
        } else {
            rc = damaged(path, "header checksum");
        }
        goto fail;
    }
    f->h = hs[best], f->slot = (uint32_t) best;
    if ((uint64_t) st.st_size < f->h.file_bytes) {
        dblade_set_error("%s is truncated (%llu of %llu bytes)", path, (unsigned long long) st.st_size,
                         (unsigned long long) f->h.file_bytes);
        rc = -EIO;
        goto fail;
    }
    const struct sf_section * sums_sec = NULL;
    for (uint32_t i = 0; i < f->h.n_sections; i++) {
        const struct sf_section * sec = &f->h.sections[i];
        if (sec->off > f->h.file_bytes || sec->bytes > f->h.file_bytes - sec->off) {
            rc = damaged(path, "section table");
            goto fail;
        }
        if (sec->kind == SEC_SUMS && f->h.version >= 2) {
            sums_sec = sec; // read by layer below
            continue;
        }
        f->sec_data[i] = malloc(sec->bytes ? sec->bytes : 1);
        if (!f->sec_data[i]) {
            rc = -ENOMEM;
            goto fail;
        }
        rc = dblade_io_read(f->fd, f->sec_data[i], sec->bytes, sec->off);
        if (rc < 0) {
            dblade_set_error("reading the session %s: %s", path, strerror(-rc));
            goto fail;
        }
        if (dblade_crc32c(f->sec_data[i], sec->bytes) != sec->crc) {
            dblade_set_error("%s is damaged (%s checksum)", path, section_name(sec->kind));
            rc = -EBADMSG;
            goto fail;
        }
        if (sec->kind == SEC_LAYERS) {
            // format 1's entries are a prefix of format 2's
            const size_t stride = f->h.version < 2 ? SF_LAYER_V1_BYTES : sizeof(struct sf_layer);
            f->n_layers         = (uint32_t) (sec->bytes / stride);
            f->layers           = calloc(f->n_layers ? f->n_layers : 1, sizeof(*f->layers));
            if (!f->layers) {
                rc = -ENOMEM;
                goto fail;
            }
            for (uint32_t j = 0; j < f->n_layers; j++) {
                memcpy(&f->layers[j], f->sec_data[i] + j * stride, stride);
                if (f->h.version < 2) {
                    f->layers[j].capacity = f->layers[j].saved;
                }
            }
        } else if (sec->kind == SEC_SUMS) {
            f->sums        = (uint32_t *) f->sec_data[i];
            f->n_sums      = sec->bytes / sizeof(uint32_t);
            f->sec_data[i] = NULL; // owned as sums
        } else if (sec->kind == SEC_PATCHES) {
            f->patches   = (struct sf_patch *) f->sec_data[i];
            f->n_patches = (uint32_t) (sec->bytes / sizeof(struct sf_patch));
        }
    }
    if ((!f->sums && !sums_sec) || (!f->layers && f->n_layers) || (f->h.version >= 2 && !f->layers)) {
        rc = damaged(path, "no layer table");
        goto fail;
    }
    for (uint32_t i = 0; i < f->n_layers; i++) {
        const struct sf_layer * l = &f->layers[i];
        const uint64_t home_end = f->h.version >= 2 ? f->h.home_end : f->h.file_bytes;
        if (l->saved % DBLADE_BLOCK || l->file_off % DBLADE_BLOCK || l->capacity % DBLADE_BLOCK ||
            l->file_off < f->h.kv_offset || l->saved > l->capacity || l->capacity > home_end ||
            l->file_off > home_end - l->capacity || l->used > l->saved) {
            rc = damaged(path, "layer table");
            goto fail;
        }
    }
    if (sums_sec) {
        rc = read_sums(f, sums_sec);
        if (rc < 0) {
            goto fail;
        }
    } else {
        for (uint32_t i = 0; i < f->n_layers; i++) {
            const struct sf_layer * l = &f->layers[i];
            if (l->sums_at > f->n_sums || l->saved / DBLADE_BLOCK > f->n_sums - l->sums_at) {
                rc = damaged(path, "layer table");
                goto fail;
            }
        }
    }
    // the KV is read with O_DIRECT where the file system allows it: the same inode, opened again
    char proc[64];
    snprintf(proc, sizeof(proc), "/proc/self/fd/%d", f->fd);
    f->dfd = open(proc, O_RDONLY | O_DIRECT | O_CLOEXEC);
    if (f->dfd < 0) {
        f->dfd = f->fd;
    }
    *out = f;
    return 0;
fail:
    dblade_sessionfile_close(f);
    return rc;
}

int dblade_sessionfile_open(const char * path, struct dblade_sessionfile ** out) {
    if (!path || !out) {
        return -EINVAL;
    }
    *out         = NULL;
    const int fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) {
        const int rc = -errno;
        if (rc == -ELOOP) {
            dblade_set_error("%s is a symlink; give the file itself", path);
        } else {
            dblade_set_error("cannot open the session %s: %s", path, strerror(-rc));
        }
        return rc;
    }
    // a save appending to the file holds it exclusively until its commit is durable
    flock(fd, LOCK_SH);
    return dblade_sessionfile_read(fd, path, out);
}

int dblade_sessionfile_section(struct dblade_sessionfile * f, uint32_t kind, const void ** data, uint64_t * bytes) {
    if (!f || !data || !bytes) {
        return -EINVAL;
    }
    for (uint32_t i = 0; i < f->h.n_sections; i++) {
        if (f->h.sections[i].kind == kind) {
            *data  = f->sec_data[i];
            *bytes = f->h.sections[i].bytes;
            return 0;
        }
    }
    return -ENOENT;
}

// --- restore ---

// the first patch of layer li (patches are sorted by layer, then block)
static uint32_t first_patch(const struct dblade_sessionfile * f, uint32_t li) {
    uint32_t lo = 0, hi = f->n_patches;
    while (lo < hi) {
        const uint32_t mid = lo + (hi - lo) / 2;
        if (f->patches[mid].layer < li) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return lo;
}

static const struct sf_layer * find_layer(const struct dblade_sessionfile * f, const struct dblade_cache * c,
                                          const struct dblade_tensor * t) {
    for (uint32_t i = 0; i < f->n_layers; i++) {
        const struct sf_layer * l = &f->layers[i];
        if (l->il == t->il && l->which == t->which && !strncmp(l->name, c->name, sizeof(l->name))) {
            return l;
        }
    }
    return NULL;
}

int dblade_sessionfile_restore(struct dblade_kv * kv, struct dblade_sessionfile * f,
                               struct dblade_sessionfile_stats * stats) {
    if (!kv || !f) {
        return -EINVAL;
    }
    struct dblade_sessionfile_stats st;
    memset(&st, 0, sizeof(st));
    int      rc      = 0;
    int      how     = 0;
    uint32_t matched = 0;
    pthread_mutex_lock(&kv->lock);
    kv->session.valid = false;
    for (struct dblade_cache * c = kv->caches; c && rc == 0; c = c->next) {
        for (uint32_t i = 0; i < c->n_tensors && rc == 0; i++) {
            struct dblade_tensor *  t = &c->tensors[i];
            const struct sf_layer * l = find_layer(f, c, t);
            const char *            which = t->which ? "V" : "K";
            if (!l || l->bytes != t->bytes || l->row_bytes != t->row_bytes ||
                l->type != (t->which ? c->type_v : c->type_k) || l->v_trans != c->v_trans) {
                dblade_set_error("%s does not fit this context: layer %d %s%s is %s there", f->path, t->il,
                                 *c->name ? c->name : "", which, l ? "of another size or type" : "missing");
                rc = -EINVAL;
                break;
            }
            matched++;
            DBLADE_KV_PATH_CALL(kv, t, settle);
            const uint32_t * want = f->sums + l->sums_at;
            const uint64_t   nblk = l->saved / DBLADE_BLOCK;
            if (l->saved == 0) {
                continue;
            }
            if (t->path == DBLADE_PATH_RAM) {
                rc = dblade_io_read(f->dfd, t->addr, l->saved, l->file_off);
                st.memory_bytes += l->saved;
            } else {
                rc = dblade_copy_store(&kv->store.map, t->store_off, f->dfd, l->file_off, l->saved, true, NULL, &how);
                dblade_store_touch(&kv->store, t->store_off + l->saved);
            }
            // the blocks this commit holds outside home, over the home copies
            const uint32_t li = (uint32_t) (l - f->layers);
            for (uint32_t p = first_patch(f, li); rc == 0 && p < f->n_patches && f->patches[p].layer == li; p++) {
                const struct sf_patch * pa = &f->patches[p];
                if (t->path == DBLADE_PATH_RAM) {
                    rc = dblade_io_read(f->dfd, t->addr + pa->block * DBLADE_BLOCK, DBLADE_BLOCK, pa->file_off);
                } else {
                    rc = dblade_copy_store(&kv->store.map, t->store_off + pa->block * DBLADE_BLOCK, f->dfd,
                                           pa->file_off, DBLADE_BLOCK, true, NULL, &how);
                }
            }
            if (rc < 0) {
                dblade_set_error("reading the session %s: %s", f->path, strerror(-rc));
                break;
            }
            if (t->path == DBLADE_PATH_DIRECT) {
                // checked by the direct path when first read, as any block it wrote itself
                if (t->sums) {
                    memset(t->sums, 0, (t->map_bytes / DBLADE_BLOCK) * sizeof(*t->sums));
                    memcpy(t->sums, want, nblk * sizeof(*want));
                }
            } else {
                // in memory now (pinned) or behind the page cache's mapping: checked here
                uint32_t got[64];
                for (uint64_t b = 0; b < nblk && rc == 0; b += 64) {
                    const uint64_t m = nblk - b < 64 ? nblk - b : 64;
                    dblade_sums_of_memory(t->addr + b * DBLADE_BLOCK, m * DBLADE_BLOCK, got);
                    for (uint64_t k = 0; k < m; k++) {
                        if (got[k] != want[b + k]) {
                            dblade_set_error("%s is damaged: KV block %llu of layer %d %s%s failed its checksum",
                                             f->path, (unsigned long long) (b + k), t->il, c->name, which);
                            rc = -EBADMSG;
                            break;
                        }
                    }
                }
                st.checked_bytes += l->saved;
            }
            t->hwm = l->used;
            st.kv_bytes += l->saved;
        }
    }
    if (rc == 0 && matched != f->n_layers) {
        dblade_set_error("%s does not fit this context: it holds %u KV tensors, this context has %u", f->path,
                         f->n_layers, matched);
        rc = -EINVAL;
    }
    if (rc == 0 && f->h.version >= 2) {
        dblade_sessionfile_matched(kv, f->dev, f->ino, f->h.gen, f->h.lineage); // a save to it appends
    }
    dblade_pipeline_leave(&kv->pipeline);
    pthread_mutex_unlock(&kv->lock);
    if (rc == 0 && stats) {
        dblade_copy_how_name(how, st.strategy, sizeof(st.strategy));
        const uint64_t moved = st.kv_bytes - st.memory_bytes;
        st.cloned_bytes      = how == DBLADE_COPY_CLONE ? moved : 0;
        st.copied_bytes      = how == DBLADE_COPY_CFR ? moved : 0;
        st.direct_bytes      = how == DBLADE_COPY_DIRECT ? moved : 0;
        st.file_bytes = f->h.file_bytes;
        *stats        = st;
    }
    return rc;
}

struct check_layer {
    const struct dblade_sessionfile * f;
    const struct sf_layer *           l;
    uint32_t                          li;
    bool                              in_tail; // checking one patch block (done: its offset in the tensor)
    uint32_t                          got[DBLADE_COPY_BUF / DBLADE_BLOCK];
    bool                              damaged;
};

static int check_piece(const void * buf, uint64_t n, uint64_t done, void * arg) {
    struct check_layer *    c    = arg;
    const struct sf_layer * l    = c->l;
    const uint32_t *        want = c->f->sums + l->sums_at + done / DBLADE_BLOCK;
    dblade_sums_of_memory(buf, n, c->got);
    for (uint64_t b = 0; b < n / DBLADE_BLOCK; b++) {
        const uint64_t blk = done / DBLADE_BLOCK + b, at = l->file_off + blk * DBLADE_BLOCK;
        if (c->got[b] != want[b] && (c->in_tail || dblade_sessionfile_block_at(c->f, c->li, blk) == at)) {
            dblade_set_error("%s is damaged: KV block %llu of layer %d %s%s failed its checksum", c->f->path,
                             (unsigned long long) (done / DBLADE_BLOCK + b), l->il, l->name, l->which ? "V" : "K");
            c->damaged = true;
            return -EBADMSG;
        }
    }
    return 0;
}

int dblade_sessionfile_verify(struct dblade_sessionfile * f, struct dblade_sessionfile_stats * stats) {
    if (!f) {
        return -EINVAL;
    }
    struct check_layer * c = malloc(sizeof(*c));
    if (!c) {
        return -ENOMEM;
    }
    int      rc      = 0;
    uint64_t checked = 0;
    for (uint32_t i = 0; i < f->n_layers && rc == 0; i++) {
        // home (a patched block's home copy is not this commit's), then the patched blocks
        c->f = f, c->l = &f->layers[i], c->li = i, c->damaged = false, c->in_tail = false;
        rc = dblade_read_pieces(f->dfd, c->l->file_off, c->l->saved, check_piece, c);
        for (uint32_t p = first_patch(f, i); rc == 0 && p < f->n_patches && f->patches[p].layer == i; p++) {
            c->in_tail = true;
            rc = dblade_read_pieces_at(f->dfd, f->patches[p].file_off, DBLADE_BLOCK, f->patches[p].block * DBLADE_BLOCK,
                                       check_piece, c);
        }
        if (rc < 0 && !c->damaged) {
            dblade_set_error("reading the session %s: %s", f->path, strerror(-rc));
        }
        checked += rc == 0 ? c->l->saved : 0;
    }
    free(c);
    if (rc == 0 && stats) {
        memset(stats, 0, sizeof(*stats));
        stats->kv_bytes      = f->h.kv_bytes;
        stats->checked_bytes = checked;
        stats->file_bytes    = f->h.file_bytes;
    }
    return rc;
}
