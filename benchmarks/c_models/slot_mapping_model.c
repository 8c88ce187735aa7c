/* A C model of interleaved slot mapping, to see where the time per token goes.
 *
 * 1,024 sequences of 1..511 blocks (as the bench's slot-mapping table), 8,192 tokens
 * in random order, block size 16.  Variants, each the minimum of 3,000 interleaved
 * calls:
 *   formula     the vLLM formula's work in C: rows given, dense [1024, 511] table
 *   rows_given  the same over pagetable's pool: rows given, bounds check
 *   probe       what slot_mapping does: linear-probing hash lookup of each id, then
 *               the rows_given work
 *   find_only   the hash lookups alone
 * Environment: LB=log2(index slots) (11: load 0.5, 12: 0.25, 13: 0.125);
 * PERFECT=1 draws ids until each sits in its home slot (no mispredicted probe).
 *
 *   gcc -O3 -o /tmp/slot_model benchmarks/c_models/slot_mapping_model.c
 *   for lb in 11 12 13; do LB=$lb /tmp/slot_model; done; PERFECT=1 LB=12 /tmp/slot_model
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define NS 1024
#define NT 8192
#define W 511
#define MAX_SLOTS (1 << 16)

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
static uint64_t state = 88172645463325252ull;
static uint64_t next(void) { state ^= state << 13; state ^= state >> 7; state ^= state << 17; return state; }

static int64_t keys[MAX_SLOTS]; static int32_t slot_rows[MAX_SLOTS]; static int shift; static uint64_t mask;
static int64_t row_start[NS], row_len[NS]; static int32_t *pool, *dense;
static int64_t seq[NT], pos[NT], rows[NT];
int64_t out[NT];   /* not static: the stores must happen */

static inline uint64_t home(int64_t key) { return ((uint64_t)key * 0x9e3779b97f4a7c15ull) >> shift; }
static inline int32_t find(int64_t key) {
    uint64_t s = home(key);
    for (;;) { if (keys[s] == key) return slot_rows[s]; if (keys[s] == -1) return -1; s = (s + 1) & mask; }
}
__attribute__((noinline)) static void formula(void) {
    for (int i = 0; i < NT; i++) out[i] = (int64_t)dense[rows[i] * W + (pos[i] >> 4)] * 16 + (pos[i] & 15);
}
__attribute__((noinline)) static void rows_given(void) {
    for (int i = 0; i < NT; i++) {
        int64_t r = rows[i], p = pos[i];
        out[i] = (uint64_t)p < (uint64_t)(row_len[r] * 16) ? ((int64_t)pool[row_start[r] + (p >> 4)] << 4) | (p & 15) : -1;
    }
}
__attribute__((noinline)) static void probe(void) {
    for (int i = 0; i < NT; i++) {
        int32_t r = find(seq[i]); int64_t p = pos[i];
        out[i] = (uint64_t)p < (uint64_t)(row_len[r] * 16) ? ((int64_t)pool[row_start[r] + (p >> 4)] << 4) | (p & 15) : -1;
    }
}
__attribute__((noinline)) static void find_only(void) { for (int i = 0; i < NT; i++) out[i] = find(seq[i]); }

int main(void) {
    int lb = getenv("LB") ? atoi(getenv("LB")) : 12;
    static char used[MAX_SLOTS];
    shift = 64 - lb; mask = (1ull << lb) - 1;
    for (int i = 0; i < MAX_SLOTS; i++) keys[i] = -1;
    int64_t total = 0, ids[NS];
    for (int i = 0; i < NS; i++) {
        row_len[i] = 1 + next() % W; row_start[i] = total; total += row_len[i];
        ids[i] = next() >> 2;
        while (getenv("PERFECT") && used[home(ids[i])]) ids[i] = next() >> 2;
        used[home(ids[i])] = 1;
    }
    pool = malloc(total * 4); dense = malloc((size_t)NS * W * 4);
    for (int64_t i = 0; i < total; i++) pool[i] = next() % 1000000;
    for (int i = 0; i < NS; i++) {
        for (int j = 0; j < row_len[i]; j++) dense[i * W + j] = pool[row_start[i] + j];
        uint64_t s = home(ids[i]); while (keys[s] != -1) s = (s + 1) & mask;
        keys[s] = ids[i]; slot_rows[s] = i;
    }
    int displaced = 0;
    for (int i = 0; i < NS; i++) displaced += keys[home(ids[i])] != ids[i];
    for (int i = 0; i < NT; i++) { int r = next() % NS; rows[i] = r; seq[i] = ids[r]; pos[i] = next() % (row_len[r] * 16); }
    const char *names[] = {"formula", "rows_given", "probe", "find_only"};
    void (*fns[])(void) = {formula, rows_given, probe, find_only};
    double best[4] = {1e9, 1e9, 1e9, 1e9};
    for (int rep = 0; rep < 3000; rep++)
        for (int v = 0; v < 4; v++) { double t = now(); fns[v](); t = now() - t; if (t < best[v]) best[v] = t; }
    printf("index load %.3f, %d of %d ids not in their home slot\n", (double)NS / (1 << lb), displaced, NS);
    for (int v = 0; v < 4; v++) printf("  %-10s %5.2f ns/token\n", names[v], best[v] * 1e9 / NT);
    int64_t sum = 0; for (int i = 0; i < NT; i++) sum += out[i];
    printf("  (checksum %lld)\n", (long long)sum);
    return 0;
}
