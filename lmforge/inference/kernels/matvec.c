/* Matrix-times-few-vectors kernels for CPU decoding (AVX2 + FMA, OpenMP).
 *
 * Decoding multiplies a handful of activation rows (one per sequence) by every weight matrix,
 * so it is bound by how fast the weights stream from memory. PyTorch's GEMV reaches about
 * half of this machine's bandwidth and its int8/int4 CPU kernels need AVX-512 to be fast;
 * these loops read each weight once, dequantise in registers and use every row of x on it.
 *
 * Layouts (all row-major, contiguous):
 *   x      (M, K) float32 activations; y (M, N) float32 outputs; bias (N) or NULL
 *   f32    weight (N, K) float32
 *   q8     weight (N, K) int8, scale (N, K/G): w = scale * q (GGUF Q8_0 is G = 32; per-row is G = K)
 *   q4     weight (N, K/2) uint8, scale and offset (N, K/G) float16: w = scale * q + offset, q in 0..15.
 *          Each run of 32 weights is 16 bytes: low nibbles hold weights 0..15, high nibbles
 *          16..31 (GGUF's Q4_0/Q4_1 block layout, so those blocks map over unchanged).
 */
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

static inline float horizontal_sum(__m256 v) {
    __m128 low = _mm256_castps256_ps128(v), high = _mm256_extractf128_ps(v, 1);
    low = _mm_add_ps(low, high);
    low = _mm_add_ps(low, _mm_movehl_ps(low, low));
    low = _mm_add_ss(low, _mm_movehdup_ps(low));
    return _mm_cvtss_f32(low);
}

/* fp32 weights: each row of x keeps four accumulators, so four FMA chains are in flight while
 * the weights stream in. Two rows of x share each weight load; a lone row uses the same
 * accumulation order, so a row's result never depends on the rows batched with it. */
#define F32_STEP(acc, w, x) acc = _mm256_fmadd_ps(_mm256_loadu_ps(w), _mm256_loadu_ps(x), acc)

static float f32_finish(__m256 a0, __m256 a1, __m256 a2, __m256 a3, const float *x, const float *w, int64_t k,
                        int64_t K) {
    for (; k + 8 <= K; k += 8) F32_STEP(a0, w + k, x + k);
    float sum = horizontal_sum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; k < K; k++) sum += w[k] * x[k];
    return sum;
}

static float f32_row1(const float *x, int64_t K, const float *w) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        F32_STEP(a0, w + k, x + k), F32_STEP(a1, w + k + 8, x + k + 8);
        F32_STEP(a2, w + k + 16, x + k + 16), F32_STEP(a3, w + k + 24, x + k + 24);
    }
    return f32_finish(a0, a1, a2, a3, x, w, k, K);
}

static void f32_rows2(const float *x0, const float *x1, int64_t K, const float *w, float out[2]) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        __m256 w0 = _mm256_loadu_ps(w + k), w1 = _mm256_loadu_ps(w + k + 8);
        __m256 w2 = _mm256_loadu_ps(w + k + 16), w3 = _mm256_loadu_ps(w + k + 24);
        a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x0 + k), a0), b0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x1 + k), b0);
        a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x0 + k + 8), a1), b1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x1 + k + 8), b1);
        a2 = _mm256_fmadd_ps(w2, _mm256_loadu_ps(x0 + k + 16), a2), b2 = _mm256_fmadd_ps(w2, _mm256_loadu_ps(x1 + k + 16), b2);
        a3 = _mm256_fmadd_ps(w3, _mm256_loadu_ps(x0 + k + 24), a3), b3 = _mm256_fmadd_ps(w3, _mm256_loadu_ps(x1 + k + 24), b3);
    }
    out[0] = f32_finish(a0, a1, a2, a3, x0, w, k, K);
    out[1] = f32_finish(b0, b1, b2, b3, x1, w, k, K);
}

void matvec_f32(const float *x, int64_t M, int64_t K, const float *weight, const float *bias, int64_t N, float *y,
                int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        const float *w = weight + n * K;
        float b = bias ? bias[n] : 0.0f;
        int64_t m = 0;
        prefetch_ahead(w, K * sizeof(float));
        for (; m + 2 <= M; m += 2) {
            float out[2];
            f32_rows2(x + m * K, x + (m + 1) * K, K, w, out);
            y[m * N + n] = out[0] + b, y[(m + 1) * N + n] = out[1] + b;
        }
        if (m < M) y[m * N + n] = f32_row1(x + m * K, K, w) + b;
    }
}

