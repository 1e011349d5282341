// Backing stores behind one interface: a preallocated, unnamed file in a directory, or a raw
// block device carrying our ownership header. Both are read and written with O_DIRECT.

#define _GNU_SOURCE
#include "store.h"

#include "base.h"
#include "header.h"
#include "io.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/fiemap.h>
#include <linux/fs.h>
#include <linux/magic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef STATX_DIOALIGN
#    define STATX_DIOALIGN 0x00002000U
#endif

int dblade_probe_align(int fd, uint32_t * off_align, uint32_t * mem_align) {
    uint32_t off = 0, mem = 0;
#ifdef SYS_statx
    struct statx sx;
    memset(&sx, 0, sizeof(sx));
    if (syscall(SYS_statx, fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &sx) == 0 && (sx.stx_mask & STATX_DIOALIGN)) {
        if (sx.stx_dio_offset_align == 0) {
            return -EINVAL; // the kernel says: no O_DIRECT here
        }
        off = sx.stx_dio_offset_align;
        mem = sx.stx_dio_mem_align;
    }
#endif
    if (off == 0) {
        struct stat st;
        int         lbs = 0;
        if (fstat(fd, &st) == 0 && S_ISBLK(st.st_mode) && ioctl(fd, BLKSSZGET, &lbs) == 0 && lbs > 0) {
            off = (uint32_t) lbs; // kernels before 6.1: the logical block size
        } else {
            off = DBLADE_BLOCK; // safe everywhere O_DIRECT works
        }
    }
    *off_align = off;
    *mem_align = mem ? mem : off;
    return 0;
}

static void fmt_bytes(char * buf, size_t cap, uint64_t n) {
    if (n >= (1ull << 30)) {
        snprintf(buf, cap, "%.2f GiB", n / 1073741824.0);
    } else {
        snprintf(buf, cap, "%.1f MiB", n / 1048576.0);
    }
}

static int open_file_store(struct dblade_store * st, const char * dir, uint64_t bytes, bool dry) {
    struct statfs sfs;
    if (statfs(dir, &sfs) != 0) {
        int e = errno;
        dblade_set_error("KV directory %s: %s", dir, strerror(e));
        return -e;
    }
    if (sfs.f_type == TMPFS_MAGIC || sfs.f_type == RAMFS_MAGIC) {
        dblade_set_error("KV directory %s is on tmpfs (memory): a KV file there saves no RAM; give a kv_dir on a disk",
                         dir);
        return -EXDEV;
    }
    struct statvfs vfs;
    if (statvfs(dir, &vfs) == 0 && (uint64_t) vfs.f_bavail * vfs.f_frsize < bytes) {
        char need[32], have[32];
        fmt_bytes(need, sizeof(need), bytes);
        fmt_bytes(have, sizeof(have), (uint64_t) vfs.f_bavail * vfs.f_frsize);
        dblade_set_error("KV directory %s has %s free, the KV file needs %s; free space or give another kv_dir", dir,
                         have, need);
        return -ENOSPC;
    }

    // a directory reached through somebody else's symlink is theirs to redirect: refused (as the
    // kernel's protected_symlinks refuses to follow such links in sticky directories)
    struct stat lsb;
    if (lstat(dir, &lsb) == 0 && S_ISLNK(lsb.st_mode) && lsb.st_uid != geteuid() && lsb.st_uid != 0) {
        dblade_set_error("KV directory %s is a symlink owned by another user (uid %u); give the directory itself",
                         dir, (unsigned) lsb.st_uid);
        return -EPERM;
    }

    // unnamed: nothing of the conversation remains on disk once the process ends, however it ends
    // (DUALBLADE_NO_TMPFILE=1 takes the named way below, for tests)
    const char * no_tmpfile = getenv("DUALBLADE_NO_TMPFILE");
    int fd = no_tmpfile && !strcmp(no_tmpfile, "1") ? (errno = EOPNOTSUPP, -1)
                                                     : open(dir, O_TMPFILE | O_RDWR | O_DIRECT | O_CLOEXEC, 0600);
    if (fd < 0 && (errno == EOPNOTSUPP || errno == EISDIR)) {
        // no O_TMPFILE here: a private name, created exclusively, unlinked at once
        for (int attempt = 0; attempt < 16 && fd < 0; attempt++) {
            snprintf(st->path, sizeof(st->path), "%s/.dualblade-kv-%d-%08lx", dir, (int) getpid(),
                     (unsigned long) (dblade_now_ns() ^ ((uint64_t) rand() << 16)));
            fd = open(st->path, O_CREAT | O_EXCL | O_NOFOLLOW | O_RDWR | O_DIRECT | O_CLOEXEC, 0600);
            if (fd >= 0) {
                unlink(st->path);
            } else if (errno != EEXIST) {
                break;
            }
        }
    }
    if (fd < 0) {
        int e = errno;
        if (e == EINVAL) {
            dblade_set_error("KV directory %s is on a file system without O_DIRECT; give a kv_dir on a disk file "
                             "system (ext4, xfs, btrfs) or use the mmap policy", dir);
        } else {
            dblade_set_error("cannot create the KV file in %s: %s; give a writable kv_dir", dir, strerror(e));
        }
        return -e;
    }
    uint32_t off_align, mem_align;
    int      rc = dblade_probe_align(fd, &off_align, &mem_align);
    if (rc < 0) {
        dblade_set_error("KV directory %s is on a file system without O_DIRECT; give a kv_dir on a disk", dir);
        close(fd);
        return rc;
    }
    if (!dry && bytes > 0 && fallocate(fd, 0, 0, (off_t) bytes) != 0) {
        int  e = errno;
        char need[32];
        fmt_bytes(need, sizeof(need), bytes);
        dblade_set_error("cannot preallocate %s for the KV file in %s: %s", need, dir, strerror(e));
        close(fd);
        return -e;
    }
    // how contiguous the reservation is: extents of the whole file
    struct fiemap fm;
    memset(&fm, 0, sizeof(fm));
    fm.fm_length       = ~0ull;
    fm.fm_extent_count = 0; // count only
    st->n_extents = ioctl(fd, FS_IOC_FIEMAP, &fm) == 0 ? fm.fm_mapped_extents : 0;

    st->fd          = fd;
    st->kind        = DBLADE_STORE_FILE;
    st->align       = off_align > DBLADE_BLOCK ? off_align : DBLADE_BLOCK;
    st->mem_align   = mem_align;
    st->data_offset = 0;
    st->data_bytes  = bytes;
    snprintf(st->path, sizeof(st->path), "%s", dir);
    return 0;
}

