// What happens to a KV object that its user must hear of (events.c): the sticky I/O error, the log of
// path switches, and the time the graph stalls waiting for I/O. Below everything that moves KV, so
// that any part may report; guarded by the KV object's lock.
#ifndef DUALBLADE_EVENTS_H
#define DUALBLADE_EVENTS_H

#include "dualblade.h"
#include "gate.h"

#include <stdatomic.h>
#include <stdint.h>

#define DBLADE_SWITCH_LOG 64u

struct dblade_events {
    uint64_t             t0_ns;        // when the KV object was created
    int                  error;        // the first failure (sticky): -errno, 0 for none
    char                 error_msg[256];
    uint64_t             n_io_errors;  // failed transfers (checksum mismatches included)
    struct dblade_switch switches[DBLADE_SWITCH_LOG];
    uint64_t             n_switches;
    struct dblade_gate   gate;         // lock-free: the graph's other threads wait here during a stall
    uint64_t             stall_ns;     // the graph's stall since the pipeline last entered a layer
};

void dblade_events_init(struct dblade_events * ev);
// records the first failure; later ones are dropped (the first says what went wrong)
void dblade_fail(struct dblade_events * ev, int rc, const char * fmt, ...) __attribute__((format(printf, 3, 4)));
// one switch of path (il -1: the initial placement)
void dblade_log_switch(struct dblade_events * ev, int32_t il, uint32_t from, uint32_t to, const char * why);
// a wait of the graph on I/O begins (its threads may sleep) / ends: counted into *counter (a layer's
// io_wait_ns, or NULL) and into stall_ns
uint64_t dblade_stall_begin(struct dblade_events * ev);
void     dblade_stall_end(struct dblade_events * ev, _Atomic uint64_t * counter, uint64_t t0);

#endif
