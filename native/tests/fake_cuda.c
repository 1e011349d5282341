// A stand-in for CUDA's driver library (libcuda.so.1) on machines without a GPU, for test_vram: "device"
// memory is host memory, so a test can look at it. What it keeps of the real thing is what vram.c relies
// on: an address range reserved once, physical allocations (memfd) mapped into it, one allocation at
// several addresses reading the same bytes, copies and memsets in stream order (here: at once).
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

API CUresult cuInit(unsigned f) { (void) f; return 0; }
API CUresult cuGetErrorString(CUresult r, const char ** s) { (void) r; *s = "fake CUDA error"; return 0; }
API CUresult cuDeviceGet(int * d, int i) { *d = i; return 0; }
API CUresult cuDeviceGetByPCIBusId(int * d, const char * id) { (void) id; *d = 0; return 0; }
API CUresult cuDevicePrimaryCtxRetain(void ** c, int d) { (void) d; *c = (void *) 0x1; return 0; }
API CUresult cuDevicePrimaryCtxRelease_v2(int d) { (void) d; return 0; }
API CUresult cuCtxPushCurrent_v2(void * c) { (void) c; return 0; }
API CUresult cuCtxPopCurrent_v2(void ** c) { *c = (void *) 0x1; return 0; }
API CUresult cuCtxSynchronize(void) { return 0; }
API CUresult cuStreamCreate(void ** s, unsigned f) { (void) f; *s = (void *) 0x2; return 0; }
API CUresult cuStreamDestroy_v2(void * s) { (void) s; return 0; }
API CUresult cuStreamSynchronize(void * s) { (void) s; return 0; }
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
    memset((void *) (uintptr_t) p, v, n);
    return 0;
}
API CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr d, const void * h, size_t n, void * s) {
    (void) s;
    memcpy((void *) (uintptr_t) d, h, n);
    return 0;
}
API CUresult cuMemcpyDtoHAsync_v2(void * h, CUdeviceptr d, size_t n, void * s) {
    (void) s;
    memcpy(h, (const void *) (uintptr_t) d, n);
    return 0;
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
