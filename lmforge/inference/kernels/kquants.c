/* Kernels for weights kept in llama.cpp's own block formats (GGUF tensor types), read as they
 * are in the file: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (32 weights a block) and the K-quants Q4_K,
 * Q5_K, Q6_K (256 weights a block). Layouts are ggml-common.h's block_q4_K etc.
 *
 * One weight matrix may mix types by row: llama.cpp picks a type per tensor (a Q4_K_M file holds
 * Q4_K, Q6_K, and Q5_0/Q8_0 where a row is not a whole number of 256-weight blocks), and our
 * fused q|k|v and gate|up matrices join tensors. So a matrix is its rows' blocks back to back
 * plus `segments`: (ggml type id, rows) for each run of rows of one type, in order.
 *
 * Decoding rounds x to int8, so every product is integer multiply-adds on 32 weights at a time.
 * For the 32-weight types x has a scale per 32 values (matvec.c's quantize_rows), applied in
 * float per block. For the K-quants x has one scale per 256 (ggml's Q8_K, `quantize_rows_256`):
 * the sub-blocks' own scales then go into the integer multiply-add and a whole block meets
 * x's scale in one FMA, which is what keeps these at memory speed.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

enum { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14 };

/* x (M, K) rounded to int8 with one scale per 256 values (ggml's Q8_K): codes xq (M, K), scales
 * xd (M, K/256), and the integer sum of the codes of each 32 (M, K/32), for the K-quants' minimums. */
static void quantize_rows_256(const float *x, int64_t M, int64_t K, int8_t *xq, float *xd, int32_t *xsums) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t b = 0; b < K / 256; b++) {
            const float *v = x + m * K + b * 256;
            float largest = 0.0f;
            for (int i = 0; i < 256; i++) largest = fmaxf(largest, fabsf(v[i]));
            float d = largest / 127.0f, inverse = d > 0.0f ? 1.0f / d : 0.0f;
            for (int j = 0; j < 8; j++) {
                int sum = 0;
                for (int i = 0; i < 32; i++) {
                    int q = (int)nearbyintf(v[j * 32 + i] * inverse);
                    xq[m * K + b * 256 + j * 32 + i] = (int8_t)q;
                    sum += q;
                }
                xsums[m * (K / 32) + b * 8 + j] = sum;
            }
            xd[m * (K / 256) + b] = d;
        }
}

static int64_t block_weights(int type) { return type >= Q4_K ? 256 : 32; }

static int64_t block_bytes(int type) {
    switch (type) {
    case Q4_0: return 18;
    case Q4_1: return 20;
    case Q5_0: return 22;
    case Q5_1: return 24;
    case Q8_0: return 34;
    case Q4_K: return 144;
    case Q5_K: return 176;
    case Q6_K: return 210;
    }
    return 0;
}

static int64_t row_bytes(int type, int64_t K) { return K / block_weights(type) * block_bytes(type); }

INLINE float half(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

/* sum(u * s) per 4 bytes as 8 int32 lanes: lanes 0-3 cover bytes 0-15, lanes 4-7 bytes 16-31 */
INLINE __m256i dot_u8_s8_i32(__m256i unsigned_bytes, __m256i signed_bytes) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(unsigned_bytes, signed_bytes), _mm256_set1_epi16(1));
}

/* dot_u8_s8_i32 in one vpdpbusd where the CPU has AVX-512 VNNI (see add_products16): the same integers,
 * since no pair of products here reaches maddubs' int16 saturation (|w| <= 128, |x| <= 127). */
INLINE __m256i dot_u8_s8_i32_vnni(__m256i unsigned_bytes, __m256i signed_bytes, int vnni) {
    if (!vnni) return dot_u8_s8_i32(unsigned_bytes, signed_bytes);
    __m256i sums = _mm256_setzero_si256();
    __asm__("vpdpbusd %2, %1, %0" : "+x"(sums) : "x"(unsigned_bytes), "x"(signed_bytes));
    return sums;
}

