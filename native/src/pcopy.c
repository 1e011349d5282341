// Parallel memcpy: a pool of threads that, with the caller, copy one large range in chunks (pcopy.h). It calls
// nothing of the module.

#define _GNU_SOURCE
#include "pcopy.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#define PCOPY_CHUNK   (2u << 20)
#define PCOPY_THREADS 15u

struct dblade_pcopy {
    pthread_mutex_t  run_lock; // one copy at a time
    pthread_mutex_t  lock;
    pthread_cond_t   work, done;
    pthread_t        threads[PCOPY_THREADS];
    uint32_t         n_threads;
    bool             stop;
    uint64_t         generation; // bumped for each copy
    uint32_t         busy;       // helpers inside the current copy
    // the copy in progress
    uint8_t *        dst;
    const uint8_t *  src;
    uint64_t         len;
    _Atomic uint64_t next; // the next chunk's offset
};

static void copy_chunks(struct dblade_pcopy * p) {
    for (;;) {
        const uint64_t off = atomic_fetch_add(&p->next, PCOPY_CHUNK);
        if (off >= p->len) {
            return;
        }
        const uint64_t n = p->len - off < PCOPY_CHUNK ? p->len - off : PCOPY_CHUNK;
        memcpy(p->dst + off, p->src + off, n);
    }
}

static void * helper(void * arg) {
    struct dblade_pcopy * p    = arg;
    uint64_t              seen = 0;
    pthread_mutex_lock(&p->lock);
    for (;;) {
        while (!p->stop && p->generation == seen) {
            pthread_cond_wait(&p->work, &p->lock);
        }
        if (p->stop) {
            break;
        }
        seen = p->generation;
        p->busy++;
        pthread_mutex_unlock(&p->lock);
        copy_chunks(p);
        pthread_mutex_lock(&p->lock);
        if (--p->busy == 0) {
            pthread_cond_broadcast(&p->done);
        }
    }
    pthread_mutex_unlock(&p->lock);
    return NULL;
}

int dblade_pcopy_open(struct dblade_pcopy ** out, uint32_t n_threads) {
    struct dblade_pcopy * p = calloc(1, sizeof(*p));
    if (!p) {
        return -ENOMEM;
    }
    pthread_mutex_init(&p->run_lock, NULL);
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->work, NULL);
    pthread_cond_init(&p->done, NULL);
    n_threads = n_threads < PCOPY_THREADS ? n_threads : PCOPY_THREADS;
    for (uint32_t i = 0; i < n_threads; i++) {
        if (pthread_create(&p->threads[i], NULL, helper, p) != 0) {
            break;
        }
        p->n_threads++;
    }
    *out = p;
    return 0;
}

void dblade_pcopy_close(struct dblade_pcopy * p) {
    if (!p) {
        return;
    }
    pthread_mutex_lock(&p->lock);
    p->stop = true;
    pthread_cond_broadcast(&p->work);
    pthread_mutex_unlock(&p->lock);
    for (uint32_t i = 0; i < p->n_threads; i++) {
        pthread_join(p->threads[i], NULL);
    }
    pthread_cond_destroy(&p->work);
    pthread_cond_destroy(&p->done);
    pthread_mutex_destroy(&p->lock);
    pthread_mutex_destroy(&p->run_lock);
    free(p);
}

void dblade_pcopy_run(struct dblade_pcopy * p, void * dst, const void * src, uint64_t len) {
    if (len <= PCOPY_CHUNK || p->n_threads == 0) {
        memcpy(dst, src, len);
        return;
    }
    pthread_mutex_lock(&p->run_lock);
    pthread_mutex_lock(&p->lock);
    p->dst = dst, p->src = src, p->len = len;
    atomic_store(&p->next, 0);
    p->generation++;
    pthread_cond_broadcast(&p->work);
    pthread_mutex_unlock(&p->lock);
    copy_chunks(p); // the caller too
    pthread_mutex_lock(&p->lock);
    while (p->busy > 0) {
        pthread_cond_wait(&p->done, &p->lock);
    }
    pthread_mutex_unlock(&p->lock);
    pthread_mutex_unlock(&p->run_lock);
}
