// A stand-in for CUDA's driver library (libcuda.so.1) on machines without a GPU, for test_vram: "device"
// memory is host memory, so a test can look at it. What it keeps of the real thing is what vram/ relies
// on: an address range reserved once, physical allocations (memfd) mapped into it, one allocation at
// several addresses reading the same bytes, copies and memsets in stream order, and events. Copies are
// asynchronous as on a GPU, and lazier: a queued copy runs only when something waits for it (a stream or
// context synchronize, or an event recorded after it), so a protocol that reuses host memory before its
// copy is done, or reads a slot it did not wait for, gets the wrong bytes and the test sees them.
#define _GNU_SOURCE
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

typedef int                CUresult;
typedef unsigned long long CUdeviceptr;

#define API __attribute__((visibility("default")))

static int n_registered;
API int fake_cuda_registered(void) { return n_registered; }

// the queue of copies (one queue: every stream is in order, and the tests use one)
struct op {
    void *       dst;
    const void * src;
    size_t       n;
    int          value; // >= 0: a memset of this byte
};
static struct op ops[4096];
static unsigned  n_ops, n_done; // queued, run (from the start)
static unsigned  events[256], n_events;

static void run_until(unsigned upto) {
    for (; n_done < upto; n_done++) {
        struct op * o = &ops[n_done % 4096];
        if (o->value >= 0) {
            memset(o->dst, o->value, o->n);
        } else {
            memcpy(o->dst, o->src, o->n);
        }
    }
}

static CUresult enqueue(void * dst, const void * src, size_t n, int value) {
    if (n_ops - n_done >= 4096) {
        run_until(n_ops);
    }
    ops[n_ops++ % 4096] = (struct op) { dst, src, n, value };
    return 0;
}

API CUresult cuInit(unsigned f) { (void) f; return 0; }
API CUresult cuGetErrorString(CUresult r, const char ** s) { (void) r; *s = "fake CUDA error"; return 0; }
API CUresult cuDeviceGet(int * d, int i) { *d = i; return 0; }
API CUresult cuDeviceGetByPCIBusId(int * d, const char * id) { (void) id; *d = 0; return 0; }
API CUresult cuDevicePrimaryCtxRetain(void ** c, int d) { (void) d; *c = (void *) 0x1; return 0; }
API CUresult cuDevicePrimaryCtxRelease_v2(int d) { (void) d; return 0; }
API CUresult cuCtxPushCurrent_v2(void * c) { (void) c; return 0; }
API CUresult cuCtxPopCurrent_v2(void ** c) { *c = (void *) 0x1; return 0; }
API CUresult cuCtxSynchronize(void) { run_until(n_ops); return 0; }
API CUresult cuStreamCreate(void ** s, unsigned f) { (void) f; *s = (void *) 0x2; return 0; }
API CUresult cuStreamDestroy_v2(void * s) { (void) s; return 0; }
API CUresult cuStreamSynchronize(void * s) { (void) s; run_until(n_ops); return 0; }
API CUresult cuEventCreate(void ** e, unsigned f) {
    (void) f;
    if (n_events >= 256) {
        return 2;
    }
    *e = (void *) (uintptr_t) (++n_events);
    return 0;
}
API CUresult cuEventDestroy_v2(void * e) { (void) e; return 0; }
API CUresult cuEventRecord(void * e, void * s) {
    (void) s;
    events[(uintptr_t) e - 1] = n_ops;
    return 0;
}
API CUresult cuEventSynchronize(void * e) { run_until(events[(uintptr_t) e - 1]); return 0; }
API CUresult cuEventQuery(void * e) { return n_done >= events[(uintptr_t) e - 1] ? 0 : 600; }
API CUresult cuMemGetAllocationGranularity(size_t * g, const void * prop, int opt) {
    (void) prop, (void) opt;
    *g = 64 << 10;
    return 0;
}
API CUresult cuMemAddressReserve(CUdeviceptr * p, size_t size, size_t align, CUdeviceptr addr, unsigned long long f) {
    (void) align, (void) addr, (void) f;
    void * m = mmap(NULL, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) {
        return 2;
    }
    *p = (CUdeviceptr) (uintptr_t) m;
    return 0;
}
API CUresult cuMemAddressFree(CUdeviceptr p, size_t size) { return munmap((void *) (uintptr_t) p, size) ? 1 : 0; }
API CUresult cuMemCreate(unsigned long long * h, size_t size, const void * prop, unsigned long long f) {
    (void) prop, (void) f;
    const int fd = memfd_create("fake-vram", 0);
    if (fd < 0 || ftruncate(fd, (off_t) size) != 0) {
        return 2;
    }
    *h = (unsigned long long) fd + 1;
    return 0;
}
API CUresult cuMemRelease(unsigned long long h) { return close((int) h - 1) ? 1 : 0; }
API CUresult cuMemMap(CUdeviceptr p, size_t size, size_t off, unsigned long long h, unsigned long long f) {
    (void) f;
    void * m = mmap((void *) (uintptr_t) p, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, (int) h - 1,
                    (off_t) off);
    return m == MAP_FAILED ? 1 : 0;
}
API CUresult cuMemUnmap(CUdeviceptr p, size_t size) {
    void * m = mmap((void *) (uintptr_t) p, size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE,
                    -1, 0);
    return m == MAP_FAILED ? 1 : 0;
}
API CUresult cuMemSetAccess(CUdeviceptr p, size_t size, const void * desc, size_t n) {
    (void) p, (void) size, (void) desc, (void) n;
    return 0;
}
API CUresult cuMemsetD8Async(CUdeviceptr p, unsigned char v, size_t n, void * s) {
    (void) s;
    return enqueue((void *) (uintptr_t) p, NULL, n, v);
}
API CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr d, const void * h, size_t n, void * s) {
    (void) s;
    return enqueue((void *) (uintptr_t) d, h, n, -1);
}
API CUresult cuMemcpyDtoHAsync_v2(void * h, CUdeviceptr d, size_t n, void * s) {
    (void) s;
    return enqueue(h, (const void *) (uintptr_t) d, n, -1);
}
API CUresult cuMemHostRegister_v2(void * p, size_t n, unsigned f) {
    (void) p, (void) n, (void) f;
    n_registered++;
    return 0;
}
API CUresult cuMemHostUnregister(void * p) {
    (void) p;
    n_registered--;
    return 0;
}