/* Quantised weights meet int8 activations, as in llama.cpp: each run of 32 values of x is
 * rounded to int8 with its own scale (absmax / 127), so the inner loop is integer
 * multiply-adds on 32 weights at a time (maddubs: unsigned bytes times signed bytes) instead
 * of widening every weight to float; 1.5-1.8x faster here. Results differ from x times the
 * dequantised matrix by ~0.3% relative, the same trade llama.cpp makes.
 *
 * Loops walk groups, then the 32-weight blocks of a group: indexing scales by b * 32 / G would
 * put an integer division (tens of cycles) in the inner loop. One row of x gets the simplest
 * loop; several rows go four at a time (a short tile repeats its first row and drops it), so
 * each weight is read from memory once per four rows. quantize_rows is kquants.c's too. */

void quantize_rows(const float *x, int64_t M, int64_t K, int8_t *xq, float *xscale, float *xsum) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t b = 0; b < K / 32; b++) {
            const float *v = x + m * K + b * 32;
            float largest = 0.0f;
            for (int i = 0; i < 32; i++) largest = fmaxf(largest, fabsf(v[i]));
            float d = largest / 127.0f, inverse = d > 0.0f ? 1.0f / d : 0.0f;
            int sum = 0;
            for (int i = 0; i < 32; i++) {
                int q = (int)nearbyintf(v[i] * inverse);
                xq[m * K + b * 32 + i] = (int8_t)q;
                sum += q;
            }
            xscale[m * (K / 32) + b] = d;
            xsum[m * (K / 32) + b] = d * (float)sum; /* sum of the rounded x, for Q4_1-style offsets */
        }
}

INLINE __m256 dot_u8_s8(__m256i unsigned_bytes, __m256i signed_bytes) {
    __m256i pairs = _mm256_maddubs_epi16(unsigned_bytes, signed_bytes);
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

INLINE __m256i unpack_nibbles(const uint8_t *w) { /* 16 bytes -> 32 codes: weights 0..15, then 16..31 */
    const __m128i low_mask = _mm_set1_epi8(0x0F);
    __m128i bytes = _mm_loadu_si128((const __m128i *)w);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(bytes, 4), low_mask), _mm_and_si128(bytes, low_mask));
}

/* int8 weights: maddubs wants unsigned x signed, so use |w| and move w's sign onto x. */
#define Q8_DOT(w32, xrow) dot_u8_s8(_mm256_sign_epi8(w32, w32), _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(xrow)), w32))

static float q8_row1(const int8_t *xq, const float *xscale, int64_t K, const int8_t *w, const float *scale, int64_t G) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t g = 0, b = 0; g < K / G; g++)
        for (int64_t end = b + G / 32; b < end; b++) {
            __m256i wv = _mm256_loadu_si256((const __m256i *)(w + b * 32));
            acc = _mm256_fmadd_ps(_mm256_set1_ps(scale[g] * xscale[b]), Q8_DOT(wv, xq + b * 32), acc);
        }
    return horizontal_sum(acc);
}

static void q8_rows4(const int8_t *xq[4], const float *xscale[4], int64_t K, const int8_t *w, const float *scale,
                     int64_t G, float out[4]) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
    for (int64_t g = 0, b = 0; g < K / G; g++)
        for (int64_t end = b + G / 32; b < end; b++) {
            __m256i wv = _mm256_loadu_si256((const __m256i *)(w + b * 32));
            acc0 = _mm256_fmadd_ps(_mm256_set1_ps(scale[g] * xscale[0][b]), Q8_DOT(wv, xq[0] + b * 32), acc0);
            acc1 = _mm256_fmadd_ps(_mm256_set1_ps(scale[g] * xscale[1][b]), Q8_DOT(wv, xq[1] + b * 32), acc1);
            acc2 = _mm256_fmadd_ps(_mm256_set1_ps(scale[g] * xscale[2][b]), Q8_DOT(wv, xq[2] + b * 32), acc2);
            acc3 = _mm256_fmadd_ps(_mm256_set1_ps(scale[g] * xscale[3][b]), Q8_DOT(wv, xq[3] + b * 32), acc3);
        }
    out[0] = horizontal_sum(acc0), out[1] = horizontal_sum(acc1), out[2] = horizontal_sum(acc2), out[3] = horizontal_sum(acc3);
}

