// Saving a session file (format.h has the layout): atomically, and without carrying the KV through
// this process's memory beyond a bounded buffer. An offloaded tensor's extent goes from the store into
// the file by the copy engine (copy.c: a reflink, else O_DIRECT, else copy_file_range); a pinned tensor
// is written from its memory. The steps, in order: the target (what may be replaced), an unnamed file
// beside it, the layout of the file, room for all of it, the KV, the sections and the header, then
// the name (a link under a temporary name, renamed over the target, the directory synced).

#define _GNU_SOURCE
#include "format.h"

#include "../base.h"
#include "../crc32c.h"
#include "../fault.h"
#include "../io.h"
#include "../kv.h"
#include "copy.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

// one save in progress
struct save {
    struct dblade_kv *              kv;
    const char *                    path;
    char                            dir[512];
    const char *                    name; // in dir
    bool                            in_dir; // path names a directory part
    int                             dirfd, fd;
    char                            tmpname[600]; // the temporary name, while it exists
    struct dblade_fault             fault_rules;
    struct dblade_fault *           fault;
    struct sf_header                h;
    struct sf_layer *               layers;
    uint32_t                        n_layers;
    uint32_t *                      sums;
    uint64_t                        n_sums;
    struct dblade_section           secs[SF_MAX_SECTIONS];
    uint32_t                        n_secs;
    int                             how; // DBLADE_COPY_*
    struct dblade_sessionfile_stats st;
};

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
    const size_t    plen = strlen(prefix);
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

