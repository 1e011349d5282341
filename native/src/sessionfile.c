// Session files: a context's KV and metadata in one file, saved atomically, loaded by any number of
// processes without changing it.
//
// Layout (format 1, little-endian as the host):
//   0        header, 4 KiB: magic, version, flags, sizes, the section table, CRC-32C of the rest
//   1 MiB    KV extents, one per K/V tensor of every layer, each on a 4 KiB boundary: the tensor's
//            rows [0, saved) as they are in memory (pinned layers) or in the store (offloaded ones)
//   ...      sections, each with its CRC-32C in the header: LAYERS (where each tensor is), SUMS (a
//            CRC-32C per 4 KiB block of every extent), then the embedding program's (llama.cpp's
//            metadata-only state, tokens, context description)
//
// Saving moves no KV through this process's memory beyond a bounded buffer: an offloaded tensor's
// extent goes from the store into the file by FICLONERANGE (reflink file systems: no data moves),
// else an O_DIRECT copy through a 4 MiB buffer, else copy_file_range (in the kernel); a pinned
// tensor is written from its memory. Loading (dblade_sessionfile_restore) copies the extents into the loader's own store
// the same way, so the direct path reads them at first use and checks each block against SUMS.

#define _GNU_SOURCE
#include "residency.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

#define SF_MAGIC        "DUALBLADE-SES-v1"
#define SF_VERSION      1u
#define SF_KV_OFFSET    (1u << 20)
#define SF_MAX_SECTIONS 32u
#define SF_COPY_BUF     (4u << 20)
#define SF_CRC_AT       (DBLADE_HEADER_BYTES - 4u)

enum { SEC_LAYERS = 1, SEC_SUMS = 2 }; // the module's own; the embedding program's are >= 16

struct sf_section {
    uint32_t kind, crc;
    uint64_t off, bytes;
};

struct sf_header {
    char              magic[16];
    uint32_t          version, header_bytes, flags, n_sections;
    uint64_t          file_bytes, created, kv_offset, kv_bytes;
    struct sf_section sections[SF_MAX_SECTIONS];
};

// one K or V tensor in the file
struct sf_layer {
    char     name[8]; // the cache's name tag ("" or "swa_")
    int32_t  il;
    uint32_t which;
    uint32_t type;
    uint32_t v_trans;
    uint64_t row_bytes;
    uint64_t bytes;     // the whole tensor
    uint64_t used;      // rows written ([0, used) bytes): the loader's high-water mark
    uint64_t saved;     // bytes in the file: used up to a whole block
    uint64_t file_off;
    uint64_t sums_at;   // its first block's index in SUMS
};

struct dblade_sessionfile {
    int               fd;     // O_RDONLY
    int               dfd;    // the same file, O_DIRECT (or fd where the file system has none)
    char              path[512];
    struct sf_header  h;
    uint8_t *         sec_data[SF_MAX_SECTIONS];
    struct sf_layer * layers;
    uint32_t          n_layers;
    uint32_t *        sums;
    uint64_t          n_sums;
};

static inline uint32_t sum_of(uint32_t crc) {
    return crc ? crc : 1; // as the engine records them: 0 means "not known"
}

// --- copies between files, no user-space copy where the kernel can do it ---

enum { HOW_CLONE = 1, HOW_CFR = 2, HOW_DIRECT = 4 };

static int forced_how(void) {
    const char * e = getenv("DUALBLADE_SESSION_COPY");
    if (!e || !*e) {
        return 0;
    }
    return !strcmp(e, "clone") ? HOW_CLONE : !strcmp(e, "copy_file_range") ? HOW_CFR : !strcmp(e, "direct") ? HOW_DIRECT : 0;
}

static int set_direct(int fd, bool on) {
    const int fl = fcntl(fd, F_GETFL);
    if (fl < 0) {
        return -errno;
    }
    return fcntl(fd, F_SETFL, on ? (fl | O_DIRECT) : (fl & ~O_DIRECT)) < 0 ? -errno : 0;
}

// [soff, soff + len) of src to [doff, ...) of dst; all multiples of DBLADE_BLOCK. *how: what did it.
// A reflink where the file system has them (no data moves); else an O_DIRECT copy through a bounded
// buffer (on ext4 about twice as fast as copy_file_range, which goes through the page cache); else, where
// O_DIRECT refuses the transfer, copy_file_range (in the kernel).
static int copy_cfr(int src, uint64_t soff, int dst, uint64_t doff, uint64_t len) {
    loff_t   so = (loff_t) soff, dof = (loff_t) doff;
    uint64_t left = len;
    while (left > 0) {
        const ssize_t n = copy_file_range(src, &so, dst, &dof, left, 0);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            return n < 0 ? -errno : -EIO;
        }
        left -= (uint64_t) n;
    }
    return 0;
}