/* signed codes times signed x: maddubs wants unsigned x signed, so |w| and w's sign moved onto x */
INLINE __m256i dot_s8_s8_i32(__m256i w, __m256i x) {
    return dot_u8_s8_i32(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
}

INLINE __m256i load32(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }

/* 16 bytes -> 32 codes: low nibbles are weights 0..15, high nibbles 16..31 (the 32-weight types) */
INLINE __m256i nibbles16(const uint8_t *w) {
    const __m128i mask = _mm_set1_epi8(0x0F);
    __m128i bytes = _mm_loadu_si128((const __m128i *)w);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(bytes, 4), mask), _mm_and_si128(bytes, mask));
}

/* The fifth bit of Q5_0/Q5_1 codes: bit i of the 32-bit qh is weight i's, moved to 0x10 of byte i. */
INLINE __m256i high_bits32(const uint8_t *qh_bytes) {
    uint32_t qh;
    memcpy(&qh, qh_bytes, 4);
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3,
                                            3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32((int)qh), spread);
    __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(bytes, bit), bit);
    return _mm256_and_si256(set, _mm256_set1_epi8(0x10));
}

/* Q4_K/Q5_K: 8 six-bit scales and 8 six-bit minimums packed in 12 bytes (ggml's get_scale_min_k4). */
static void scales_mins_k4(const uint8_t *q, uint8_t scales[8], uint8_t mins[8]) {
    for (int j = 0; j < 8; j++) {
        if (j < 4) {
            scales[j] = q[j] & 63, mins[j] = q[j + 4] & 63;
        } else {
            scales[j] = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
            mins[j] = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
        }
    }
}

INLINE float hsum(__m256 v) {
    __m128 low = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    low = _mm_add_ps(low, _mm_movehl_ps(low, low));
    low = _mm_add_ss(low, _mm_movehdup_ps(low));
    return _mm_cvtss_f32(low);
}

/* One row of 32-weight-block weights (K values, type `type`) times one row of x rounded to int8:
 * xq (K), xscale and xsum (K/32): per 32 values, the scale and scale * sum of the codes. */
static float row_dot(int type, const uint8_t *w, const int8_t *xq, const float *xscale, const float *xsum, int64_t K) {
    __m256 acc = _mm256_setzero_ps();
    float offsets = 0.0f; /* minimum/offset terms: per 32 weights, offset * sum(x) */
    switch (type) {
    case Q8_0:
        for (int64_t b = 0; b < K / 32; b++, w += 34) {
            __m256i dot = dot_s8_s8_i32(load32(w + 2), load32(xq + b * 32));
            acc = _mm256_fmadd_ps(_mm256_set1_ps(half(w) * xscale[b]), _mm256_cvtepi32_ps(dot), acc);
        }
        break;
    case Q4_0: /* codes - 8 and - 16 as signed bytes: no offset term */
        for (int64_t b = 0; b < K / 32; b++, w += 18) {
            __m256i codes = _mm256_sub_epi8(nibbles16(w + 2), _mm256_set1_epi8(8));
            __m256i dot = dot_s8_s8_i32(codes, load32(xq + b * 32));
            acc = _mm256_fmadd_ps(_mm256_set1_ps(half(w) * xscale[b]), _mm256_cvtepi32_ps(dot), acc);
        }
        break;
    case Q5_0:
        for (int64_t b = 0; b < K / 32; b++, w += 22) {
            __m256i codes = _mm256_or_si256(nibbles16(w + 6), high_bits32(w + 2));
            __m256i dot = dot_s8_s8_i32(_mm256_sub_epi8(codes, _mm256_set1_epi8(16)), load32(xq + b * 32));
            acc = _mm256_fmadd_ps(_mm256_set1_ps(half(w) * xscale[b]), _mm256_cvtepi32_ps(dot), acc);
        }
        break;
    case Q4_1:
    case Q5_1:
        for (int64_t b = 0; b < K / 32; b++) {
            int five = type == Q5_1;
            __m256i codes = five ? _mm256_or_si256(nibbles16(w + 8), high_bits32(w + 4)) : nibbles16(w + 4);
            __m256i dot = dot_u8_s8_i32(codes, load32(xq + b * 32));
            acc = _mm256_fmadd_ps(_mm256_set1_ps(half(w) * xscale[b]), _mm256_cvtepi32_ps(dot), acc);
            offsets += half(w + 2) * xsum[b];
            w += five ? 24 : 20;
        }
        break;
    }
    return hsum(acc) + offsets;
}

