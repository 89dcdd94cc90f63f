/* Low-bit matmuls for a CPU node: 4-bit (GGUF Q4_1-style) and 8-bit (Q8_0-style) weights in blocks of 32
 * along K, times activations quantized per block of 32 to int8 (as llama.cpp's Q8_1), on AVX-512 VNNI
 * (vpdpbusd: 64 byte products per instruction), or AVX2 where the CPU has no VNNI. Built at first use by
 * runtime/lowbit.py with the machine's own -march=native; on a CPU or compiler with neither, oh_available() is 0
 * and the node keeps PyTorch's kernels.
 *
 * Two layouts (runtime/lowbit.py packs the weights), one per path; block scales (d) and minimums (m) are fp16, as
 * GGUF's, and 8-bit codes are stored + 128 as unsigned bytes.
 * - AVX-512 VNNI, "groups": 16 output rows per record, one per 32-bit lane (see dot_group below).
 * - AVX2, "rows": each row's codes, then its d, then its m, in one run of memory. The codes go in block pairs
 *   (2p, 2p+1) in "lane order": a pair's 32-bit words alternate between its two blocks (word 2j holds elements
 *   4j..4j+3 of block 2p, word 2j+1 the same of block 2p+1), so each 32-bit lane belongs to one block and the
 *   pair's two scales, broadcast as [s0, s1, s0, s1, ...], line up with the lanes; the activations are quantized
 *   into the same order. 8-bit: a pair is 64 bytes. 4-bit: pairs go in twos (a quad of 4 blocks, 64 bytes): byte
 *   t holds position t of the first pair in its low nibble and of the second in its high nibble; a last lone pair
 *   (K = 64 mod 128) is 32 bytes, byte t holding its positions t (low) and t + 32 (high).
 *
 * Per output row n and activation row r: y = sum over blocks b of d[n,b] * sx[r,b] * dot(q[n,b], xq[r,b])
 * + sum over b of c[n,b] * sx[r,b] * sum(xq[r,b]), where c is the block minimum (4-bit, w = m + q*d) or -128*d
 * (8-bit, for the +128 offset). Every output is computed by one thread in the same order whatever the row count,
 * the thread count or the other rows: a row's result does not depend on what it is batched with.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VNNI__)
#define OH_VNNI 1
#define OH_AVX2 0
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define OH_VNNI 0
#define OH_AVX2 1
#include <immintrin.h>
#else
#define OH_VNNI 0
#define OH_AVX2 0
#endif
#define OH_KERNEL (OH_VNNI || OH_AVX2)

#define QK 32

typedef struct {              /* runtime/lowbit.py keeps each row's codes, scales and offsets in one run of memory */
    const uint8_t *codes;     /* row n's K/2 (4-bit) or K (8-bit) bytes at codes + n * code_stride, layout above */
    const uint16_t *scales;   /* row n's K/32 fp16 d at scales + n * scale_stride */
    const uint16_t *offsets;  /* row n's K/32 fp16 m (4-bit; unused for 8-bit) at offsets + n * scale_stride */
    int64_t n, k;
    int32_t bits;             /* 4 or 8 */
    int64_t code_stride;      /* bytes from one row's codes to the next's */
    int64_t scale_stride;     /* fp16 values from one row's scales (and offsets) to the next's */
    int32_t layout;           /* 0: rows (above); 1: groups of 16 rows (AVX-512 VNNI only, see dot_group) */
} oh_weight;

/* 2: AVX-512 VNNI, 1: AVX2 (vpmaddubsw, as llama.cpp on such CPUs), 0: no kernel in this build. */
int oh_available(void) { return OH_VNNI ? 2 : (OH_AVX2 ? 1 : 0); }

#define MAX_BLOCKS 1024 /* K up to 32768 */

#if OH_VNNI

static inline __m512 load16(const void *x, int bf16, int64_t i) {
    if (bf16) {
        __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)x + i));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_loadu_ps((const float *)x + i);
}

/* One activation row [K] (fp32 or bf16) -> int8 codes [K] (K order), per-block scale sx [K/32] and
 * sx * sum(codes) [K/32]. sx = max|x| / 127, codes = x / sx rounded half to even. */
