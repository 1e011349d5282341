// Session files: a session's rows saved from one placement (direct, page cache, pinned) come back in
// another, bit for bit; the file's refusals (symlink, foreign file) and its checks (truncated, damaged
// header, newer format, a damaged KV block found by the direct path at first read, other geometry).
#define _GNU_SOURCE
#include "dualblade-llama.h"
#include "check.h"

#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define ROW   256
#define ROWS  64
#define BYTES (ROW * ROWS)
#define USED  20
#define KV_AT (1u << 20)

static void fill(unsigned char * p, int seed) {
    for (int r = 0; r < USED; r++) memset(p + r * ROW, (r * 7 + seed) & 0xff, ROW);
}

static int same(const unsigned char * p, int seed) {
    for (int r = 0; r < USED; r++)
        for (int i = 0; i < ROW; i++)
            if (p[r * ROW + i] != ((r * 7 + seed) & 0xff)) return 0;
    return 1;
}

// a session of three layers on the given paths, and its one cache (row_bytes: of every tensor)
static struct dblade_kv * make(const char * dir, const uint32_t paths[3], uint64_t row,
                                    struct dblade_cache ** c) {
    struct dblade_layout_layer lay[3];
    for (int i = 0; i < 3; i++) {
        struct dblade_layout_layer l = { i, paths[i], row * ROWS, row * ROWS, 0, 0 };
        lay[i] = l;
    }
    struct dblade_config cfg = { .policy = DBLADE_POLICY_DIRECT, .budget_bytes = 1 << 20, .kv_dir = dir };
    struct dblade_kv * s;
    CHECK_EQ(dblade_kv_create(&cfg, 3, lay, &s), 0);
    struct dblade_layer_desc d[3];
    for (int i = 0; i < 3; i++) {
        struct dblade_layer_desc x = { .il = i, .n_rows = ROWS, .n_stream = 1, .k_bytes = row * ROWS,
                                       .v_bytes = row * ROWS, .k_row_bytes = row, .v_row_bytes = row };
        d[i] = x;
    }
    struct dblade_cache_desc desc = { .name = "", .type_k = 1, .type_v = 1, .n_layers = 3, .layers = d };
    dblade_kv_bind(s);
    CHECK_EQ(dblade_cache_open(&desc, c), 0);
    dblade_kv_bind(NULL);
    return s;
}

// whether a state save/restore leaves tensor `which` of layer il to the module (a metadata-only mode)
static bool skips(struct dblade_cache * c, int32_t il, uint32_t which) {
    void * host = NULL;
    return dblade_cache_state_rows(c, il, which, &host) == DBLADE_STATE_ROWS_NONE;
}

// what the patched llama.cpp and the Python side do around a metadata-only restore
static int restore(struct dblade_kv * s, struct dblade_cache * c, const char * path) {
    struct dblade_sessionfile * f;
    int rc = dblade_sessionfile_open(path, &f);
    if (rc < 0) return rc;
    CHECK_EQ(dblade_kv_state_mode(s, DBLADE_STATE_LOAD_META), 0);
    CHECK_EQ(dblade_cache_state_mode(c, 0), DBLADE_STATE_LOAD_META);
    CHECK(skips(c, 1, 1));
    dblade_cache_state_begin(c);
    dblade_cache_clear(c); // the restore's clear(true)
    dblade_cache_state_end(c, USED);
    CHECK_EQ(dblade_kv_state_mode(s, DBLADE_STATE_STOCK), 0);
    rc = dblade_sessionfile_restore(s, f, NULL);
    dblade_sessionfile_close(f);
    return rc;
}

static void copy_file(const char * from, const char * to, long cut, long flip) {
    FILE * a = fopen(from, "rb");
    CHECK(a);
    fseek(a, 0, SEEK_END);
    long n = ftell(a);
    fseek(a, 0, SEEK_SET);
    unsigned char * b = malloc((size_t) n);
    CHECK(fread(b, 1, (size_t) n, a) == (size_t) n);
    fclose(a);
    if (flip >= 0) b[flip] ^= 0xff;
    FILE * o = fopen(to, "wb");
    CHECK(o);
    CHECK(fwrite(b, 1, (size_t) (cut >= 0 ? cut : n), o) == (size_t) (cut >= 0 ? cut : n));
    fclose(o);
    free(b);
}