/* row_dot of one weight row with 4 rows of x at once (xq, xscale, xsum of row j are j rows on): each
 * block's codes are unpacked once for the 4. Batched decoding and short prefills (M rows) unpacked
 * every block M times, which made a 16-row step cost ~11 single-row ones. Each row's sums run as in
 * row_dot, in its order, so the results are row_dot's to the bit. */
INLINE void row_dot4_typed(int type, int vnni, const uint8_t *w, const int8_t *xq, const float *xscale, const float *xsum,
                           int64_t K, float out[4]) {
    const int64_t blocks = K / 32;
    const int has_min = type == Q4_1 || type == Q5_1, stride = (int)block_bytes(type);
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    float offsets[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int64_t b = 0; b < blocks; b++, w += stride) {
        __m256i codes;
        switch (type) {
        case Q8_0: codes = load32(w + 2); break;
        case Q4_0: codes = _mm256_sub_epi8(nibbles16(w + 2), _mm256_set1_epi8(8)); break;
        case Q5_0: codes = _mm256_sub_epi8(_mm256_or_si256(nibbles16(w + 6), high_bits32(w + 2)), _mm256_set1_epi8(16)); break;
        case Q4_1: codes = nibbles16(w + 4); break;
        default: codes = _mm256_or_si256(nibbles16(w + 8), high_bits32(w + 4)); break; /* Q5_1 */
        }
        /* signed codes: dot_s8_s8_i32's |w| once, w's sign onto each row of x */
        __m256i magnitude = has_min ? codes : _mm256_sign_epi8(codes, codes);
        float d = half(w), minimum = has_min ? half(w + 2) : 0.0f;
        for (int j = 0; j < 4; j++) {
            __m256i x = load32(xq + j * K + b * 32);
            __m256i dot = dot_u8_s8_i32_vnni(magnitude, has_min ? x : _mm256_sign_epi8(x, codes), vnni);
            acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(d * xscale[j * blocks + b]), _mm256_cvtepi32_ps(dot), acc[j]);
            if (has_min) offsets[j] += minimum * xsum[j * blocks + b];
        }
    }
    for (int j = 0; j < 4; j++) out[j] = hsum(acc[j]) + offsets[j];
}

#define ROW_DOT4_CASES(VNNI)                                                   \
    case Q8_0: row_dot4_typed(Q8_0, VNNI, w, xq, xscale, xsum, K, out); break; \
    case Q4_0: row_dot4_typed(Q4_0, VNNI, w, xq, xscale, xsum, K, out); break; \
    case Q5_0: row_dot4_typed(Q5_0, VNNI, w, xq, xscale, xsum, K, out); break; \
    case Q4_1: row_dot4_typed(Q4_1, VNNI, w, xq, xscale, xsum, K, out); break; \
    default: row_dot4_typed(Q5_1, VNNI, w, xq, xscale, xsum, K, out); break;

static void row_dot4(int type, const uint8_t *w, const int8_t *xq, const float *xscale, const float *xsum, int64_t K,
                     float out[4]) {
    if (cpu_has_vnni()) { /* one copy per type and instruction set, its branches folded away */
        switch (type) { ROW_DOT4_CASES(1) }
    } else {
        switch (type) { ROW_DOT4_CASES(0) }
    }
}

