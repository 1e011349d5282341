// Sessions and caches: binding, layout checks, stats, lifetime when either side lets go first.
#include "dualblade.h"
#include "check.h"

#include <errno.h>
#include <pthread.h>
#include <stddef.h>
#include <string.h>

static struct dblade_layer_desc L(int il, uint64_t k, uint64_t v) {
    struct dblade_layer_desc d = { .il = il, .n_rows = 256, .n_stream = 1, .k_bytes = k, .v_bytes = v,
                                   .k_row_bytes = k / 256, .v_row_bytes = v / 256 };
    return d;
}

static void * open_unbound(void * arg) {
    // a thread that never bound a session gets no cache: stock llama.cpp behaviour
    const struct dblade_cache_desc * desc = arg;
    struct dblade_cache * c = (void *) 1;
    CHECK_EQ(dblade_cache_open(desc, &c), 0);
    CHECK(c == NULL);
    return NULL;
}

int main(void) {
    CHECK_EQ(dblade_abi_version(), DBLADE_ABI_VERSION);

    struct dblade_config bad = { .policy = 7, .budget_bytes = 1 };
    struct dblade_session * s = NULL;
    CHECK_EQ(dblade_session_create(&bad, 0, NULL, &s), -EINVAL);
    bad.policy = DBLADE_POLICY_RAM;
    bad.budget_bytes = 0;
    CHECK_EQ(dblade_session_create(&bad, 0, NULL, &s), -EINVAL);

    struct dblade_config cfg = { .policy = DBLADE_POLICY_RAM, .budget_bytes = DBLADE_BUDGET_UNLIMITED };
    CHECK_EQ(dblade_session_create(&cfg, 0, NULL, &s), 0);

    struct dblade_layer_desc base[2] = { L(5, 4096, 4096), L(0, 8192, 8192) };
    struct dblade_layer_desc swa[1]  = { L(3, 1024, 1024) };
    struct dblade_cache_desc d1 = { .name = "", .n_layers = 2, .layers = base };
    struct dblade_cache_desc d2 = { .name = "swa_", .n_layers = 1, .layers = swa };

    // not bound yet: no cache
    struct dblade_cache * c1 = NULL, * c2 = NULL;
    CHECK_EQ(dblade_cache_open(&d1, &c1), 0);
    CHECK(c1 == NULL);

    CHECK_EQ(dblade_session_bind(s), 0);
    pthread_t th;
    pthread_create(&th, NULL, open_unbound, &d1); // binding is per thread
    pthread_join(th, NULL);
    CHECK_EQ(dblade_cache_open(&d1, &c1), 0);
    CHECK_EQ(dblade_cache_open(&d2, &c2), 0);
    CHECK(c1 && c2);
    CHECK_EQ(dblade_session_bind(NULL), 0);

    // every tensor has its own zeroed, writable address range
    unsigned char * k5 = dblade_tensor_data(dblade_cache_tensor(c1, 5, 0));
    unsigned char * v0 = dblade_tensor_data(dblade_cache_tensor(c1, 0, 1));
    CHECK(k5 && v0 && k5 != v0);
    CHECK(dblade_cache_tensor(c1, 3, 0) == NULL); // layer 3 is in the other cache
    CHECK_EQ(k5[100], 0);
    memset(k5, 7, 4096);
    CHECK(dblade_cache_can_shift(c1));

    struct dblade_stats st;
    CHECK_EQ(dblade_session_stats(s, &st), 0);
    CHECK_EQ(st.n_layers, 3);
    CHECK_EQ(st.kv_bytes_total, 2 * 4096 + 2 * 8192 + 2 * 1024);
    CHECK_EQ(st.resident_bytes, st.kv_bytes_total);
    CHECK_EQ(st.bytes_read, 0);
    CHECK_EQ(st.policy, DBLADE_POLICY_RAM);
    CHECK(st.budget_bytes == DBLADE_BUDGET_UNLIMITED);

    struct dblade_layer_stats ls[8];
    CHECK_EQ(dblade_session_layers(s, ls, 8), 3);
    CHECK_EQ(ls[0].il, 0); // sorted by layer
    CHECK_EQ(ls[1].il, 3);
    CHECK_EQ(ls[2].il, 5);
    CHECK_EQ(ls[0].bytes, 16384);
    CHECK_EQ(ls[2].path, DBLADE_PATH_RAM);
    CHECK_EQ(dblade_session_layers(s, ls, 1), 3); // count even when capped

    // clear zeroes RAM tensors, as the stock clear does
    dblade_cache_clear(c1);
    CHECK_EQ(k5[100], 0);

    // the embedding side lets go first: the caches keep the session alive
    dblade_session_release(s);
    dblade_cache_close(c1);
    dblade_cache_close(c2);

    // with a layout, a cache whose geometry differs from the plan is refused
    struct dblade_layout_layer lay[2] = { { 5, DBLADE_PATH_RAM, 4096, 4096 }, { 0, DBLADE_PATH_RAM, 8192, 9999 } };
    CHECK_EQ(dblade_session_create(&cfg, 2, lay, &s), 0);
    dblade_session_bind(s);
    CHECK_EQ(dblade_cache_open(&d1, &c1), -EINVAL);
    CHECK(strstr(dblade_last_error(), "not the planned one"));
    dblade_session_bind(NULL);
    dblade_session_release(s);

    // offloaded layers need a store
    struct dblade_layout_layer off[1] = { { 0, DBLADE_PATH_DIRECT, 8192, 8192 } };
    struct dblade_config dcfg = { .policy = DBLADE_POLICY_DIRECT, .budget_bytes = 1 << 20 };
    CHECK_EQ(dblade_session_create(&dcfg, 1, off, &s), -EINVAL);
    CHECK(strstr(dblade_last_error(), "kv_dir"));

    puts("test_session: ok");
    return 0;
}