// The cells' placement of a metadata-only state: what a save encodes a restore decodes, and a
// placement that does not fit (another magic, a head or a range past the cells, ranges out of
// order or overlapping, another count) is refused.
static void cells_format(void) {
    const uint32_t ranges[] = { 0, 3, 5, 7, 9, 10 };
    uint8_t        buf[64];
    CHECK_EQ(dblade_cells_bytes(3), DBLADE_CELLS_HEAD + 24);
    dblade_cells_encode(8, ranges, 3, buf);
    CHECK_EQ(dblade_cells_rest(buf, 16, 6), 24);
    CHECK_EQ(dblade_cells_rest(buf, 16, 17), -EBADMSG); // more cells than the stream has
    uint32_t head = 0, idxs[6];
    CHECK_EQ(dblade_cells_decode(buf, buf + DBLADE_CELLS_HEAD, 16, 6, &head, idxs), 0);
    CHECK_EQ(head, 8);
    const uint32_t want[6] = { 0, 1, 2, 5, 6, 9 };
    CHECK(memcmp(idxs, want, sizeof(want)) == 0);
    CHECK_EQ(dblade_cells_decode(buf, buf + DBLADE_CELLS_HEAD, 16, 5, &head, idxs), -EBADMSG); // count
    CHECK_EQ(dblade_cells_rest(buf, 7, 6), -EBADMSG);                                           // head past the cells
    CHECK_EQ(dblade_cells_decode(buf, buf + DBLADE_CELLS_HEAD, 9, 6, &head, idxs), -EBADMSG); // a range past them
    const uint32_t overlap[] = { 0, 3, 2, 4 };
    dblade_cells_encode(0, overlap, 2, buf);
    CHECK_EQ(dblade_cells_decode(buf, buf + DBLADE_CELLS_HEAD, 16, 5, &head, idxs), -EBADMSG);
    buf[0] ^= 1; // not the magic
    CHECK_EQ(dblade_cells_rest(buf, 16, 5), -EBADMSG);
    printf("cells: placement encoded and decoded, bad ones refused\n");
}