/* sums + the products of int16 pairs, added in pairs: madd then add, or where the CPU has AVX-512 VNNI
 * one vpdpwssd (the same integers; one instruction of the K-quants' three per 32 weights and row).
 * Inline assembly since the library is built for AVX2: the instruction runs only where
 * cpu_has_vnni() said so at run time, and `vnni` is a constant in each copy of the callers. */
INLINE __m256i add_products16(__m256i sums, __m256i pairs, __m256i scale, int vnni) {
    if (vnni) {
        __asm__("vpdpwssd %2, %1, %0" : "+x"(sums) : "x"(pairs), "x"(scale));
        return sums;
    }
    return _mm256_add_epi32(sums, _mm256_madd_epi16(pairs, scale));
}

/* One row of K-quant weights times R rows of x rounded as ggml's Q8_K (`quantize_rows_256`): row j's
 * codes at xq + j * K, its scales at xd + j * (K / 256), its sums at xsums + j * (K / 32). Each
 * block's codes and scales are unpacked once for the R rows (a short prefill's k rows unpacked every
 * block k times), and each row's sums run in the same order whatever R is, so a row's result does
 * not depend on the rows batched with it. */
INLINE void row_dot_k_rows(int type, int R, int vnni, const uint8_t *w, const int8_t *xq, const float *xd, const int32_t *xsums,
                           int64_t K, float *out) {
    __m256 acc[4];
    float offsets[4];
    for (int j = 0; j < R; j++) acc[j] = _mm256_setzero_ps(), offsets[j] = 0.0f;
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    const int64_t blocks = K / 256;
    if (type == Q6_K) {
        for (int64_t b = 0; b < blocks; b++, w += 210) {
            const uint8_t *ql = w, *qh = w + 128;
            const int8_t *scales = (const int8_t *)(w + 192);
            __m256i sums[4], odd[4]; /* two chains per row: an add's latency, not vpdpwssd's, bounds the loop */
            for (int j = 0; j < R; j++) sums[j] = odd[j] = _mm256_setzero_si256();
            for (int part = 0; part < 2; part++) { /* 128 weights each: 64 bytes of ql, 32 of qh, 8 scales */
                const uint8_t *l = ql + part * 64;
                const int8_t *sc = scales + part * 8;
                __m256i high = load32(qh + part * 32);
                for (int c = 0; c < 4; c++) { /* weights 32c..32c+31 of this part */
                    __m256i bytes = load32(l + (c % 2) * 32);
                    __m256i low = c < 2 ? _mm256_and_si256(bytes, low4) : _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4);
                    __m256i top = _mm256_and_si256(_mm256_srli_epi16(high, 2 * c), _mm256_set1_epi8(3));
                    __m256i codes = _mm256_sub_epi8(_mm256_or_si256(low, _mm256_slli_epi16(top, 4)), _mm256_set1_epi8(32));
                    __m256i magnitude = _mm256_sign_epi8(codes, codes);
                    /* the first 16 weights take scale 2c, the next 16 scale 2c+1 */
                    __m256i scale = _mm256_set_m128i(_mm_set1_epi16(sc[2 * c + 1]), _mm_set1_epi16(sc[2 * c]));
                    for (int j = 0; j < R; j++) {
                        __m256i x = load32(xq + j * K + b * 256 + (part * 4 + c) * 32);
                        __m256i pairs = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(x, codes));
                        if (c % 2) odd[j] = add_products16(odd[j], pairs, scale, vnni);
                        else sums[j] = add_products16(sums[j], pairs, scale, vnni);
                    }
                }
            }
            float d = half(w + 208);
            for (int j = 0; j < R; j++) {
                __m256i total = _mm256_add_epi32(sums[j], odd[j]);
                acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(d * xd[j * blocks + b]), _mm256_cvtepi32_ps(total), acc[j]);
            }
        }
        for (int j = 0; j < R; j++) out[j] = hsum(acc[j]);
        return;
    }
    /* Q4_K/Q5_K: w = d * scale_i * q - dmin * min_i per sub-block i of 32 */
    const int five = type == Q5_K;
    for (int64_t b = 0; b < blocks; b++) {
        uint8_t scales[8], mins[8];
        scales_mins_k4(w + 4, scales, mins);
        const uint8_t *qh = w + 16, *qs = w + (five ? 48 : 16);
        __m256i sums[4], odd[4];
        for (int j = 0; j < R; j++) sums[j] = odd[j] = _mm256_setzero_si256();
        for (int i = 0; i < 8; i += 2) { /* sub-blocks i and i+1 share 32 bytes: low and high nibbles */
            __m256i bytes = load32(qs + (i / 2) * 32);
            __m256i codes0 = _mm256_and_si256(bytes, low4);
            __m256i codes1 = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4);
            if (five) { /* bit i of qh[l] is the fifth bit of weight l of sub-block i */
                __m256i bits = load32(qh);
                codes0 = _mm256_or_si256(codes0, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(bits, i), _mm256_set1_epi8(1)), 4));
                codes1 = _mm256_or_si256(codes1, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(bits, i + 1), _mm256_set1_epi8(1)), 4));
            }
            __m256i scale0 = _mm256_set1_epi16(scales[i]), scale1 = _mm256_set1_epi16(scales[i + 1]);
            for (int j = 0; j < R; j++) {
                const int8_t *x = xq + j * K + b * 256;
                __m256i pairs0 = _mm256_maddubs_epi16(codes0, load32(x + i * 32));
                __m256i pairs1 = _mm256_maddubs_epi16(codes1, load32(x + (i + 1) * 32));
                sums[j] = add_products16(sums[j], pairs0, scale0, vnni);
                odd[j] = add_products16(odd[j], pairs1, scale1, vnni);
            }
        }
        float d = half(w), dmin = half(w + 2);
        for (int j = 0; j < R; j++) {
            int32_t minimum = 0;
            for (int i = 0; i < 8; i++) minimum += mins[i] * xsums[j * (K / 32) + b * 8 + i];
            __m256i total = _mm256_add_epi32(sums[j], odd[j]);
            acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(d * xd[j * blocks + b]), _mm256_cvtepi32_ps(total), acc[j]);
            offsets[j] -= dmin * xd[j * blocks + b] * (float)minimum;
        }
        w += five ? 176 : 144;
    }
    for (int j = 0; j < R; j++) out[j] = hsum(acc[j]) + offsets[j];
}

