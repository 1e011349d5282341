// Shared between the module's own files; nothing here is exported.
#ifndef DUALBLADE_INTERNAL_H
#define DUALBLADE_INTERNAL_H

#include <stdint.h>

// Staging memory the direct path needs for layers of at most max_layer bytes: the layer in use
// and the one being prefetched, rounded up to whole 4 KiB blocks.
static inline uint64_t dblade_staging_bytes(uint64_t max_layer) {
    const uint64_t blk = 4096;
    return 2 * ((max_layer + blk - 1) / blk * blk);
}

#endif
