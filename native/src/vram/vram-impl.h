// Private to vram/: the VRAM tier's state. slots.c sets it up (the driver, the device address of every
// streamed tensor, the slots behind them, the page-locked ring and write-back buffer, the engines that read
// the host paths' bytes); stream.c moves the bytes (the cut protocol, the reads ahead on the worker).
#ifndef DUALBLADE_VRAM_IMPL_H
#define DUALBLADE_VRAM_IMPL_H

#include "vram.h"

#include "../base.h"
#include "../engine.h"
#include "../pcopy.h"
#include "../stripe.h"
#include "../worker.h"
#include "cuda.h"

// a streamed layer's bytes, from its host path to its slot:
//   IDLE     at rest on its host path (nothing of it in the ring, its slot free for others)
//   READING  the worker reads it into the ring (the lock dropped meanwhile)
//   READY    in the ring
//   LOADING  being copied into its slot (slot_ev[slot] says when it is done)
//   LOADED   in its slot: the layer computes; its new rows go back at the next cut, and it is IDLE again
enum { SL_IDLE = 0, SL_READING, SL_READY, SL_LOADING, SL_LOADED };

struct dblade_streamed {
    struct dblade_tensor * k; // K (V: k->pair); NULL until the cache attaches it
    int32_t                il;
    uint32_t               slot;
    int                    state;
    uint64_t               off, bytes;   // its place in the ring (K at off, V at off + k_len)
    uint64_t               k_len, v_len; // bytes [0, len) of K and V it holds there (or copies from its host path)
    bool                   issued; // READING, and every read of it has gone to the device (the rest in flight)
    bool                   in_slot; // its slot still holds what its host path does (nothing went into the slot
                                    // since it computed): the next graph that computes it needs no copy (a
                                    // prompt computed layer by layer visits a layer once per ubatch)
};

// a lane of the reads ahead: the engines that read the host paths' store, O_DIRECT (direct path) and
// buffered (page cache), and its work item on its worker
#define VRAM_LANES 2
// the lanes that read unless DUALBLADE_READ_LANES says otherwise (slots.c): one. Two overlapping at a layer's
// tail ("tail") keep the device's queue full across layers, but measured no faster (GPU run 14: 0.99x)
#define VRAM_READ_LANES "1"
struct dblade_vram;
struct dblade_vram_lane {
    struct dblade_vram *   v;
    struct dblade_worker * worker;
    struct dblade_work     work;
    struct dblade_io *     io_direct, * io_buffered;
};

#define VRAM_AHEAD_MAX_ROWS UINT32_MAX // every ubatch reads ahead (DUALBLADE_AHEAD_MAX_ROWS bounds it, a bisection's knob)

struct dblade_vram {
    struct dblade_cuda     cu;
    struct dblade_vram_env env;
    CUdevice               dev;
    CUcontext              ctx;
    CUstream               stream; // copies, ours: never ggml's
    size_t                 gran;
    CUdeviceptr            va; // every streamed tensor's address, one reservation
    uint64_t               va_bytes;
    uint32_t               n_slots;
    uint64_t               slot_bytes;
    CUmemGenericAllocationHandle * slots;
    CUevent *                      slot_ev;    // per slot: the last copy into it is done
    int32_t *                      slot_owner; // per slot: the streamed layer copied into it last (-1: none)
    uint64_t                       pad;        // room after each tensor for the GPU buffer's padding
    // the streamed layers in graph order (by il), and il -> that order
    uint32_t                 n_streamed;
    struct dblade_streamed * sl;
    int32_t                  max_il;
    int32_t *                index_of; // [il]: its place in sl, -1 for a layer not streamed
    // the ring: page-locked memory the host paths' bytes are read into, ahead of the graph, in graph order
    // (a FIFO: layers leave it in the order they entered); then copied into slots from there
    uint8_t * ring;
    uint64_t  ring_bytes, ring_head, ring_tail, ring_used;
    bool      ring_pinned;
    // the rows a layer stored come back through here (page-locked, whole pages), grown as needed
    uint8_t * wb;
    uint64_t  wb_bytes;
    bool      wb_pinned;
    char      pin_why[96]; // why host memory is not page-locked (a limit), for the stats
    // the reads ahead: up to two lanes, each reading one layer at a time with its own engines, so that the
    // next direct layer's reads are in flight while one ends (the device's queue does not drain between them)
    struct dblade_vram_lane lanes[VRAM_LANES];
    uint32_t                n_lanes;      // 1 or 2 (DUALBLADE_READ_LANES, slots.c)
    bool                    side_by_side; // two direct layers read whole side by side (DUALBLADE_READ_LANES=2), not
                                          // only the next one's beside the last reads of the one before
    struct dblade_worker    lane_worker; // lane 1's thread (lane 0 runs on the KV object's worker)
    pthread_cond_t          read_done;   // a layer left READING (broadcast, the lock held)
    struct dblade_stripe buffered; // the store's members opened again without O_DIRECT (zeroed: none)
    struct dblade_pcopy * pcopy; // the threads that copy the page cache into the ring
    // the graph: the streamed layer it computes next, and the one whose new rows are still in VRAM
    int32_t  next, pending;
    int32_t  il0, il1; // the layers the graphs compute (dblade_vram_layers): all, or a prompt's segment
    uint64_t pending_lo, pending_hi; // rows it stored
    // no layer is read ahead while a ubatch of more than ahead_max_rows tokens computes (a prompt's): GPU
    // runs 2 and 3 of issue 21 found tokens that differed from all-in-VRAM only there (docs/gpu.md)
    uint32_t ahead_max_rows;
    bool     ahead_held;
    // counters, read by stats without the lock
    _Atomic uint64_t h2d_bytes, h2d_pinned_bytes, d2h_bytes, copy_wait_ns, ring_read_bytes;
    _Atomic uint64_t ring_around_bytes; // of ring_read_bytes: page-cache layers' reads around the cache (O_DIRECT)
    _Atomic uint64_t ring_overlapped;   // layers whose reads started while another's were in flight
};

// slots.c
uint64_t dblade_vram_tensor_len(const struct dblade_tensor * t); // the bytes of t worth copying: [0, hwm)
// the write-back buffer holds at least bytes; 0 or -ENOMEM
int      dblade_vram_wb_reserve(struct dblade_vram * v, uint64_t bytes);

#endif
