// Placement plan: geometry + budget -> a path per layer.
//
// The one place this decision is made: the runtime uses it when a KV cache opens, and
// `dualblade info` asks it before any weight is loaded.

#include "plan.h"

#include "dualblade.h"

#include <errno.h>
#include <stdbool.h>
#include <stdlib.h>

const char * dblade_path_name(uint32_t path) {
    switch (path) {
        case DBLADE_PATH_RAM:    return "ram";
        case DBLADE_PATH_MMAP:   return "mmap";
        case DBLADE_PATH_DIRECT: return "direct";
        case DBLADE_PATH_VRAM:   return "vram";
        default:                 return "?";
    }
}

const char * dblade_policy_name(uint32_t policy) {
    switch (policy) {
        case DBLADE_POLICY_RAM:    return "ram";
        case DBLADE_POLICY_MMAP:   return "mmap";
        case DBLADE_POLICY_DIRECT: return "direct";
        case DBLADE_POLICY_AUTO:   return "auto";
        default:                   return "?";
    }
}

struct order_item {
    uint64_t bytes;
    uint32_t idx;
};

// largest first, then by layer order: pinning the largest layers that fit keeps the most bytes
// resident, which is what decode time depends on (every offloaded byte is read once per token)
static int cmp_order(const void * a, const void * b) {
    const struct order_item * x = a;
    const struct order_item * y = b;
    if (x->bytes != y->bytes) {
        return x->bytes > y->bytes ? -1 : 1;
    }
    return x->idx < y->idx ? -1 : (x->idx > y->idx);
}

int dblade_plan(uint32_t policy, uint64_t budget, uint32_t n, const uint64_t * layer_bytes,
                uint32_t * paths, uint64_t * staging_out) {
    if (policy > DBLADE_POLICY_AUTO || (n > 0 && (!layer_bytes || !paths))) {
        return -EINVAL;
    }
    if (staging_out) {
        *staging_out = 0;
    }

    uint64_t total = 0;
    uint64_t max_layer = 0;
    for (uint32_t i = 0; i < n; i++) {
        paths[i] = DBLADE_PATH_RAM;
        total += layer_bytes[i];
        if (layer_bytes[i] > max_layer) {
            max_layer = layer_bytes[i];
        }
    }
    if (policy == DBLADE_POLICY_RAM || budget == DBLADE_BUDGET_UNLIMITED || total <= budget) {
        return 0;
    }

    const uint32_t off_path = policy == DBLADE_POLICY_MMAP ? DBLADE_PATH_MMAP : DBLADE_PATH_DIRECT;

    struct order_item * order = malloc(sizeof(*order) * n);
    uint32_t *          pin   = malloc(sizeof(*pin) * n);
    if (!order || !pin) {
        free(order);
        free(pin);
        return -ENOMEM;
    }
    for (uint32_t i = 0; i < n; i++) {
        order[i].bytes = layer_bytes[i];
        order[i].idx   = i;
    }
    qsort(order, n, sizeof(*order), cmp_order);

    // Try each k: the k largest layers pinned, order[k] the largest offloaded one (it sets the
    // staging size), then any smaller layer that still fits. Keep the k that pins the most bytes.
    uint64_t best_pinned = 0, best_staging = 0, min_needed = UINT64_MAX, prefix = 0;
    int      best_k      = -1;
    for (uint32_t k = 0; k < n; prefix += order[k].bytes, k++) {
        const uint64_t staging = off_path == DBLADE_PATH_DIRECT ? dblade_plan_staging(order[k].bytes, n - k) : 0;
        if (prefix + staging < min_needed) {
            min_needed = prefix + staging;
        }
        if (prefix + staging > budget) {
            continue;
        }
        uint64_t left = budget - staging - prefix, pinned = prefix;
        for (uint32_t j = k + 1; j < n; j++) {
            if (order[j].bytes <= left) {
                left -= order[j].bytes;
                pinned += order[j].bytes;
            }
        }
        if (best_k < 0 || pinned >= best_pinned) { // ties: pin the earlier layers
            best_k = (int) k, best_pinned = pinned, best_staging = staging;
        }
    }
    if (best_k < 0) {
        free(order);
        free(pin);
        if (staging_out) {
            *staging_out = min_needed; // the smallest budget that works
        }
        return -ENOMEM;
    }

    uint64_t left = budget - best_staging;
    for (uint32_t k = 0; k < n; k++) {
        const uint32_t i = order[k].idx;
        const bool pinned = (int) k < best_k || ((int) k > best_k && layer_bytes[i] <= left);
        if (pinned) {
            left -= layer_bytes[i];
        }
        paths[i] = pinned ? DBLADE_PATH_RAM : off_path;
    }
    free(order);
    free(pin);
    if (staging_out) {
        *staging_out = best_staging;
    }
    return 0;
}