/* One copy per type and instruction set, its branches folded away: R rows (1 or 4) of x. */
#define ROW_DOT_K_CASES(R, VNNI)                                                       \
    case Q4_K: row_dot_k_rows(Q4_K, R, VNNI, w, xq, xd, xsums, K, out); break;       \
    case Q5_K: row_dot_k_rows(Q5_K, R, VNNI, w, xq, xd, xsums, K, out); break;       \
    default: row_dot_k_rows(Q6_K, R, VNNI, w, xq, xd, xsums, K, out); break;

static float row_dot_k(int type, const uint8_t *w, const int8_t *xq, const float *xd, const int32_t *xsums, int64_t K) {
    float out[1];
    if (cpu_has_vnni()) {
        switch (type) { ROW_DOT_K_CASES(1, 1) }
    } else {
        switch (type) { ROW_DOT_K_CASES(1, 0) }
    }
    return out[0];
}

static void row_dot_k4(int type, const uint8_t *w, const int8_t *xq, const float *xd, const int32_t *xsums, int64_t K,
                       float out[4]) {
    if (cpu_has_vnni()) {
        switch (type) { ROW_DOT_K_CASES(4, 1) }
    } else {
        switch (type) { ROW_DOT_K_CASES(4, 0) }
    }
}

/* y (M, N) = x (M, K) times the block matrix (N rows, see the top) + bias. K a multiple of 256
 * wherever a K-quant segment is, of 32 otherwise. Scratch: xq (M, K) int8, xscale, xsum (M, K/32). */
