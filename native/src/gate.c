// The gate: ggml's compute threads meet here at every fence of an offloaded tensor.
//
// ggml runs a custom op on every thread of the graph and then puts them through its barrier, where
// the waiting ones spin. A fence runs on thread 0; while it waits for the disk, the other threads
// would spin for the whole I/O time (one core of two, busy doing nothing). Instead they arrive here:
// a barrier of nth threads that spins while the fence computes (a few microseconds, as ggml would)
// and sleeps on a futex once the fence says it is waiting for I/O (dblade_gate_block), or after
// a short spin whatever it says.
//
// Lock-free; it owns its four counters and calls nothing but the futex.

#define _GNU_SOURCE
#include "gate.h"

#include <limits.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#define GATE_SPINS 1024u // about 20 us of pause instructions: what a fence without I/O takes

static void futex_wait(_Atomic uint32_t * addr, uint32_t val) {
    syscall(SYS_futex, (uint32_t *) addr, FUTEX_WAIT_PRIVATE, val, NULL, NULL, 0);
}

static void futex_wake_all(_Atomic uint32_t * addr) {
    syscall(SYS_futex, (uint32_t *) addr, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

void dblade_gate_arrive(struct dblade_gate * g, uint32_t nth) {
    // the generation cannot move before this thread has arrived: reading it first is safe
    const uint32_t gen = atomic_load_explicit(&g->gen, memory_order_acquire);
    if (atomic_fetch_add_explicit(&g->arrived, 1, memory_order_acq_rel) + 1 == nth) {
        atomic_store_explicit(&g->arrived, 0, memory_order_relaxed);
        atomic_fetch_add_explicit(&g->gen, 1, memory_order_seq_cst);
        if (atomic_load_explicit(&g->sleepers, memory_order_seq_cst) > 0) {
            futex_wake_all(&g->gen);
        }
        return;
    }
    for (uint32_t spins = 0; atomic_load_explicit(&g->gen, memory_order_acquire) == gen;) {
        // a fence that takes long without saying so (a busy machine took the core of the thread
        // doing it) is waited for asleep too: spinning would keep that core from it
        if (spins >= GATE_SPINS || atomic_load_explicit(&g->blocking, memory_order_acquire)) {
            atomic_fetch_add_explicit(&g->sleepers, 1, memory_order_seq_cst);
            futex_wait(&g->gen, gen); // returns at once if the generation has moved
            atomic_fetch_sub_explicit(&g->sleepers, 1, memory_order_seq_cst);
            spins = 0; // woken early (the I/O is in): spin for the rest of the fence
        } else {
            cpu_relax();
            spins++;
        }
    }
}

void dblade_gate_unblock(struct dblade_gate * g) {
    if (atomic_exchange_explicit(&g->blocking, 0, memory_order_seq_cst) &&
        atomic_load_explicit(&g->sleepers, memory_order_seq_cst) > 0) {
        futex_wake_all(&g->gen); // they wake while the fence finishes, not after it
    }
}