static float q4_row1(const int8_t *xq, const float *xscale, const float *xsum, int64_t K, const uint8_t *w,
                     const uint16_t *scale, const uint16_t *offset, int64_t G) {
    __m256 acc = _mm256_setzero_ps();
    float offset_sum = 0.0f; /* sum over blocks of offset * sum(x over the block) */
    for (int64_t g = 0, b = 0; g < K / G; g++) {
        float group_scale = _cvtsh_ss(scale[g]), group_offset = _cvtsh_ss(offset[g]);
        for (int64_t end = b + G / 32; b < end; b++) {
            __m256 dot = dot_u8_s8(unpack_nibbles(w + b * 16), _mm256_loadu_si256((const __m256i *)(xq + b * 32)));
            acc = _mm256_fmadd_ps(_mm256_set1_ps(group_scale * xscale[b]), dot, acc);
            offset_sum += group_offset * xsum[b];
        }
    }
    return horizontal_sum(acc) + offset_sum;
}

static void q4_rows4(const int8_t *xq[4], const float *xscale[4], const float *xsum[4], int64_t K, const uint8_t *w,
                     const uint16_t *scale, const uint16_t *offset, int64_t G, float out[4]) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    float offset_sum[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int64_t g = 0, b = 0; g < K / G; g++) {
        float group_scale = _cvtsh_ss(scale[g]), group_offset = _cvtsh_ss(offset[g]);
        for (int64_t end = b + G / 32; b < end; b++) {
            __m256i codes = unpack_nibbles(w + b * 16);
            for (int r = 0; r < 4; r++) { /* constant trip count: unrolled, acc stays in registers */
                __m256 dot = dot_u8_s8(codes, _mm256_loadu_si256((const __m256i *)(xq[r] + b * 32)));
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(group_scale * xscale[r][b]), dot, acc[r]);
                offset_sum[r] += group_offset * xsum[r][b];
            }
        }
    }
    for (int r = 0; r < 4; r++) out[r] = horizontal_sum(acc[r]) + offset_sum[r];
}

/* q4 on CPUs with AVX-512 VNNI (checked at run time; the library is built for AVX2): vpdpbusd
 * multiplies and sums 64 codes by 64 int8 x in one instruction, two 32-weight blocks a register,
 * where AVX2 takes three per block. Decoding SmolLM2 is bound by these products, not by memory
 * (int4 weights stream at ~5 GB/s). R rows of x (1 or 4) share each unpacked pair of blocks; every
 * row's sums run in the same order for R = 1 and 4, so a row's result never depends on its batch. */
#define VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))

/* x's side of each pair of blocks, laid out once per call for every weight row: 8 copies of each block's
 * scale, then 8 of each block's xsum / 8 (per lane, so that the 16 lanes of o * xsum / 8 add up to the
 * blocks' offset terms). The products then take one multiply and one FMA from memory per row and pair,
 * where broadcasting scalars per row took five instructions and a chain of scalar FMAs
 * (SmolLM2 Q4_1, 16-row step on 2 threads: its int4 matvecs 43.8 -> 36.9 ms). */
#define PAIR_FLOATS 32

VNNI static void q4_pair_table(const float *xscale, const float *xsum, int64_t K, float *table) {
    for (int64_t b = 0; b + 2 <= K / 32; b += 2, table += PAIR_FLOATS) {
        __m512 scales = _mm512_insertf32x8(_mm512_set1_ps(xscale[b]), _mm256_set1_ps(xscale[b + 1]), 1);
        __m512 sums = _mm512_insertf32x8(_mm512_set1_ps(xsum[b] * 0.125f), _mm256_set1_ps(xsum[b + 1] * 0.125f), 1);
        _mm512_storeu_ps(table, scales), _mm512_storeu_ps(table + 16, sums);
    }
}