// [off, off + len) of fd read through a bounded buffer, each piece handed to fn(buf, n, done, arg) with
// done its offset in the range; the first error ends it (a read's -errno, or fn's)
typedef int (*sf_piece_fn)(const void * buf, uint64_t n, uint64_t done, void * arg);

static int read_pieces(int fd, uint64_t off, uint64_t len, sf_piece_fn fn, void * arg) {
    void * buf = NULL;
    if (posix_memalign(&buf, DBLADE_BLOCK, SF_COPY_BUF) != 0) {
        return -ENOMEM;
    }
    int rc = 0;
    for (uint64_t done = 0; done < len && rc == 0; done += SF_COPY_BUF) {
        const uint64_t n = len - done < SF_COPY_BUF ? len - done : SF_COPY_BUF;
        rc               = dblade_io_read(fd, buf, n, off + done);
        if (rc == 0) {
            rc = fn(buf, n, done, arg);
        }
    }
    free(buf);
    return rc;
}

struct copy_to {
    int                   dst;
    uint64_t              doff;
    struct dblade_fault * fault;
};

static int write_piece(const void * buf, uint64_t n, uint64_t done, void * arg) {
    const struct copy_to * c = arg;
    return dblade_io_rw(c->dst, 1, (void *) buf, n, c->doff + done, c->fault);
}

static int copy_direct(int src, uint64_t soff, int dst, uint64_t doff, uint64_t len, struct dblade_fault * fault) {
    struct copy_to c = { dst, doff, fault };
    return read_pieces(src, soff, len, write_piece, &c);
}

// two streams at once (halves of the range): the device has reads and writes in flight together
struct copy_half {
    int      src, dst;
    uint64_t soff, doff, len;
    int      rc;
};

static void * copy_half_run(void * arg) {
    struct copy_half * h = arg;
    h->rc                = copy_direct(h->src, h->soff, h->dst, h->doff, h->len, NULL);
    return NULL;
}

static int copy_direct2(int src, uint64_t soff, int dst, uint64_t doff, uint64_t len, struct dblade_fault * fault) {
    if (fault || len < (1u << 20)) { // the fault rules count transfers in order: one stream
        return copy_direct(src, soff, dst, doff, len, fault);
    }
    const uint64_t   half = dblade_align_down(len / 2, DBLADE_BLOCK);
    struct copy_half h    = { src, dst, soff + half, doff + half, len - half, 0 };
    pthread_t        th;
    if (pthread_create(&th, NULL, copy_half_run, &h) != 0) {
        return copy_direct(src, soff, dst, doff, len, NULL);
    }
    const int rc = copy_direct(src, soff, dst, doff, half, NULL);
    pthread_join(th, NULL);
    return rc < 0 ? rc : h.rc;
}

static int copy_range(int src, uint64_t soff, int dst, uint64_t doff, uint64_t len, struct dblade_fault * fault,
                      int * how) {
    const int force = fault ? HOW_DIRECT : forced_how();
    if (len == 0) {
        return 0;
    }
    if (!force || force == HOW_CLONE) {
        struct file_clone_range r = { .src_fd = src, .src_offset = soff, .src_length = len, .dest_offset = doff };
        if (ioctl(dst, FICLONERANGE, &r) == 0) {
            *how |= HOW_CLONE;
            return 0;
        }
    }
    if (force == HOW_CFR) {
        *how |= HOW_CFR;
        return copy_cfr(src, soff, dst, doff, len);
    }
    int rc = copy_direct2(src, soff, dst, doff, len, fault);
    if (rc == -EINVAL && !force) {
        *how |= HOW_CFR;
        return copy_cfr(src, soff, dst, doff, len);
    }
    *how |= HOW_DIRECT;
    return rc;
}

static int sum_piece(const void * buf, uint64_t n, uint64_t done, void * arg) {
    dblade_crc32c_blocks(buf, n / DBLADE_BLOCK, (uint32_t *) arg + done / DBLADE_BLOCK);
    return 0;
}

// CRC-32C of each block of [off, off + len) of fd
static int sums_read(int fd, uint64_t off, uint64_t len, uint32_t * out) {
    return read_pieces(fd, off, len, sum_piece, out);
}

static void sums_of_memory(const void * p, uint64_t len, uint32_t * out) {
    const uint64_t n = len / DBLADE_BLOCK;
    dblade_crc32c_blocks(p, n, out);
    for (uint64_t i = 0; i < n; i++) {
        out[i] = sum_of(out[i]);
    }
}

static void how_name(int how, char * out, size_t cap) {
    snprintf(out, cap, "%s%s%s%s%s", how & HOW_CLONE ? "clone" : "", (how & HOW_CLONE) && (how & ~HOW_CLONE) ? "+" : "",
             how & HOW_CFR ? "copy_file_range" : "", (how & HOW_CFR) && (how & HOW_DIRECT) ? "+" : "",
             how & HOW_DIRECT ? "direct" : "");
}

