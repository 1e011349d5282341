// CUDA's driver API, as much of it as the VRAM tier uses, loaded at run time (cuda.c): no CUDA toolkit
// is needed to build the module, and a machine without a GPU never loads it.
#ifndef DUALBLADE_CUDA_H
#define DUALBLADE_CUDA_H

#include <stddef.h>

// --- the declarations used (as cuda.h has them, CUDA >= 11.2) ---
typedef int                          CUresult;
typedef int                          CUdevice;
typedef struct CUctx_st *            CUcontext;
typedef struct CUstream_st *         CUstream;
typedef struct CUevent_st *          CUevent;
typedef unsigned long long           CUdeviceptr;
typedef unsigned long long           CUmemGenericAllocationHandle;

typedef struct {
    int type; // CU_MEM_LOCATION_TYPE_DEVICE = 1
    int id;
} CUmemLocation;

typedef struct {
    int           type;                 // CU_MEM_ALLOCATION_TYPE_PINNED = 1
    int           requestedHandleTypes; // CU_MEM_HANDLE_TYPE_NONE = 0
    CUmemLocation location;
    void *        win32HandleMetaData;
    struct {
        unsigned char  compressionType;
        unsigned char  gpuDirectRDMACapable;
        unsigned short usage;
        unsigned char  reserved[4];
    } allocFlags;
} CUmemAllocationProp;

typedef struct {
    CUmemLocation location;
    int           flags; // CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 3
} CUmemAccessDesc;

#define CU_STREAM_NON_BLOCKING  1u
#define CU_EVENT_DISABLE_TIMING 2u
#define CUDA_ERROR_NOT_READY    600

struct dblade_cuda {
    CUresult (*Init)(unsigned);
    CUresult (*GetErrorString)(CUresult, const char **);
    CUresult (*DeviceGet)(CUdevice *, int);
    CUresult (*DeviceGetByPCIBusId)(CUdevice *, const char *);
    CUresult (*DevicePrimaryCtxRetain)(CUcontext *, CUdevice);
    CUresult (*DevicePrimaryCtxRelease)(CUdevice);
    CUresult (*CtxPushCurrent)(CUcontext);
    CUresult (*CtxPopCurrent)(CUcontext *);
    CUresult (*CtxSynchronize)(void);
    CUresult (*StreamCreate)(CUstream *, unsigned);
    CUresult (*StreamDestroy)(CUstream);
    CUresult (*StreamSynchronize)(CUstream);
    CUresult (*MemGetAllocationGranularity)(size_t *, const CUmemAllocationProp *, int);
    CUresult (*MemAddressReserve)(CUdeviceptr *, size_t, size_t, CUdeviceptr, unsigned long long);
    CUresult (*MemAddressFree)(CUdeviceptr, size_t);
    CUresult (*MemCreate)(CUmemGenericAllocationHandle *, size_t, const CUmemAllocationProp *, unsigned long long);
    CUresult (*MemRelease)(CUmemGenericAllocationHandle);
    CUresult (*MemMap)(CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle, unsigned long long);
    CUresult (*MemUnmap)(CUdeviceptr, size_t);
    CUresult (*MemSetAccess)(CUdeviceptr, size_t, const CUmemAccessDesc *, size_t);
    CUresult (*MemsetD8Async)(CUdeviceptr, unsigned char, size_t, CUstream);
    CUresult (*MemcpyHtoDAsync)(CUdeviceptr, const void *, size_t, CUstream);
    CUresult (*MemcpyDtoHAsync)(void *, CUdeviceptr, size_t, CUstream);
    CUresult (*MemHostRegister)(void *, size_t, unsigned);
    CUresult (*MemHostUnregister)(void *);
    CUresult (*EventCreate)(CUevent *, unsigned);
    CUresult (*EventDestroy)(CUevent);
    CUresult (*EventRecord)(CUevent, CUstream);
    CUresult (*EventSynchronize)(CUevent);
    CUresult (*EventQuery)(CUevent);
    void * lib; // the driver library, dlopen()ed
};

// loads libcuda.so.1 (DUALBLADE_CUDA_LIB: another library, e.g. the tests' stand-in) and resolves
// every entry above; -errno with dblade_get_error() set
int          dblade_cuda_load(struct dblade_cuda * cu);
void         dblade_cuda_unload(struct dblade_cuda * cu);
// a CUresult in words
const char * dblade_cuda_error(const struct dblade_cuda * cu, CUresult r);

#endif