VNNI INLINE void q4_rows_vnni(int R, const int8_t *const *xq, const float *const *pairs, const float *const *xscale,
                              const float *const *xsum, int64_t K, const uint8_t *w, const uint16_t *scale,
                              const uint16_t *offset, int64_t G, float *out) {
    const int64_t blocks = K / 32, per_group = G / 32;
    __m512 acc[4], offsets[4];
    __m256 tail[4];
    float tail_offset[4];
    for (int r = 0; r < R; r++)
        acc[r] = offsets[r] = _mm512_setzero_ps(), tail[r] = _mm256_setzero_ps(), tail_offset[r] = 0.0f;
    int64_t b = 0;
    for (; b + 2 <= blocks; b += 2) {
        int64_t g0 = per_group == 1 ? b : b / per_group, g1 = per_group == 1 ? b + 1 : (b + 1) / per_group;
        __m512 weight_scales = _mm512_insertf32x8(_mm512_set1_ps(_cvtsh_ss(scale[g0])), _mm256_set1_ps(_cvtsh_ss(scale[g1])), 1);
        __m512 weight_offsets = _mm512_insertf32x8(_mm512_set1_ps(_cvtsh_ss(offset[g0])), _mm256_set1_ps(_cvtsh_ss(offset[g1])), 1);
        __m512i codes = _mm512_inserti64x4(_mm512_castsi256_si512(unpack_nibbles(w + b * 16)),
                                           unpack_nibbles(w + (b + 1) * 16), 1);
        for (int r = 0; r < R; r++) {
            const float *pair = pairs[r] + (b / 2) * PAIR_FLOATS;
            __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes, _mm512_loadu_si512(xq[r] + b * 32));
            __m512 scales = _mm512_mul_ps(weight_scales, _mm512_loadu_ps(pair));
            acc[r] = _mm512_fmadd_ps(scales, _mm512_cvtepi32_ps(dot), acc[r]);
            offsets[r] = _mm512_fmadd_ps(weight_offsets, _mm512_loadu_ps(pair + 16), offsets[r]);
        }
    }
    if (b < blocks) { /* an odd last block */
        int64_t g = b / per_group;
        float s = _cvtsh_ss(scale[g]), o = _cvtsh_ss(offset[g]);
        __m256i codes = unpack_nibbles(w + b * 16);
        for (int r = 0; r < R; r++) {
            __m256i dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), codes,
                                              _mm256_loadu_si256((const __m256i *)(xq[r] + b * 32)));
            tail[r] = _mm256_fmadd_ps(_mm256_set1_ps(s * xscale[r][b]), _mm256_cvtepi32_ps(dot), tail[r]);
            tail_offset[r] += o * xsum[r][b];
        }
    }
    for (int r = 0; r < R; r++) {
        __m512 both = _mm512_add_ps(acc[r], offsets[r]);
        __m256 folded = _mm256_add_ps(_mm512_castps512_ps256(both), _mm512_extractf32x8_ps(both, 1));
        out[r] = horizontal_sum(_mm256_add_ps(folded, tail[r])) + tail_offset[r];
    }
}

VNNI static float q4_row1_vnni(const int8_t *xq, const float *pairs, const float *xscale, const float *xsum, int64_t K,
                               const uint8_t *w, const uint16_t *scale, const uint16_t *offset, int64_t G) {
    float out;
    q4_rows_vnni(1, &xq, &pairs, &xscale, &xsum, K, w, scale, offset, G, &out);
    return out;
}

VNNI static void q4_rows4_vnni(const int8_t *xq[4], const float *pairs[4], const float *xscale[4], const float *xsum[4],
                               int64_t K, const uint8_t *w, const uint16_t *scale, const uint16_t *offset, int64_t G,
                               float out[4]) {
    q4_rows_vnni(4, xq, pairs, xscale, xsum, K, w, scale, offset, G, out);
}

/* also kquants.c's */
int cpu_has_vnni(void) {
    static int known = -1;
    if (known < 0)
        known = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                __builtin_cpu_supports("avx512vnni") && getenv("LMFORGE_NO_VNNI") == NULL;
    return known;
}

/* Row pointers of a four-row tile starting at m0; rows past M repeat row m0. */
#define TILE_ROWS(base, stride, m0, M, out) \
    for (int r = 0; r < 4; r++) out[r] = (base) + ((m0) + r < (M) ? (m0) + r : (m0)) * (stride)

/* K and G must be multiples of 32, G dividing K (G = K: one scale per row).
 * Scratch: xq (M, K) int8, xscale and xsum (M, K/32). */
void matvec_q8(const float *x, int64_t M, int64_t K, const int8_t *weight, const float *scale, int64_t G,
               const float *bias, int64_t N, float *y, int8_t *xq, float *xscale, float *xsum, int threads) {
    int64_t groups = K / G, blocks = K / 32;
    quantize_rows(x, M, K, xq, xscale, xsum);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        const int8_t *w = weight + n * K;
        const float *row_scale = scale + n * groups;
        float b = bias ? bias[n] : 0.0f;
        prefetch_ahead(w, K);
        if (M == 1) {
            y[n] = q8_row1(xq, xscale, K, w, row_scale, G) + b;
            continue;
        }
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const int8_t *xs[4];
            const float *ss[4];
            float out[4];
            TILE_ROWS(xq, K, m0, M, xs);
            TILE_ROWS(xscale, blocks, m0, M, ss);
            q8_rows4(xs, ss, K, w, row_scale, G, out);
            for (int r = 0; r < 4 && m0 + r < M; r++) y[(m0 + r) * N + n] = out[r] + b;
        }
    }
}