static void quantize_row(const void *x, int bf16, int64_t k, int8_t *xq, float *sx, float *sxsum) {
    for (int64_t b = 0; b < k / QK; b++) {
        __m512 v0 = load16(x, bf16, b * QK), v1 = load16(x, bf16, b * QK + 16);
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        float d = amax / 127.0f;
        __m512 id = _mm512_set1_ps(d > 0.0f ? 1.0f / d : 0.0f);
        __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, id)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, id));
        sx[b] = d;
        sxsum[b] = d * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
        _mm_storeu_si128((__m128i *)(xq + b * QK), _mm512_cvtsepi32_epi8(q0));
        _mm_storeu_si128((__m128i *)(xq + b * QK + 16), _mm512_cvtsepi32_epi8(q1));
    }
}

/* The groups layout: 16 weight rows at a time, each 32-bit lane of a register one row. Per group and block of 32,
 * one record: the codes of 8 k-quads (4 consecutive k) for the 16 rows, 4 bytes per row per k-quad (lane = row),
 * then the 16 rows' fp16 scales d, then (4-bit) their fp16 minimums m. 4-bit: 4 x 64 bytes, the low nibbles of
 * 64-byte part t holding k-quad 2t and the high nibbles k-quad 2t + 1 (256 + 32 + 32 bytes); 8-bit: 8 x 64 bytes
 * (codes + 128), k-quad q in part q (512 + 32 bytes). A k-quad of the activation codes is broadcast to all lanes
 * (an embedded {1to16} memory operand), so a block costs 8 vpdpbusd, one int -> float conversion and two or three
 * FMAs for 16 rows, and a row's result needs no horizontal sum. Up to 4 activation rows share the unpacking. */
static inline int64_t record_bytes(const oh_weight *w) { return w->bits == 4 ? 256 + 64 : 512 + 32; }

static inline void dot_group(const oh_weight *w, int64_t g, const int8_t *xq, const float *sx, const float *sxsum,
                             const int R, __m512 *acc) {
    const int64_t k = w->k, blocks = k / QK, rec = record_bytes(w);
    const uint8_t *base = w->codes + g * blocks * rec;
    const __m512i mask = _mm512_set1_epi8(0x0F);
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t *p = base + b * rec;
        __m512i dot[4], high[4];
        for (int r = 0; r < R; r++) dot[r] = high[r] = _mm512_setzero_si512();
        if (w->bits == 4) {  /* high nibbles left in place (x 16), shifted back once per block: exact integers */
            for (int t = 0; t < 4; t++) {
                const __m512i raw = _mm512_loadu_si512(p + 64 * t);
                const __m512i lo = _mm512_and_si512(raw, mask), hi = _mm512_andnot_si512(mask, raw);
                for (int r = 0; r < R; r++) {
                    const int32_t *x = (const int32_t *)(xq + r * k + b * QK) + 2 * t;
                    dot[r] = _mm512_dpbusd_epi32(dot[r], lo, _mm512_set1_epi32(x[0]));
                    high[r] = _mm512_dpbusd_epi32(high[r], hi, _mm512_set1_epi32(x[1]));
                }
            }
            for (int r = 0; r < R; r++) dot[r] = _mm512_add_epi32(dot[r], _mm512_srai_epi32(high[r], 4));
        } else {
            for (int t = 0; t < 8; t++) {
                const __m512i codes = _mm512_loadu_si512(p + 64 * t);
                for (int r = 0; r < R; r++)
                    dot[r] = _mm512_dpbusd_epi32(dot[r], codes,
                                                 _mm512_set1_epi32(((const int32_t *)(xq + r * k + b * QK))[t]));
            }
        }
        const int64_t scales_at = w->bits == 4 ? 256 : 512;
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p + scales_at)));
        if (w->bits == 4) {
            const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p + scales_at + 32)));
            for (int r = 0; r < R; r++) {
                const __m512 scaled = _mm512_mul_ps(_mm512_cvtepi32_ps(dot[r]), _mm512_set1_ps(sx[r * blocks + b]));
                acc[r] = _mm512_fmadd_ps(d, scaled, acc[r]);
                acc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(sxsum[r * blocks + b]), acc[r]);
            }
        } else {  /* the codes carry +128: sum (q + 128) x = sum q x + 128 sum x */
            for (int r = 0; r < R; r++) {
                const __m512 scaled = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r]), _mm512_set1_ps(sx[r * blocks + b]),
                                                      _mm512_set1_ps(-128.0f * sxsum[r * blocks + b]));
                acc[r] = _mm512_fmadd_ps(d, scaled, acc[r]);
            }
        }
    }
}
#endif

