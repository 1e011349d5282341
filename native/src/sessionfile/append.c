// A save appended to the commit the KV last matched (format.h has the layout): only what changed
// since is written. Per block of each tensor, against that commit:
//   - unchanged, at home there: nothing;
//   - changed, at home there: to the tail (a patch), the home copy left to that commit;
//   - changed or not, held in its tail: home (nothing names the home copy), so that patches never pile up;
//   - beyond its rows: home.
// An offloaded tensor knows what changed from the bits its writes set (dblade_tensor_changed); a pinned
// one compares its memory's checksums with the commit's. The sections saved with room grow in place
// when the commit's copy is a prefix of the new one. The commit: everything durable, then the header
// slot the last commit is not in; then the last commit's tail, which nothing names any more, goes.

#define _GNU_SOURCE
#include "save.h"

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
#include <unistd.h>

enum { KEEP, HOME, PATCH };

struct layer_plan {
    struct dblade_tensor * t;
    uint32_t *             now; // pinned: the memory's checksums of the blocks the commit has
};

static bool bit(const struct dblade_tensor * t, uint64_t b) {
    return t->changed && (t->changed[b / 64] >> (b % 64) & 1);
}

// what block b of layer li gets
static int action(const struct save * sv, const struct layer_plan * p, uint32_t li, uint64_t b) {
    const struct sf_layer *           was = &sv->old->layers[li];
    const struct dblade_sessionfile * f   = sv->old;
    const uint64_t                    had = was->saved / DBLADE_BLOCK;
    if (b >= had) {
        return HOME;
    }
    const bool at_home = dblade_sessionfile_block_at(f, li, b) == was->file_off + b * DBLADE_BLOCK;
    const bool changed = p->now ? p->now[b] != f->sums[was->sums_at + b] : bit(p->t, b);
    return !at_home ? HOME : changed ? PATCH : KEEP;
}

// the layers as the commit has them, the same tensors in the same order, else not appendable
static int plan_layers(struct save * sv, struct layer_plan * plans) {
    const struct dblade_sessionfile * f  = sv->old;
    uint32_t                          li = 0;
    for (struct dblade_cache * c = sv->kv->caches; c; c = c->next) {
        for (uint32_t i = 0; i < c->n_tensors; i++, li++) {
            struct dblade_tensor * t = &c->tensors[i];
            if (li >= f->n_layers) {
                return 1;
            }
            const struct sf_layer * was = &f->layers[li];
            struct sf_layer *       l   = &sv->layers[li];
            sf_plan_layer(t, l);
            if (strncmp(l->name, was->name, sizeof(l->name)) || l->il != was->il || l->which != was->which ||
                l->type != was->type || l->v_trans != was->v_trans || l->row_bytes != was->row_bytes ||
                l->bytes != was->bytes || l->capacity != was->capacity || (t->path != DBLADE_PATH_RAM && l->v_trans)) {
                return 1;
            }
            l->file_off = was->file_off, l->sums_at = was->sums_at;
            plans[li].t = t;
            const uint64_t had = was->saved / DBLADE_BLOCK, has = l->saved / DBLADE_BLOCK;
            const uint64_t n   = had < has ? had : has;
            if (t->path == DBLADE_PATH_RAM && n) {
                plans[li].now = malloc(n * sizeof(uint32_t));
                if (!plans[li].now) {
                    return -ENOMEM;
                }
                dblade_sums_of_memory(t->addr, n * DBLADE_BLOCK, plans[li].now);
            }
        }
    }
    return li == f->n_layers ? 0 : 1;
}

// the sections: with room whose home the commit does not use, or uses with a prefix of the new bytes,
// at home (whole, or what follows the prefix); the others in the tail
struct sec_plan {
    uint64_t at, from; // home offset and the first byte to write; at == 0: in the tail
};

