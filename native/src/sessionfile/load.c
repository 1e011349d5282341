// Opening, checking, restoring and verifying a session file (format.h has the layout). The file is
// only read: any number of processes may load it at once. Restoring copies the offloaded tensors'
// extents into the loader's own store with the copy engine (copy.c), so the direct path reads them at
// first use and checks each block against SUMS; pinned tensors are read and checked here.

#define _GNU_SOURCE
#include "format.h"

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
#include <sys/stat.h>
#include <unistd.h>

struct dblade_sessionfile {
    int               fd;  // O_RDONLY
    int               dfd; // the same file, O_DIRECT (or fd where the file system has none)
    char              path[512];
    struct sf_header  h;
    uint8_t *         sec_data[SF_MAX_SECTIONS];
    struct sf_layer * layers;
    uint32_t          n_layers;
    uint32_t *        sums;
    uint64_t          n_sums;
};

void dblade_sessionfile_close(struct dblade_sessionfile * f) {
    if (!f) {
        return;
    }
    for (uint32_t i = 0; i < SF_MAX_SECTIONS; i++) {
        free(f->sec_data[i]);
    }
    if (f->dfd >= 0 && f->dfd != f->fd) {
        close(f->dfd);
    }
    if (f->fd >= 0) {
        close(f->fd);
    }
    free(f);
}

static const char * section_name(uint32_t kind) {
    switch (kind) {
        case SEC_LAYERS: return "layer table";
        case SEC_SUMS:   return "block checksums";
        default:         return "metadata";
    }
}

int dblade_sessionfile_open(const char * path, struct dblade_sessionfile ** out) {
    if (!path || !out) {
        return -EINVAL;
    }
    *out                          = NULL;
    struct dblade_sessionfile * f = calloc(1, sizeof(*f));
    if (!f) {
        return -ENOMEM;
    }
    f->dfd = -1;
    snprintf(f->path, sizeof(f->path), "%s", path);
    int rc = 0;
    f->fd  = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (f->fd < 0) {
        rc = -errno;
        if (rc == -ELOOP) {
            dblade_set_error("%s is a symlink; give the file itself", path);
        } else {
            dblade_set_error("cannot open the session %s: %s", path, strerror(-rc));
        }
        goto fail;
    }
    struct stat st;
    if (fstat(f->fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        dblade_set_error("%s is not a dualblade session (not a regular file)", path);
        rc = -EINVAL;
        goto fail;
    }
    uint8_t  blk[DBLADE_HEADER_BYTES];
    ssize_t  n = pread(f->fd, blk, sizeof(blk), 0);
    if (n < 16 || memcmp(blk, SF_MAGIC, 16) != 0) {
        dblade_set_error("%s is not a dualblade session", path);
        rc = -EINVAL;
        goto fail;
    }
    if (n < (ssize_t) sizeof(blk)) {
        dblade_set_error("%s is truncated (%llu bytes; a session has at least %u)", path,
                         (unsigned long long) st.st_size, DBLADE_HEADER_BYTES);
        rc = -EIO;
        goto fail;
    }
    memcpy(&f->h, blk, sizeof(f->h));
    uint32_t crc;
    memcpy(&crc, blk + SF_CRC_AT, 4);
    if (f->h.version > SF_VERSION || f->h.flags != 0) {
        dblade_set_error("%s was saved by a newer dualblade (session format %u, this one reads %u); upgrade dualblade",
                         path, f->h.version, SF_VERSION);
        rc = -EPROTONOSUPPORT;
        goto fail;
    }
    if (crc != dblade_crc32c(blk, SF_CRC_AT) || f->h.header_bytes != DBLADE_HEADER_BYTES ||
        f->h.n_sections > SF_MAX_SECTIONS || f->h.version == 0) {
        dblade_set_error("%s is damaged (header checksum)", path);
        rc = -EBADMSG;
        goto fail;
    }
    if ((uint64_t) st.st_size < f->h.file_bytes) {
        dblade_set_error("%s is truncated (%llu of %llu bytes)", path, (unsigned long long) st.st_size,
                         (unsigned long long) f->h.file_bytes);
        rc = -EIO;
        goto fail;
    }
    for (uint32_t i = 0; i < f->h.n_sections; i++) {
        const struct sf_section * sec = &f->h.sections[i];
        if (sec->off > f->h.file_bytes || sec->bytes > f->h.file_bytes - sec->off) {
            dblade_set_error("%s is damaged (section table)", path);
            rc = -EBADMSG;
            goto fail;
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
            f->layers   = (struct sf_layer *) f->sec_data[i];
            f->n_layers = (uint32_t) (sec->bytes / sizeof(struct sf_layer));
        } else if (sec->kind == SEC_SUMS) {
            f->sums   = (uint32_t *) f->sec_data[i];
            f->n_sums = sec->bytes / sizeof(uint32_t);
        }
    }
    if (!f->sums || (!f->layers && f->n_layers)) {
        dblade_set_error("%s is damaged (no layer table)", path);
        rc = -EBADMSG;
        goto fail;
    }
    for (uint32_t i = 0; i < f->n_layers; i++) {
        const struct sf_layer * l = &f->layers[i];
        if (l->saved % DBLADE_BLOCK || l->file_off % DBLADE_BLOCK || l->file_off < f->h.kv_offset ||
            l->saved > f->h.file_bytes || l->file_off > f->h.file_bytes - l->saved || l->used > l->saved ||
            l->sums_at > f->n_sums || l->saved / DBLADE_BLOCK > f->n_sums - l->sums_at) {
            dblade_set_error("%s is damaged (layer table)", path);
            rc = -EBADMSG;
            goto fail;
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
                rc = dblade_copy_range(f->dfd, l->file_off, kv->store.fd, t->store_off, l->saved, NULL, &how);
                dblade_store_touch(&kv->store, t->store_off + l->saved);
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
    uint32_t                          got[DBLADE_COPY_BUF / DBLADE_BLOCK];
    bool                              damaged;
};

static int check_piece(const void * buf, uint64_t n, uint64_t done, void * arg) {
    struct check_layer *    c    = arg;
    const struct sf_layer * l    = c->l;
    const uint32_t *        want = c->f->sums + l->sums_at + done / DBLADE_BLOCK;
    dblade_sums_of_memory(buf, n, c->got);
    for (uint64_t b = 0; b < n / DBLADE_BLOCK; b++) {
        if (c->got[b] != want[b]) {
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
        c->f = f, c->l = &f->layers[i], c->damaged = false;
        rc = dblade_read_pieces(f->dfd, c->l->file_off, c->l->saved, check_piece, c);
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