#if OH_AVX2
/* The rows layout on 256-bit registers: a 32-byte half of a pair holds 16 elements of each of its two blocks in
 * alternating 32-bit lanes, so [s0, s1, s0, s1, ...] (vbroadcastsd) lines up with them. Products go
 * through vpmaddubsw (u8 x s8 -> pairs summed to int16) and vpmaddwd by ones (-> int32 per 4-byte lane). 4-bit codes
 * (<= 15) cannot saturate the int16 pairs; 8-bit codes use llama.cpp's sign trick (|w| times x with w's sign), so
 * the 8-bit tail (the -128 correction of the unsigned codes) is not needed here. */
static inline __m256 pair_bcast(const float *p) {  /* [p0, p1, p0, p1, ...] */
    return _mm256_castpd_ps(_mm256_broadcast_sd((const double *)p));
}

static inline __m256 load8(const void *x, int bf16, int64_t i) {
    if (bf16) {
        __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)x + i));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    return _mm256_loadu_ps((const float *)x + i);
}

static inline float hsum8(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

static void quantize_row(const void *x, int bf16, int64_t k, int8_t *xq, float *sx, float *sxsum) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t b = 0; b < k / QK; b++) {
        __m256 v[4];
        for (int i = 0; i < 4; i++) v[i] = load8(x, bf16, b * QK + 8 * i);
        __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                                 _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        const float amax = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
        const float d = amax / 127.0f;
        const __m256 id = _mm256_set1_ps(d > 0.0f ? 1.0f / d : 0.0f);
        __m256i q[4];
        for (int i = 0; i < 4; i++) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], id));
        __m256i total = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
        t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
        t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
        sx[b] = d;
        sxsum[b] = d * (float)_mm_cvtsi128_si32(t);
        __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        bytes = _mm256_permutevar8x32_epi32(bytes, order);  /* natural order: 32 codes */
        uint32_t words[8];
        _mm256_storeu_si256((__m256i *)words, bytes);
        uint32_t *pair = (uint32_t *)(xq + (b >> 1) * 64) + (b & 1);
        for (int j = 0; j < 8; j++) pair[2 * j] = words[j];
    }
}

static inline __m256 dot4(__m256i w, __m256i x, __m256i ones) {  /* unsigned 4-bit codes times int8 */
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(w, x), ones));
}

static inline __m256 dot8(__m256i w_offset, __m256i x, __m256i ones) {  /* int8 (stored + 128) times int8 */
    const __m256i w = _mm256_xor_si256(w_offset, _mm256_set1_epi8((char)0x80));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w)),
                                                ones));
}

