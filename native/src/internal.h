// Shared between the module's own files; nothing here is exported.
#ifndef DUALBLADE_INTERNAL_H
#define DUALBLADE_INTERNAL_H

#include "dualblade.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define DBLADE_BLOCK 4096u // every extent, offset and length is a multiple of this

static inline uint64_t dblade_align_up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }
static inline uint64_t dblade_align_down(uint64_t x, uint64_t a) { return x / a * a; }

// Staging memory the direct path needs for layers of at most max_layer bytes: the layer in use
// and the one being prefetched, rounded up to whole blocks.
static inline uint64_t dblade_staging_bytes(uint64_t max_layer) {
    return 2 * dblade_align_up(max_layer, DBLADE_BLOCK);
}

uint64_t dblade_now_ns(void);

// --- error messages: the last failure of this thread, in words (the return value is -errno) ---
void         dblade_set_error(const char * fmt, ...) __attribute__((format(printf, 1, 2)));
const char * dblade_get_error(void);

// --- device header (header.c) ---
#define DBLADE_HEADER_BYTES   4096u
#define DBLADE_HEADER_VERSION 1u
#define DBLADE_DEVICE_DATA_OFFSET (1u << 20) // data starts 1 MiB in: header, then room to grow

struct dblade_header {
    uint32_t version;
    uint8_t  uuid[16];
    uint64_t device_bytes;
    uint64_t data_offset;
    uint64_t data_bytes;
    uint32_t align;
    uint64_t geometry; // hash of the KV layout the data was written with
    uint64_t created;  // unix seconds
};

uint32_t     dblade_crc32c(const void * data, size_t len);
void         dblade_header_encode(const struct dblade_header * h, uint8_t out[DBLADE_HEADER_BYTES]);
int          dblade_header_decode(const uint8_t in[DBLADE_HEADER_BYTES], struct dblade_header * h);
// what the first bytes of a device hold: a name, "data of another program", or NULL when blank
const char * dblade_detect_signature(const uint8_t * buf, size_t len);
#define DBLADE_SIGNATURE_SCAN (68u * 1024u) // bytes to read for dblade_detect_signature

// --- backing store (store.c): a preallocated file or a raw device, read/written with O_DIRECT ---
enum dblade_store_kind { DBLADE_STORE_FILE = 1, DBLADE_STORE_DEVICE = 2 };

struct dblade_store {
    int      fd;
    int      kind;
    uint32_t align;       // O_DIRECT offset/length alignment
    uint32_t mem_align;   // O_DIRECT buffer alignment
    uint64_t data_offset; // where extents start
    uint64_t data_bytes;  // bytes reserved for extents
    uint32_t n_extents;   // file: FIEMAP extent count of the reservation (1 = contiguous)
    char     path[512];
};

// opens (creates) the store for data_bytes of extents; -errno with dblade_get_error() set
// dry: check everything, write nothing (no preallocation, no header)
int  dblade_store_open(struct dblade_store * st, const struct dblade_config * cfg, uint64_t data_bytes,
                       uint64_t geometry, bool dry);
void dblade_store_close(struct dblade_store * st);
int  dblade_probe_align(int fd, uint32_t * off_align, uint32_t * mem_align);

// --- I/O engine (io.c): whole aligned ranges, retried on EINTR and short transfers ---
int dblade_io_read(int fd, void * buf, uint64_t len, uint64_t off);
int dblade_io_write(int fd, const void * buf, uint64_t len, uint64_t off);

#endif