static void plan_sections(struct save * sv, struct sec_plan * sp) {
    const struct dblade_sessionfile * f = sv->old;
    memcpy(sv->h.rooms, f->h.rooms, sizeof(sv->h.rooms));
    for (uint32_t i = 0; i < sv->n_in; i++) {
        const struct dblade_section * s = &sv->in[i];
        sp[i]                           = (struct sec_plan) { 0, 0 };
        const struct sf_room *        r = NULL;
        for (uint32_t k = 0; k < SF_MAX_ROOMS && !r; k++) {
            r = f->h.rooms[k].kind == s->kind && f->h.rooms[k].bytes >= s->bytes ? &f->h.rooms[k] : NULL;
        }
        if (!r) {
            sv->secs[sv->n_secs++] = *s;
            continue;
        }
        int cur = -1;
        for (uint32_t k = 0; k < f->h.n_sections; k++) {
            cur = f->h.sections[k].kind == s->kind ? (int) k : cur;
        }
        const struct sf_section * c = cur >= 0 ? &f->h.sections[cur] : NULL;
        if (!c || c->off != r->off) {
            sp[i] = (struct sec_plan) { r->off, 0 };
        } else if (c->bytes <= s->bytes && f->sec_data[cur] && !memcmp(f->sec_data[cur], s->data, c->bytes)) {
            sp[i] = (struct sec_plan) { r->off, c->bytes };
        } else {
            sv->secs[sv->n_secs++] = *s;
        }
    }
}

// layer li's blocks: runs of one action, home ones at home, patches from *tail on; or (sums) the
// checksum slots of the blocks written home (after the blocks: the slots are not O_DIRECT writes)
static int write_layer(struct save * sv, const struct layer_plan * p, uint32_t li, uint64_t * tail, bool sums) {
    const struct sf_layer * l   = &sv->layers[li];
    const uint64_t          has = l->saved / DBLADE_BLOCK;
    int                     rc  = 0;
    uint32_t                got[64];
    for (uint64_t b = 0; b < has && rc == 0;) {
        const int a = action(sv, p, li, b);
        uint64_t  e = b + 1;
        while (e < has && e - b < 64 && action(sv, p, li, e) == a) {
            e++;
        }
        if (a == HOME) {
            rc = sums ? sf_put_sums(sv, li, b, e)
                      : sf_put_blocks(sv, p->t, b, e - b, l->file_off + b * DBLADE_BLOCK, sv->sums + l->sums_at + b);
        } else if (a == PATCH && !sums) {
            rc = sf_put_blocks(sv, p->t, b, e - b, *tail, got);
            for (uint64_t k = 0; rc == 0 && k < e - b; k++) {
                sv->patches[sv->n_patches++] = (struct sf_patch) { li, got[k], b + k, *tail + k * DBLADE_BLOCK };
                sv->sums[l->sums_at + b + k] = got[k]; // as this commit has it (its home slot stays the last one's)
            }
            *tail += (e - b) * DBLADE_BLOCK;
        }
        b = e;
    }
    return rc;
}