// The directory and the name in it; what is there may be replaced only if it is a session file.
static int target(struct save * sv) {
    const char * path = sv->path;
    if (strlen(path) >= sizeof(sv->dir)) {
        dblade_set_error("the session path is too long (%zu bytes; at most %zu)", strlen(path), sizeof(sv->dir) - 1);
        return -ENAMETOOLONG;
    }
    snprintf(sv->dir, sizeof(sv->dir), "%s", path);
    char * slash = strrchr(sv->dir, '/');
    sv->name     = slash ? slash + 1 : sv->dir;
    sv->in_dir   = slash != NULL;
    if (slash == sv->dir) {
        sv->dir[1] = 0, sv->name = path + 1;
    } else if (slash) {
        *slash = 0, sv->name = path + (slash - sv->dir) + 1;
    }
    if (!*sv->name || !strcmp(sv->name, ".") || !strcmp(sv->name, "..")) {
        dblade_set_error("%s names a directory; give a file name for the session", path);
        return -EISDIR;
    }
    sv->dirfd = open(sv->in_dir ? sv->dir : ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (sv->dirfd < 0) {
        const int e = errno;
        dblade_set_error("cannot open the directory of %s: %s", path, strerror(e));
        return -e;
    }
    struct stat pst;
    if (fstatat(sv->dirfd, sv->name, &pst, AT_SYMLINK_NOFOLLOW) == 0) {
        if (S_ISLNK(pst.st_mode)) {
            dblade_set_error("%s is a symlink; give the file itself", path);
            return -ELOOP;
        }
        if (!S_ISREG(pst.st_mode) || !is_session_file(sv->dirfd, sv->name)) {
            dblade_set_error("%s is not a dualblade session; refusing to overwrite it", path);
            return -EEXIST;
        }
    }
    remove_stale_temps(sv->dirfd, sv->name);
    const char * fspec = getenv("DUALBLADE_FAULT");
    if (fspec && *fspec && dblade_fault_init(&sv->fault_rules, fspec) == 0) {
        sv->fault = &sv->fault_rules;
    }
    return 0;
}

// an unnamed file in the target directory: a crash before the link leaves nothing
static int create(struct save * sv) {
    sv->fd = openat(sv->dirfd, ".", O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
    for (int i = 0; i < 100 && sv->fd < 0; i++) {
        snprintf(sv->tmpname, sizeof(sv->tmpname), ".%s.tmp.%d.%d", sv->name, (int) getpid(), i);
        sv->fd = openat(sv->dirfd, sv->tmpname, O_CREAT | O_EXCL | O_RDWR | O_NOFOLLOW | O_CLOEXEC, 0600);
    }
    if (sv->fd < 0) {
        const int e = errno;
        sv->tmpname[0] = 0;
        dblade_set_error("cannot create a file in the directory of %s: %s", sv->path, strerror(e));
        return -e;
    }
    fchmod(sv->fd, 0600);
    return 0;
}

// The file's layout, the KV object's lock held: every tensor of every cache back to back from
// SF_KV_OFFSET, then the sections (the module's and the caller's), each to its end.
static int lay_out(struct save * sv, const struct dblade_section * sections, uint32_t n_sections) {
    uint32_t cap = 0;
    for (struct dblade_cache * c = sv->kv->caches; c; c = c->next) {
        cap += c->n_tensors;
    }
    sv->layers = calloc(cap ? cap : 1, sizeof(*sv->layers));
    if (!sv->layers) {
        return -ENOMEM;
    }
    uint64_t off = SF_KV_OFFSET;
    for (struct dblade_cache * c = sv->kv->caches; c; c = c->next) {
        for (uint32_t i = 0; i < c->n_tensors; i++) {
            const struct dblade_tensor * t = &c->tensors[i];
            struct sf_layer *            l = &sv->layers[sv->n_layers++];
            memcpy(l->name, c->name, strnlen(c->name, sizeof(l->name) - 1));
            l->il         = t->il;
            l->which      = t->which;
            l->type       = t->which ? c->type_v : c->type_k;
            l->v_trans    = c->v_trans;
            l->row_bytes  = t->row_bytes;
            l->bytes      = t->bytes;
            uint64_t used = t->which && c->v_trans ? t->bytes : (uint64_t) c->state_rows * t->row_bytes;
            used          = used < t->bytes ? used : t->bytes;
            if (t->path != DBLADE_PATH_RAM) {
                used = used < t->hwm ? used : t->hwm; // the store holds nothing above hwm
            }
            l->used     = used;
            l->saved    = dblade_align_up(used, DBLADE_BLOCK);
            l->saved    = l->saved < t->map_bytes ? l->saved : t->map_bytes;
            l->file_off = off;
            l->sums_at  = sv->n_sums;
            off += l->saved;
            sv->n_sums += l->saved / DBLADE_BLOCK;
        }
    }
    sv->sums = calloc(sv->n_sums ? sv->n_sums : 1, sizeof(*sv->sums));
    if (!sv->sums) {
        return -ENOMEM;
    }
    sv->h.kv_offset         = SF_KV_OFFSET;
    sv->h.kv_bytes          = off - SF_KV_OFFSET;
    sv->secs[sv->n_secs++]  = (struct dblade_section) { SEC_LAYERS, 0, sv->layers,
                                                        (uint64_t) sv->n_layers * sizeof(*sv->layers) };
    sv->secs[sv->n_secs++]  = (struct dblade_section) { SEC_SUMS, 0, sv->sums, sv->n_sums * sizeof(*sv->sums) };
    for (uint32_t i = 0; i < n_sections; i++) {
        sv->secs[sv->n_secs++] = sections[i];
    }
    uint64_t end = off;
    for (uint32_t i = 0; i < sv->n_secs; i++) {
        end              = dblade_align_up(end, 8);
        sv->h.sections[i] = (struct sf_section) { sv->secs[i].kind, 0, end, sv->secs[i].bytes };
        end += sv->secs[i].bytes; // the file ends with the last section: every byte after the KV is checked
    }
    sv->h.n_sections = sv->n_secs;
    sv->h.file_bytes = end;
    return 0;
}

// room for all of it first: a full disk fails here, before anything is named
static int reserve(struct save * sv) {
    if (fallocate(sv->fd, 0, 0, (off_t) sv->h.file_bytes) == 0 || errno == EOPNOTSUPP) {
        return 0;
    }
    const int      e = errno;
    struct statvfs vfs;
    char           a[32], b[32];
    if (e == ENOSPC && fstatvfs(sv->fd, &vfs) == 0) {
        dblade_set_error("no space for the session: %s has %s free, the session needs %s", sv->in_dir ? sv->dir : ".",
                         format_bytes((uint64_t) vfs.f_bavail * vfs.f_frsize, a, sizeof(a)),
                         format_bytes(sv->h.file_bytes, b, sizeof(b)));
    } else {
        dblade_set_error("cannot reserve %llu bytes for the session %s: %s", (unsigned long long) sv->h.file_bytes,
                         sv->path, strerror(e));
    }
    return -e;
}

// One tensor's rows and their sums, the KV object's lock held: a pinned tensor from memory, an
// offloaded one from the store (flushed by the caller). Its blocks' sums are the direct path's record
// where it has one for every block, else from the page cache's mapping, else read back once.
static int save_tensor(struct save * sv, const struct dblade_tensor * t, const struct sf_layer * l) {
    uint32_t *     out  = sv->sums + l->sums_at;
    const uint64_t nblk = l->saved / DBLADE_BLOCK;
    if (l->saved == 0) {
        return 0;
    }
    if (t->path == DBLADE_PATH_RAM) {
        const int rc = dblade_io_rw(sv->fd, 1, t->addr, l->saved, l->file_off, sv->fault);
        dblade_sums_of_memory(t->addr, l->saved, out);
        sv->st.memory_bytes += l->saved;
        return rc;
    }
    int rc = dblade_copy_range(sv->kv->store.fd, t->store_off, sv->fd, l->file_off, l->saved, sv->fault, &sv->how);
    if (rc < 0) {
        return rc;
    }
    bool known = t->path == DBLADE_PATH_DIRECT && t->sums;
    for (uint64_t b = 0; known && b < nblk; b++) {
        known = t->sums[b] != 0;
    }
    if (known) {
        memcpy(out, t->sums, nblk * sizeof(*out));
    } else if (t->path == DBLADE_PATH_MMAP) {
        dblade_sums_of_memory(t->addr, l->saved, out);
        sv->st.checked_bytes += l->saved;
    } else {
        rc = dblade_sums_of_file(sv->fd, l->file_off, l->saved, out);
        sv->st.checked_bytes += l->saved;
    }
    return rc;
}

static int save_kv(struct save * sv) {
    int      rc = 0;
    uint32_t li = 0;
    for (struct dblade_cache * c = sv->kv->caches; c && rc == 0; c = c->next) {
        for (uint32_t i = 0; i < c->n_tensors && rc == 0; i++, li++) {
            rc = save_tensor(sv, &c->tensors[i], &sv->layers[li]);
        }
    }
    return rc;
}

// the sections, with their checksums, then the header, and all of it durable
static int save_meta(struct save * sv) {
    int rc = 0;
    for (uint32_t i = 0; i < sv->n_secs && rc == 0; i++) {
        sv->h.sections[i].crc = dblade_crc32c(sv->secs[i].data, sv->secs[i].bytes);
        rc = dblade_io_rw(sv->fd, 1, (void *) sv->secs[i].data, sv->secs[i].bytes, sv->h.sections[i].off, sv->fault);
    }
    memcpy(sv->h.magic, SF_MAGIC, sizeof(sv->h.magic));
    sv->h.version      = SF_VERSION;
    sv->h.header_bytes = DBLADE_HEADER_BYTES;
    sv->h.created      = (uint64_t) time(NULL);
    uint8_t * blk      = rc == 0 ? malloc(DBLADE_HEADER_BYTES) : NULL;
    if (rc == 0 && !blk) {
        rc = -ENOMEM;
    }
    if (rc == 0) {
        memset(blk, 0, DBLADE_HEADER_BYTES);
        memcpy(blk, &sv->h, sizeof(sv->h));
        const uint32_t crc = dblade_crc32c(blk, SF_CRC_AT);
        memcpy(blk + SF_CRC_AT, &crc, 4);
        rc = dblade_io_rw(sv->fd, 1, blk, DBLADE_HEADER_BYTES, 0, sv->fault);
    }
    free(blk);
    if (rc == 0 && fsync(sv->fd) < 0) {
        rc = -errno;
    }
    return rc;
}

// named: linked under a temporary name, renamed over the old one, the directory synced
static int name(struct save * sv) {
    if (!*sv->tmpname) {
        char proc[64];
        snprintf(proc, sizeof(proc), "/proc/self/fd/%d", sv->fd);
        int lrc = -1;
        for (int i = 0; i < 100 && lrc < 0; i++) {
            snprintf(sv->tmpname, sizeof(sv->tmpname), ".%s.tmp.%d.%d", sv->name, (int) getpid(), i);
            lrc = linkat(AT_FDCWD, proc, sv->dirfd, sv->tmpname, AT_SYMLINK_FOLLOW);
            if (lrc < 0 && errno != EEXIST) {
                lrc = linkat(sv->fd, "", sv->dirfd, sv->tmpname, AT_EMPTY_PATH);
                if (lrc < 0 && errno != EEXIST) {
                    break;
                }
            }
        }
        if (lrc < 0) {
            const int e    = errno;
            sv->tmpname[0] = 0;
            dblade_set_error("cannot name the session %s: %s", sv->path, strerror(e));
            return -e;
        }
    }
    test_pause("linked");
    if (renameat(sv->dirfd, sv->tmpname, sv->dirfd, sv->name) < 0) {
        const int e = errno;
        dblade_set_error("cannot name the session %s: %s", sv->path, strerror(e));
        return -e;
    }
    sv->tmpname[0] = 0;
    fsync(sv->dirfd);
    return 0;
}

static int write_failed(struct save * sv, int rc) {
    dblade_set_error(rc == -ENOSPC ? "no space left for the session %s" : "writing the session %s: %s", sv->path,
                     strerror(-rc));
    return rc;
}

int dblade_sessionfile_save(struct dblade_kv * kv, const char * path, const struct dblade_section * sections,
                            uint32_t n_sections, struct dblade_sessionfile_stats * stats) {
    if (!kv || !path || !*path || (n_sections && !sections) || n_sections + 2 > SF_MAX_SECTIONS) {
        dblade_set_error("invalid arguments");
        return -EINVAL;
    }
    struct save * sv = calloc(1, sizeof(*sv));
    if (!sv) {
        return -ENOMEM;
    }
    sv->kv = kv, sv->path = path, sv->dirfd = -1, sv->fd = -1;
    int rc = target(sv);
    if (rc == 0) {
        rc = create(sv);
    }
    if (rc == 0) {
        pthread_mutex_lock(&kv->lock);
        rc = lay_out(sv, sections, n_sections);
        rc = rc ? rc : reserve(sv);
        if (rc == 0) {
            const bool direct = dblade_copy_set_direct(sv->fd, true) == 0;
            rc                = save_kv(sv);
            if (rc < 0) {
                write_failed(sv, rc);
            } else {
                test_pause("kv");
                if (direct) {
                    dblade_copy_set_direct(sv->fd, false);
                }
                rc = save_meta(sv);
                rc = rc ? write_failed(sv, rc) : 0;
            }
        }
        pthread_mutex_unlock(&kv->lock);
    }
    if (rc == 0) {
        rc = name(sv);
    }
    if (rc < 0 && *sv->tmpname) {
        unlinkat(sv->dirfd, sv->tmpname, 0);
    }
    if (rc == 0 && stats) {
        // bytes by strategy: only one is used per save in practice; report them all under the mix
        struct dblade_sessionfile_stats * st = &sv->st;
        const uint64_t moved                 = sv->h.kv_bytes - st->memory_bytes;
        st->kv_bytes                         = sv->h.kv_bytes;
        st->file_bytes                       = sv->h.file_bytes;
        st->cloned_bytes                     = sv->how == DBLADE_COPY_CLONE ? moved : 0;
        st->copied_bytes                     = sv->how == DBLADE_COPY_CFR ? moved : 0;
        st->direct_bytes                     = sv->how == DBLADE_COPY_DIRECT ? moved : 0;
        dblade_copy_how_name(sv->how, st->strategy, sizeof(st->strategy));
        if (!sv->how) {
            snprintf(st->strategy, sizeof(st->strategy), "memory");
        }
        *stats = *st;
    }
    free(sv->sums);
    free(sv->layers);
    if (sv->fd >= 0) {
        close(sv->fd);
    }
    if (sv->dirfd >= 0) {
        close(sv->dirfd);
    }
    free(sv);
    return rc;
}