/* K and G must be multiples of 32, G dividing K. Scratch as for matvec_q8. */
void matvec_q4(const float *x, int64_t M, int64_t K, const uint8_t *weight, const uint16_t *scale, const uint16_t *offset,
               int64_t G, const float *bias, int64_t N, float *y, int8_t *xq, float *xscale, float *xsum,
               int threads) {
    int64_t groups = K / G, blocks = K / 32, table_floats = (blocks / 2) * PAIR_FLOATS;
    quantize_rows(x, M, K, xq, xscale, xsum);
    const int vnni = cpu_has_vnni();
    float *tables = NULL;
    if (vnni) {
        tables = malloc((M * table_floats + 1) * sizeof(float));
        for (int64_t m = 0; m < M; m++) q4_pair_table(xscale + m * blocks, xsum + m * blocks, K, tables + m * table_floats);
    }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *w = weight + n * (K / 2);
        const uint16_t *row_scale = scale + n * groups, *row_offset = offset + n * groups;
        float b = bias ? bias[n] : 0.0f;
        prefetch_ahead(w, K / 2);
        if (M == 1) {
            y[n] = (vnni ? q4_row1_vnni(xq, tables, xscale, xsum, K, w, row_scale, row_offset, G)
                         : q4_row1(xq, xscale, xsum, K, w, row_scale, row_offset, G)) + b;
            continue;
        }
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const int8_t *xs[4];
            const float *ss[4], *sums[4], *pairs[4];
            float out[4];
            TILE_ROWS(xq, K, m0, M, xs);
            TILE_ROWS(xscale, blocks, m0, M, ss);
            TILE_ROWS(xsum, blocks, m0, M, sums);
            if (vnni) {
                TILE_ROWS(tables, table_floats, m0, M, pairs);
                q4_rows4_vnni(xs, pairs, ss, sums, K, w, row_scale, row_offset, G, out);
            } else {
                q4_rows4(xs, ss, sums, K, w, row_scale, row_offset, G, out);
            }
            for (int r = 0; r < 4 && m0 + r < M; r++) y[(m0 + r) * N + n] = out[r] + b;
        }
    }
    free(tables);
}

/* Dequantisation for many-row products (prefill): N rows (the caller passes a slab of a weight)
 * written straight into `out` (N, K) fp32, a reused buffer, so no temporaries. Same
 * arithmetic as the PyTorch reference (code * scale, then + offset), rounded the same way: no
 * fused multiply-add contraction here. */
#define NO_FMA __attribute__((optimize("fp-contract=off")))

/* fp32 -> bf16 rounded to nearest even, as PyTorch's .bfloat16() does (weights are finite: no NaN case).
 * Prefill on CPUs with bf16 matmuls dequantises straight into bf16: converting fp32 slabs with
 * PyTorch's copy_ was a fifth of a Qwen3-0.6B prefill. */
void to_bf16(const float *x, int64_t n, uint16_t *out) {
    int64_t i = 0;
    const __m256i half_ulp = _mm256_set1_epi32(0x7FFF), one = _mm256_set1_epi32(1);
    for (; i + 16 <= n; i += 16) {
        __m256i a = _mm256_castps_si256(_mm256_loadu_ps(x + i)), b = _mm256_castps_si256(_mm256_loadu_ps(x + i + 8));
        a = _mm256_srli_epi32(_mm256_add_epi32(a, _mm256_add_epi32(half_ulp, _mm256_and_si256(_mm256_srli_epi32(a, 16), one))), 16);
        b = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(half_ulp, _mm256_and_si256(_mm256_srli_epi32(b, 16), one))), 16);
        /* packus interleaves 128-bit lanes: a0-3 b0-3 a4-7 b4-7; the permute puts a before b */
        __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0xD8);
        _mm256_storeu_si256((__m256i *)(out + i), packed);
    }
    for (; i < n; i++) {
        uint32_t bits;
        memcpy(&bits, x + i, 4);
        out[i] = (uint16_t)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
    }
}

/* Rows 0..N-1 of a matrix, each made by `make(matrix, n, row)` in fp32, into `out`: fp32 rows, or bf16
 * rows where bf16 is set (see RowSink). */
typedef struct {
    const void *codes;
    const void *scale;
    const uint16_t *offset;
    int64_t K, G;
} QuantizedRows;