int sf_append(struct save * sv) {
    struct dblade_sessionfile * f  = sv->old;
    struct dblade_kv *          kv = sv->kv;
    sv->layers                     = calloc(f->n_layers ? f->n_layers : 1, sizeof(*sv->layers));
    struct layer_plan *         pl = calloc(f->n_layers ? f->n_layers : 1, sizeof(*pl));
    struct sec_plan             sp[SF_MAX_SECTIONS];
    sv->n_sums                     = f->n_sums;
    sv->sums                       = malloc((f->n_sums ? f->n_sums : 1) * sizeof(*sv->sums));
    if (!sv->layers || !pl || !sv->sums) {
        free(pl);
        return -ENOMEM;
    }
    memcpy(sv->sums, f->sums, f->n_sums * sizeof(*sv->sums));
    sv->n_layers = f->n_layers;
    pthread_mutex_lock(&kv->lock);
    int rc = plan_layers(sv, pl);
    if (rc == 1) {
        snprintf(sv->why_whole, sizeof(sv->why_whole), "the file holds another layout of the KV");
    }
    // the patches first: the tail's size
    uint64_t n_patch = 0;
    for (uint32_t li = 0; rc == 0 && li < sv->n_layers; li++) {
        for (uint64_t b = 0; b < sv->layers[li].saved / DBLADE_BLOCK; b++) {
            n_patch += action(sv, &pl[li], li, b) == PATCH;
        }
    }
    sv->patches = rc == 0 ? calloc(n_patch ? n_patch : 1, sizeof(*sv->patches)) : NULL;
    rc          = rc == 0 && !sv->patches ? -ENOMEM : rc;
    if (rc == 0) {
        plan_sections(sv, sp);
        // the tail where the last commit's is not: at the end of home if it fits before that one
        sv->n_patches       = (uint32_t) n_patch; // sizes the tail; counted again as written
        const uint64_t need = n_patch * DBLADE_BLOCK + sf_tail_meta_bytes(sv) + 64;
        sv->n_patches       = 0;
        const uint64_t home = f->h.home_end;
        uint64_t       tail = home + need <= f->h.tail_off ? home
                                                           : dblade_align_up(f->h.tail_off + f->h.tail_bytes, DBLADE_BLOCK);
        sv->h               = f->h;
        sv->h.tail_off      = tail;
        sv->h.n_sections    = 1; // SUMS, where it was
        for (uint32_t k = 0; k < f->h.n_sections; k++) {
            if (f->h.sections[k].kind == SEC_SUMS) {
                sv->h.sections[0] = f->h.sections[k];
            }
        }
        const bool direct = dblade_copy_set_direct(sv->fd, true) == 0;
        for (uint32_t li = 0; rc == 0 && li < sv->n_layers; li++) {
            sv->layers[li].n_patches = 0;
            const uint32_t before    = sv->n_patches;
            rc                       = write_layer(sv, &pl[li], li, &tail, false);
            sv->layers[li].n_patches = sv->n_patches - before;
        }
        if (direct) {
            dblade_copy_set_direct(sv->fd, false);
        }
        for (uint32_t li = 0; rc == 0 && li < sv->n_layers; li++) {
            rc = write_layer(sv, &pl[li], li, &tail, true);
        }
        sf_test_pause("kv");
        uint64_t end = tail;
        rc           = rc ? rc : sf_put_tail(sv, tail, &end);
        for (uint32_t i = 0; rc == 0 && i < sv->n_in; i++) {
            const struct dblade_section * s = &sv->in[i];
            if (sp[i].at) {
                sv->h.sections[sv->h.n_sections++] =
                    (struct sf_section) { s->kind, dblade_crc32c(s->data, s->bytes), sp[i].at, s->bytes };
                rc = sf_put(sv, (const uint8_t *) s->data + sp[i].from, s->bytes - sp[i].from, sp[i].at + sp[i].from);
            }
        }
        sv->h.tail_bytes = end - sv->h.tail_off;
        sv->h.file_bytes = end;
        sv->h.gen        = f->h.gen + 1;
        uint64_t kv_bytes = 0;
        for (uint32_t li = 0; li < sv->n_layers; li++) {
            kv_bytes += sv->layers[li].saved;
        }
        sv->h.kv_bytes = kv_bytes;
        rc             = rc ? rc : sf_commit(sv, 1 - f->slot);
        if (rc == 0) {
            dblade_sessionfile_matched(kv, f->dev, f->ino, sv->h.gen, sv->h.lineage);
        }
    }
    pthread_mutex_unlock(&kv->lock);
    for (uint32_t li = 0; li < f->n_layers; li++) {
        free(pl[li].now);
    }
    free(pl);
    if (rc == 1) { // nothing written: the save as it was, for the whole one
        free(sv->layers), free(sv->sums), free(sv->patches);
        sv->layers = NULL, sv->sums = NULL, sv->patches = NULL;
        sv->n_layers = 0, sv->n_sums = 0, sv->n_patches = 0;
    }
    if (rc == 0) {
        // the last commit's tail is named by nothing now: cut off, or a hole
        const uint64_t old_end = dblade_align_up(f->h.tail_off + f->h.tail_bytes, DBLADE_BLOCK);
        if (sv->h.tail_off < f->h.tail_off) {
            if (ftruncate(sv->fd, (off_t) sv->h.file_bytes) < 0) {
                // the bytes stay, unnamed: harmless
            }
        } else if (old_end > f->h.tail_off) {
            fallocate(sv->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t) f->h.tail_off,
                      (off_t) (old_end - f->h.tail_off));
        }
    }
    return rc;
}
