// Saving a session file (format.h has the layout), without carrying the KV through this process's
// memory beyond a bounded buffer. An offloaded tensor's extent goes from the store into the file by
// the copy engine (copy.c: a reflink, else O_DIRECT, else copy_file_range); a pinned tensor is
// written from its memory. The target (what may be replaced) first; then, where the file holds the
// commit the KV last matched, an append (append.c); else the file written whole: an unnamed file
// beside it, the layout, room for what it holds, the KV, the checksums, the tail and the header, then
// the name (a link under a temporary name, renamed over the target, the directory synced).

#define _GNU_SOURCE
#include "save.h"

#include "../base.h"
#include "../crc32c.h"
#include "../fault.h"
#include "../io.h"
#include "../kv.h"
#include "copy.h"

#include <dirent.h>
#include <stddef.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

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
    bool ok = false;
    for (uint32_t slot = 0; slot < SF_SLOTS && !ok; slot++) {
        char          magic[16];
        const ssize_t n = pread(fd, magic, sizeof(magic), (off_t) slot * DBLADE_HEADER_BYTES);
        ok              = n == (ssize_t) sizeof(magic) && memcmp(magic, SF_MAGIC, sizeof(magic)) == 0;
    }
    close(fd);
    return ok;
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

// The whole file's layout, the KV object's lock held: every tensor of every cache at home at its
// full size from SF_KV_OFFSET, their checksum slots, the homes of the sections with room; the tail
// (LAYERS, PATCHES, the other sections) after them.
static int lay_out(struct save * sv) {
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
            struct sf_layer * l = &sv->layers[sv->n_layers++];
            sf_plan_layer(&c->tensors[i], l);
            l->file_off = off;
            l->sums_at  = sv->n_sums;
            off += l->capacity;
            sv->n_sums += l->capacity / DBLADE_BLOCK;
        }
    }
    sv->sums = calloc(sv->n_sums ? sv->n_sums : 1, sizeof(*sv->sums));
    if (!sv->sums) {
        return -ENOMEM;
    }
    sv->h.kv_offset   = SF_KV_OFFSET;
    sv->h.sections[0] = (struct sf_section) { SEC_SUMS, 0, off, sv->n_sums * 4 };
    sv->h.n_sections  = 1;
    off               = dblade_align_up(off + sv->n_sums * 4, DBLADE_BLOCK);
    uint32_t n_rooms  = 0;
    for (uint32_t i = 0; i < sv->n_in; i++) {
        const struct dblade_section * s = &sv->in[i];
        if (s->reserved && s->reserved >= s->bytes && n_rooms < SF_MAX_ROOMS) {
            sv->h.rooms[n_rooms++] = (struct sf_room) { s->kind, 0, off, dblade_align_up(s->reserved, DBLADE_BLOCK) };
            off += sv->h.rooms[n_rooms - 1].bytes;
        } else {
            sv->secs[sv->n_secs++] = *s;
        }
    }
    sv->h.home_end = off;
    sv->h.tail_off = off;
    return 0;
}

// room first for what the file will hold: a full disk fails here, before anything is named
static int reserve_range(struct save * sv, uint64_t off, uint64_t len) {
    if (len == 0 || fallocate(sv->fd, 0, (off_t) off, (off_t) len) == 0 || errno == EOPNOTSUPP) {
        return 0;
    }
    const int      e = errno;
    struct statvfs vfs;
    char           a[32], b[32];
    if (e == ENOSPC && fstatvfs(sv->fd, &vfs) == 0) {
        uint64_t need = 0; // the rows it holds
        for (uint32_t i = 0; i < sv->n_layers; i++) {
            need += sv->layers[i].saved;
        }
        dblade_set_error("no space for the session: %s has %s free, the session needs %s", sv->in_dir ? sv->dir : ".",
                         format_bytes((uint64_t) vfs.f_bavail * vfs.f_frsize, a, sizeof(a)),
                         format_bytes(need, b, sizeof(b)));
    } else {
        dblade_set_error("cannot reserve %llu bytes for the session %s: %s", (unsigned long long) len, sv->path,
                         strerror(e));
    }
    return -e;
}

static int reserve(struct save * sv) {
    int rc = 0;
    for (uint32_t i = 0; i < sv->n_layers && rc == 0; i++) {
        rc = reserve_range(sv, sv->layers[i].file_off, sv->layers[i].saved);
    }
    return rc ? rc : reserve_range(sv, sv->h.sections[0].off, sv->n_sums * 4);
}