static inline void dot_rows(const oh_weight *w, int64_t n, const int8_t *xq, const float *sx, const float *sxsum,
                            const int R, float *out) {
    const int64_t k = w->k, blocks = k / QK, pairs = k / 64;
    const uint16_t *dh = w->scales + n * w->scale_stride, *mh = w->offsets + n * w->scale_stride;
    const __m256i ones = _mm256_set1_epi16(1);
    float dF[MAX_BLOCKS], ds[4][MAX_BLOCKS], tail[4];
    for (int64_t b = 0; b < blocks; b++) dF[b] = _cvtsh_ss(dh[b]);
    for (int r = 0; r < R; r++) {
        float t = 0.0f;
        for (int64_t b = 0; b < blocks; b++) {
            ds[r][b] = dF[b] * sx[r * blocks + b];
            if (w->bits == 4) t += _cvtsh_ss(mh[b]) * sxsum[r * blocks + b];
        }
        tail[r] = t;
    }
    __m256 acc0[4], acc1[4];
    for (int r = 0; r < R; r++) acc0[r] = acc1[r] = _mm256_setzero_ps();
    if (w->bits == 8) {
        const uint8_t *codes = w->codes + n * w->code_stride;
        for (int64_t p = 0; p < pairs; p++) {
            const __m256i w0 = _mm256_loadu_si256((const __m256i *)(codes + p * 64));
            const __m256i w1 = _mm256_loadu_si256((const __m256i *)(codes + p * 64 + 32));
            for (int r = 0; r < R; r++) {
                const int8_t *x = xq + r * k + p * 64;
                const __m256 s = pair_bcast(ds[r] + 2 * p);
                acc0[r] = _mm256_fmadd_ps(dot8(w0, _mm256_loadu_si256((const __m256i *)x), ones), s, acc0[r]);
                acc1[r] = _mm256_fmadd_ps(dot8(w1, _mm256_loadu_si256((const __m256i *)(x + 32)), ones), s, acc1[r]);
            }
        }
    } else {
        const uint8_t *codes = w->codes + n * w->code_stride;
        const __m256i mask = _mm256_set1_epi8(0x0F);
        int64_t p = 0;
        for (; p + 1 < pairs; p += 2) {  /* a quad: low nibbles = pair p, high nibbles = pair p + 1 */
            for (int h = 0; h < 2; h++) {
                const __m256i raw = _mm256_loadu_si256((const __m256i *)(codes + p * 32 + h * 32));
                const __m256i lo = _mm256_and_si256(raw, mask), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask);
                for (int r = 0; r < R; r++) {
                    const int8_t *x = xq + r * k + p * 64 + h * 32;
                    acc0[r] = _mm256_fmadd_ps(dot4(lo, _mm256_loadu_si256((const __m256i *)x), ones),
                                              pair_bcast(ds[r] + 2 * p), acc0[r]);
                    acc1[r] = _mm256_fmadd_ps(dot4(hi, _mm256_loadu_si256((const __m256i *)(x + 64)), ones),
                                              pair_bcast(ds[r] + 2 * p + 2), acc1[r]);
                }
            }
        }
        if (p < pairs) {  /* a lone last pair: 32 bytes, positions t (low nibble) and t + 32 (high) */
            const __m256i raw = _mm256_loadu_si256((const __m256i *)(codes + p * 32));
            const __m256i lo = _mm256_and_si256(raw, mask), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask);
            for (int r = 0; r < R; r++) {
                const int8_t *x = xq + r * k + p * 64;
                const __m256 s = pair_bcast(ds[r] + 2 * p);
                acc0[r] = _mm256_fmadd_ps(dot4(lo, _mm256_loadu_si256((const __m256i *)x), ones), s, acc0[r]);
                acc1[r] = _mm256_fmadd_ps(dot4(hi, _mm256_loadu_si256((const __m256i *)(x + 32)), ones), s, acc1[r]);
            }
        }
    }
    for (int r = 0; r < R; r++) out[r] = hsum8(_mm256_add_ps(acc0[r], acc1[r])) + tail[r];
}
#endif

#if OH_KERNEL
static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even, as torch's cast */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#ifndef CHUNK_BYTES
#define CHUNK_BYTES 16384
#endif

#if OH_VNNI
#define UNIT 16 /* outputs per unit of work: a group of 16 rows */
/* Outputs 16u.. of R activation rows: out[r][0..15]. */
static inline void dot_unit(const oh_weight *w, int64_t u, const int8_t *xq, const float *sx, const float *sxsum,
                            const int R, float out[4][UNIT]) {
    __m512 acc[4];
    dot_group(w, u, xq, sx, sxsum, R, acc);
    for (int r = 0; r < R; r++) _mm512_storeu_ps(out[r], acc[r]);
}
#else
#define UNIT 1 /* one output row */
static inline void dot_unit(const oh_weight *w, int64_t u, const int8_t *xq, const float *sx, const float *sxsum,
                            const int R, float out[4][UNIT]) {
    float one[4];
    dot_rows(w, u, xq, sx, sxsum, R, one);
    for (int r = 0; r < R; r++) out[r][0] = one[r];
}
#endif

