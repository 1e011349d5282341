// The host cost of a ubatch's KQ mask, side by side: llama.cpp's general fill (the loop of set_input_kq_mask_impl in
// llama-kv-cache.cpp, reduced to its case here: one causal sequence, f16, no SWA, ALiBi or 2-D positions) against
// patch 0007's two runs a row, for the last ubatch of a prompt (default: 11,008 tokens at 30,720 cells, a 30K
// prompt's third ubatch); checks that both write the same bytes. Build and run from the repo root (after a build,
// which prepares the vendor tree and installs libggml-base; -O3 as llama.cpp's Release build):
//   V=vendor/llama-cpp-python/vendor/llama.cpp L=$(python -c 'import llama_cpp, os; print(os.path.dirname(llama_cpp.__file__))')/lib
//   g++ -O3 -std=c++17 -I$V/src -I$V/include -I$V/ggml/include tools/bench-kq-mask.cpp -L$L -lggml-base \
//       -Wl,-rpath,$L -o /tmp/bench-kq-mask && /tmp/bench-kq-mask [n_kv [ubatch]]
#include "llama-kv-cells.h"
#include "ggml.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

typedef ggml_fp16_t T;

static double now() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// llama.cpp's loop: the first token's row cell by cell (recording the cells near the ubatch), then each token's row
// copied from it and those cells checked again
static void general(const llama_kv_cells & cells, const std::vector<llama_pos> & pos, int64_t n_kv, T * data) {
    const T keep = ggml_fp32_to_fp16(0.0f), drop = ggml_fp32_to_fp16(-INFINITY);
    const uint32_t n_swa = 0;
    const llama_pos seq_pos_min = pos[0];
    std::vector<uint32_t> idxs;
    idxs.reserve(pos.size() + n_swa + 32);
    for (size_t i = 0; i < pos.size(); i++) {
        const llama_pos p1   = pos[i];
        const uint64_t  idst = n_kv * i;
        const bool      prev = i > 0;
        if (prev) {
            std::copy(data, data + n_kv, data + idst);
        }
        for (int64_t jj = 0; jj < n_kv; jj++) {
            uint32_t j = jj;
            if (prev) {
                if ((size_t) jj >= idxs.size()) {
                    break;
                }
                j = idxs[jj];
            }
            if (cells.is_empty(j) || !cells.seq_has(j, 0)) {
                data[idst + j] = drop;
                continue;
            }
            const llama_pos p0 = cells.pos_get(j);
            if (!prev && p0 + (int32_t) (n_swa + 32) >= seq_pos_min) {
                idxs.push_back(j);
            }
            data[idst + j] = p0 > p1 ? drop : keep;
        }
    }
}

// patch 0007: the cells checked once, then two runs a row
static void in_order(const llama_kv_cells & cells, const std::vector<llama_pos> & pos, int64_t n_kv, T * data) {
    const T keep = ggml_fp32_to_fp16(0.0f), drop = ggml_fp32_to_fp16(-INFINITY);
    for (int64_t j = 0; j < n_kv; j++) {
        if (cells.is_empty(j) || !cells.seq_has(j, 0) || cells.pos_get(j) != j) {
            abort();
        }
    }
    for (size_t i = 0; i < pos.size(); i++) {
        T * row = data + n_kv * i;
        std::fill(row, row + pos[i] + 1, keep);
        std::fill(row + pos[i] + 1, row + n_kv, drop);
    }
}

int main(int argc, char ** argv) {
    const int64_t n_kv = argc > 1 ? atoll(argv[1]) : 30720;
    const int64_t n_ub = argc > 2 ? atoll(argv[2]) : 11008;
    if (n_ub < 1 || n_ub > n_kv) {
        fprintf(stderr, "usage: %s [n_kv [ubatch]] (1 <= ubatch <= n_kv)\n", argv[0]);
        return 2;
    }
    llama_kv_cells cells;
    cells.resize(n_kv);
    for (int64_t j = 0; j < n_kv; j++) { // the prompt so far, this ubatch included, in cell order
        cells.pos_set(j, j);
        cells.seq_add(j, 0);
    }
    std::vector<llama_pos> pos(n_ub);
    for (int64_t i = 0; i < n_ub; i++) {
        pos[i] = n_kv - n_ub + i;
    }
    std::vector<T> a(n_kv * n_ub), b(n_kv * n_ub);
    double best_general = 1e9, best_in_order = 1e9;
    for (int rep = 0; rep < 3; rep++) {
        double t0 = now();
        general(cells, pos, n_kv, a.data());
        double t1 = now();
        in_order(cells, pos, n_kv, b.data());
        double t2 = now();
        best_general  = std::min(best_general, t1 - t0);
        best_in_order = std::min(best_in_order, t2 - t1);
    }
    const bool same = memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
    printf("n_kv %lld, ubatch %lld (best of 3): general %.3f s, in order %.3f s, %.1fx; same bytes: %s\n",
           (long long) n_kv, (long long) n_ub, best_general, best_in_order, best_general / best_in_order,
           same ? "yes" : "NO");
    return same ? 0 : 1;
}