static int open_device_store(struct dblade_store * st, const char * dev, uint64_t bytes, uint64_t geometry,
                             bool force, bool dry) {
    // O_EXCL on a block device: refused while it is mounted or opened exclusively by anyone else
    int fd = open(dev, O_RDWR | O_DIRECT | O_EXCL | O_CLOEXEC);
    if (fd < 0) {
        int e = errno;
        if (e == EBUSY) {
            dblade_set_error("KV device %s is in use (mounted, or held by another program); give an unused device", dev);
        } else {
            dblade_set_error("cannot open KV device %s: %s", dev, strerror(e));
        }
        return -e;
    }
    struct stat sb;
    if (fstat(fd, &sb) != 0 || !S_ISBLK(sb.st_mode)) {
        dblade_set_error("KV device %s is not a block device; give a raw device or partition, or a kv_dir", dev);
        close(fd);
        return -ENOTBLK;
    }
    uint64_t size = 0;
    if (ioctl(fd, BLKGETSIZE64, &size) != 0) {
        int e = errno;
        dblade_set_error("cannot read the size of KV device %s: %s", dev, strerror(e));
        close(fd);
        return -e;
    }
    uint32_t off_align, mem_align;
    int      rc = dblade_probe_align(fd, &off_align, &mem_align);
    if (rc < 0) {
        dblade_set_error("KV device %s does not support O_DIRECT", dev);
        close(fd);
        return rc;
    }
    const uint64_t need = DBLADE_DEVICE_DATA_OFFSET + bytes;
    if (size < need) {
        char have_s[32], need_s[32];
        fmt_bytes(have_s, sizeof(have_s), size);
        fmt_bytes(need_s, sizeof(need_s), need);
        dblade_set_error("KV device %s is too small: %s, the KV needs %s; give a larger device or a smaller context",
                         dev, have_s, need_s);
        close(fd);
        return -ENOSPC;
    }

    uint8_t * buf = NULL;
    if (posix_memalign((void **) &buf, 4096, DBLADE_SIGNATURE_SCAN) != 0) {
        close(fd);
        return -ENOMEM;
    }
    const uint64_t scan = size < DBLADE_SIGNATURE_SCAN ? dblade_align_down(size, 4096) : DBLADE_SIGNATURE_SCAN;
    rc = dblade_io_read(fd, buf, scan, 0);
    if (rc < 0) {
        dblade_set_error("cannot read KV device %s: %s", dev, strerror(-rc));
        free(buf);
        close(fd);
        return rc;
    }
    struct dblade_header h;
    const int hrc = dblade_header_decode(buf, &h);
    const char * what = NULL;
    if (hrc == 0 && h.geometry != geometry) {
        what = "a dualblade KV of another model or context size";
    } else if (hrc == -EBADMSG || hrc == -EPROTO) {
        what = hrc == -EPROTO ? "a dualblade KV header of another version" : "a damaged dualblade KV header";
    } else if (hrc == -ENOENT) {
        what = dblade_detect_signature(buf, scan);
    }
    if (what && !force) {
        dblade_set_error("KV device %s holds %s; refusing to overwrite it (force takes it over and destroys what is "
                         "there)", dev, what);
        free(buf);
        close(fd);
        return -EEXIST;
    }
    if (dry) {
        free(buf);
        close(fd);
        return 0;
    }
    if (what) {
        fprintf(stderr, "dualblade: taking over KV device %s, overwriting %s\n", dev, what);
    }

    // the data a previous run of ours recorded (a foreign header's fields mean nothing)
    const uint64_t old_data = hrc == 0 && h.data_offset == DBLADE_DEVICE_DATA_OFFSET &&
                                      h.data_bytes <= size - DBLADE_DEVICE_DATA_OFFSET
                                  ? h.data_bytes
                                  : 0;
    memset(&h, 0, sizeof(h));
    h.version = DBLADE_HEADER_VERSION;
    for (int i = 0; i < 16; i++) {
        h.uuid[i] = (uint8_t) (rand() ^ (dblade_now_ns() >> (i % 8)));
    }
    h.device_bytes = size;
    h.data_offset  = DBLADE_DEVICE_DATA_OFFSET;
    h.data_bytes   = bytes;
    h.align        = off_align > DBLADE_BLOCK ? off_align : DBLADE_BLOCK;
    h.geometry     = geometry;
    h.created      = (uint64_t) time(NULL);
    dblade_header_encode(&h, buf);
    rc = dblade_io_write(fd, buf, DBLADE_HEADER_BYTES, 0);
    if (rc == 0 && fdatasync(fd) != 0) {
        rc = -errno;
    }
    free(buf);
    if (rc < 0) {
        dblade_set_error("cannot write the header of KV device %s: %s", dev, strerror(-rc));
        close(fd);
        return rc;
    }
    // whatever a run that was killed left of its conversation goes, and what this run will use
    // starts blank (best effort: not every device discards)
    const uint64_t range[2] = { DBLADE_DEVICE_DATA_OFFSET, dblade_align_up(old_data > bytes ? old_data : bytes, 4096) };
    ioctl(fd, BLKDISCARD, range);

    st->fd          = fd;
    st->kind        = DBLADE_STORE_DEVICE;
    st->align       = h.align;
    st->mem_align   = mem_align;
    st->data_offset = DBLADE_DEVICE_DATA_OFFSET;
    st->data_bytes  = bytes;
    st->n_extents   = 1;
    snprintf(st->path, sizeof(st->path), "%s", dev);
    return 0;
}

