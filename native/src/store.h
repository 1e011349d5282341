// The backing store (store.c): one or several members, each a preallocated, unnamed file or a raw device
// with our header, read and written with O_DIRECT in aligned byte ranges. Several members are striped
// (stripe.h): callers see one logical offset space and ask the map where each byte lives.
#ifndef DUALBLADE_STORE_H
#define DUALBLADE_STORE_H

#include "dualblade.h"
#include "stripe.h"

#include <stdbool.h>
#include <stdint.h>

enum dblade_store_kind { DBLADE_STORE_FILE = 1, DBLADE_STORE_DEVICE = 2 };

struct dblade_store_member {
    int      fd;
    int      kind;
    uint32_t align;       // O_DIRECT offset/length alignment
    uint32_t mem_align;   // O_DIRECT buffer alignment
    uint64_t data_offset; // where its share starts
    uint64_t data_bytes;  // bytes reserved for its share
    uint32_t n_extents;   // file: FIEMAP extent count of the reservation (1 = contiguous)
    double   read_bps;    // striped: the probed O_DIRECT read bandwidth (0: not probed)
    char     path[512];
};

struct dblade_store {
    uint32_t                   n; // members (0: no store)
    struct dblade_store_member members[DBLADE_STRIPE_MEMBERS];
    struct dblade_stripe       map;         // logical offset -> member, offset there
    uint32_t                   align;       // the strictest of the members' (and of the stripe unit)
    uint32_t                   mem_align;
    uint64_t                   data_offset; // logical offset where extents start
    uint64_t                   data_bytes;  // logical bytes reserved for extents
    uint64_t                   touched_end; // logical: written below this since it opened (what a wipe covers)
    char                       path[512];   // for messages: the member, or the members joined by ", "
    struct dblade_io_shape *   shape;       // its O_DIRECT reads' shape, measured by its engines (shape.c)
};

// opens (creates) the store for data_bytes of extents; -errno with dblade_get_error() set. cfg's kv_dir and
// kv_device may each name several members, one per line. dry: check everything, write nothing (no
// preallocation, no header, no probe)
int  dblade_store_open(struct dblade_store * st, const struct dblade_config * cfg, uint64_t data_bytes,
                       uint64_t geometry, bool dry);
void dblade_store_close(struct dblade_store * st);
// the store will hold data below end (logical)
static inline void dblade_store_touch(struct dblade_store * st, uint64_t end) {
    st->touched_end = end > st->touched_end ? end : st->touched_end;
}
// discards (or overwrites with zeros) everything touched: nothing of a conversation stays
int  dblade_store_wipe(struct dblade_store * st, bool zero);
int  dblade_probe_align(int fd, uint32_t * off_align, uint32_t * mem_align);
// where a failed transfer went, for messages: the store's path, or (striped) the member's and which it is
const char * dblade_store_where(const struct dblade_store * st, int member, char * buf, size_t cap);
// [off, off + len) of the store mapped at addr (MAP_SHARED | MAP_FIXED), one mapping per stripe piece
int  dblade_store_mmap(const struct dblade_store * st, void * addr, uint64_t off, uint64_t len);
// the page cache lets go of [off, off + len)
void dblade_store_dontneed(const struct dblade_store * st, uint64_t off, uint64_t len);
// [off, off + len) of the store written from src with O_DIRECT, now, around the page cache (which the kernel
// writes back and drops for the range first): src, off and len aligned as the store's O_DIRECT needs; 0 or -errno
int  dblade_store_write_direct(const struct dblade_store * st, const void * src, uint64_t off, uint64_t len);
// a copy of the map whose members are opened again without O_DIRECT (buffered reads through the page cache);
// dblade_store_close_buffered closes them
int  dblade_store_open_buffered(const struct dblade_store * st, struct dblade_stripe * out);
void dblade_store_close_buffered(struct dblade_stripe * map);

#endif
