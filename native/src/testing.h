// Hooks for the module's own C tests (native/tests/); not exported.
#ifndef DUALBLADE_TESTING_H
#define DUALBLADE_TESTING_H

#include "dualblade.h"

// returns once the worker has nothing queued or running
void dblade_kv_quiesce(struct dblade_kv * kv);

#endif
