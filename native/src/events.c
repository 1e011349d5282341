// The sticky error, the switch log and the stall accounting of a KV object (events.h says what each
// holds). The caller holds the KV object's lock; the gate is lock-free.

#define _GNU_SOURCE
#include "events.h"

#include "base.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

void dblade_events_init(struct dblade_events * ev) {
    memset(ev, 0, sizeof(*ev));
    ev->t0_ns = dblade_now_ns();
}

void dblade_fail(struct dblade_events * ev, int rc, const char * fmt, ...) {
    if (ev->error == 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(ev->error_msg, sizeof(ev->error_msg), fmt, ap);
        va_end(ap);
        ev->error = rc;
    }
}

void dblade_log_switch(struct dblade_events * ev, int32_t il, uint32_t from, uint32_t to, const char * why) {
    struct dblade_switch * e = &ev->switches[ev->n_switches % DBLADE_SWITCH_LOG];
    e->t_ms                  = (dblade_now_ns() - ev->t0_ns) / 1000000u;
    e->il                    = il;
    e->from                  = from;
    e->to                    = to;
    snprintf(e->reason, sizeof(e->reason), "%s", why);
    ev->n_switches++;
}

uint64_t dblade_stall_begin(struct dblade_events * ev) {
    dblade_gate_block(&ev->gate);
    return dblade_now_ns();
}

void dblade_stall_end(struct dblade_events * ev, _Atomic uint64_t * counter, uint64_t t0) {
    dblade_gate_unblock(&ev->gate); // the other compute threads wake while this one finishes the fence
    const uint64_t dt = dblade_now_ns() - t0;
    if (counter) {
        atomic_fetch_add(counter, dt);
    }
    ev->stall_ns += dt;
}
