// The gate (gate.c): ggml's compute threads meet at every fence of an offloaded tensor; while the
// fence waits for I/O they sleep on a futex instead of spinning at ggml's barrier.
#ifndef DUALBLADE_GATE_H
#define DUALBLADE_GATE_H

#include <stdatomic.h>
#include <stdint.h>

struct dblade_gate {
    _Atomic uint32_t gen;      // bumped when every thread has arrived
    _Atomic uint32_t arrived;
    _Atomic uint32_t blocking; // the fence is waiting for I/O: sleep, do not spin
    _Atomic uint32_t sleepers;
};

// every thread but the fence's arrives here (nth in all); returns once the fence is done
void dblade_gate_arrive(struct dblade_gate * g, uint32_t nth);
// the fence waits for I/O from now on: arriving threads sleep
static inline void dblade_gate_block(struct dblade_gate * g) {
    atomic_store_explicit(&g->blocking, 1, memory_order_release);
}
// the fence no longer waits (its I/O is in, or it is done): sleeping waiters get up
void dblade_gate_unblock(struct dblade_gate * g);

#endif