static void dequantize_rows(void (*make)(const QuantizedRows *, int64_t, float *), const QuantizedRows *matrix,
                            int64_t N, void *out, int bf16, int threads) {
    RowSink sink = {out, bf16, matrix->K};
#pragma omp parallel num_threads(threads)
    {
        float *scratch = bf16 ? malloc(matrix->K * sizeof(float)) : NULL;
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            make(matrix, n, row_for(sink, n, scratch));
            row_done(sink, n, scratch);
        }
        free(scratch);
    }
}

static NO_FMA void q8_row(const QuantizedRows *matrix, int64_t n, float *row) {
    const int64_t K = matrix->K, G = matrix->G;
    for (int64_t g = 0; g < K / G; g++) { /* by group: k / G per weight was 3.3 ns a weight, 8x this */
        const int8_t *codes = (const int8_t *)matrix->codes + n * K + g * G;
        float s = ((const float *)matrix->scale)[n * (K / G) + g];
        for (int64_t i = 0; i < G; i++) row[g * G + i] = (float)codes[i] * s;
    }
}

static NO_FMA void q4_row(const QuantizedRows *matrix, int64_t n, float *row) {
    const int64_t K = matrix->K, G = matrix->G;
    for (int64_t b = 0; b < K / 32; b++) {
        const uint8_t *bytes = (const uint8_t *)matrix->codes + n * (K / 2) + b * 16;
        int64_t group = n * (K / G) + b * 32 / G;
        float s = _cvtsh_ss(((const uint16_t *)matrix->scale)[group]), o = _cvtsh_ss(matrix->offset[group]);
        for (int i = 0; i < 16; i++) {
            row[b * 32 + i] = (float)(bytes[i] & 0x0F) * s + o;
            row[b * 32 + i + 16] = (float)(bytes[i] >> 4) * s + o;
        }
    }
}

void dequantize_q8(const int8_t *weight, const float *scale, int64_t N, int64_t K, int64_t G, void *out, int bf16,
                   int threads) {
    QuantizedRows matrix = {weight, scale, NULL, K, G};
    dequantize_rows(q8_row, &matrix, N, out, bf16, threads);
}

void dequantize_q4(const uint8_t *weight, const uint16_t *scale, const uint16_t *offset, int64_t N, int64_t K,
                   int64_t G, void *out, int bf16, int threads) {
    QuantizedRows matrix = {weight, scale, offset, K, G};
    dequantize_rows(q4_row, &matrix, N, out, bf16, threads);
}

/* int8 weights times fp32 x without rounding x: for the LM head, whose logits pick tokens
 * directly (rounding x there flips near-ties of greedy decoding). Rows of x go four at a time, as
 * in matvec_q4: each 16 weights are widened to fp32 once for the four (the widening was half the
 * instructions: a server's 16-row step spent a quarter of its time here). Each row's sums run in
 * the one-row order, so results do not depend on M. */
INLINE void q8_exact_group(const int8_t *w, const float *xm, int64_t k0, int64_t k1, __m256 *acc) {
    for (int64_t k = k0; k < k1; k += 16) {
        __m128i bytes = _mm_loadu_si128((const __m128i *)(w + k));
        __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
        __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(bytes, 8)));
        *acc = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xm + k), *acc);
        *acc = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xm + k + 8), *acc);
    }
}

void matvec_q8_exact(const float *x, int64_t M, int64_t K, const int8_t *weight, const float *scale, int64_t G,
                     const float *bias, int64_t N, float *y, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        const int8_t *w = weight + n * K;
        const float *row_scale = scale + n * (K / G);
        int64_t m = 0;
        prefetch_ahead(w, K);
        for (; m + 4 <= M; m += 4) {
            __m256 total[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
            for (int64_t g = 0; g < K / G; g++) {
                __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
                for (int64_t k = g * G; k < (g + 1) * G; k += 16) {
                    __m128i bytes = _mm_loadu_si128((const __m128i *)(w + k));
                    __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
                    __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(bytes, 8)));
                    for (int r = 0; r < 4; r++) {
                        const float *xm = x + (m + r) * K;
                        acc[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xm + k), acc[r]);
                        acc[r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xm + k + 8), acc[r]);
                    }
                }
                for (int r = 0; r < 4; r++) total[r] = _mm256_fmadd_ps(_mm256_set1_ps(row_scale[g]), acc[r], total[r]);
            }
            for (int r = 0; r < 4; r++) y[(m + r) * N + n] = horizontal_sum(total[r]) + (bias ? bias[n] : 0.0f);
        }
        for (; m < M; m++) {
            const float *xm = x + m * K;
            __m256 total = _mm256_setzero_ps();
            for (int64_t g = 0; g < K / G; g++) {
                __m256 acc = _mm256_setzero_ps();
                q8_exact_group(w, xm, g * G, (g + 1) * G, &acc);
                total = _mm256_fmadd_ps(_mm256_set1_ps(row_scale[g]), acc, total);
            }
            y[m * N + n] = horizontal_sum(total) + (bias ? bias[n] : 0.0f);
        }
    }
}

