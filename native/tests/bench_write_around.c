// Why path_mmap.c writes a prompt's rows around the page cache under a memory limit: a prefill's stores (16
// layers of 64 MiB, three ubatches of 20 MiB a layer) into a MAP_SHARED mapping of a preallocated file, with
// O_DIRECT pwrite, and with buffered pwrite; then two buffered reads of the first 4 layers' rows (a resident set
// the decode reads next). Not a test (not in ctest): run it inside a memory-limited cgroup, caches dropped, e.g.
// (cgroup v1)  mkdir /sys/fs/cgroup/memory/wa && echo 400M >/sys/fs/cgroup/memory/wa/memory.limit_in_bytes
//              sync; echo 3 >/proc/sys/vm/drop_caches
//              sh -c 'echo $$ >/sys/fs/cgroup/memory/wa/cgroup.procs; exec bench_write_around FILE MODE'
// MODE 0: memcpy into the mapping, 1: O_DIRECT, 2: buffered pwrite, 3: the first 4 layers memcpy, the rest
// O_DIRECT. FILE is created and removed. On the dev machine (400 MiB limit, virtio disk): 0 wrote at 0.50-0.73
// GiB/s, 1 at 1.68-1.71, 2 at 0.54-1.02; with the 4 layers' 240 MiB fitting, 3 wrote as fast as 1.
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double) t.tv_sec + (double) t.tv_nsec * 1e-9;
}

int main(int argc, char ** argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: bench_write_around FILE MODE (0 mmap, 1 O_DIRECT, 2 buffered, 3 mixed)\n");
        return 2;
    }
    const char * path = argv[1];
    const int    mode = atoi(argv[2]);
    const size_t NL = 16, R = (size_t) 64 << 20, U = 3, C = (size_t) 20 << 20;
    const int    fdd = open(path, O_RDWR | O_CREAT | O_EXCL | O_DIRECT, 0600), fdb = open(path, O_RDWR);
    if (fdd < 0 || fdb < 0 || fallocate(fdd, 0, 0, (off_t) (NL * R)) != 0) {
        perror(path);
        return 1;
    }
    posix_fadvise(fdb, 0, 0, POSIX_FADV_DONTNEED);
    uint8_t * map = mmap(NULL, NL * R, PROT_READ | PROT_WRITE, MAP_SHARED, fdd, 0);
    uint8_t * buf = NULL, * tmp = malloc(U * C);
    if (map == MAP_FAILED || posix_memalign((void **) &buf, 4096, C) != 0 || !tmp) {
        perror("memory");
        return 1;
    }
    memset(buf, 7, C);
    const double t0 = now();
    for (size_t u = 0; u < U; u++) {
        for (size_t l = 0; l < NL; l++) {
            const off_t off = (off_t) (l * R + u * C);
            const int   fd  = mode == 1 || (mode == 3 && l >= 4) ? fdd : mode == 2 ? fdb : -1;
            if (fd < 0) {
                memcpy(map + off, buf, C);
            } else if (pwrite(fd, buf, C, off) != (ssize_t) C) {
                perror("pwrite");
                return 1;
            }
        }
    }
    const double t1 = now();
    for (int pass = 0; pass < 2; pass++) {
        for (size_t l = 0; l < 4; l++) {
            if (pread(fdb, tmp, U * C, (off_t) (l * R)) < 0) {
                perror("pread");
                return 1;
            }
        }
    }
    const double t2 = now();
    printf("mode %d: wrote %.0f MiB in %.2f s (%.2f GiB/s), then 2 reads of 4 layers in %.2f s\n", mode,
           (double) (U * NL * C) / (1 << 20), t1 - t0, (double) (U * NL * C) / (t1 - t0) / (1 << 30), t2 - t1);
    munmap(map, NL * R);
    close(fdd);
    close(fdb);
    unlink(path);
    free(tmp);
    free(buf);
    return 0;
}
