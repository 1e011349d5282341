// Backing stores: an unnamed preallocated O_DIRECT file; refusals with reasons.
#define _GNU_SOURCE
#include "../src/base.h"
#include "../src/io.h"
#include "../src/store.h"
#include "check.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static int count_entries(const char * dir) {
    DIR * d = opendir(dir);
    int   n = 0;
    for (struct dirent * e; (e = readdir(d));) {
        n += strcmp(e->d_name, ".") && strcmp(e->d_name, "..");
    }
    closedir(d);
    return n;
}

int main(void) {
    char dir[512];
    test_mkdtemp(dir, sizeof(dir), "store");

    struct dblade_config cfg = { .policy = DBLADE_POLICY_DIRECT, .budget_bytes = 1 << 20, .kv_dir = dir };
    struct dblade_store  st;
    CHECK_EQ(dblade_store_open(&st, &cfg, 8 << 20, 1, false), 0);
    CHECK(st.n == 1 && st.members[0].fd >= 0 && st.members[0].kind == DBLADE_STORE_FILE);
    CHECK(st.map.n == 1 && st.map.fd[0] == st.members[0].fd);
    CHECK(st.align >= 4096 && (st.align & (st.align - 1)) == 0);
    CHECK(st.members[0].n_extents >= 1);
    CHECK_EQ(count_entries(dir), 0); // unnamed: nothing to leave behind
    const int fd = st.members[0].fd;
    CHECK_EQ(fcntl(fd, F_GETFL) & O_DIRECT, O_DIRECT);

    // aligned O_DIRECT round trip
    void * a = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    void * b = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    for (int i = 0; i < (1 << 20); i++) ((unsigned char *) a)[i] = (unsigned char) (i * 7 + 3);
    CHECK_EQ(dblade_io_write(fd, a, 1 << 20, 4 << 20), 0);
    CHECK_EQ(dblade_io_read(fd, b, 1 << 20, 4 << 20), 0);
    CHECK(memcmp(a, b, 1 << 20) == 0);
    dblade_store_close(&st);

    // too large for the file system: refused up front, naming both sizes
    CHECK_EQ(dblade_store_open(&st, &cfg, 1ull << 50, 1, false), -ENOSPC);
    CHECK(strstr(dblade_get_error(), "free") && strstr(dblade_get_error(), "needs"));
    // a directory that does not exist
    struct dblade_config missing = cfg;
    missing.kv_dir = "/nonexistent/dualblade";
    CHECK(dblade_store_open(&st, &missing, 1 << 20, 1, false) < 0);
    CHECK(strstr(dblade_get_error(), "/nonexistent/dualblade"));
    // tmpfs: a KV file there saves no memory
    if (access("/dev/shm", W_OK) == 0) {
        struct dblade_config shm = cfg;
        shm.kv_dir = "/dev/shm";
        CHECK_EQ(dblade_store_open(&st, &shm, 1 << 20, 1, false), -EXDEV);
        CHECK(strstr(dblade_get_error(), "tmpfs"));
    }
    // a regular file is not a block device
    char file[600];
    snprintf(file, sizeof(file), "%s/not-a-device", dir);
    close(open(file, O_CREAT | O_WRONLY, 0600));
    struct dblade_config dev = { .policy = DBLADE_POLICY_DIRECT, .budget_bytes = 1, .kv_device = file };
    CHECK_EQ(dblade_store_open(&st, &dev, 1 << 20, 1, true), -ENOTBLK);
    CHECK(strstr(dblade_get_error(), "not a block device"));
    unlink(file);
    // a dry check writes nothing
    char msg[512];
    const struct dblade_layout_layer lay[2] = { { 0, DBLADE_PATH_RAM, 4 << 20, 4 << 20 },
                                                { 1, DBLADE_PATH_DIRECT, 4 << 20, 4 << 20 } };
    CHECK_EQ(dblade_store_check(&cfg, 2, lay, msg, sizeof(msg)), 0);
    CHECK_EQ(count_entries(dir), 0);
    CHECK(dblade_store_check(&missing, 2, lay, msg, sizeof(msg)) < 0 && strlen(msg) > 0);

    rmdir(dir);
    puts("test_store: ok");
    return 0;
}
