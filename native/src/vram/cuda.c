// Loads CUDA's driver library and resolves the entries cuda.h lists, by their versioned names where
// the ABI changed (what cuda.h's macros select). It calls nothing of the module but the error text.

#define _GNU_SOURCE
#include "cuda.h"

#include "../base.h"

#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

const char * dblade_cuda_error(const struct dblade_cuda * cu, CUresult r) {
    const char * s = NULL;
    if (cu->GetErrorString) {
        cu->GetErrorString(r, &s);
    }
    return s ? s : "unknown CUDA error";
}

int dblade_cuda_load(struct dblade_cuda * cu) {
    // DUALBLADE_CUDA_LIB: another driver library (test_vram's stand-in on machines without a GPU)
    const char * name = getenv("DUALBLADE_CUDA_LIB") ? getenv("DUALBLADE_CUDA_LIB") : "libcuda.so.1";
    cu->lib            = dlopen(name, RTLD_NOW | RTLD_LOCAL);
    if (!cu->lib) {
        dblade_set_error("cannot load the CUDA driver (%s): %s", name, dlerror());
        return -ENOENT;
    }
    // versioned names where the ABI changed (what cuda.h's macros select)
    static const struct { size_t off; const char * name; } syms[] = {
#define SYM(f, n) { offsetof(struct dblade_cuda, f), n }
        SYM(Init, "cuInit"),
        SYM(GetErrorString, "cuGetErrorString"),
        SYM(DeviceGet, "cuDeviceGet"),
        SYM(DeviceGetByPCIBusId, "cuDeviceGetByPCIBusId"),
        SYM(DevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain"),
        SYM(DevicePrimaryCtxRelease, "cuDevicePrimaryCtxRelease_v2"),
        SYM(CtxPushCurrent, "cuCtxPushCurrent_v2"),
        SYM(CtxPopCurrent, "cuCtxPopCurrent_v2"),
        SYM(CtxSynchronize, "cuCtxSynchronize"),
        SYM(StreamCreate, "cuStreamCreate"),
        SYM(StreamDestroy, "cuStreamDestroy_v2"),
        SYM(StreamSynchronize, "cuStreamSynchronize"),
        SYM(MemGetAllocationGranularity, "cuMemGetAllocationGranularity"),
        SYM(MemAddressReserve, "cuMemAddressReserve"),
        SYM(MemAddressFree, "cuMemAddressFree"),
        SYM(MemCreate, "cuMemCreate"),
        SYM(MemRelease, "cuMemRelease"),
        SYM(MemMap, "cuMemMap"),
        SYM(MemUnmap, "cuMemUnmap"),
        SYM(MemSetAccess, "cuMemSetAccess"),
        SYM(MemsetD8Async, "cuMemsetD8Async"),
        SYM(MemcpyHtoDAsync, "cuMemcpyHtoDAsync_v2"),
        SYM(MemcpyDtoHAsync, "cuMemcpyDtoHAsync_v2"),
        SYM(MemHostRegister, "cuMemHostRegister_v2"),
        SYM(MemHostUnregister, "cuMemHostUnregister"),
        SYM(EventCreate, "cuEventCreate"),
        SYM(EventDestroy, "cuEventDestroy_v2"),
        SYM(EventRecord, "cuEventRecord"),
        SYM(EventSynchronize, "cuEventSynchronize"),
        SYM(EventQuery, "cuEventQuery"),
#undef SYM
    };
    for (size_t i = 0; i < sizeof(syms) / sizeof(syms[0]); i++) {
        void * f = dlsym(cu->lib, syms[i].name);
        if (!f) {
            dblade_set_error("the CUDA driver has no %s (too old for VRAM streaming: CUDA 11.2 or later)",
                             syms[i].name);
            return -ENOSYS;
        }
        memcpy((char *) cu + syms[i].off, &f, sizeof(f));
    }
    return 0;
}

void dblade_cuda_unload(struct dblade_cuda * cu) {
    if (cu->lib) {
        dlclose(cu->lib);
        cu->lib = NULL;
    }
}
