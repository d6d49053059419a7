/* What matvec.c and kquants.c share. */
#include <immintrin.h>
#include <stdint.h>

#define INLINE static inline __attribute__((always_inline))

void quantize_rows(const float *x, int64_t M, int64_t K, int8_t *xq, float *xscale, float *xsum);
int cpu_has_vnni(void);
void to_bf16(const float *x, int64_t n, uint16_t *out);

/* Where a dequantisation writes its rows: fp32 rows of `out`, or (bf16 set) bf16 rows, each made in a
 * row of fp32 scratch first; see `row_for` and `row_done`. */
typedef struct {
    void *out;
    int bf16;
    int64_t K;
} RowSink;

INLINE float *row_for(RowSink sink, int64_t n, float *scratch) {
    return sink.bf16 ? scratch : (float *)sink.out + n * sink.K;
}

INLINE void row_done(RowSink sink, int64_t n, const float *scratch) {
    if (sink.bf16) to_bf16(scratch, sink.K, (uint16_t *)sink.out + n * sink.K);
}

/* Software prefetch, PREFETCH_DISTANCE bytes past what a loop reads now. Decoding streams every
 * weight once, and on the Intel VM of 2026-12 the hardware prefetchers left a one-thread matvec
 * at a third of memory speed: Q5_0 rows streamed at 2.3 GB/s, 6.7-7.0 with this (Q4_0 2.6 -> 7.4,
 * Q8_0 6.4 -> 8.8; distances 512/1024/2048/4096 bytes gave 5.2/6.7/7.0/6.6 GB/s on Q5_0), and
 * SmolLM2 Q4_K_M's decode step went from 37 to 23 ms on one thread. Prefetches past the end of
 * an array are harmless: they never fault. */
#define PREFETCH_DISTANCE 2048

INLINE void prefetch_ahead(const void *now, int64_t bytes) {
    const char *ahead = (const char *)now + PREFETCH_DISTANCE;
    for (int64_t i = 0; i < bytes; i += 64) _mm_prefetch(ahead + i, _MM_HINT_T0);
}
