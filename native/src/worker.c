// The worker: a thread that runs the KV object's background work in order (worker.h). The graph's
// thread never reads a file or waits for a prefetch it did not ask for: that is done here.
//
// It owns the thread and its queue; it calls nothing but the work items it is given.

#define _GNU_SOURCE
#include "worker.h"

void dblade_worker_init(struct dblade_worker * w, pthread_mutex_t * lock) {
    w->lock    = lock;
    w->started = false;
    w->stop    = false;
    w->head = w->tail = NULL;
    pthread_cond_init(&w->work, NULL);
    pthread_cond_init(&w->done, NULL);
}

static void * worker_main(void * arg) {
    struct dblade_worker * w = arg;
    pthread_mutex_lock(w->lock);
    for (;;) {
        while (!w->head && !w->stop) {
            pthread_cond_wait(&w->work, w->lock);
        }
        if (w->stop) {
            break;
        }
        struct dblade_work * work = w->head;
        w->head                   = work->next;
        if (!w->head) {
            w->tail = NULL;
        }
        work->next   = NULL;
        work->queued = false;
        work->run(work);
        pthread_cond_broadcast(&w->done);
    }
    pthread_mutex_unlock(w->lock);
    return NULL;
}

void dblade_worker_destroy(struct dblade_worker * w) {
    if (w->started) {
        pthread_mutex_lock(w->lock);
        w->stop = true;
        pthread_cond_broadcast(&w->work);
        pthread_mutex_unlock(w->lock);
        pthread_join(w->thread, NULL);
        w->started = false;
    }
    pthread_cond_destroy(&w->work);
    pthread_cond_destroy(&w->done);
}

bool dblade_worker_queue(struct dblade_worker * w, struct dblade_work * work, bool urgent) {
    if (!w->started && pthread_create(&w->thread, NULL, worker_main, w) == 0) {
        w->started = true;
    }
    if (!w->started) {
        return false;
    }
    if (work->queued) {
        return true;
    }
    work->queued = true;
    if (urgent || !w->head) {
        work->next = w->head;
        w->head    = work;
        if (!w->tail) {
            w->tail = work;
        }
    } else {
        work->next    = NULL;
        w->tail->next = work;
        w->tail       = work;
    }
    pthread_cond_signal(&w->work);
    return true;
}

void dblade_worker_wait(struct dblade_worker * w) {
    pthread_cond_wait(&w->done, w->lock);
}