int main(void) {
    cells_format();
    char dir[512], path[600], other[600];
    test_mkdtemp(dir, sizeof(dir), "sessionfile");
    snprintf(path, sizeof(path), "%s/s.dbkv", dir);

    // saved from: layer 0 direct, 1 page cache, 2 pinned
    const uint32_t pa[3] = { DBLADE_PATH_DIRECT, DBLADE_PATH_MMAP, DBLADE_PATH_RAM };
    struct dblade_cache * c;
    struct dblade_kv * s = make(dir, pa, ROW, &c);
    int64_t rows[USED];
    for (int i = 0; i < USED; i++) rows[i] = i;
    for (int il = 0; il < 3; il++) {
        for (uint32_t w = 0; w < 2; w++) {
            struct dblade_tensor * t = dblade_cache_tensor(c, il, w);
            dblade_fence_write(t, rows, USED, ROW);
            fill(dblade_tensor_data(t), il * 2 + (int) w + 1);
        }
    }
    CHECK_EQ(dblade_kv_flush(s), 0);
    CHECK_EQ(dblade_kv_state_mode(s, DBLADE_STATE_SAVE_META), 0);
    CHECK_EQ(dblade_cache_state_mode(c, USED), DBLADE_STATE_SAVE_META);
    CHECK(skips(c, 0, 0) && !skips(c, 7, 0));
    CHECK_EQ(dblade_kv_state_mode(s, DBLADE_STATE_STOCK), 0);
    CHECK(!skips(c, 0, 0));
    const char hello[] = "hello";
    struct dblade_section sec = { 17, 0, hello, sizeof(hello) };
    struct dblade_sessionfile_stats st;
    CHECK_EQ(dblade_sessionfile_save(s, path, &sec, 1, &st), 0);
    CHECK_EQ(st.kv_bytes, 6 * 8192); // 20 rows of 256 bytes, in whole blocks, per tensor
    CHECK_EQ(st.memory_bytes, 2 * 8192);
    struct stat sb;
    CHECK_EQ(stat(path, &sb), 0);
    CHECK_EQ(sb.st_mode & 0777, 0600);
    CHECK_EQ((uint64_t) sb.st_size, st.file_bytes);
    CHECK_EQ(dblade_sessionfile_save(s, path, &sec, 1, &st), 0); // appended to: this KV saved it
    CHECK_EQ(st.appended, 1u);

    // never through a symlink, never over a file that is not a session
    snprintf(other, sizeof(other), "%s/link.dbkv", dir);
    CHECK_EQ(symlink(path, other), 0);
    CHECK_EQ(dblade_sessionfile_save(s, other, &sec, 1, NULL), -ELOOP);
    struct dblade_sessionfile * f;
    CHECK_EQ(dblade_sessionfile_open(other, &f), -ELOOP);
    snprintf(other, sizeof(other), "%s/notes.txt", dir);
    FILE * o = fopen(other, "w");
    fputs("mine", o);
    fclose(o);
    CHECK_EQ(dblade_sessionfile_save(s, other, &sec, 1, NULL), -EEXIST);
    CHECK(strstr(dblade_last_error(), "refusing to overwrite"));
    CHECK_EQ(dblade_sessionfile_open(other, &f), -EINVAL);

    // the sections come back; no other kind is there
    CHECK_EQ(dblade_sessionfile_open(path, &f), 0);
    const void * data;
    uint64_t n;
    CHECK_EQ(dblade_sessionfile_section(f, 17, &data, &n), 0);
    CHECK(n == sizeof(hello) && !memcmp(data, hello, n));
    CHECK_EQ(dblade_sessionfile_section(f, 18, &data, &n), -ENOENT);
    dblade_sessionfile_close(f);

    // restored into another placement: 0 page cache, 1 direct, 2 direct
    const uint32_t pb[3] = { DBLADE_PATH_MMAP, DBLADE_PATH_DIRECT, DBLADE_PATH_DIRECT };
    struct dblade_cache * c2;
    struct dblade_kv * s2 = make(dir, pb, ROW, &c2);
    CHECK_EQ(restore(s2, c2, path), 0);
    for (int il = 0; il < 3; il++) {
        for (uint32_t w = 0; w < 2; w++) {
            struct dblade_tensor * t = dblade_cache_tensor(c2, il, w);
            dblade_fence_read(t, dblade_tensor_data(t), USED * ROW);
            CHECK(same(dblade_tensor_data(t), il * 2 + (int) w + 1));
        }
    }
    CHECK_EQ(dblade_kv_error(s2, NULL, 0), 0);

    // checks at open: truncated, damaged header, newer format
    copy_file(path, other, 3000, -1);
    CHECK_EQ(dblade_sessionfile_open(other, &f), -EIO);
    copy_file(path, other, (long) st.file_bytes - 1, -1);
    CHECK_EQ(dblade_sessionfile_open(other, &f), -EIO);
    CHECK(strstr(dblade_last_error(), "truncated"));
    // the second save appended: its commit is in header slot 1, slot 0 holds the first (a damaged older slot
    // is not the file's content)
    copy_file(path, other, -1, 100);
    CHECK_EQ(dblade_sessionfile_open(other, &f), 0);
    dblade_sessionfile_close(f);
    copy_file(path, other, -1, 4096 + 100);
    CHECK_EQ(dblade_sessionfile_open(other, &f), -EBADMSG);
    copy_file(path, other, -1, (long) st.file_bytes - 2); // in the last section
    CHECK_EQ(dblade_sessionfile_open(other, &f), -EBADMSG);
    copy_file(path, other, -1, 4096 + 16); // the version's low byte: 2 -> 0xfd
    CHECK_EQ(dblade_sessionfile_open(other, &f), -EPROTONOSUPPORT);

    // a damaged KV block of layer 1 K (the file's third tensor, each at home at its full size): found when the
    // direct path reads it
    copy_file(path, other, -1, KV_AT + 2 * ROWS * ROW + 5);
    CHECK_EQ(dblade_sessionfile_open(other, &f), 0); // opens: the sections are intact
    CHECK_EQ(dblade_sessionfile_verify(f, NULL), -EBADMSG); // a full read finds it up front
    CHECK(strstr(dblade_last_error(), "KV block 0 of layer 1 K"));
    dblade_sessionfile_close(f);
    CHECK_EQ(dblade_sessionfile_open(path, &f), 0);
    struct dblade_sessionfile_stats vs;
    CHECK_EQ(dblade_sessionfile_verify(f, &vs), 0);
    CHECK_EQ(vs.checked_bytes, 6 * 8192);
    dblade_sessionfile_close(f);
    struct dblade_cache * c3;
    struct dblade_kv * s3 = make(dir, pb, ROW, &c3);
    CHECK_EQ(restore(s3, c3, other), 0);
    struct dblade_tensor * k1 = dblade_cache_tensor(c3, 1, 0);
    dblade_fence_read(k1, dblade_tensor_data(k1), USED * ROW);
    CHECK_EQ(dblade_kv_error(s3, NULL, 0), -EBADMSG);
    // the same block, pinned in the loader: found at load
    const uint32_t pc[3] = { DBLADE_PATH_DIRECT, DBLADE_PATH_RAM, DBLADE_PATH_DIRECT };
    struct dblade_cache * c4;
    struct dblade_kv * s4 = make(dir, pc, ROW, &c4);
    CHECK_EQ(restore(s4, c4, other), -EBADMSG);
    CHECK(strstr(dblade_last_error(), "failed its checksum"));

    // another geometry: refused
    struct dblade_cache * c5;
    struct dblade_kv * s5 = make(dir, pb, 2 * ROW, &c5);
    CHECK_EQ(restore(s5, c5, path), -EINVAL);
    CHECK(strstr(dblade_last_error(), "does not fit"));

    struct dblade_kv * all[] = { s, s2, s3, s4, s5 };
    struct dblade_cache * caches[] = { c, c2, c3, c4, c5 };
    for (int i = 0; i < 5; i++) {
        dblade_cache_close(caches[i]);
        dblade_kv_release(all[i]);
    }
    char cmd[700];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
    CHECK_EQ(system(cmd), 0);
    printf("sessionfile: ok\n");
    return 0;
}
