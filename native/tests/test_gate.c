// The gate: ggml's compute threads meet at a fence. Nobody leaves before every thread has arrived;
// while the fence says it waits for I/O the others sleep (their CPU time stays near zero), and
// they get up when it stops waiting. Thousands of rounds, as a graph makes them.
#define _GNU_SOURCE
#include "../src/gate.h"
#include "check.h"

#include <pthread.h>
#include <stdio.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#define NTH 3

static struct dblade_gate gate;
static _Atomic int        arrived_round[NTH];
static _Atomic int        errors;
static _Atomic uint64_t   waiter_cpu_us;
static int                rounds = 20000;
static int                slow_every = 0; // thread 0 blocks for 100 ms every that many rounds (0: never)

static uint64_t thread_cpu_us(void) {
    struct rusage ru;
    getrusage(RUSAGE_THREAD, &ru);
    return (uint64_t) (ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000000u + (uint64_t) (ru.ru_utime.tv_usec +
                                                                                          ru.ru_stime.tv_usec);
}

static void * run(void * arg) {
    const int ith = (int) (intptr_t) arg;
    for (int r = 1; r <= rounds; r++) {
        if (ith == 0 && slow_every && r % slow_every == 0) {
            dblade_gate_block(&gate); // the fence waits for the disk
            struct timespec ts = { 0, 100 * 1000 * 1000 };
            nanosleep(&ts, NULL);
            dblade_gate_unblock(&gate);
        }
        atomic_store(&arrived_round[ith], r);
        const uint64_t c0 = thread_cpu_us();
        dblade_gate_arrive(&gate, NTH);
        if (ith != 0 && slow_every && r % slow_every == 0) {
            atomic_fetch_add(&waiter_cpu_us, thread_cpu_us() - c0);
        }
        for (int j = 0; j < NTH; j++) { // nobody left before everyone of this round came
            if (atomic_load(&arrived_round[j]) < r) {
                atomic_fetch_add(&errors, 1);
            }
        }
    }
    return NULL;
}

static void go(void) {
    pthread_t th[NTH];
    for (int i = 0; i < NTH; i++) atomic_store(&arrived_round[i], 0);
    for (int i = 0; i < NTH; i++) CHECK_EQ(pthread_create(&th[i], NULL, run, (void *) (intptr_t) i), 0);
    for (int i = 0; i < NTH; i++) pthread_join(th[i], NULL);
    CHECK_EQ(atomic_load(&errors), 0);
}

int main(void) {
    go(); // fast fences: spin, never wrong
    rounds = 10, slow_every = 2; // five fences of 100 ms waiting for I/O
    go();
    const uint64_t cpu = atomic_load(&waiter_cpu_us);
    printf("test_gate: %d waiters x 5 waits of 100 ms cost %llu us of CPU\n", NTH - 1, (unsigned long long) cpu);
    CHECK(cpu < 50000); // asleep: a spinning waiter would burn 2 x 500 ms
    puts("test_gate: ok");
    return 0;
}