void matvec_blocks(const float *x, int64_t M, int64_t K, const uint8_t *weight, const int64_t *segments,
                   int64_t n_segments, const float *bias, int64_t N, float *y, int8_t *xq, float *xscale, float *xsum,
                   int threads) {
    int k_quants = 0, small_blocks = 0;
    for (int64_t s = 0; s < n_segments; s++) {
        if (segments[2 * s] >= Q4_K) k_quants = 1;
        else small_blocks = 1;
    }
    if (small_blocks) quantize_rows(x, M, K, xq, xscale, xsum);
    int8_t *kq = NULL; /* x as Q8_K for the K-quant rows */
    float *kd = NULL;
    int32_t *ksums = NULL;
    if (k_quants) {
        kq = malloc(M * K), kd = malloc(M * (K / 256) * sizeof(float)), ksums = malloc(M * (K / 32) * sizeof(int32_t));
        quantize_rows_256(x, M, K, kq, kd, ksums);
    }
#pragma omp parallel num_threads(threads)
    {
        const uint8_t *start = weight;
        int64_t first = 0;
        for (int64_t s = 0; s < n_segments; s++) {
            int type = (int)segments[2 * s];
            int64_t rows = segments[2 * s + 1], stride = row_bytes(type, K);
#pragma omp for schedule(static) nowait
            for (int64_t r = 0; r < rows; r++) {
                int64_t n = first + r, m = 0;
                float b = bias ? bias[n] : 0.0f;
                prefetch_ahead(start + r * stride, stride);
                for (; m + 4 <= M; m += 4) {
                    float four[4];
                    if (type >= Q4_K)
                        row_dot_k4(type, start + r * stride, kq + m * K, kd + m * (K / 256), ksums + m * (K / 32), K, four);
                    else
                        row_dot4(type, start + r * stride, xq + m * K, xscale + m * (K / 32), xsum + m * (K / 32), K, four);
                    for (int j = 0; j < 4; j++) y[(m + j) * N + n] = four[j] + b;
                }
                for (; m < M; m++)
                    y[m * N + n] = (type >= Q4_K ? row_dot_k(type, start + r * stride, kq + m * K, kd + m * (K / 256),
                                                             ksums + m * (K / 32), K)
                                                 : row_dot(type, start + r * stride, xq + m * K, xscale + m * (K / 32),
                                                           xsum + m * (K / 32), K)) +
                                   b;
            }
            start += rows * stride, first += rows;
        }
    }
    free(kq), free(kd), free(ksums);
}

/* ggml's dequantize_row_* for one row of K weights. Each weight is computed as ggml computes it
 * (d * scale * q - dmin * m, (q - 16) * d, ...) so results equal the gguf package's. */
#define NO_FMA __attribute__((optimize("fp-contract=off")))