/* ---- The rest of a Llama-family decoding step, for rows of one new token each. ---- */

/* out = x / rms(x) * weight, per row of length D. */
void rms_norm(const float *x, const float *weight, float eps, int64_t rows, int64_t D, float *out) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * D;
        float *yr = out + r * D;
        __m256 acc = _mm256_setzero_ps();
        int64_t d = 0;
        for (; d + 8 <= D; d += 8) {
            __m256 v = _mm256_loadu_ps(xr + d);
            acc = _mm256_fmadd_ps(v, v, acc);
        }
        float sum = horizontal_sum(acc);
        for (; d < D; d++) sum += xr[d] * xr[d];
        float inverse = 1.0f / sqrtf(sum / (float)D + eps);
        for (d = 0; d < D; d++) yr[d] = xr[d] * inverse * weight[d];
    }
}

/* x += delta, then out = rms_norm(x): the residual add and the next norm in one pass. */
void add_rms_norm(float *x, const float *delta, const float *weight, float eps, int64_t rows, int64_t D, float *out) {
    for (int64_t i = 0; i < rows * D; i++) x[i] += delta[i];
    rms_norm(x, weight, eps, rows, D, out);
}

/* e^x for 8 floats: Cephes' expf (as in Pommier's avx_mathfun), ~1e-7 relative; x is clamped to
 * +-88.38, past which float's e^x is 0 or inf anyway. libm's expf one value at a time was a third of a
 * 16-row step's SwiGLU and softmax time. */
INLINE __m256 exp8(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-88.3762626647949f));
    __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x); /* x - n ln 2, ln 2 in two parts */
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(x, x), x), _mm256_set1_ps(1.0f));
    __m256i power = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(power)); /* times 2^n */
}

/* out (rows, H) = silu(gate) * up, where each row of gate_up (rows, 2H) is [gate | up]. */
void silu_mul(const float *gate_up, int64_t rows, int64_t H, float *out) {
    for (int64_t r = 0; r < rows; r++) {
        const float *gate = gate_up + r * 2 * H, *up = gate + H;
        int64_t h = 0;
        for (; h + 8 <= H; h += 8) {
            __m256 g = _mm256_loadu_ps(gate + h);
            __m256 sigmoid_inverse = _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), g)));
            _mm256_storeu_ps(out + r * H + h, _mm256_mul_ps(_mm256_div_ps(g, sigmoid_inverse), _mm256_loadu_ps(up + h)));
        }
        for (; h < H; h++) out[r * H + h] = gate[h] / (1.0f + expf(-gate[h])) * up[h];
    }
}

/* out (rows, H) = gelu_tanh(gate) * up, rows of [gate | up] as for silu_mul (Gemma's GeGLU). */
void gelu_tanh_mul(const float *gate_up, int64_t rows, int64_t H, float *out) {
    const float sqrt_2_over_pi = 0.7978845608028654f;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t h = 0; h < H; h++) {
            float g = gate_up[r * 2 * H + h];
            float gelu = 0.5f * g * (1.0f + tanhf(sqrt_2_over_pi * (g + 0.044715f * g * g * g)));
            out[r * H + h] = gelu * gate_up[r * 2 * H + H + h];
        }
}

/* Attention of one new token per row over that row's cached keys and values.
 *
 * qkv (rows, (H + 2 * KV) * D): this step's fused projection, [q heads | k heads | v heads].
 * Each q and k head is RMS-normed with q_norm / k_norm (D weights each) where they are not NULL
 * (Qwen3, Gemma 3), then rotated by RoPE (half-split layout) at its row's position; k and v are
 * stored in the cache (slots, KV, capacity, D) at cache row slot[r], position position[r], and
 * out (rows, H * D) = softmax(scale * q k^T) v over positions max(0, position[r] - window + 1)
 * .. position[r] (window 0: from 0). cos/sin: this layer's tables (max_positions, D).
 * Rows may share a slot: a sequence's k new tokens are k rows at consecutive positions (a short
 * prefill). Every row's k and v are stored before any row attends, so each such row sees the
 * earlier ones' entries, which is causal attention within the k.
 * scores: scratch of `threads` * (H / KV) * capacity floats (a run of positions per query head of a group,
 * per thread).
 */