int dblade_store_open(struct dblade_store * st, const struct dblade_config * cfg, uint64_t data_bytes,
                      uint64_t geometry, bool dry) {
    memset(st, 0, sizeof(*st));
    st->fd = -1;
    if (cfg->kv_device) {
        return open_device_store(st, cfg->kv_device, data_bytes, geometry, (cfg->flags & DBLADE_CONFIG_FORCE) != 0, dry);
    }
    if (!cfg->kv_dir) {
        dblade_set_error("offloaded KV layers need a kv_dir or a kv_device");
        return -EINVAL;
    }
    return open_file_store(st, cfg->kv_dir, data_bytes, dry);
}

void dblade_store_close(struct dblade_store * st) {
    if (st->fd >= 0) {
        close(st->fd);
        st->fd = -1;
    }
}

static int wipe_below(struct dblade_store * st, uint64_t end, bool zero) {
    if (st->fd < 0 || end <= st->data_offset) {
        return 0;
    }
    const uint64_t off = st->data_offset;
    const uint64_t len = dblade_align_up(end - off, st->align);
    if (st->kind == DBLADE_STORE_DEVICE) {
        const uint64_t range[2] = { off, len };
        return ioctl(st->fd, zero ? BLKZEROOUT : BLKDISCARD, range) == 0 ? 0 : -errno;
    }
    if (!zero) {
        return 0; // an unnamed file's blocks are freed when it closes: a hole first changes nothing
    }
    // a file system may keep the old blocks behind a hole or an unwritten extent: write zeros over them
    const uint64_t chunk = 4u << 20;
    void *         zeros = NULL;
    if (posix_memalign(&zeros, st->mem_align > 4096 ? st->mem_align : 4096, chunk) != 0) {
        return -ENOMEM;
    }
    memset(zeros, 0, chunk);
    int rc = 0;
    for (uint64_t p = 0; p < len && rc == 0; p += chunk) {
        rc = dblade_io_write(st->fd, zeros, len - p < chunk ? len - p : chunk, off + p);
    }
    free(zeros);
    return rc == 0 && fdatasync(st->fd) != 0 ? -errno : rc;
}

int dblade_store_wipe(struct dblade_store * st, bool zero) {
    const int rc = wipe_below(st, st->touched_end, zero);
    if (rc == 0) {
        st->touched_end = 0;
    }
    return rc;
}