static NO_FMA void dequantize_row(int type, const uint8_t *w, int64_t K, float *out) {
    switch (type) {
    case Q8_0:
        for (int64_t b = 0; b < K / 32; b++, w += 34) {
            float d = half(w); /* read once: out may alias w as far as the compiler knows (5x slower) */
            for (int i = 0; i < 32; i++) out[b * 32 + i] = d * (float)(int8_t)w[2 + i];
        }
        break;
    case Q4_0:
    case Q4_1:
        for (int64_t b = 0; b < K / 32; b++, out += 32) {
            int has_min = type == Q4_1;
            float d = half(w), m = has_min ? half(w + 2) : 0.0f;
            const uint8_t *qs = w + (has_min ? 4 : 2);
            for (int i = 0; i < 16; i++) {
                if (has_min) {
                    out[i] = (float)(qs[i] & 0xF) * d + m, out[i + 16] = (float)(qs[i] >> 4) * d + m;
                } else {
                    out[i] = (float)((qs[i] & 0xF) - 8) * d, out[i + 16] = (float)((qs[i] >> 4) - 8) * d;
                }
            }
            w += has_min ? 20 : 18;
        }
        break;
    case Q5_0:
    case Q5_1:
        for (int64_t b = 0; b < K / 32; b++, out += 32) {
            int has_min = type == Q5_1;
            float d = half(w), m = has_min ? half(w + 2) : 0.0f;
            uint32_t qh;
            memcpy(&qh, w + (has_min ? 4 : 2), 4);
            const uint8_t *qs = w + (has_min ? 8 : 6);
            for (int i = 0; i < 16; i++) {
                int q0 = (qs[i] & 0xF) | (((qh >> i) & 1) << 4), q1 = (qs[i] >> 4) | (((qh >> (i + 16)) & 1) << 4);
                if (has_min) {
                    out[i] = (float)q0 * d + m, out[i + 16] = (float)q1 * d + m;
                } else {
                    out[i] = (float)(q0 - 16) * d, out[i + 16] = (float)(q1 - 16) * d;
                }
            }
            w += has_min ? 24 : 22;
        }
        break;
    case Q4_K:
    case Q5_K:
        for (int64_t b = 0; b < K / 256; b++) {
            int five = type == Q5_K;
            float d = half(w), dmin = half(w + 2);
            uint8_t scales[8], mins[8];
            scales_mins_k4(w + 4, scales, mins);
            const uint8_t *qh = w + 16, *qs = w + (five ? 48 : 16);
            for (int j = 0; j < 8; j++, out += 32) {
                float scale = d * scales[j], minimum = dmin * mins[j];
                const uint8_t *bytes = qs + (j / 2) * 32;
                for (int l = 0; l < 32; l++) {
                    int q = j % 2 ? bytes[l] >> 4 : bytes[l] & 0xF;
                    if (five) q |= ((qh[l] >> j) & 1) << 4;
                    out[l] = scale * (float)q - minimum;
                }
            }
            w += five ? 176 : 144;
        }
        break;
    case Q6_K:
        for (int64_t b = 0; b < K / 256; b++, w += 210) {
            float d = half(w + 208);
            for (int part = 0; part < 2; part++, out += 128) {
                const uint8_t *ql = w + part * 64, *qh = w + 128 + part * 32;
                const int8_t *sc = (const int8_t *)(w + 192) + part * 8;
                for (int l = 0; l < 32; l++) {
                    int is = l / 16;
                    int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
                    int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
                    int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                    int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                    out[l] = d * (float)sc[is] * (float)q1;
                    out[l + 32] = d * (float)sc[is + 2] * (float)q2;
                    out[l + 64] = d * (float)sc[is + 4] * (float)q3;
                    out[l + 96] = d * (float)sc[is + 6] * (float)q4;
                }
            }
        }
        break;
    }
}

/* Rows first_row .. first_row + rows - 1 of the block matrix into out (rows, K): fp32, or bf16 where
 * bf16 is set (see RowSink). */
void dequantize_blocks(const uint8_t *weight, const int64_t *segments, int64_t n_segments, int64_t K,
                       int64_t first_row, int64_t rows, void *out, int bf16, int threads) {
    RowSink sink = {out, bf16, K};
#pragma omp parallel num_threads(threads)
    {
        float *scratch = bf16 ? malloc(K * sizeof(float)) : NULL;
        const uint8_t *start = weight;
        int64_t segment_first = 0;
        for (int64_t s = 0; s < n_segments; s++) {
            int type = (int)segments[2 * s];
            int64_t count = segments[2 * s + 1], stride = row_bytes(type, K);
            int64_t begin = first_row > segment_first ? first_row : segment_first;
            int64_t end = first_row + rows < segment_first + count ? first_row + rows : segment_first + count;
#pragma omp for schedule(static) nowait
            for (int64_t n = begin; n < end; n++) {
                float *row = row_for(sink, n - first_row, scratch);
                dequantize_row(type, start + (n - segment_first) * stride, K, row);
                row_done(sink, n - first_row, scratch);
            }
            start += count * stride, segment_first += count;
        }
        free(scratch);
    }
}
