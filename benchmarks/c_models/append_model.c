/* A C model of a round-robin append_blocks, the least its two passes can cost.
 *
 * 65,536 blocks for 1,024 sequences, one block per sequence per step (the bench's
 * round-robin stream).  Rows exist already and the pool's pages are resident, so
 * this is only the per-block work: a hash probe and a count per block (pass 1), then
 * a scattered store into 1,024 growing rows (pass 2).  The real call also creates the
 * 1,024 sequences in a fresh table, faults in a fresh pool and validates its input.
 *
 *   gcc -O3 -o /tmp/append_model benchmarks/c_models/append_model.c && /tmp/append_model
 */
#include <stdint.h>
#include <stdio.h>
#include <time.h>

#define NS 1024
#define PER 64
#define N (NS * PER)

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
static uint64_t state = 88172645463325252ull;
static uint64_t next(void) { state ^= state << 13; state ^= state >> 7; state ^= state << 17; return state; }

static int64_t keys[4096]; static int32_t slot_rows[4096]; static const int shift = 64 - 12; static const uint64_t mask = 4095;
static int64_t seqs[N]; static int32_t blocks[N], run_rows[N];
static int64_t row_start[NS]; static int32_t row_len[NS], pending[NS];
int32_t pool[N];   /* not static: the stores must happen */

static inline uint64_t home(int64_t key) { return ((uint64_t)key * 0x9e3779b97f4a7c15ull) >> shift; }
static inline int32_t find(int64_t key) {
    uint64_t s = home(key);
    for (;;) { if (keys[s] == key) return slot_rows[s]; if (keys[s] == -1) return -1; s = (s + 1) & mask; }
}
__attribute__((noinline)) static void pass1(void) {
    for (int i = 0; i < NS; i++) pending[i] = 0;
    for (int i = 0; i < N; i++) { int32_t r = find(seqs[i]); run_rows[i] = r; pending[r]++; }
}
__attribute__((noinline)) static void pass2(void) {
    int64_t start = 0;
    for (int i = 0; i < NS; i++) { row_start[i] = start; start += pending[i]; row_len[i] = 0; }
    for (int i = 0; i < N; i++) { int32_t r = run_rows[i], l = row_len[r]; pool[row_start[r] + l] = blocks[i]; row_len[r] = l + 1; }
}
__attribute__((noinline)) static void both(void) { pass1(); pass2(); }

int main(void) {
    for (int i = 0; i < 4096; i++) keys[i] = -1;
    int64_t ids[NS];
    for (int i = 0; i < NS; i++) {
        ids[i] = next() >> 1;
        uint64_t s = home(ids[i]); while (keys[s] != -1) s = (s + 1) & mask;
        keys[s] = ids[i]; slot_rows[s] = i;
    }
    for (int i = 0; i < N; i++) { seqs[i] = ids[i % NS]; blocks[i] = next() % N; }
    const char *names[] = {"both", "pass1", "pass2"};
    void (*fns[])(void) = {both, pass1, pass2};
    double best[3] = {1e9, 1e9, 1e9};
    for (int rep = 0; rep < 400; rep++)
        for (int v = 0; v < 3; v++) { double t = now(); fns[v](); t = now() - t; if (t < best[v]) best[v] = t; }
    for (int v = 0; v < 3; v++) printf("%-6s %5.2f ns/block\n", names[v], best[v] * 1e9 / N);
    int64_t sum = 0; for (int i = 0; i < N; i++) sum += pool[i];
    printf("(checksum %lld)\n", (long long)sum);
    return 0;
}
