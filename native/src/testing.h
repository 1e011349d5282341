// Hooks for the module's own C tests (native/tests/); not exported.
#ifndef DUALBLADE_TESTING_H
#define DUALBLADE_TESTING_H

#include "dualblade.h"

// returns once the worker has nothing queued or running
void dblade_kv_quiesce(struct dblade_kv * kv);
// the KV object's lock, to read what its threads write (a tensor's read counters)
void dblade_kv_lock(struct dblade_kv * kv);
void dblade_kv_unlock(struct dblade_kv * kv);

#endif
