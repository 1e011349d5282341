// The placement plan (plan.c; dblade_plan in dualblade.h is its public face): what it reserves.
#ifndef DUALBLADE_PLAN_H
#define DUALBLADE_PLAN_H

#include "base.h"

// Staging memory the direct path needs for layers of at most max_layer bytes out of n_layers: the
// layer in use and the one being prefetched, rounded up to whole blocks, and the tail page each
// direct K and V tensor keeps in memory between passes.
static inline uint64_t dblade_plan_staging(uint64_t max_layer, uint32_t n_layers) {
    return 2 * dblade_align_up(max_layer, DBLADE_BLOCK) + (uint64_t) n_layers * 2 * DBLADE_BLOCK;
}

#endif
