// Shared between the module's own files; nothing here is exported.
#ifndef DUALBLADE_INTERNAL_H
#define DUALBLADE_INTERNAL_H

#include "dualblade.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define DBLADE_BLOCK     4096u      // every extent, offset and length is a multiple of this
#define DBLADE_HUGE_PAGE (2u << 20) // a transparent huge page (x86-64, arm64 with 4 KiB pages)

static inline uint64_t dblade_align_up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }
static inline uint64_t dblade_align_down(uint64_t x, uint64_t a) { return x / a * a; }

// Staging memory the direct path needs for layers of at most max_layer bytes out of n_layers: the
// layer in use and the one being prefetched, rounded up to whole blocks, and the tail page each
// direct K and V tensor keeps in memory between passes.
static inline uint64_t dblade_staging_bytes(uint64_t max_layer, uint32_t n_layers) {
    return 2 * dblade_align_up(max_layer, DBLADE_BLOCK) + (uint64_t) n_layers * 2 * DBLADE_BLOCK;
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

// --- CRC-32C (crc32c.c) ---
uint32_t dblade_crc32c(const void * data, size_t len);
// the CRC of each DBLADE_BLOCK-sized block of data
void     dblade_crc32c_blocks(const void * data, size_t n_blocks, uint32_t * out);
// which implementation runs: "vpclmul", "sse42" or "soft" (DUALBLADE_CRC picks a slower one)
const char * dblade_crc32c_impl(void);
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
// discards (or overwrites with zeros) the data area below end: nothing of a conversation stays
int  dblade_store_wipe(struct dblade_store * st, uint64_t end, bool zero);
int  dblade_probe_align(int fd, uint32_t * off_align, uint32_t * mem_align);

// --- synchronous transfers (io.c): whole aligned ranges, retried on EINTR and short transfers ---
struct dblade_fault;
// fault (NULL: none) may replace each transfer's result (DUALBLADE_FAULT, for tests)
int dblade_io_rw(int fd, int write, void * buf, uint64_t len, uint64_t off, struct dblade_fault * fault);
int dblade_io_read(int fd, void * buf, uint64_t len, uint64_t off);
int dblade_io_write(int fd, const void * buf, uint64_t len, uint64_t off);

// --- asynchronous engine (engine.c): batches of transfers, DBLADE_IO_DEPTH chunks in flight ---
#define DBLADE_IO_CHUNK      (4u << 20)
#define DBLADE_IO_TAIL_CHUNK (1u << 20) // the last DBLADE_IO_CHUNK of a batch goes in pieces of this
#define DBLADE_IO_DEPTH 16u // 64 MiB in flight at most

enum { DBLADE_IO_URING = 1, DBLADE_IO_THREADS = 2 };

struct dblade_io_req {
    void *     buf;
    uint64_t   len;
    uint64_t   off;
    int        write;
    int        res;  // out: 0 or the first -errno of this request (-EBADMSG: a checksum mismatch)
    uint32_t * sums; // per DBLADE_BLOCK of the request, or NULL: a write records the blocks' CRC-32C,
                     // a read checks them (0: not known, not checked)
};

// --- fault injection for tests (fault.c): DUALBLADE_FAULT ---
#define DBLADE_FAULT_RULES 8u

struct dblade_fault_rule {
    int      write;
    int      kind;
    uint64_t n;      // the n-th transfer of its direction, from 1
    bool     onward; // and every later one
};

struct dblade_fault {
    uint32_t                 n_rules;
    struct dblade_fault_rule rules[DBLADE_FAULT_RULES];
    _Atomic uint64_t         count[2];  // transfers so far: reads, writes
    _Atomic uint64_t         short_off; // the rest of a short transfer ends the store here
};

// parses a fault list (NULL or "": none); -EINVAL with dblade_get_error() set
int     dblade_fault_init(struct dblade_fault * f, const char * spec);
// a transfer of len bytes at off completed with res (bytes, or -errno): what it reports instead
int64_t dblade_fault_apply(struct dblade_fault * f, int write, uint64_t off, uint64_t len, int64_t res);

// --- io_uring on the kernel's ABI (uring.c): a ring, its SQEs and CQEs, nothing more ---
#ifdef DBLADE_HAVE_URING
#    include <linux/io_uring.h>

struct dblade_ring {
    int                   fd;
    void *                sq_ring, * cq_ring;
    size_t                sq_bytes, cq_bytes, sqes_bytes;
    unsigned *            sq_head, * sq_tail, * sq_array, * cq_head, * cq_tail;
    unsigned              sq_mask, sq_n, cq_mask;
    struct io_uring_sqe * sqes;
    struct io_uring_cqe * cqes;
    unsigned              sqe_tail, sqe_head; // SQEs handed out / submitted
};

int                   dblade_ring_init(struct dblade_ring * r, unsigned entries);
void                  dblade_ring_exit(struct dblade_ring * r);
struct io_uring_sqe * dblade_ring_sqe(struct dblade_ring * r); // NULL when the ring is full
int                   dblade_ring_submit(struct dblade_ring * r); // what was filled in; how many the kernel took
int                   dblade_ring_wait(struct dblade_ring * r, struct io_uring_cqe ** out); // the next completion
void                  dblade_ring_seen(struct dblade_ring * r); // ... consumed
void dblade_ring_prep_rw(struct io_uring_sqe * sqe, int write, int fd, void * buf, uint32_t len, uint64_t off,
                         uint64_t user_data);
void dblade_ring_prep_nop(struct io_uring_sqe * sqe, uint64_t user_data);
#endif

struct dblade_io;
// picks io_uring where it works, else the thread pool (DUALBLADE_IO_ENGINE forces one)
int          dblade_io_open(struct dblade_io ** out, int fd);
void         dblade_io_close(struct dblade_io * io);
int          dblade_io_kind(const struct dblade_io * io);
const char * dblade_io_why(const struct dblade_io * io);
const char * dblade_io_engine_name(int kind);
// every request to completion; 0 or the first failing request's -errno
int          dblade_io_run(struct dblade_io * io, struct dblade_io_req * reqs, uint32_t n);

// --- memory monitor and the auto policy (monitor.c) ---
#define DBLADE_MONITOR_PERIOD_NS (20ull * 1000 * 1000)         // at most one sample per 20 ms
#define DBLADE_AUTO_STALL_HIGH   0.10                          // share of time stalled on memory: demote
#define DBLADE_AUTO_STALL_LOW    0.01                          // below this (and room to spare): promote
#define DBLADE_AUTO_HOLD_NS      (2ull * 1000 * 1000 * 1000)   // no promotion within 2 s of a switch
#define DBLADE_AUTO_HOLD_MAX_NS  (64ull * 1000 * 1000 * 1000)  // the hold doubles on flaps, up to this
#define DBLADE_AUTO_FILL_RATE    (4ull << 20)                  // new rows per second above which the context
                                                               // is filling (a prefill): no promotion
#define DBLADE_AUTO_FILL_WINDOW_NS (200ull * 1000 * 1000)      // the rate is measured over this

struct dblade_monitor {
    int  cg_version; // 0 none found, 1, 2
    char cg_dir[512];
};

struct dblade_mem_sample {
    uint64_t t_ns;
    uint64_t cg_limit; // UINT64_MAX: no limit
    uint64_t cg_anon;  // the group's anonymous memory
    uint64_t mem_total, mem_available; // UINT64_MAX: unknown
    uint64_t psi_us;                   // memory stall ("some"), cumulative microseconds; UINT64_MAX: no PSI
};

struct dblade_auto_state {
    uint64_t last_t_ns, last_psi_us, last_switch_ns, last_promote_ns;
    uint64_t hold_ns;               // current hold before a promotion; doubles when promotions flap
    uint64_t cap_bytes, need_bytes; // of the last decision
    uint64_t fill_t_ns, fill_bytes; // the rows of all offloaded layers at the start of the rate window
    double   fill_rate;             // bytes per second they grew by in the last window (< 0: not known yet)
};

struct dblade_auto_layer {
    uint32_t want;           // DBLADE_PATH_MMAP or DBLADE_PATH_DIRECT; updated by the decision
    uint64_t need_bytes;     // what the layer holds now (rows written)
    uint64_t full_bytes;     // what it holds when the context is full
    uint64_t resident_bytes; // of it in the page cache now (mmap layers)
};

void     dblade_monitor_init(struct dblade_monitor * m);
void     dblade_monitor_sample(const struct dblade_monitor * m, struct dblade_mem_sample * o);
// bytes of page cache the offloaded layers may use; reserve = the weights' working set
uint64_t dblade_auto_capacity(const struct dblade_mem_sample * m, uint64_t reserve, uint64_t page_cached);
// updates layers[].want; returns how many changed, with the reason in why
int      dblade_auto_decide(struct dblade_auto_state * st, const struct dblade_mem_sample * m, uint64_t reserve,
                            struct dblade_auto_layer * layers, uint32_t n, char * why, size_t why_cap);

// --- for tests: wait until the worker has nothing queued or running ---
void dblade_session_quiesce(struct dblade_session * s);

#endif