// every tensor's rows and their checksums, the KV object's lock held (the store flushed by the caller)
static int save_kv(struct save * sv) {
    int      rc = 0;
    uint32_t li = 0;
    for (struct dblade_cache * c = sv->kv->caches; c && rc == 0; c = c->next) {
        for (uint32_t i = 0; i < c->n_tensors && rc == 0; i++, li++) {
            const struct sf_layer * l = &sv->layers[li];
            rc = sf_put_blocks(sv, &c->tensors[i], 0, l->saved / DBLADE_BLOCK, l->file_off, sv->sums + l->sums_at);
        }
    }
    return rc;
}

// the checksums, the sections at home and in the tail, the header in slot 0: the first commit
static int save_meta(struct save * sv) {
    int rc = 0;
    for (uint32_t i = 0; i < sv->n_layers && rc == 0; i++) {
        rc = sf_put_sums(sv, i, 0, sv->layers[i].saved / DBLADE_BLOCK);
    }
    uint64_t end = sv->h.tail_off;
    rc           = rc ? rc : sf_put_tail(sv, sv->h.tail_off, &end);
    for (uint32_t i = 0; i < sv->n_in && rc == 0; i++) {
        for (uint32_t r = 0; r < SF_MAX_ROOMS; r++) {
            if (sv->h.rooms[r].kind == sv->in[i].kind && sv->h.rooms[r].bytes) {
                const struct dblade_section * s = &sv->in[i];
                sv->h.sections[sv->h.n_sections++] =
                    (struct sf_section) { s->kind, dblade_crc32c(s->data, s->bytes), sv->h.rooms[r].off, s->bytes };
                rc = sf_put(sv, s->data, s->bytes, sv->h.rooms[r].off);
                break;
            }
        }
    }
    sv->h.tail_bytes = end - sv->h.tail_off;
    sv->h.file_bytes = end;
    sv->h.gen        = 1;
    if (getrandom(&sv->h.lineage, sizeof(sv->h.lineage), 0) != sizeof(sv->h.lineage)) {
        sv->h.lineage = (uint64_t) time(NULL) * 2654435761u ^ (uint64_t) getpid();
    }
    uint64_t kv_bytes = 0;
    for (uint32_t i = 0; i < sv->n_layers; i++) {
        kv_bytes += sv->layers[i].saved;
    }
    sv->h.kv_bytes = kv_bytes;
    return rc ? rc : sf_commit(sv, 0);
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
    sf_test_pause("linked");
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

// the file written whole under a new name
static int save_whole(struct save * sv) {
    struct dblade_kv * kv = sv->kv;
    int                rc = create(sv);
    if (rc < 0) {
        return rc;
    }
    pthread_mutex_lock(&kv->lock);
    kv->session.valid = false;
    rc                = lay_out(sv);
    rc                = rc ? rc : reserve(sv);
    if (rc == 0) {
        const bool direct = dblade_copy_set_direct(sv->fd, true) == 0;
        rc                = save_kv(sv);
        if (rc < 0) {
            write_failed(sv, rc);
        } else {
            sf_test_pause("kv");
            if (direct) {
                dblade_copy_set_direct(sv->fd, false);
            }
            rc = save_meta(sv);
            rc = rc ? write_failed(sv, rc) : 0;
        }
    }
    if (rc == 0) {
        dblade_sessionfile_matched(kv, 0, 0, sv->h.gen, sv->h.lineage); // its identity once it is named
    }
    pthread_mutex_unlock(&kv->lock);
    rc = rc ? rc : name(sv);
    struct stat st;
    if (rc == 0 && fstat(sv->fd, &st) == 0) {
        pthread_mutex_lock(&kv->lock);
        kv->session.valid = true, kv->session.dev = (uint64_t) st.st_dev, kv->session.ino = (uint64_t) st.st_ino;
        pthread_mutex_unlock(&kv->lock);
    }
    return rc;
}

// The file at the target, if it holds the commit this KV last matched: opened for the append and
// locked against other savers (a loader holds a shared lock while it reads). Else why not.
static void open_last(struct save * sv) {
    struct dblade_kv * kv = sv->kv;
    pthread_mutex_lock(&kv->lock);
    const bool valid = kv->session.valid;
    pthread_mutex_unlock(&kv->lock);
    if (!valid) {
        snprintf(sv->why_whole, sizeof(sv->why_whole), "this context has not saved to or loaded from it");
        return;
    }
    const int fd = openat(sv->dirfd, sv->name, O_RDWR | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) {
        snprintf(sv->why_whole, sizeof(sv->why_whole), "new file");
        return;
    }
    // a process reading it (a shared lock) for a while: written whole beside it instead
    int locked = -1;
    for (int i = 0; i < 200 && (locked = flock(fd, LOCK_EX | LOCK_NB)) < 0 && errno == EWOULDBLOCK; i++) {
        usleep(10000);
    }
    struct dblade_sessionfile * f = NULL;
    if (locked < 0) {
        close(fd);
        snprintf(sv->why_whole, sizeof(sv->why_whole), "another process holds the file");
        return;
    }
    if (dblade_sessionfile_read(fd, sv->path, &f) < 0) {
        snprintf(sv->why_whole, sizeof(sv->why_whole), "the file does not read back");
        return;
    }
    pthread_mutex_lock(&kv->lock);
    const bool same = kv->session.valid && f->h.version >= 2 && f->dev == kv->session.dev &&
                      f->ino == kv->session.ino && f->h.gen == kv->session.gen && f->h.lineage == kv->session.lineage;
    pthread_mutex_unlock(&kv->lock);
    if (!same) {
        snprintf(sv->why_whole, sizeof(sv->why_whole), f->h.version < 2 ? "an older session format" :
                                                                           "the file changed since this context matched it");
        dblade_sessionfile_close(f);
        return;
    }
    sv->old = f;
}

int dblade_sessionfile_save_flags(struct dblade_kv * kv, const char * path, const struct dblade_section * sections,
                                  uint32_t n_sections, uint32_t flags, struct dblade_sessionfile_stats * stats) {
    if (!kv || !path || !*path || (n_sections && !sections) || n_sections + 3 > SF_MAX_SECTIONS) {
        dblade_set_error("invalid arguments");
        return -EINVAL;
    }
    struct save * sv = calloc(1, sizeof(*sv));
    if (!sv) {
        return -ENOMEM;
    }
    sv->kv = kv, sv->path = path, sv->dirfd = -1, sv->fd = -1, sv->in = sections, sv->n_in = n_sections;
    int rc = target(sv);
    if (rc == 0 && (flags & DBLADE_SAVE_WHOLE)) {
        snprintf(sv->why_whole, sizeof(sv->why_whole), "asked to write it whole");
    } else if (rc == 0) {
        open_last(sv);
    }
    if (rc == 0 && sv->old) {
        sv->fd = sv->old->fd;
        rc     = sf_append(sv);
        if (rc < 0) {
            write_failed(sv, rc);
        }
        if (rc == 1) { // not this time: whole, beside it
            dblade_sessionfile_close(sv->old);
            sv->old = NULL, sv->fd = -1, rc = 0;
        }
    }
    if (rc == 0 && !sv->old) {
        rc = save_whole(sv);
    }
    if (rc < 0 && *sv->tmpname) {
        unlinkat(sv->dirfd, sv->tmpname, 0);
    }
    if (rc == 0 && stats) {
        // bytes by strategy: only one is used per save in practice; report them all under the mix
        struct dblade_sessionfile_stats * st = &sv->st;
        st->kv_bytes                         = sv->h.kv_bytes;
        st->file_bytes                       = sv->h.file_bytes;
        const uint64_t moved = sv->moved;
        st->cloned_bytes     = sv->how == DBLADE_COPY_CLONE ? moved : 0;
        st->copied_bytes     = sv->how == DBLADE_COPY_CFR ? moved : 0;
        st->direct_bytes     = sv->how == DBLADE_COPY_DIRECT ? moved : 0;
        dblade_copy_how_name(sv->how, st->strategy, sizeof(st->strategy));
        if (!sv->how) {
            snprintf(st->strategy, sizeof(st->strategy), "memory");
        }
        st->appended  = sv->old != NULL;
        st->n_patches = sv->n_patches;
        snprintf(st->whole_why, sizeof(st->whole_why), "%s", sv->old ? "" : sv->why_whole);
        *stats = *st;
    }
    free(sv->sums);
    free(sv->layers);
    free(sv->patches);
    if (sv->old) {
        dblade_sessionfile_close(sv->old); // closes fd (and drops the lock)
    } else if (sv->fd >= 0) {
        close(sv->fd);
    }
    if (sv->dirfd >= 0) {
        close(sv->dirfd);
    }
    free(sv);
    return rc;
}

int dblade_sessionfile_save(struct dblade_kv * kv, const char * path, const struct dblade_section * sections,
                            uint32_t n_sections, struct dblade_sessionfile_stats * stats) {
    return dblade_sessionfile_save_flags(kv, path, sections, n_sections, 0, stats);
}