static const char * format_bytes(uint64_t b, char * buf, size_t cap) {
    const char * unit[] = { "B", "KiB", "MiB", "GiB", "TiB" };
    double       x      = (double) b;
    int          u      = 0;
    while (x >= 1024 && u < 4) {
        x /= 1024, u++;
    }
    snprintf(buf, cap, u ? "%.1f %s" : "%.0f %s", x, unit[u]);
    return buf;
}

// --- the header ---

static void header_encode(const struct sf_header * h, uint8_t out[DBLADE_HEADER_BYTES]) {
    memset(out, 0, DBLADE_HEADER_BYTES);
    memcpy(out, h, sizeof(*h));
    const uint32_t crc = dblade_crc32c(out, SF_CRC_AT);
    memcpy(out + SF_CRC_AT, &crc, 4);
}

_Static_assert(sizeof(struct sf_header) <= SF_CRC_AT, "the session header fits its block");

static bool is_session_file(int dirfd, const char * name) {
    const int fd = openat(dirfd, name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) {
        return false;
    }
    char          magic[16];
    const ssize_t n = pread(fd, magic, sizeof(magic), 0);
    close(fd);
    return n == (ssize_t) sizeof(magic) && memcmp(magic, SF_MAGIC, sizeof(magic)) == 0;
}

// temporary names of saves whose process is gone: ".<name>.tmp.<pid>.<n>"
static void remove_stale_temps(int dirfd, const char * name) {
    const int fd2 = dup(dirfd);
    DIR *     d   = fd2 >= 0 ? fdopendir(fd2) : NULL;
    if (!d) {
        if (fd2 >= 0) {
            close(fd2);
        }
        return;
    }
    char prefix[300];
    snprintf(prefix, sizeof(prefix), ".%s.tmp.", name);
    const size_t   plen = strlen(prefix);
    struct dirent * e;
    while ((e = readdir(d)) != NULL) {
        if (strncmp(e->d_name, prefix, plen) != 0) {
            continue;
        }
        const long pid = strtol(e->d_name + plen, NULL, 10);
        if (pid > 0 && kill((pid_t) pid, 0) < 0 && errno == ESRCH && is_session_file(dirfd, e->d_name)) {
            unlinkat(dirfd, e->d_name, 0);
        }
    }
    closedir(d);
}

// DUALBLADE_TEST_PAUSE=save:<phase>: the saver stops itself there (SIGSTOP), for crash tests
static void test_pause(const char * phase) {
    const char * e = getenv("DUALBLADE_TEST_PAUSE");
    if (e && !strncmp(e, "save:", 5) && !strcmp(e + 5, phase)) {
        raise(SIGSTOP);
    }
}

// --- save ---