/* Outputs UNIT*u.. (fewer at the end) for activation rows [r0, r1): up to 4 rows share the weights' unpacking. */
static void output_unit(const oh_weight *w, int64_t u, const int8_t *xq, const float *sx, const float *sxsum,
                        int64_t r0, int64_t m, void *y, int y_bf16) {
    const int64_t k = w->k, n = w->n, blocks = k / QK, first = UNIT * u;
    const int64_t count = n - first < UNIT ? n - first : UNIT;
    for (int64_t r = r0; r < m; r += 4) {
        float out[4][UNIT];
        const int rows = m - r < 4 ? (int)(m - r) : 4;
        const int8_t *xr = xq + r * k;
        const float *sr = sx + r * blocks, *tr = sxsum + r * blocks;
        switch (rows) {  /* constant R: each case compiled with its loops over rows unrolled */
            case 1: dot_unit(w, u, xr, sr, tr, 1, out); break;
            case 2: dot_unit(w, u, xr, sr, tr, 2, out); break;
            case 3: dot_unit(w, u, xr, sr, tr, 3, out); break;
            default: dot_unit(w, u, xr, sr, tr, 4, out); break;
        }
        for (int i = 0; i < rows; i++) {
            for (int64_t l = 0; l < count; l++) {
                if (y_bf16) ((uint16_t *)y)[(r + i) * n + first + l] = f32_to_bf16(out[i][l]);
                else ((float *)y)[(r + i) * n + first + l] = out[i][l];
            }
        }
    }
}
#endif

/* y [M, N] = x [M, K] times W^T; x and y fp32 (dtype flag 0) or bf16 (1), rows contiguous. Returns 0; -1 when
 * this build has no kernel or K is not a multiple of 64 (or over 32768); -2 when out of memory. */
int oh_matmul(const oh_weight *w, const void *x, int x_bf16, int64_t m, void *y, int y_bf16, int threads) {
#if OH_KERNEL
    const int64_t k = w->k, n = w->n, blocks = k / QK;
    if (k % 64 != 0 || blocks > MAX_BLOCKS || w->layout != (OH_VNNI ? 1 : 0)) return -1;  /* one layout per path */
    int8_t *xq = (int8_t *)malloc((size_t)(m * k));
    float *sx = (float *)malloc(sizeof(float) * (size_t)(2 * m * blocks));
    if (!xq || !sx) { free(xq); free(sx); return -2; }
    float *sxsum = sx + m * blocks;
    for (int64_t r = 0; r < m; r++)
        quantize_row((const char *)x + r * k * (x_bf16 ? 2 : 4), x_bf16, k, xq + r * k, sx + r * blocks,
                     sxsum + r * blocks);
    /* Activation rows in chunks that stay in the L1 cache while every weight row passes them (a prefill's
     * rows do not all fit); a row's operations are the same in any chunk. */
    const int64_t chunk = CHUNK_BYTES / k < 4 ? 4 : (CHUNK_BYTES / k) & ~(int64_t)3;
    for (int64_t r0 = 0; r0 < m; r0 += chunk) {
        const int64_t r1 = m - r0 < chunk ? m : r0 + chunk, units = (n + UNIT - 1) / UNIT;
        if (threads > 1) {
            #pragma omp parallel for schedule(static) num_threads(threads)
            for (int64_t u = 0; u < units; u++) output_unit(w, u, xq, sx, sxsum, r0, r1, y, y_bf16);
        } else {  /* no OpenMP region at all: entering one costs about a microsecond even for one thread */
            for (int64_t u = 0; u < units; u++) output_unit(w, u, xq, sx, sxsum, r0, r1, y, y_bf16);
        }
    }
    free(xq);
    free(sx);
    return 0;
#else
    (void)w; (void)x; (void)x_bf16; (void)m; (void)y; (void)y_bf16; (void)threads;
    return -1;
#endif
}
