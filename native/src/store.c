// Backing stores behind one interface: a preallocated, unnamed file in a directory, or a raw
// block device carrying our ownership header. Both are read and written with O_DIRECT.

#define _GNU_SOURCE
#include "store.h"

#include "base.h"
#include "header.h"
#include "io.h"
#include "shape.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/fiemap.h>
#include <linux/fs.h>
#include <linux/magic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
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

static int open_file_member(struct dblade_store_member * st, const char * dir, uint64_t bytes, bool dry) {
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

static int open_device_member(struct dblade_store_member * st, const char * dev, uint64_t bytes, uint64_t geometry,
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

// --- several members ---

// the next line of a member list ("a\nb"); false at its end
static bool next_member(const char ** list, char * out, size_t cap) {
    const char * p = *list;
    if (!p || !*p) {
        return false;
    }
    const char * nl  = strchr(p, '\n');
    const size_t len = nl ? (size_t) (nl - p) : strlen(p);
    snprintf(out, cap, "%.*s", (int) (len < cap ? len : cap - 1), p);
    *list = nl ? nl + 1 : p + len;
    return true;
}

static uint64_t env_bytes(const char * name, uint64_t dflt) {
    const char * v = getenv(name);
    return v && strtoull(v, NULL, 10) > 0 ? strtoull(v, NULL, 10) : dflt;
}

// the member's O_DIRECT read bandwidth: a probe region written, then read back in DBLADE_PROBE_IO requests
// (bytes/s; 0 where the member is too small to probe). It writes only inside the member's reservation.
#define DBLADE_PROBE_BYTES (16u << 20)
static double probe_read_bps(struct dblade_store_member * m) {
    const uint64_t bytes = m->data_bytes < DBLADE_PROBE_BYTES ? 0 : DBLADE_PROBE_BYTES;
    void *         buf   = NULL;
    if (bytes == 0 || posix_memalign(&buf, m->mem_align > 4096 ? m->mem_align : 4096, bytes) != 0) {
        return 0;
    }
    memset(buf, 0x5a, bytes); // written: a file's unwritten extents would read as zeros without any I/O
    double bps = 0;
    if (dblade_io_write(m->fd, buf, bytes, m->data_offset) == 0 && fdatasync(m->fd) == 0) {
        const uint64_t t0 = dblade_now_ns();
        if (dblade_io_read(m->fd, buf, bytes, m->data_offset) == 0) {
            const uint64_t dt = dblade_now_ns() - t0;
            bps               = dt ? bytes * 1e9 / (double) dt : 0;
        }
    }
    free(buf);
    return bps;
}

// the member holds need bytes from now on (a larger share than the even split it was opened with)
static int grow_member(struct dblade_store_member * m, uint64_t need) {
    if (need <= m->data_bytes) {
        return 0;
    }
    char need_s[32];
    fmt_bytes(need_s, sizeof(need_s), need);
    if (m->kind == DBLADE_STORE_FILE) {
        if (fallocate(m->fd, 0, 0, (off_t) need) != 0) {
            const int e = errno;
            dblade_set_error("cannot preallocate %s for the KV file in %s (its share of the stripes): %s", need_s,
                             m->path, strerror(e));
            return -e;
        }
    } else {
        uint64_t size = 0;
        if (ioctl(m->fd, BLKGETSIZE64, &size) != 0 || size < DBLADE_DEVICE_DATA_OFFSET + need) {
            dblade_set_error("KV device %s is too small for its share of the stripes (%s); give a larger device, "
                             "or DUALBLADE_STRIPE_SHARES to share them evenly", m->path, need_s);
            return -ENOSPC;
        }
        uint8_t * buf = NULL;
        if (posix_memalign((void **) &buf, 4096, DBLADE_HEADER_BYTES) != 0) {
            return -ENOMEM;
        }
        struct dblade_header h;
        int rc = dblade_io_read(m->fd, buf, DBLADE_HEADER_BYTES, 0);
        if (rc == 0 && (rc = dblade_header_decode(buf, &h)) == 0) {
            h.data_bytes = need;
            dblade_header_encode(&h, buf);
            rc = dblade_io_write(m->fd, buf, DBLADE_HEADER_BYTES, 0);
            rc = rc == 0 && fdatasync(m->fd) != 0 ? -errno : rc;
        }
        free(buf);
        if (rc < 0) {
            dblade_set_error("cannot write the header of KV device %s: %s", m->path, strerror(-rc));
            return rc;
        }
    }
    m->data_bytes = need;
    return 0;
}

// each member's share of the stripes: DUALBLADE_STRIPE_SHARES=a,b,... as given, else from probed bandwidths
static int member_shares(struct dblade_store * st, uint32_t * share) {
    const char * env = getenv("DUALBLADE_STRIPE_SHARES");
    if (env && *env) {
        const char * p = env;
        for (uint32_t m = 0; m < st->n; m++) {
            char *              end = NULL;
            const unsigned long v   = strtoul(p, &end, 10);
            if (end == p || v == 0 || v > 8 || (m + 1 < st->n ? *end != ',' : *end != 0)) {
                dblade_set_error("DUALBLADE_STRIPE_SHARES=%s is not a share per member: give %u numbers from 1 to 8, "
                                 "separated by commas", env, st->n);
                return -EINVAL;
            }
            share[m] = (uint32_t) v;
            p        = end + 1;
        }
        return 0;
    }
    double bps[DBLADE_STRIPE_MEMBERS] = { 0 };
    for (uint32_t m = 0; m < st->n; m++) {
        bps[m] = st->members[m].read_bps = probe_read_bps(&st->members[m]);
    }
    dblade_stripe_shares(st->n, bps, share);
    return 0;
}

static int open_member(struct dblade_store_member * m, const struct dblade_config * cfg, const char * path,
                       uint64_t bytes, uint64_t geometry, bool dry) {
    memset(m, 0, sizeof(*m));
    m->fd = -1;
    if (cfg->kv_device) {
        return open_device_member(m, path, bytes, geometry, (cfg->flags & DBLADE_CONFIG_FORCE) != 0, dry);
    }
    return open_file_member(m, path, bytes, dry);
}

int dblade_store_open(struct dblade_store * st, const struct dblade_config * cfg, uint64_t data_bytes,
                      uint64_t geometry, bool dry) {
    memset(st, 0, sizeof(*st));
    const char * list = cfg->kv_device ? cfg->kv_device : cfg->kv_dir;
    if (!list) {
        dblade_set_error("offloaded KV layers need a kv_dir or a kv_device");
        return -EINVAL;
    }
    char     paths[DBLADE_STRIPE_MEMBERS][512];
    uint32_t n = 0;
    for (char one[512]; next_member(&list, one, sizeof(one));) {
        if (n == DBLADE_STRIPE_MEMBERS) {
            dblade_set_error("the KV is striped over at most %u members; give fewer", DBLADE_STRIPE_MEMBERS);
            return -E2BIG;
        }
        for (uint32_t i = 0; i < n; i++) {
            if (!strcmp(paths[i], one)) {
                dblade_set_error("%s is given twice as a KV member; give each once", one);
                return -EINVAL;
            }
        }
        snprintf(paths[n++], sizeof(paths[0]), "%s", one);
    }
    if (n == 0) {
        dblade_set_error("offloaded KV layers need a kv_dir or a kv_device");
        return -EINVAL;
    }

    // opened with an even split (the probe needs them open); a faster member's larger share is reserved after
    uint64_t dflt = DBLADE_STRIPE_UNIT;
    while (data_bytes / dflt > DBLADE_STRIPE_MAX) {
        dflt *= 2;
    }
    const uint64_t unit = dblade_align_up(env_bytes("DUALBLADE_STRIPE_UNIT", dflt), DBLADE_BLOCK);
    uint32_t       share[DBLADE_STRIPE_MEMBERS];
    for (uint32_t m = 0; m < n; m++) {
        share[m] = 1;
    }
    if (n > 1 && dblade_stripe_init(&st->map, n, share, unit) < 0) {
        dblade_set_error("DUALBLADE_STRIPE_UNIT must be a positive multiple of 4096");
        return -EINVAL;
    }
    int rc = dblade_io_shape_new(&st->shape);
    for (uint32_t m = 0; m < n && rc == 0; m++) {
        const uint64_t even = n > 1 ? dblade_stripe_member_bytes(&st->map, m, data_bytes) : data_bytes;
        rc                  = open_member(&st->members[m], cfg, paths[m], even, geometry, dry);
        st->n               = m + 1;
    }
    if (rc < 0 || dry) {
        dblade_store_close(st);
        return rc;
    }

    st->align     = 0;
    st->mem_align = 0;
    for (uint32_t m = 0; m < n; m++) {
        st->align     = st->members[m].align > st->align ? st->members[m].align : st->align;
        st->mem_align = st->members[m].mem_align > st->mem_align ? st->members[m].mem_align : st->mem_align;
    }
    st->data_bytes = data_bytes;
    if (n == 1) {
        dblade_stripe_single(&st->map, st->members[0].fd);
        st->data_offset = st->members[0].data_offset;
        snprintf(st->path, sizeof(st->path), "%s", st->members[0].path);
        return 0;
    }
    if (unit % st->align) {
        dblade_set_error("DUALBLADE_STRIPE_UNIT=%llu is not a multiple of the members' O_DIRECT alignment %u",
                         (unsigned long long) unit, st->align);
        dblade_store_close(st);
        return -EINVAL;
    }
    rc = member_shares(st, share);
    if (rc == 0) {
        rc = dblade_stripe_init(&st->map, n, share, unit);
    }
    for (uint32_t m = 0; m < n && rc == 0; m++) {
        rc = grow_member(&st->members[m], dblade_stripe_member_bytes(&st->map, m, data_bytes));
        st->map.fd[m]   = st->members[m].fd;
        st->map.base[m] = st->members[m].data_offset;
    }
    if (rc < 0) {
        dblade_store_close(st);
        return rc;
    }
    st->data_offset = 0;
    size_t at = 0;
    for (uint32_t m = 0; m < n && at < sizeof(st->path); m++) {
        at += (size_t) snprintf(st->path + at, sizeof(st->path) - at, "%s%s", m ? ", " : "", st->members[m].path);
    }
    return 0;
}

void dblade_store_close(struct dblade_store * st) {
    for (uint32_t m = 0; m < st->n; m++) {
        if (st->members[m].fd >= 0) {
            close(st->members[m].fd);
            st->members[m].fd = -1;
        }
    }
    st->n = 0;
    dblade_io_shape_free(st->shape);
    st->shape = NULL;
}

static int wipe_member(struct dblade_store_member * m, uint64_t len, bool zero) {
    if (m->fd < 0 || len == 0) {
        return 0;
    }
    const uint64_t off = m->data_offset;
    len                = dblade_align_up(len, m->align);
    if (m->kind == DBLADE_STORE_DEVICE) {
        const uint64_t range[2] = { off, len };
        return ioctl(m->fd, zero ? BLKZEROOUT : BLKDISCARD, range) == 0 ? 0 : -errno;
    }
    if (!zero) {
        return 0; // an unnamed file's blocks are freed when it closes: a hole first changes nothing
    }
    // a file system may keep the old blocks behind a hole or an unwritten extent: write zeros over them
    const uint64_t chunk = 4u << 20;
    void *         zeros = NULL;
    if (posix_memalign(&zeros, m->mem_align > 4096 ? m->mem_align : 4096, chunk) != 0) {
        return -ENOMEM;
    }
    memset(zeros, 0, chunk);
    int rc = 0;
    for (uint64_t p = 0; p < len && rc == 0; p += chunk) {
        rc = dblade_io_write(m->fd, zeros, len - p < chunk ? len - p : chunk, off + p);
    }
    free(zeros);
    return rc == 0 && fdatasync(m->fd) != 0 ? -errno : rc;
}

int dblade_store_wipe(struct dblade_store * st, bool zero) {
    if (st->touched_end <= st->data_offset) {
        return 0;
    }
    const uint64_t logical = st->touched_end - st->data_offset;
    int            rc      = 0;
    for (uint32_t m = 0; m < st->n && rc == 0; m++) {
        // a striped member also held its bandwidth probe, at the start of its share
        uint64_t len = dblade_stripe_member_bytes(&st->map, m, logical);
        if (st->n > 1 && st->members[m].read_bps > 0) {
            len = len > DBLADE_PROBE_BYTES ? len : DBLADE_PROBE_BYTES;
        }
        rc = wipe_member(&st->members[m], len, zero);
    }
    if (rc == 0) {
        st->touched_end = 0;
    }
    return rc;
}

// --- the paths' views of the members ---

const char * dblade_store_where(const struct dblade_store * st, int member, char * buf, size_t cap) {
    if (st->n <= 1 || member < 0 || (uint32_t) member >= st->n) {
        return st->path;
    }
    snprintf(buf, cap, "%s (member %d of %u)", st->members[member].path, member + 1, st->n);
    return buf;
}

int dblade_store_mmap(const struct dblade_store * st, void * addr, uint64_t off, uint64_t len) {
    for (uint64_t done = 0, n; done < len; done += n) {
        uint32_t m;
        uint64_t phys;
        n = dblade_stripe_piece(&st->map, off + done, len - done, &m, &phys);
        if (mmap((uint8_t *) addr + done, n, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, st->map.fd[m],
                 (off_t) phys) == MAP_FAILED) {
            return -errno;
        }
    }
    return 0;
}

int dblade_store_write_direct(const struct dblade_store * st, const void * src, uint64_t off, uint64_t len) {
    if (off % st->align || len % st->align || (uintptr_t) src % st->mem_align) {
        return -EINVAL;
    }
    for (uint64_t done = 0, n; done < len; done += n) {
        uint32_t m;
        uint64_t phys;
        n = dblade_stripe_piece(&st->map, off + done, len - done, &m, &phys);
        const int rc = dblade_io_rw_member(st->map.fd[m], m, 1, (uint8_t *) src + done, n, phys, NULL);
        if (rc < 0) {
            return rc;
        }
    }
    return 0;
}

void dblade_store_dontneed(const struct dblade_store * st, uint64_t off, uint64_t len) {
    for (uint64_t done = 0, n; done < len; done += n) {
        uint32_t m;
        uint64_t phys;
        n = dblade_stripe_piece(&st->map, off + done, len - done, &m, &phys);
        posix_fadvise(st->map.fd[m], (off_t) phys, (off_t) n, POSIX_FADV_DONTNEED);
    }
}

int dblade_store_open_buffered(const struct dblade_store * st, struct dblade_stripe * out) {
    *out = st->map;
    for (uint32_t m = 0; m < out->n; m++) {
        out->fd[m] = -1;
    }
    for (uint32_t m = 0; m < st->map.n; m++) {
        char proc[64];
        snprintf(proc, sizeof(proc), "/proc/self/fd/%d", st->map.fd[m]);
        // a device already held O_EXCL by us: this open is not exclusive, and the kernel allows it
        out->fd[m] = open(proc, O_RDWR | O_CLOEXEC);
        if (out->fd[m] < 0) {
            const int e = errno;
            dblade_set_error("cannot open the KV store %s again for buffered reads: %s", st->members[m].path,
                             strerror(e));
            dblade_store_close_buffered(out);
            return -e;
        }
    }
    return 0;
}

void dblade_store_close_buffered(struct dblade_stripe * map) {
    for (uint32_t m = 0; m < map->n; m++) {
        if (map->fd[m] >= 0) {
            close(map->fd[m]);
            map->fd[m] = -1;
        }
    }
}