int dblade_sessionfile_save(struct dblade_session * s, const char * path, const struct dblade_section * sections,
                            uint32_t n_sections, struct dblade_sessionfile_stats * stats) {
    if (!s || !path || !*path || (n_sections && !sections) || n_sections + 2 > SF_MAX_SECTIONS) {
        dblade_set_error("invalid arguments");
        return -EINVAL;
    }
    struct dblade_sessionfile_stats st;
    memset(&st, 0, sizeof(st));
    // the directory and the name in it
    char dir[512];
    if (strlen(path) >= sizeof(dir)) {
        dblade_set_error("the session path is too long (%zu bytes; at most %zu)", strlen(path), sizeof(dir) - 1);
        return -ENAMETOOLONG;
    }
    snprintf(dir, sizeof(dir), "%s", path);
    char *       slash = strrchr(dir, '/');
    const char * name  = slash ? slash + 1 : dir;
    if (slash == dir) {
        dir[1] = 0, name = path + 1;
    } else if (slash) {
        *slash = 0, name = path + (slash - dir) + 1;
    }
    if (!*name || !strcmp(name, ".") || !strcmp(name, "..")) {
        dblade_set_error("%s names a directory; give a file name for the session", path);
        return -EISDIR;
    }
    const int dirfd = open(slash ? dir : ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dirfd < 0) {
        const int e = errno;
        dblade_set_error("cannot open the directory of %s: %s", path, strerror(e));
        return -e;
    }
    struct stat pst;
    if (fstatat(dirfd, name, &pst, AT_SYMLINK_NOFOLLOW) == 0) {
        if (S_ISLNK(pst.st_mode)) {
            dblade_set_error("%s is a symlink; give the file itself", path);
            close(dirfd);
            return -ELOOP;
        }
        if (!S_ISREG(pst.st_mode) || !is_session_file(dirfd, name)) {
            dblade_set_error("%s is not a dualblade session; refusing to overwrite it", path);
            close(dirfd);
            return -EEXIST;
        }
    }
    remove_stale_temps(dirfd, name);

    struct dblade_fault  fault_rules;
    struct dblade_fault * fault = NULL;
    const char *          fspec = getenv("DUALBLADE_FAULT");
    if (fspec && *fspec && dblade_fault_init(&fault_rules, fspec) == 0) {
        fault = &fault_rules;
    }

    // an unnamed file in the target directory: a crash before the link leaves nothing
    char tmpname[600] = "";
    int  fd           = openat(dirfd, ".", O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
    if (fd < 0) {
        for (int i = 0; i < 100 && fd < 0; i++) {
            snprintf(tmpname, sizeof(tmpname), ".%s.tmp.%d.%d", name, (int) getpid(), i);
            fd = openat(dirfd, tmpname, O_CREAT | O_EXCL | O_RDWR | O_NOFOLLOW | O_CLOEXEC, 0600);
        }
        if (fd < 0) {
            const int e = errno;
            dblade_set_error("cannot create a file in the directory of %s: %s", path, strerror(e));
            close(dirfd);
            return -e;
        }
    }
    fchmod(fd, 0600);

    int               rc     = 0;
    struct sf_layer * layers = NULL;
    uint32_t *        sums   = NULL;
    uint32_t          n_layers = 0;
    uint64_t          n_sums   = 0;
    int               how      = 0;
    void *            blk      = NULL;
    struct sf_header  h;
    memset(&h, 0, sizeof(h));

    pthread_mutex_lock(&s->lock);
    // the plan: every tensor of every cache, back to back from SF_KV_OFFSET
    uint32_t cap = 0;
    for (struct dblade_cache * c = s->caches; c; c = c->next) {
        cap += c->n_tensors;
    }
    layers = calloc(cap ? cap : 1, sizeof(*layers));
    if (!layers) {
        rc = -ENOMEM;
        goto out_locked;
    }
    uint64_t off = SF_KV_OFFSET;
    for (struct dblade_cache * c = s->caches; c; c = c->next) {
        for (uint32_t i = 0; i < c->n_tensors; i++) {
            struct dblade_tensor * t = &c->tensors[i];
            struct sf_layer *      l = &layers[n_layers++];
            memcpy(l->name, c->name, strnlen(c->name, sizeof(l->name) - 1));
            l->il        = t->il;
            l->which     = t->which;
            l->type      = t->which ? c->type_v : c->type_k;
            l->v_trans   = c->v_trans;
            l->row_bytes = t->row_bytes;
            l->bytes     = t->bytes;
            uint64_t used = t->which && c->v_trans ? t->bytes : (uint64_t) c->state_rows * t->row_bytes;
            used          = used < t->bytes ? used : t->bytes;
            if (t->path != DBLADE_PATH_RAM) {
                used = used < t->hwm ? used : t->hwm; // the store holds nothing above hwm
            }
            l->used     = used;
            l->saved    = dblade_align_up(used, DBLADE_BLOCK);
            l->saved    = l->saved < t->map_bytes ? l->saved : t->map_bytes;
            l->file_off = off;
            l->sums_at  = n_sums;
            off += l->saved;
            n_sums += l->saved / DBLADE_BLOCK;
        }
    }
    sums = calloc(n_sums ? n_sums : 1, sizeof(*sums));
    if (!sums) {
        rc = -ENOMEM;
        goto out_locked;
    }
    h.kv_offset = SF_KV_OFFSET;
    h.kv_bytes  = off - SF_KV_OFFSET;
    // the sections after the KV
    struct dblade_section secs[SF_MAX_SECTIONS];
    uint32_t              n_secs = 0;
    secs[n_secs++] = (struct dblade_section) { SEC_LAYERS, 0, layers, (uint64_t) n_layers * sizeof(*layers) };
    secs[n_secs++] = (struct dblade_section) { SEC_SUMS, 0, sums, n_sums * sizeof(*sums) };
    for (uint32_t i = 0; i < n_sections; i++) {
        secs[n_secs++] = sections[i];
    }
    uint64_t end = off;
    for (uint32_t i = 0; i < n_secs; i++) {
        end           = dblade_align_up(end, 8);
        h.sections[i] = (struct sf_section) { secs[i].kind, 0, end, secs[i].bytes };
        end += secs[i].bytes; // the file ends with the last section: every byte after the KV is checked
    }
    h.n_sections = n_secs;
    h.file_bytes = end;
    // room for all of it first: a full disk fails here, before anything is named
    if (fallocate(fd, 0, 0, (off_t) end) < 0 && errno != EOPNOTSUPP) {
        const int e = errno;
        struct statvfs vfs;
        char           a[32], b[32];
        if (e == ENOSPC && fstatvfs(fd, &vfs) == 0) {
            dblade_set_error("no space for the session: %s has %s free, the session needs %s", slash ? dir : ".",
                             format_bytes((uint64_t) vfs.f_bavail * vfs.f_frsize, a, sizeof(a)),
                             format_bytes(end, b, sizeof(b)));
        } else {
            dblade_set_error("cannot reserve %llu bytes for the session %s: %s", (unsigned long long) end, path,
                             strerror(e));
        }
        rc = -e;
        goto out_locked;
    }
    // the KV: pinned tensors from memory, offloaded ones from the store (flushed by the caller)
    const bool direct_ok = set_direct(fd, true) == 0;
    uint32_t   li        = 0;
    for (struct dblade_cache * c = s->caches; c && rc == 0; c = c->next) {
        for (uint32_t i = 0; i < c->n_tensors && rc == 0; i++, li++) {
            struct dblade_tensor * t = &c->tensors[i];
            struct sf_layer *      l = &layers[li];
            uint32_t *             out_sums = sums + l->sums_at;
            const uint64_t         nblk     = l->saved / DBLADE_BLOCK;
            if (l->saved == 0) {
                continue;
            }
            if (t->path == DBLADE_PATH_RAM) {
                rc = dblade_io_rw(fd, 1, t->addr, l->saved, l->file_off, fault);
                sums_of_memory(t->addr, l->saved, out_sums);
                st.memory_bytes += l->saved;
                continue;
            }
            rc = copy_range(s->store.fd, t->store_off, fd, l->file_off, l->saved, fault, &how);
            if (rc < 0) {
                break;
            }
            // the blocks' sums: as the direct path recorded them, else from the page cache's mapping
            // (mmap path), else read back once
            bool known = t->path == DBLADE_PATH_DIRECT && t->sums;
            for (uint64_t b = 0; known && b < nblk; b++) {
                known = t->sums[b] != 0;
            }
            if (known) {
                memcpy(out_sums, t->sums, nblk * sizeof(*out_sums));
            } else if (t->path == DBLADE_PATH_MMAP) {
                sums_of_memory(t->addr, l->saved, out_sums);
                st.checked_bytes += l->saved;
            } else {
                rc = sums_read(fd, l->file_off, l->saved, out_sums);
                for (uint64_t b = 0; b < nblk; b++) {
                    out_sums[b] = sum_of(out_sums[b]);
                }
                st.checked_bytes += l->saved;
            }
        }
    }
    if (rc < 0) {
        dblade_set_error(rc == -ENOSPC ? "no space left for the session %s" : "writing the session %s: %s", path,
                         strerror(-rc));
        goto out_locked;
    }
    test_pause("kv");
    // the sections, with their checksums, then the header
    if (direct_ok) {
        set_direct(fd, false);
    }
    for (uint32_t i = 0; i < n_secs && rc == 0; i++) {
        h.sections[i].crc = dblade_crc32c(secs[i].data, secs[i].bytes);
        rc                = dblade_io_rw(fd, 1, (void *) secs[i].data, secs[i].bytes, h.sections[i].off, fault);
    }
    memcpy(h.magic, SF_MAGIC, sizeof(h.magic));
    h.version      = SF_VERSION;
    h.header_bytes = DBLADE_HEADER_BYTES;
    h.created      = (uint64_t) time(NULL);
    if (rc == 0 && (blk = malloc(DBLADE_HEADER_BYTES)) == NULL) {
        rc = -ENOMEM;
    }
    if (rc == 0) {
        header_encode(&h, blk);
        rc = dblade_io_rw(fd, 1, blk, DBLADE_HEADER_BYTES, 0, fault);
    }
    if (rc == 0 && fsync(fd) < 0) {
        rc = -errno;
    }
    if (rc < 0) {
        dblade_set_error(rc == -ENOSPC ? "no space left for the session %s" : "writing the session %s: %s", path,
                         strerror(-rc));
        goto out_locked;
    }
    pthread_mutex_unlock(&s->lock);

    // named: linked under a temporary name, renamed over the old one, the directory synced
    if (!*tmpname) {
        char proc[64];
        snprintf(proc, sizeof(proc), "/proc/self/fd/%d", fd);
        int lrc = -1;
        for (int i = 0; i < 100 && lrc < 0; i++) {
            snprintf(tmpname, sizeof(tmpname), ".%s.tmp.%d.%d", name, (int) getpid(), i);
            lrc = linkat(AT_FDCWD, proc, dirfd, tmpname, AT_SYMLINK_FOLLOW);
            if (lrc < 0 && errno != EEXIST) {
                lrc = linkat(fd, "", dirfd, tmpname, AT_EMPTY_PATH);
                if (lrc < 0 && errno != EEXIST) {
                    break;
                }
            }
        }
        if (lrc < 0) {
            rc = -errno;
            dblade_set_error("cannot name the session %s: %s", path, strerror(-rc));
            tmpname[0] = 0;
            goto out;
        }
    }
    test_pause("linked");
    if (renameat(dirfd, tmpname, dirfd, name) < 0) {
        rc = -errno;
        dblade_set_error("cannot name the session %s: %s", path, strerror(-rc));
        goto out;
    }
    tmpname[0] = 0;
    fsync(dirfd);
    st.kv_bytes   = h.kv_bytes;
    st.file_bytes = h.file_bytes;
    how_name(how, st.strategy, sizeof(st.strategy));
    if (!how) {
        snprintf(st.strategy, sizeof(st.strategy), "memory");
    }
    goto out;

out_locked:
    pthread_mutex_unlock(&s->lock);
out:
    if (rc < 0 && *tmpname) {
        unlinkat(dirfd, tmpname, 0);
    }
    if (rc == 0 && stats) {
        // bytes by strategy: only one is used per save in practice; report them all under the mix
        st.cloned_bytes = how == HOW_CLONE ? h.kv_bytes - st.memory_bytes : 0;
        st.copied_bytes = how == HOW_CFR ? h.kv_bytes - st.memory_bytes : 0;
        st.direct_bytes = how == HOW_DIRECT ? h.kv_bytes - st.memory_bytes : 0;
        *stats          = st;
    }
    free(blk);
    free(sums);
    free(layers);
    close(fd);
    close(dirfd);
    return rc;
}

// --- open and check ---

void dblade_sessionfile_close(struct dblade_sessionfile * f) {
    if (!f) {
        return;
    }
    for (uint32_t i = 0; i < SF_MAX_SECTIONS; i++) {
        free(f->sec_data[i]);
    }
    if (f->dfd >= 0 && f->dfd != f->fd) {
        close(f->dfd);
    }
    if (f->fd >= 0) {
        close(f->fd);
    }
    free(f);
}

static const char * section_name(uint32_t kind) {
    switch (kind) {
        case SEC_LAYERS: return "layer table";
        case SEC_SUMS:   return "block checksums";
        default:         return "metadata";
    }
}

int dblade_sessionfile_open(const char * path, struct dblade_sessionfile ** out) {
    if (!path || !out) {
        return -EINVAL;
    }
    *out                          = NULL;
    struct dblade_sessionfile * f = calloc(1, sizeof(*f));
    if (!f) {
        return -ENOMEM;
    }
    f->dfd = -1;
    snprintf(f->path, sizeof(f->path), "%s", path);
    int rc = 0;
    f->fd  = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (f->fd < 0) {
        rc = -errno;
        if (rc == -ELOOP) {
            dblade_set_error("%s is a symlink; give the file itself", path);
        } else {
            dblade_set_error("cannot open the session %s: %s", path, strerror(-rc));
        }
        goto fail;
    }
    struct stat st;
    if (fstat(f->fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        dblade_set_error("%s is not a dualblade session (not a regular file)", path);
        rc = -EINVAL;
        goto fail;
    }
    uint8_t  blk[DBLADE_HEADER_BYTES];
    ssize_t  n = pread(f->fd, blk, sizeof(blk), 0);
    if (n < 16 || memcmp(blk, SF_MAGIC, 16) != 0) {
        dblade_set_error("%s is not a dualblade session", path);
        rc = -EINVAL;
        goto fail;
    }
    if (n < (ssize_t) sizeof(blk)) {
        dblade_set_error("%s is truncated (%llu bytes; a session has at least %u)", path,
                         (unsigned long long) st.st_size, DBLADE_HEADER_BYTES);
        rc = -EIO;
        goto fail;
    }
    memcpy(&f->h, blk, sizeof(f->h));
    uint32_t crc;
    memcpy(&crc, blk + SF_CRC_AT, 4);
    if (f->h.version > SF_VERSION || f->h.flags != 0) {
        dblade_set_error("%s was saved by a newer dualblade (session format %u, this one reads %u); upgrade dualblade",
                         path, f->h.version, SF_VERSION);
        rc = -EPROTONOSUPPORT;
        goto fail;
    }
    if (crc != dblade_crc32c(blk, SF_CRC_AT) || f->h.header_bytes != DBLADE_HEADER_BYTES ||
        f->h.n_sections > SF_MAX_SECTIONS || f->h.version == 0) {
        dblade_set_error("%s is damaged (header checksum)", path);
        rc = -EBADMSG;
        goto fail;
    }
    if ((uint64_t) st.st_size < f->h.file_bytes) {
        dblade_set_error("%s is truncated (%llu of %llu bytes)", path, (unsigned long long) st.st_size,
                         (unsigned long long) f->h.file_bytes);
        rc = -EIO;
        goto fail;
    }
    for (uint32_t i = 0; i < f->h.n_sections; i++) {
        const struct sf_section * sec = &f->h.sections[i];
        if (sec->off > f->h.file_bytes || sec->bytes > f->h.file_bytes - sec->off) {
            dblade_set_error("%s is damaged (section table)", path);
            rc = -EBADMSG;
            goto fail;
        }
        f->sec_data[i] = malloc(sec->bytes ? sec->bytes : 1);
        if (!f->sec_data[i]) {
            rc = -ENOMEM;
            goto fail;
        }
        rc = dblade_io_read(f->fd, f->sec_data[i], sec->bytes, sec->off);
        if (rc < 0) {
            dblade_set_error("reading the session %s: %s", path, strerror(-rc));
            goto fail;
        }
        if (dblade_crc32c(f->sec_data[i], sec->bytes) != sec->crc) {
            dblade_set_error("%s is damaged (%s checksum)", path, section_name(sec->kind));
            rc = -EBADMSG;
            goto fail;
        }
        if (sec->kind == SEC_LAYERS) {
            f->layers   = (struct sf_layer *) f->sec_data[i];
            f->n_layers = (uint32_t) (sec->bytes / sizeof(struct sf_layer));
        } else if (sec->kind == SEC_SUMS) {
            f->sums   = (uint32_t *) f->sec_data[i];
            f->n_sums = sec->bytes / sizeof(uint32_t);
        }
    }
    if (!f->sums || (!f->layers && f->n_layers)) {
        dblade_set_error("%s is damaged (no layer table)", path);
        rc = -EBADMSG;
        goto fail;
    }
    for (uint32_t i = 0; i < f->n_layers; i++) {
        const struct sf_layer * l = &f->layers[i];
        if (l->saved % DBLADE_BLOCK || l->file_off % DBLADE_BLOCK || l->file_off < f->h.kv_offset ||
            l->saved > f->h.file_bytes || l->file_off > f->h.file_bytes - l->saved || l->used > l->saved ||
            l->sums_at > f->n_sums || l->saved / DBLADE_BLOCK > f->n_sums - l->sums_at) {
            dblade_set_error("%s is damaged (layer table)", path);
            rc = -EBADMSG;
            goto fail;
        }
    }
    // the KV is read with O_DIRECT where the file system allows it: the same inode, opened again
    char proc[64];
    snprintf(proc, sizeof(proc), "/proc/self/fd/%d", f->fd);
    f->dfd = open(proc, O_RDONLY | O_DIRECT | O_CLOEXEC);
    if (f->dfd < 0) {
        f->dfd = f->fd;
    }
    *out = f;
    return 0;
fail:
    dblade_sessionfile_close(f);
    return rc;
}

int dblade_sessionfile_section(struct dblade_sessionfile * f, uint32_t kind, const void ** data, uint64_t * bytes) {
    if (!f || !data || !bytes) {
        return -EINVAL;
    }
    for (uint32_t i = 0; i < f->h.n_sections; i++) {
        if (f->h.sections[i].kind == kind) {
            *data  = f->sec_data[i];
            *bytes = f->h.sections[i].bytes;
            return 0;
        }
    }
    return -ENOENT;
}

// --- restore ---

static const struct sf_layer * find_layer(const struct dblade_sessionfile * f, const struct dblade_cache * c,
                                          const struct dblade_tensor * t) {
    for (uint32_t i = 0; i < f->n_layers; i++) {
        const struct sf_layer * l = &f->layers[i];
        if (l->il == t->il && l->which == t->which && !strncmp(l->name, c->name, sizeof(l->name))) {
            return l;
        }
    }
    return NULL;
}

int dblade_sessionfile_restore(struct dblade_session * s, struct dblade_sessionfile * f,
                               struct dblade_sessionfile_stats * stats) {
    if (!s || !f) {
        return -EINVAL;
    }
    struct dblade_sessionfile_stats st;
    memset(&st, 0, sizeof(st));
    int      rc      = 0;
    int      how     = 0;
    uint32_t matched = 0;
    pthread_mutex_lock(&s->lock);
    for (struct dblade_cache * c = s->caches; c && rc == 0; c = c->next) {
        for (uint32_t i = 0; i < c->n_tensors && rc == 0; i++) {
            struct dblade_tensor *  t = &c->tensors[i];
            const struct sf_layer * l = find_layer(f, c, t);
            const char *            kv = t->which ? "V" : "K";
            if (!l || l->bytes != t->bytes || l->row_bytes != t->row_bytes ||
                l->type != (t->which ? c->type_v : c->type_k) || l->v_trans != c->v_trans) {
                dblade_set_error("%s does not fit this context: layer %d %s%s is %s there", f->path, t->il,
                                 *c->name ? c->name : "", kv, l ? "of another size or type" : "missing");
                rc = -EINVAL;
                break;
            }
            matched++;
            dblade_pipeline_settle(s, t);
            const uint32_t * want = f->sums + l->sums_at;
            const uint64_t   nblk = l->saved / DBLADE_BLOCK;
            if (l->saved == 0) {
                continue;
            }
            if (t->path == DBLADE_PATH_RAM) {
                rc = dblade_io_read(f->dfd, t->addr, l->saved, l->file_off);
                st.memory_bytes += l->saved;
            } else {
                rc = copy_range(f->dfd, l->file_off, s->store.fd, t->store_off, l->saved, NULL, &how);
                const uint64_t end = t->store_off + l->saved;
                s->touched_end     = end > s->touched_end ? end : s->touched_end;
            }
            if (rc < 0) {
                dblade_set_error("reading the session %s: %s", f->path, strerror(-rc));
                break;
            }
            if (t->path == DBLADE_PATH_DIRECT) {
                // checked by the direct path when first read, as any block it wrote itself
                if (t->sums) {
                    memset(t->sums, 0, (t->map_bytes / DBLADE_BLOCK) * sizeof(*t->sums));
                    memcpy(t->sums, want, nblk * sizeof(*want));
                }
            } else {
                // in memory now (pinned) or behind the page cache's mapping: checked here
                uint32_t got[64];
                for (uint64_t b = 0; b < nblk && rc == 0; b += 64) {
                    const uint64_t m = nblk - b < 64 ? nblk - b : 64;
                    sums_of_memory(t->addr + b * DBLADE_BLOCK, m * DBLADE_BLOCK, got);
                    for (uint64_t k = 0; k < m; k++) {
                        if (got[k] != want[b + k]) {
                            dblade_set_error("%s is damaged: KV block %llu of layer %d %s%s failed its checksum",
                                             f->path, (unsigned long long) (b + k), t->il, c->name, kv);
                            rc = -EBADMSG;
                            break;
                        }
                    }
                }
                st.checked_bytes += l->saved;
            }
            if (t->path != DBLADE_PATH_RAM) {
                t->hwm = l->used;
            }
            st.kv_bytes += l->saved;
        }
    }
    if (rc == 0 && matched != f->n_layers) {
        dblade_set_error("%s does not fit this context: it holds %u KV tensors, this context has %u", f->path,
                         f->n_layers, matched);
        rc = -EINVAL;
    }
    s->active = NULL;
    pthread_mutex_unlock(&s->lock);
    if (rc == 0 && stats) {
        how_name(how, st.strategy, sizeof(st.strategy));
        const uint64_t moved = st.kv_bytes - st.memory_bytes;
        st.cloned_bytes      = how == HOW_CLONE ? moved : 0;
        st.copied_bytes      = how == HOW_CFR ? moved : 0;
        st.direct_bytes      = how == HOW_DIRECT ? moved : 0;
        st.file_bytes = f->h.file_bytes;
        *stats        = st;
    }
    return rc;
}

struct check_layer {
    const struct dblade_sessionfile * f;
    const struct sf_layer *           l;
    uint32_t                          got[SF_COPY_BUF / DBLADE_BLOCK];
    bool                              damaged;
};

static int check_piece(const void * buf, uint64_t n, uint64_t done, void * arg) {
    struct check_layer *    c    = arg;
    const struct sf_layer * l    = c->l;
    const uint32_t *        want = c->f->sums + l->sums_at + done / DBLADE_BLOCK;
    sums_of_memory(buf, n, c->got);
    for (uint64_t b = 0; b < n / DBLADE_BLOCK; b++) {
        if (c->got[b] != want[b]) {
            dblade_set_error("%s is damaged: KV block %llu of layer %d %s%s failed its checksum", c->f->path,
                             (unsigned long long) (done / DBLADE_BLOCK + b), l->il, l->name, l->which ? "V" : "K");
            c->damaged = true;
            return -EBADMSG;
        }
    }
    return 0;
}

int dblade_sessionfile_verify(struct dblade_sessionfile * f, struct dblade_sessionfile_stats * stats) {
    if (!f) {
        return -EINVAL;
    }
    struct check_layer * c = malloc(sizeof(*c));
    if (!c) {
        return -ENOMEM;
    }
    int      rc      = 0;
    uint64_t checked = 0;
    for (uint32_t i = 0; i < f->n_layers && rc == 0; i++) {
        c->f = f, c->l = &f->layers[i], c->damaged = false;
        rc = read_pieces(f->dfd, c->l->file_off, c->l->saved, check_piece, c);
        if (rc < 0 && !c->damaged) {
            dblade_set_error("reading the session %s: %s", f->path, strerror(-rc));
        }
        checked += rc == 0 ? c->l->saved : 0;
    }
    free(c);
    if (rc == 0 && stats) {
        memset(stats, 0, sizeof(*stats));
        stats->kv_bytes      = f->h.kv_bytes;
        stats->checked_bytes = checked;
        stats->file_bytes    = f->h.file_bytes;
    }
    return rc;
}
