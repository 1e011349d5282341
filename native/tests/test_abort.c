// Stopping an evaluation (Llama.abort_eval): dblade_kv_abort asks, from any thread, and dblade_kv_aborting, the
// abort callback llama.cpp's CPU backend calls between two nodes of a graph, answers; the request stays until
// withdrawn. A thread that asks while another polls, as a server's event loop does while its worker computes.
#define _GNU_SOURCE
#include "../src/testing.h"
#include "dualblade.h"
#include "check.h"

#include <errno.h>
#include <pthread.h>
#include <unistd.h>

static void * ask(void * kv) {
    usleep(20 * 1000);
    CHECK_EQ(dblade_kv_abort(kv, 1), 0);
    return NULL;
}

int main(void) {
    struct dblade_config cfg = { .policy = DBLADE_POLICY_RAM, .budget_bytes = DBLADE_BUDGET_UNLIMITED };
    struct dblade_kv *   kv  = NULL;
    CHECK_EQ(dblade_kv_create(&cfg, 0, NULL, &kv), 0);

    CHECK(!dblade_kv_aborting(kv));
    CHECK_EQ(dblade_kv_abort(kv, 1), 0);
    CHECK(dblade_kv_aborting(kv));
    CHECK(dblade_kv_aborting(kv)); // asked again and again until withdrawn
    CHECK_EQ(dblade_kv_abort(kv, 0), 0);
    CHECK(!dblade_kv_aborting(kv));

    // another thread asks while this one polls, as llama.cpp does between nodes
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, ask, kv), 0);
    long polls = 0;
    while (!dblade_kv_aborting(kv)) {
        polls++;
    }
    CHECK_EQ(pthread_join(t, NULL), 0);
    CHECK(polls > 0);
    CHECK_EQ(dblade_kv_abort(kv, 0), 0);

    CHECK(!dblade_kv_aborting(NULL)); // a context without a KV object is never stopped
    CHECK_EQ(dblade_kv_abort(NULL, 1), -EINVAL);
    dblade_kv_release(kv);
    printf("test_abort: ok\n");
    return 0;
}
