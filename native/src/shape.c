// The request shape of a store's O_DIRECT reads, chosen by measuring them (shape.h says why).
//
// Every read batch of at least MEASURE_BYTES is timed as a whole (a decode pass reads a layer's K and V in
// one batch: 32 MiB for llama-1b at 16K). The first batches go round the candidates, TRIES each; after
// that reads take the fastest by its recent average, and every EXPLORE-th batch goes to the next of the
// others in turn, so that a shape the device got better at is found again (the GPU machine's disk moves
// by +-30% over tens of seconds). What one batch costs there: at most the gap between two shapes, 1/EXPLORE
// of the time.

#define _GNU_SOURCE
#include "shape.h"

#include "base.h"
#include "engine.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#define MEASURE_BYTES (8u << 20) // a smaller batch is mostly the device's latency: it tells shapes apart badly
#define TRIES         3u
#define EXPLORE       16u
#define KEEP          0.7 // of the average, per new batch
#define MAX_CHUNK     (64u << 20)
#define MAX_DEPTH     DBLADE_IO_DEPTH // what an engine's batch keeps in flight at most

// the first is what reads use until the others are measured (the engine's shape before this file)
static const struct {
    uint32_t chunk, depth;
} candidates[DBLADE_SHAPES] = {
    { DBLADE_IO_CHUNK, DBLADE_IO_DEPTH }, { 1u << 20, 4 }, { 1u << 20, 16 }, { 4u << 20, 4 }, { 8u << 20, 4 },
};

struct dblade_io_shape {
    pthread_mutex_t lock;
    int             fixed;
    uint32_t        chunk, depth; // fixed: DUALBLADE_IO_SHAPE's
    uint32_t        best, explore;
    uint64_t        measured; // batches
    uint64_t        batches[DBLADE_SHAPES];
    double          gib_s[DBLADE_SHAPES];
};

// "1M:4", "512K:8", "4194304:16": the size takes K, M or nothing (bytes)
static int parse(const char * e, uint32_t * chunk, uint32_t * depth) {
    char *             end  = NULL;
    unsigned long long size = strtoull(e, &end, 10);
    if (end == e) {
        return -EINVAL;
    }
    if (*end == 'K' || *end == 'k') {
        size <<= 10, end++;
    } else if (*end == 'M' || *end == 'm') {
        size <<= 20, end++;
    }
    if (*end != ':') {
        return -EINVAL;
    }
    const char *       d = end + 1;
    unsigned long long n = strtoull(d, &end, 10);
    if (end == d || *end || size < DBLADE_BLOCK || size > MAX_CHUNK || size % DBLADE_BLOCK || n < 1 ||
        n > MAX_DEPTH) {
        return -EINVAL;
    }
    *chunk = (uint32_t) size;
    *depth = (uint32_t) n;
    return 0;
}

int dblade_io_shape_new(struct dblade_io_shape ** out) {
    struct dblade_io_shape * s = calloc(1, sizeof(*s));
    if (!s) {
        return -ENOMEM;
    }
    const char * e = getenv("DUALBLADE_IO_SHAPE");
    if (e && *e && strcmp(e, "auto")) {
        if (parse(e, &s->chunk, &s->depth) < 0) {
            dblade_set_error("DUALBLADE_IO_SHAPE=%s is not a request shape: use auto, or SIZE:DEPTH such as 1M:4 "
                             "(SIZE a multiple of 4K up to 64M, DEPTH 1-%u)", e, MAX_DEPTH);
            free(s);
            return -EINVAL;
        }
        s->fixed = 1;
    }
    pthread_mutex_init(&s->lock, NULL);
    *out = s;
    return 0;
}

void dblade_io_shape_free(struct dblade_io_shape * s) {
    if (s) {
        pthread_mutex_destroy(&s->lock);
        free(s);
    }
}

void dblade_io_shape_pick(struct dblade_io_shape * s, int write, uint64_t bytes, uint32_t * chunk,
                          uint32_t * depth, int * which) {
    *which = -1;
    if (s->fixed) {
        *chunk = s->chunk, *depth = s->depth;
        return;
    }
    pthread_mutex_lock(&s->lock);
    uint32_t c = s->best;
    if (!write && bytes >= MEASURE_BYTES) {
        uint32_t fewest = 0;
        for (uint32_t i = 1; i < DBLADE_SHAPES; i++) {
            fewest = s->batches[i] < s->batches[fewest] ? i : fewest;
        }
        if (s->batches[fewest] < TRIES) {
            c = fewest;
        } else if (++s->measured % EXPLORE == 0) {
            s->explore = (s->explore + 1) % DBLADE_SHAPES;
            s->explore = s->explore == s->best ? (s->explore + 1) % DBLADE_SHAPES : s->explore;
            c          = s->explore;
        }
        *which = (int) c;
    }
    pthread_mutex_unlock(&s->lock);
    *chunk = candidates[c].chunk, *depth = candidates[c].depth;
}

void dblade_io_shape_done(struct dblade_io_shape * s, int which, uint64_t bytes, uint64_t ns) {
    if (which < 0 || which >= DBLADE_SHAPES || ns == 0) {
        return;
    }
    const double r = (double) bytes / (double) ns * 1e9 / (double) (1u << 30);
    pthread_mutex_lock(&s->lock);
    s->gib_s[which] = s->batches[which]++ ? KEEP * s->gib_s[which] + (1 - KEEP) * r : r;
    for (uint32_t i = 0; i < DBLADE_SHAPES; i++) {
        if (s->batches[i] >= TRIES && (s->batches[s->best] < TRIES || s->gib_s[i] > s->gib_s[s->best])) {
            s->best = i;
        }
    }
    pthread_mutex_unlock(&s->lock);
}

void dblade_io_shape_report(struct dblade_io_shape * s, struct dblade_io_shape_report * out) {
    memset(out, 0, sizeof(*out));
    out->fixed = s->fixed;
    if (s->fixed) {
        out->chunk = s->chunk, out->depth = s->depth;
        return;
    }
    pthread_mutex_lock(&s->lock);
    out->chunk = candidates[s->best].chunk, out->depth = candidates[s->best].depth;
    out->n     = DBLADE_SHAPES;
    for (uint32_t i = 0; i < DBLADE_SHAPES; i++) {
        out->rates[i] = (struct dblade_io_shape_rate) { candidates[i].chunk, candidates[i].depth, s->batches[i],
                                                        s->gib_s[i] };
    }
    pthread_mutex_unlock(&s->lock);
}
