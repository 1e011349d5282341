// The worker (worker.c): one thread per KV object that runs work while the graph computes: the direct
// path's transfers and the auto policy's memory samples. A work item is a function; the thread runs
// them in order, the KV object's lock held (a work may drop it while it waits for I/O).
#ifndef DUALBLADE_WORKER_H
#define DUALBLADE_WORKER_H

#include <pthread.h>
#include <stdbool.h>

struct dblade_work {
    void (*run)(struct dblade_work * w); // called on the worker, the lock held
    struct dblade_work * next;
    bool                 queued;
};

struct dblade_worker {
    pthread_mutex_t *    lock; // the KV object's
    pthread_cond_t       work, done;
    pthread_t            thread;
    bool                 started, stop;
    struct dblade_work * head, * tail;
};

void dblade_worker_init(struct dblade_worker * w, pthread_mutex_t * lock);
// stops the thread (the lock not held); queued work is dropped
void dblade_worker_destroy(struct dblade_worker * w);
// the lock held: queues the work (at the front when urgent) unless it is queued already, starting the
// thread on first use; false when no thread can run (the caller does the work itself)
bool dblade_worker_queue(struct dblade_worker * w, struct dblade_work * work, bool urgent);
// the lock held: sleeps until the worker has finished a work item (or a work announced progress)
void dblade_worker_wait(struct dblade_worker * w);

#endif
