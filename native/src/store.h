// The backing store (store.c): a preallocated, unnamed file or a raw device with our header, read and
// written with O_DIRECT, in aligned byte ranges.
#ifndef DUALBLADE_STORE_H
#define DUALBLADE_STORE_H

#include "dualblade.h"

#include <stdbool.h>
#include <stdint.h>

enum dblade_store_kind { DBLADE_STORE_FILE = 1, DBLADE_STORE_DEVICE = 2 };

struct dblade_store {
    int      fd;
    int      kind;
    uint32_t align;       // O_DIRECT offset/length alignment
    uint32_t mem_align;   // O_DIRECT buffer alignment
    uint64_t data_offset; // where extents start
    uint64_t data_bytes;  // bytes reserved for extents
    uint32_t n_extents;   // file: FIEMAP extent count of the reservation (1 = contiguous)
    uint64_t touched_end; // written below this offset since it opened (what a wipe covers)
    char     path[512];
};

// opens (creates) the store for data_bytes of extents; -errno with dblade_get_error() set
// dry: check everything, write nothing (no preallocation, no header)
int  dblade_store_open(struct dblade_store * st, const struct dblade_config * cfg, uint64_t data_bytes,
                       uint64_t geometry, bool dry);
void dblade_store_close(struct dblade_store * st);
// the store will hold data below end
static inline void dblade_store_touch(struct dblade_store * st, uint64_t end) {
    st->touched_end = end > st->touched_end ? end : st->touched_end;
}
// discards (or overwrites with zeros) everything touched: nothing of a conversation stays
int  dblade_store_wipe(struct dblade_store * st, bool zero);
int  dblade_probe_align(int fd, uint32_t * off_align, uint32_t * mem_align);

#endif