void attention_decode(float *qkv, int64_t rows, int64_t H, int64_t KV, int64_t D, const int64_t *slot,
                      const int64_t *position, float *key_cache, float *value_cache, int64_t capacity,
                      const float *cos_table, const float *sin_table, const float *q_norm, const float *k_norm,
                      float norm_eps, float scale, int64_t window, float *scores, float *out, int threads) {
    int64_t width = (H + 2 * KV) * D, half = D / 2;
    for (int64_t r = 0; r < rows; r++) {
        const float *cosines = cos_table + position[r] * D, *sines = sin_table + position[r] * D;
        for (int64_t head = 0; head < H + KV; head++) { /* norm and rotate q heads and k heads */
            float *v = qkv + r * width + head * D;
            const float *norm = head < H ? q_norm : k_norm;
            if (norm) rms_norm(v, norm, norm_eps, 1, D, v);
            for (int64_t i = 0; i < half; i++) {
                float a = v[i], b = v[i + half];
                v[i] = a * cosines[i] - b * sines[i];
                v[i + half] = b * cosines[i + half] + a * sines[i + half];
            }
        }
        for (int64_t kv = 0; kv < KV; kv++) {
            int64_t at = ((slot[r] * KV + kv) * capacity + position[r]) * D;
            memcpy(key_cache + at, qkv + r * width + (H + kv) * D, D * sizeof(float));
            memcpy(value_cache + at, qkv + r * width + (H + KV + kv) * D, D * sizeof(float));
        }
    }
    /* One task per row and kv head: its group of H / KV query heads reads each key and value once. The
     * cache is the step's largest read at long contexts, and a task per query head read it H / KV times
     * (SmolLM2's 16-row step spent a sixth of its time here). */
    const int64_t group = H / KV;
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++)
        for (int64_t kv = 0; kv < KV; kv++) {
            int64_t seen = position[r] + 1, first = window > 0 && seen > window ? seen - window : 0;
            const float *keys = key_cache + (slot[r] * KV + kv) * capacity * D;
            const float *values = value_cache + (slot[r] * KV + kv) * capacity * D;
            float *score = scores + omp_get_thread_num() * group * capacity; /* row g: query head kv * group + g */
            for (int64_t t = first; t < seen; t++) {
                const float *key = keys + t * D;
                prefetch_ahead(key, D * sizeof(float));
                for (int64_t g = 0; g < group; g++) {
                    const float *q = qkv + r * width + (kv * group + g) * D;
                    __m256 acc = _mm256_setzero_ps();
                    int64_t d = 0;
                    for (; d + 8 <= D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(key + d), acc);
                    float dot = horizontal_sum(acc);
                    for (; d < D; d++) dot += q[d] * key[d];
                    score[g * capacity + t] = dot * scale;
                }
            }
            for (int64_t g = 0; g < group; g++) { /* softmax of each query head's scores, in place */
                float *row = score + g * capacity, best = -INFINITY, total = 0.0f;
                for (int64_t t = first; t < seen; t++) best = row[t] > best ? row[t] : best;
                int64_t t = first;
                __m256 totals = _mm256_setzero_ps();
                for (; t + 8 <= seen; t += 8) {
                    __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(row + t), _mm256_set1_ps(best)));
                    _mm256_storeu_ps(row + t, e);
                    totals = _mm256_add_ps(totals, e);
                }
                total = horizontal_sum(totals);
                for (; t < seen; t++) total += (row[t] = expf(row[t] - best));
                float inverse_total = 1.0f / total;
                for (t = first; t < seen; t++) row[t] *= inverse_total;
                float *y = out + r * H * D + (kv * group + g) * D;
                for (int64_t d = 0; d < D; d++) y[d] = 0.0f;
            }
            for (int64_t t = first; t < seen; t++) {
                const float *v = values + t * D;
                prefetch_ahead(v, D * sizeof(float));
                for (int64_t g = 0; g < group; g++) {
                    float p = score[g * capacity + t], *y = out + r * H * D + (kv * group + g) * D;
                    int64_t d = 0;
                    for (; d + 8 <= D; d += 8)
                        _mm256_storeu_ps(y + d, _mm256_fmadd_ps(_mm256_set1_ps(p), _mm256_loadu_ps(v + d), _mm256_loadu_ps(y + d)));
                    for (; d < D; d++) y[d] += p * v[d];
                }
            }
        }
}

/* Frees the calling thread's OpenMP workers (they exit; the next parallel region starts new ones). */
void release_threads(void) { omp_pause_resource_all(omp_pause_soft); }
