/* Low-bit matmuls for a CPU node: 4-bit (GGUF Q4_1-style) and 8-bit (Q8_0-style) weights in blocks of 32
 * along K, times activations quantized per block of 32 to int8 (as llama.cpp's Q8_1), on AVX-512 VNNI
 * (vpdpbusd: 64 byte products per instruction), or AVX2 where the CPU has no VNNI (vpmaddubsw, as llama.cpp on such
 * CPUs). Built at first use by runtime/lowbit.py with the machine's own -march=native; on a CPU or compiler with
 * neither, oh_available() is 0 and the node keeps PyTorch's kernels.
 *
 * One layout, "groups" (runtime/lowbit.py packs the weights): G output rows per record, one per 32-bit lane of a
 * vector register (G = 16 on AVX-512, 8 on AVX2: oh_group_rows()). Per group and block of 32, one record: the codes
 * of the block's 8 k-quads (4 consecutive k) for the G rows, 4 bytes per row per k-quad (lane = row), then the G
 * rows' fp16 scales d, then (4-bit) their fp16 minimums m. 4-bit: 4 parts of 4G bytes, the low nibbles of part t
 * holding k-quad 2t and the high nibbles k-quad 2t + 1 (16G + 2G + 2G bytes); 8-bit: 8 parts of 4G bytes (codes
 * + 128), k-quad q in part q (32G + 2G bytes). A k-quad of the activation codes is broadcast to all lanes, so a
 * row's dot product needs no horizontal sum, and the scales of G rows are converted and applied at once.
 *
 * Also here: the norms and attention of fp32 low-bit spans, and a bf16 matmul for unquantized bf16 spans
 * (hardware.matmul=library; oh_matmul_bf16, its own layout and comment below).
 *
 * Per output row n and activation row r: y = sum over blocks b of d[n,b] * (sx[r,b] * dot(q[n,b], xq[r,b]))
 * + m[n,b] * (sx[r,b] * sum(xq[r,b])), for 8-bit with dot over the stored codes q + 128 and m = -128 d folded in
 * (see dot_group). Both paths compute the same integers and then the same float operations in the same order, so
 * the AVX2 build's outputs have the AVX-512 build's bits. Every output is computed by one thread in the same order
 * whatever the row count, the thread count or the other rows: a row's result does not depend on its batch.
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

typedef struct {
    const uint8_t *codes;     /* ceil(N / group) groups of K/32 records each, the layout above */
    int64_t n, k;
    int32_t bits;             /* 4 or 8 */
    int32_t group;            /* rows per record: this build's oh_group_rows() */
} oh_weight;

/* 2: AVX-512 VNNI, 1: AVX2, 0: no kernel in this build. */
int oh_available(void) { return OH_VNNI ? 2 : (OH_AVX2 ? 1 : 0); }

/* Rows per record of the layout this build reads (0: no kernel). */
int oh_group_rows(void) { return OH_VNNI ? 16 : (OH_AVX2 ? 8 : 0); }

#define MAX_K 32768 /* runtime/lowbit.py MAX_K */

/* Where a record's fp16 scales start (its codes' bytes), and the bytes of one record (a group of G rows, one block
 * of 32): codes, fp16 scales, fp16 minimums (4-bit). runtime/lowbit.py _codes_bytes / _record_bytes. */
static inline int64_t scales_at(const oh_weight *w) { return w->bits == 4 ? 16 * w->group : 32 * w->group; }
static inline int64_t record_bytes(const oh_weight *w) { return scales_at(w) + 2 * w->group * (w->bits == 4 ? 2 : 1); }

/* Activation row r quantized: codes xq[r*K ..] (K order), and per block b: scale sx = max|x| / 127, the codes' sum
 * xsum, and sxsum = sx * xsum. Codes = x / sx rounded half to even (the default rounding mode). */
typedef struct {
    int8_t *xq;
    float *sx, *sxsum;
    int32_t *xsum;
} oh_acts;

#if OH_VNNI
#define UNIT 16 /* outputs per unit of work: a group of 16 rows, one per 32-bit lane */
#define MAX_ROWS 8 /* activation rows that share one unpacking of the weights (dot_block's registers) */
typedef __m512 vf;
typedef __m512i vi;
#define VF_ZERO _mm512_setzero_ps
#define VF_SET1 _mm512_set1_ps
#define VF_MUL _mm512_mul_ps
#define VF_FMA _mm512_fmadd_ps
#define VF_FROM_INT _mm512_cvtepi32_ps
#define VF_STORE _mm512_storeu_ps
#define VF_ADD _mm512_add_ps
#define VF_SUB _mm512_sub_ps
#define VF_MAX _mm512_max_ps
#define VF_ROUND(x) _mm512_roundscale_ps((x), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define VF_POW2(k) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(k), _mm512_set1_epi32(127)), 23))
#define VF_LOADU _mm512_loadu_ps
#define VF_DIV _mm512_div_ps
#define VF_LOAD_HALF(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p)))

static inline __m512 load16(const void *x, int bf16, int64_t i) {
    if (bf16) {
        __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)x + i));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_loadu_ps((const float *)x + i);
}

static void quantize_row(const void *x, int bf16, int64_t k, int8_t *xq, float *sx, float *sxsum, int32_t *xsum) {
    for (int64_t b = 0; b < k / QK; b++) {
        __m512 v0 = load16(x, bf16, b * QK), v1 = load16(x, bf16, b * QK + 16);
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        float d = amax / 127.0f;
        __m512 id = _mm512_set1_ps(d > 0.0f ? 1.0f / d : 0.0f);
        __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, id)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, id));
        const int32_t total = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
        sx[b] = d;
        xsum[b] = total;
        sxsum[b] = d * (float)total;
        _mm_storeu_si128((__m128i *)(xq + b * QK), _mm512_cvtsepi32_epi8(q0));
        _mm_storeu_si128((__m128i *)(xq + b * QK + 16), _mm512_cvtsepi32_epi8(q1));
    }
}

/* Block b of 16 weight rows (its record p) times R activation rows: dot[r] lane l = the block's integer dot product
 * of row l, over the stored codes (4-bit: q; 8-bit: q + 128). 8 vpdpbusd, the k-quad of activation codes an
 * embedded {1to16} broadcast. 4-bit: both nibbles unpacked once for all R rows (and, shift, and). Up to 4 rows keep
 * two accumulators each (low and high nibbles: two dependency chains, which a lone row needs to overlap the
 * instruction's latency), more rows one each (8 chains already; 2 per row would not fit in the 32 registers).
 * Integer sums in any order are exact: the same integers for every R. */
static inline void dot_block(const oh_weight *w, const uint8_t *p, const oh_acts *a, int64_t b, const int R,
                             vi *dot) {
    const int64_t k = w->k;
    const __m512i mask = _mm512_set1_epi8(0x0F);
    for (int r = 0; r < R; r++) dot[r] = _mm512_setzero_si512();
    if (w->bits == 4) {
        __m512i high[MAX_ROWS];
        if (R <= 4)
            for (int r = 0; r < R; r++) high[r] = _mm512_setzero_si512();
        for (int t = 0; t < 4; t++) {
            const __m512i raw = _mm512_loadu_si512(p + 64 * t);
            const __m512i lo = _mm512_and_si512(raw, mask), hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), mask);
            for (int r = 0; r < R; r++) {
                const int32_t *x = (const int32_t *)(a->xq + r * k + b * QK) + 2 * t;
                dot[r] = _mm512_dpbusd_epi32(dot[r], lo, _mm512_set1_epi32(x[0]));
                if (R <= 4) high[r] = _mm512_dpbusd_epi32(high[r], hi, _mm512_set1_epi32(x[1]));
                else dot[r] = _mm512_dpbusd_epi32(dot[r], hi, _mm512_set1_epi32(x[1]));
            }
        }
        if (R <= 4)
            for (int r = 0; r < R; r++) dot[r] = _mm512_add_epi32(dot[r], high[r]);
    } else {
        for (int t = 0; t < 8; t++) {
            const __m512i codes = _mm512_loadu_si512(p + 64 * t);
            for (int r = 0; r < R; r++)
                dot[r] = _mm512_dpbusd_epi32(dot[r], codes,
                                             _mm512_set1_epi32(((const int32_t *)(a->xq + r * k + b * QK))[t]));
        }
    }
}
#endif

#if OH_AVX2
#define UNIT 8 /* a group of 8 rows, one per 32-bit lane */
#define MAX_ROWS 4 /* 16 registers: 4 rows' sums, accumulators and the unpacked codes */
typedef __m256 vf;
typedef __m256i vi;
#define VF_ZERO _mm256_setzero_ps
#define VF_SET1 _mm256_set1_ps
#define VF_MUL _mm256_mul_ps
#define VF_FMA _mm256_fmadd_ps
#define VF_FROM_INT _mm256_cvtepi32_ps
#define VF_STORE _mm256_storeu_ps
#define VF_ADD _mm256_add_ps
#define VF_SUB _mm256_sub_ps
#define VF_MAX _mm256_max_ps
#define VF_ROUND(x) _mm256_round_ps((x), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define VF_POW2(k) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(k), _mm256_set1_epi32(127)), 23))
#define VF_LOADU _mm256_loadu_ps
#define VF_DIV _mm256_div_ps
#define VF_LOAD_HALF(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))

static inline __m256 load8(const void *x, int bf16, int64_t i) {
    if (bf16) {
        __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)x + i));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    return _mm256_loadu_ps((const float *)x + i);
}

/* The AVX-512 path's quantize_row on 256-bit registers: the same values (a max and an integer sum are exact in any
 * order; the scale, its inverse and the rounding are the same operations). */
static void quantize_row(const void *x, int bf16, int64_t k, int8_t *xq, float *sx, float *sxsum, int32_t *xsum) {
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
        xsum[b] = _mm_cvtsi128_si32(t);
        sxsum[b] = d * (float)xsum[b];
        __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        _mm256_storeu_si256((__m256i *)(xq + b * QK), _mm256_permutevar8x32_epi32(bytes, order));  /* K order */
    }
}

/* The AVX-512 path's dot_block for 8 weight rows: the same integers. vpmaddubsw multiplies unsigned bytes by signed
 * ones and adds pairs into int16, saturating: 4-bit codes (<= 15) times |x| <= 127 stay far from it, so a block's 8
 * k-quads are summed in int16 (at most 8 x 2 x 15 x 127 = 30480) and widened once (vpmaddwd by ones). 8-bit codes
 * go through llama.cpp's sign trick, |q| times x with q's sign (|q| <= 127: a pair at most 32258), and the +128 the
 * stored codes carry is added back as 128 sum x, giving the AVX-512 path's sum (q + 128) x. */
static inline void dot_block(const oh_weight *w, const uint8_t *p, const oh_acts *a, int64_t b, const int R,
                             vi *dot) {
    const int64_t k = w->k, blocks = k / QK;
    const __m256i mask = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1), flip = _mm256_set1_epi8((char)0x80);
    if (w->bits == 4) {
        __m256i sum16[4];
        for (int r = 0; r < R; r++) sum16[r] = _mm256_setzero_si256();
        for (int t = 0; t < 4; t++) {
            const __m256i raw = _mm256_loadu_si256((const __m256i *)(p + 32 * t));
            const __m256i lo = _mm256_and_si256(raw, mask), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask);
            for (int r = 0; r < R; r++) {
                const int32_t *x = (const int32_t *)(a->xq + r * k + b * QK) + 2 * t;
                sum16[r] = _mm256_add_epi16(sum16[r], _mm256_maddubs_epi16(lo, _mm256_set1_epi32(x[0])));
                sum16[r] = _mm256_add_epi16(sum16[r], _mm256_maddubs_epi16(hi, _mm256_set1_epi32(x[1])));
            }
        }
        for (int r = 0; r < R; r++) dot[r] = _mm256_madd_epi16(sum16[r], ones);
    } else {
        for (int r = 0; r < R; r++) dot[r] = _mm256_setzero_si256();
        for (int t = 0; t < 8; t++) {
            const __m256i q = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(p + 32 * t)), flip);
            const __m256i size = _mm256_abs_epi8(q);
            for (int r = 0; r < R; r++) {
                const __m256i x = _mm256_set1_epi32(((const int32_t *)(a->xq + r * k + b * QK))[t]);
                const __m256i pairs = _mm256_maddubs_epi16(size, _mm256_sign_epi8(x, q));
                dot[r] = _mm256_add_epi32(dot[r], _mm256_madd_epi16(pairs, ones));
            }
        }
        for (int r = 0; r < R; r++)
            dot[r] = _mm256_add_epi32(dot[r], _mm256_set1_epi32(128 * a->xsum[r * blocks + b]));
    }
}
#endif

#if OH_KERNEL
/* How far ahead of the record being read the weights are prefetched: the records of all units lie in one run of
 * memory, read once per step, and the hardware prefetcher alone left the kernel short of the memory's bandwidth
 * (bench/bench_lowbit_rows.py against the previous commit, SmolLM2 int4, 1 thread, AVX-512: 1.1x at 1 row, 1.2x at 8,
 * 1.17x at 42; 6-12 KB all alike). */
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 8192
#endif

/* One group of UNIT weight rows (g) times R activation rows: out[r][l] = output row UNIT g + l. Each path's
 * dot_block gives a block's integers; the float operations after them are this one code for both paths, in this
 * order, so the AVX2 build's outputs have the AVX-512 build's bits (tests/quant/test_lowbit.py). */
static inline void dot_unit(const oh_weight *w, int64_t g, const oh_acts *a, const int R, float out[MAX_ROWS][UNIT]) {
    const int64_t blocks = w->k / QK, rec = record_bytes(w);
    const uint8_t *base = w->codes + g * blocks * rec;
    vf acc[MAX_ROWS];
    for (int r = 0; r < R; r++) acc[r] = VF_ZERO();
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t *p = base + b * rec;
        vi dot[MAX_ROWS];
        for (int64_t line = 0; line < rec; line += 64)  /* a hint (never faults, changes no result) */
            _mm_prefetch((const char *)p + PREFETCH_BYTES + line, _MM_HINT_T0);
        dot_block(w, p, a, b, R, dot);
        const vf d = VF_LOAD_HALF(p + scales_at(w));
        if (w->bits == 4) {  /* w = m + q d */
            const vf m = VF_LOAD_HALF(p + scales_at(w) + 2 * UNIT);
            for (int r = 0; r < R; r++) {
                const vf scaled = VF_MUL(VF_FROM_INT(dot[r]), VF_SET1(a->sx[r * blocks + b]));
                acc[r] = VF_FMA(d, scaled, acc[r]);
                acc[r] = VF_FMA(m, VF_SET1(a->sxsum[r * blocks + b]), acc[r]);
            }
        } else {  /* w = q d, and sum q x = sum (q + 128) x - 128 sum x */
            for (int r = 0; r < R; r++) {
                const vf scaled = VF_FMA(VF_FROM_INT(dot[r]), VF_SET1(a->sx[r * blocks + b]),
                                         VF_SET1(-128.0f * a->sxsum[r * blocks + b]));
                acc[r] = VF_FMA(d, scaled, acc[r]);
            }
        }
    }
    for (int r = 0; r < R; r++) VF_STORE(out[r], acc[r]);
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

/* Outputs UNIT*u.. (fewer at the end) for activation rows [r0, r1): up to MAX_ROWS rows share the weights'
 * unpacking. */
static void output_unit(const oh_weight *w, int64_t u, const oh_acts *a, int64_t r0, int64_t m, void *y, int y_bf16) {
    const int64_t k = w->k, n = w->n, blocks = k / QK, first = UNIT * u;
    const int64_t count = n - first < UNIT ? n - first : UNIT;
    for (int64_t r = r0; r < m; r += MAX_ROWS) {
        float out[MAX_ROWS][UNIT];
        const int rows = m - r < MAX_ROWS ? (int)(m - r) : MAX_ROWS;
        const oh_acts at = {a->xq + r * k, a->sx + r * blocks, a->sxsum + r * blocks, a->xsum + r * blocks};
        switch (rows) {  /* constant R: each case compiled with its loops over rows unrolled */
            case 1: dot_unit(w, u, &at, 1, out); break;
            case 2: dot_unit(w, u, &at, 2, out); break;
            case 3: dot_unit(w, u, &at, 3, out); break;
#if MAX_ROWS > 4
            case 4: dot_unit(w, u, &at, 4, out); break;
            case 5: dot_unit(w, u, &at, 5, out); break;
            case 6: dot_unit(w, u, &at, 6, out); break;
            case 7: dot_unit(w, u, &at, 7, out); break;
#endif
            default: dot_unit(w, u, &at, MAX_ROWS, out); break;
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
 * this build has no kernel, K is not a multiple of 64 or over MAX_K, or the weight was packed for another group
 * size; -2 when out of memory. */
int oh_matmul(const oh_weight *w, const void *x, int x_bf16, int64_t m, void *y, int y_bf16, int threads) {
#if OH_KERNEL
    const int64_t k = w->k, n = w->n, blocks = k / QK;
    if (k % 64 != 0 || k > MAX_K || w->group != UNIT) return -1;
    int8_t *xq = (int8_t *)malloc((size_t)(m * k));
    float *sx = (float *)malloc(sizeof(float) * (size_t)(3 * m * blocks));  /* sx, sxsum, xsum */
    if (!xq || !sx) { free(xq); free(sx); return -2; }
    const oh_acts a = {xq, sx, sx + m * blocks, (int32_t *)(sx + 2 * m * blocks)};
    for (int64_t r = 0; r < m; r++)
        quantize_row((const char *)x + r * k * (x_bf16 ? 2 : 4), x_bf16, k, xq + r * k, a.sx + r * blocks,
                     a.sxsum + r * blocks, a.xsum + r * blocks);
    /* Activation rows in chunks that stay in the L1 cache while every weight row passes them (a prefill's
     * rows do not all fit); a row's operations are the same in any chunk. */
    const int64_t chunk = CHUNK_BYTES / k < MAX_ROWS ? MAX_ROWS : (CHUNK_BYTES / k) & ~(int64_t)(MAX_ROWS - 1);
    const int64_t units = (n + UNIT - 1) / UNIT;
    for (int64_t r0 = 0; r0 < m; r0 += chunk) {
        const int64_t r1 = m - r0 < chunk ? m : r0 + chunk;
        if (threads > 1) {
            #pragma omp parallel for schedule(static) num_threads(threads)
            for (int64_t u = 0; u < units; u++) output_unit(w, u, &a, r0, r1, y, y_bf16);
        } else {  /* no OpenMP region at all: entering one costs about a microsecond even for one thread */
            for (int64_t u = 0; u < units; u++) output_unit(w, u, &a, r0, r1, y, y_bf16);
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

/* ---- bf16 weights (runtime/lowbit.py Bf16Weight) ---------------------------------------------------------------
 * y [M, N] = x [M, K] times W^T for a bf16 W, read 2 bytes per weight. Layout: ceil(N / 16) groups of 16 rows, each
 * [K][16] (row n's weight k at group n / 16, index 16 k + n % 16; rows past N zero). Per output, one chain of
 * fused multiply-adds in k order from 0 (a bf16 x bf16 product is exact in fp32, so each step rounds once), with x
 * read as fp32 (a bf16 x widened exactly): the bits of an output depend only on its weight row and its activation
 * row, never on M, N, the other rows, the thread count, or the build (AVX-512: one 16-lane register per group; AVX2:
 * two 8-lane ones, lane for lane the same operations). Up to BF_ROWS activation rows share each weight load; BF_UNITS
 * groups run side by side (independent chains, to hide the multiply-add latency at one row). */
#if OH_KERNEL
/* (measured on SmolLM2's shapes, 1 thread, AVX-512: 6 rows x 4 groups 1.2x faster than 4 x 4 at 5 rows, the same at
 * 1 row; AVX2 has 16 registers: 2 rows x 2 groups x 2 halves of accumulators) */
#if OH_VNNI
#define BF_UNITS 4
#ifndef BF_ROWS
#define BF_ROWS 6
#endif
#else
#define BF_UNITS 2
#ifndef BF_ROWS
#define BF_ROWS 2
#endif
#endif
#ifndef BF_CHUNK_BYTES
#define BF_CHUNK_BYTES 65536
#endif

static inline void bf16_to_f32_row(const uint16_t *x, int64_t k, float *out) {
    for (int64_t i = 0; i < k; i++) {
        const uint32_t u = (uint32_t)x[i] << 16;
        memcpy(out + i, &u, 4);
    }
}

/* Groups g0 .. g0 + U - 1 times R activation rows (fp32, rows k apart): out[r][16 j + l] = output 16 (g0 + j) + l. */
static inline void bf16_units(const uint16_t *wp, int64_t k, int64_t g0, const int U, const float *x, const int R,
                              float out[BF_ROWS][16 * BF_UNITS]) {
#if OH_VNNI
    __m512 acc[BF_ROWS][BF_UNITS];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < U; j++) acc[r][j] = _mm512_setzero_ps();
    const uint16_t *base = wp + g0 * k * 16;
    for (int64_t i = 0; i < k; i++) {
        __m512 wv[BF_UNITS];
        for (int j = 0; j < U; j++) {
            const __m256i half = _mm256_loadu_si256((const __m256i *)(base + (j * k + i) * 16));
            wv[j] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
        }
        for (int r = 0; r < R; r++) {
            const __m512 xv = _mm512_set1_ps(x[r * k + i]);
            for (int j = 0; j < U; j++) acc[r][j] = _mm512_fmadd_ps(wv[j], xv, acc[r][j]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int j = 0; j < U; j++) _mm512_storeu_ps(out[r] + 16 * j, acc[r][j]);
#else
    __m256 acc[BF_ROWS][2 * BF_UNITS];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < 2 * U; j++) acc[r][j] = _mm256_setzero_ps();
    const uint16_t *base = wp + g0 * k * 16;
    for (int64_t i = 0; i < k; i++) {
        __m256 wv[2 * BF_UNITS];
        for (int j = 0; j < U; j++) {
            const __m256i both = _mm256_loadu_si256((const __m256i *)(base + (j * k + i) * 16));
            wv[2 * j] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(both)), 16));
            wv[2 * j + 1] = _mm256_castsi256_ps(
                _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(both, 1)), 16));
        }
        for (int r = 0; r < R; r++) {
            const __m256 xv = _mm256_set1_ps(x[r * k + i]);
            for (int j = 0; j < 2 * U; j++) acc[r][j] = _mm256_fmadd_ps(wv[j], xv, acc[r][j]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int j = 0; j < 2 * U; j++) _mm256_storeu_ps(out[r] + 8 * j, acc[r][j]);
#endif
}

#define BF_CASE(R, U) case (R) * 8 + (U): bf16_units(wp, k, g0, U, xr, R, out); break;
#if BF_UNITS > 2
#define BF_CASES(R) BF_CASE(R, 1) BF_CASE(R, 2) BF_CASE(R, 3) BF_CASE(R, 4)
#else
#define BF_CASES(R) BF_CASE(R, 1) BF_CASE(R, 2)
#endif

/* Unit u (groups BF_UNITS u ..) of the output for activation rows [r0, r1). */
static void bf16_output(const uint16_t *wp, int64_t n, int64_t k, int64_t u, const float *x, int64_t r0, int64_t r1,
                        void *y, int y_bf16) {
    const int64_t groups = (n + 15) / 16, g0 = u * BF_UNITS;
    const int U = groups - g0 < BF_UNITS ? (int)(groups - g0) : BF_UNITS;
    const int64_t first = 16 * g0, count = n - first < 16 * U ? n - first : 16 * U;
    for (int64_t r = r0; r < r1; r += BF_ROWS) {
        float out[BF_ROWS][16 * BF_UNITS];
        const int R = r1 - r < BF_ROWS ? (int)(r1 - r) : BF_ROWS;
        const float *xr = x + r * k;
        switch (R * 8 + U) {  /* constant R and U: each case compiled with its loops unrolled */
            BF_CASES(1)
            BF_CASES(2)
#if BF_ROWS > 2
            BF_CASES(3)
            BF_CASES(4)
#endif
#if BF_ROWS > 4
            BF_CASES(5)
            BF_CASES(6)
#endif
#if BF_ROWS > 6
            BF_CASES(7)
            BF_CASES(8)
#endif
            default: return;
        }
        for (int i = 0; i < R; i++)
            for (int64_t l = 0; l < count; l++) {
                if (y_bf16) ((uint16_t *)y)[(r + i) * n + first + l] = f32_to_bf16(out[i][l]);
                else ((float *)y)[(r + i) * n + first + l] = out[i][l];
            }
    }
}
#endif

/* y [M, N] = x [M, K] times W^T for W bf16 in the layout above; x and y fp32 (flag 0) or bf16 (1), rows
 * contiguous. Returns 0; -1 when this build has no kernel; -2 when out of memory. */
int oh_matmul_bf16(const uint16_t *wp, int64_t n, int64_t k, const void *x, int x_bf16, int64_t m, void *y,
                   int y_bf16, int threads) {
#if OH_KERNEL
    float *xf = NULL;
    const float *xs = (const float *)x;
    if (x_bf16) {
        xf = (float *)malloc(sizeof(float) * (size_t)(m * k));
        if (!xf) return -2;
        for (int64_t r = 0; r < m; r++) bf16_to_f32_row((const uint16_t *)x + r * k, k, xf + r * k);
        xs = xf;
    }
    const int64_t units = ((n + 15) / 16 + BF_UNITS - 1) / BF_UNITS;
    /* activation rows in chunks that stay in the L1 cache while the weights pass them (a prefill's rows) */
    const int64_t fit = BF_CHUNK_BYTES / (4 * k), chunk = fit < BF_ROWS ? BF_ROWS : fit - fit % BF_ROWS;
    for (int64_t r0 = 0; r0 < m; r0 += chunk) {
        const int64_t r1 = m - r0 < chunk ? m : r0 + chunk;
        if (threads > 1) {
            #pragma omp parallel for schedule(static) num_threads(threads)
            for (int64_t u = 0; u < units; u++) bf16_output(wp, n, k, u, xs, r0, r1, y, y_bf16);
        } else {
            for (int64_t u = 0; u < units; u++) bf16_output(wp, n, k, u, xs, r0, r1, y, y_bf16);
        }
    }
    free(xf);
    return 0;
#else
    (void)wp; (void)n; (void)k; (void)x; (void)x_bf16; (void)m; (void)y; (void)y_bf16; (void)threads;
    return -1;
#endif
}

/* y [M, K] = the RMS norm of each row of x [M, K] times w [K], fp32 (runtime/lowbit.py KernelRMSNorm): per row,
 * the sum of squares in 16 partial sums (element i in partial i % 16, each a chain of fmaf in k order) added in a
 * fixed tree, divided by K; r = 1 / sqrtf(mean + eps); y = (x * r) * w, rounded after each product as transformers'
 * fp32 RMSNorm (its sum runs in another order, so these are not its bits: every norm of a span that uses this one
 * is this one). Plain C with fmaf and IEEE sqrt and division, exactly rounded on every build: the AVX2 build's bits
 * are the AVX-512 build's, and a row's bits do not depend on the other rows. Returns 0. */
int oh_rms_norm(const float *x, const float *w, float eps, int64_t m, int64_t k, float *y) {
    for (int64_t r = 0; r < m; r++) {
        const float *xr = x + r * k;
        float *yr = y + r * k;
        float part[16] = {0};
        int64_t i = 0;
        for (; i + 16 <= k; i += 16)
            for (int j = 0; j < 16; j++) part[j] = fmaf(xr[i + j], xr[i + j], part[j]);
        for (int j = 0; i < k; i++, j++) part[j] = fmaf(xr[i], xr[i], part[j]);
        for (int width = 8; width > 0; width /= 2)
            for (int j = 0; j < width; j++) part[j] = part[j] + part[j + width];
        const float scale = 1.0f / sqrtf(part[0] / (float)k + eps);
        for (i = 0; i < k; i++) yr[i] = (xr[i] * scale) * w[i];
    }
    return 0;
}

/* ---- attention (runtime/lowbit.py attention, runtime/kernel_attention.py) ----------------------------------------
 * softmax(q k^T * scale) v for each query row, head and batch row on its own, in a fixed order of operations (built
 * with -ffp-contract=off: every multiply-add is written out, nothing else is fused): a row's bits depend only on its
 * own query and the keys and values it sees, never on how many rows, heads or batch rows a call takes or on the
 * thread count, and are the same on the AVX2 and AVX-512 builds. So a prefill, a decode step, a verify and a batched
 * step give a position the same bits. Per row: the scores s_t = dot16(q, k_t) * scale over the visible keys (16
 * partial sums of fmaf chains added in a fixed tree, as oh_rms_norm), m = max s_t, p_t = oh_expf(s_t - m), l = their
 * sum in 16 partial sums (position i in partial i % 16, a fixed tree), o = sum_t p_t v_t (a chain of fmaf per output
 * element in key order), then o / l. For speed, and changing no bit: 4 keys' dots at once, the exponentials and the
 * maximum in vector registers, and two rows' value sums interleaved over the keys they share. */

#if OH_KERNEL
/* The rest of dot16's tree once its 16 partial sums are 8 (partial j + partial j + 8): j + 4, then j + 2, j + 1. */
static inline float tree8(__m256 eight) {
    const __m128 four = _mm_add_ps(_mm256_castps256_ps128(eight), _mm256_extractf128_ps(eight, 1));
    const __m128 two = _mm_add_ps(four, _mm_movehl_ps(four, four));
    return _mm_cvtss_f32(_mm_add_ss(two, _mm_movehdup_ps(two)));
}

/* a . b for n a multiple of 16: 16 partial sums (element i in partial i % 16, each a chain of fmaf in order), added
 * in a fixed tree (partial j + partial j + 8, then j + 4, j + 2, j + 1): one 512-bit register or two 256-bit ones,
 * the same operations lane for lane. */
static inline float dot16(const float *a, const float *b, int64_t n) {
#if OH_VNNI
    __m512 part = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) part = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), part);
    const __m256 eight = _mm256_add_ps(_mm512_castps512_ps256(part), _mm512_extractf32x8_ps(part, 1));
#else
    __m256 low = _mm256_setzero_ps(), high = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
        low = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), low);
        high = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), high);
    }
    const __m256 eight = _mm256_add_ps(low, high);
#endif
    return tree8(eight);
}

/* dot16 of q with 4 keys at once (their chains interleaved; each key's operations are dot16's). */
static inline void dot16x4(const float *a, const float *const b[4], int64_t n, float out[4]) {
#if OH_VNNI
    __m512 part[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t i = 0; i < n; i += 16) {
        const __m512 x = _mm512_loadu_ps(a + i);
        for (int t = 0; t < 4; t++) part[t] = _mm512_fmadd_ps(x, _mm512_loadu_ps(b[t] + i), part[t]);
    }
    for (int t = 0; t < 4; t++) {
        const __m256 eight = _mm256_add_ps(_mm512_castps512_ps256(part[t]), _mm512_extractf32x8_ps(part[t], 1));
#else
    __m256 low[4], high[4];
    for (int t = 0; t < 4; t++) low[t] = high[t] = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
        const __m256 x0 = _mm256_loadu_ps(a + i), x1 = _mm256_loadu_ps(a + i + 8);
        for (int t = 0; t < 4; t++) {
            low[t] = _mm256_fmadd_ps(x0, _mm256_loadu_ps(b[t] + i), low[t]);
            high[t] = _mm256_fmadd_ps(x1, _mm256_loadu_ps(b[t] + i + 8), high[t]);
        }
    }
    for (int t = 0; t < 4; t++) {
        const __m256 eight = _mm256_add_ps(low[t], high[t]);
#endif
        out[t] = tree8(eight);
    }
}

/* e^x for x <= 0 (a score minus the row's maximum), Cephes' expf: n = round(x log2 e), r = x - n ln 2 in two
 * parts, a degree-7 polynomial in r, times 2^n; within 2 ulp of e^x. x is clamped at -87 (e^-87 ~ 1.6e-38, the
 * smallest normal float's order): what it adds to a sum of ones and more is nothing. The same operations on every
 * build; exp_shifted runs them in vector registers and this for its last few. NaN stays NaN. */
static inline float oh_expf(float x) {
    if (x != x) return x;  /* NaN (converting it to an integer below would be undefined) */
    x = x < -87.0f ? -87.0f : x;
    const float n = rintf(x * 1.44269504088896341f);
    float r = fmaf(n, -0.693359375f, x);
    r = fmaf(n, 2.12194440e-4f, r);
    float p = 1.9875691500e-4f;
    p = fmaf(p, r, 1.3981999507e-3f);
    p = fmaf(p, r, 8.3334519073e-3f);
    p = fmaf(p, r, 4.1665795894e-2f);
    p = fmaf(p, r, 1.6666665459e-1f);
    p = fmaf(p, r, 5.0000001201e-1f);
    p = fmaf(p, r * r, r) + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return p * two_n;
}

/* x[i] = oh_expf(x[i] - m) for i < n: the same operations lane by lane in vector registers (the compiler left the
 * scalar loop unvectorized on AVX2), the last few by oh_expf itself. */
static inline void exp_shifted(float *x, int64_t n, float m) {
    enum { LANES = (int)(sizeof(vf) / sizeof(float)) };
    const vf shift = VF_SET1(m), floor = VF_SET1(-87.0f), log2e = VF_SET1(1.44269504088896341f);
    const vf c1 = VF_SET1(-0.693359375f), c2 = VF_SET1(2.12194440e-4f), one = VF_SET1(1.0f);
    const vf p0 = VF_SET1(1.9875691500e-4f), p1 = VF_SET1(1.3981999507e-3f), p2 = VF_SET1(8.3334519073e-3f);
    const vf p3 = VF_SET1(4.1665795894e-2f), p4 = VF_SET1(1.6666665459e-1f), p5 = VF_SET1(5.0000001201e-1f);
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        vf v = VF_MAX(floor, VF_SUB(VF_LOADU(x + i), shift));  /* x < -87 ? -87 : x, NaN kept (the second operand) */
        const vf k = VF_ROUND(VF_MUL(v, log2e));
        vf r = VF_FMA(k, c1, v);
        r = VF_FMA(k, c2, r);
        vf y = VF_FMA(p0, r, p1);
        y = VF_FMA(y, r, p2);
        y = VF_FMA(y, r, p3);
        y = VF_FMA(y, r, p4);
        y = VF_FMA(y, r, p5);
        y = VF_ADD(VF_FMA(y, VF_MUL(r, r), r), one);
        VF_STORE(x + i, VF_MUL(y, VF_POW2(k)));
    }
    for (; i < n; i++) x[i] = oh_expf(x[i] - m);
}

/* The largest of x [n > 0]: exact in any order, so in 16 lanes (the scalar chain of compares was a quarter of a long
 * prefill's attention). */
static float max_of(const float *x, int64_t n) {
    float lane[16];
    for (int j = 0; j < 16; j++) lane[j] = x[0];
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) lane[j] = x[i + j] > lane[j] ? x[i + j] : lane[j];
    for (int j = 0; i < n; i++, j++) lane[j] = x[i] > lane[j] ? x[i] : lane[j];
    float m = lane[0];
    for (int j = 1; j < 16; j++) m = lane[j] > m ? lane[j] : m;
    return m;
}

static float sum16(const float *x, int64_t n) {
    float part[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) part[j] = part[j] + x[i + j];
    for (int j = 0; i < n; i++, j++) part[j] = part[j] + x[i];
    for (int width = 8; width > 0; width /= 2)
        for (int j = 0; j < width; j++) part[j] = part[j] + part[j + width];
    return part[0];
}

/* acc[r] [D] += sum over i < n of p[r][i] v[keys[i]] for R = 1 or 2 rows over the same keys, each element a chain of
 * fmaf in key order (two rows: their chains interleaved, each row's operations those of it alone). The sums stay in
 * registers across the keys, a slice of columns at a time (constant register counts); acc is read and written in
 * memory between calls, which changes no bit (a float stored and loaded back is the same float), so a row's chain
 * may run over several calls. D is a multiple of 16. */
#define WEIGH(R, W)                                                                                                   \
    do {                                                                                                              \
        for (; j0 + (W) * LANES <= D; j0 += (W) * LANES) {                                                            \
            vf sum[R][W];                                                                                             \
            for (int r = 0; r < (R); r++)                                                                             \
                for (int c = 0; c < (W); c++) sum[r][c] = VF_LOADU(acc[r] + j0 + LANES * c);                          \
            for (int64_t i = 0; i < n; i++) {                                                                         \
                const float *vr = v + (int64_t)keys[i] * stride + j0;                                                 \
                vf w[R];                                                                                              \
                for (int r = 0; r < (R); r++) w[r] = VF_SET1(p[r][i]);                                                \
                for (int c = 0; c < (W); c++) {                                                                       \
                    const vf x = VF_LOADU(vr + LANES * c);                                                            \
                    for (int r = 0; r < (R); r++) sum[r][c] = VF_FMA(w[r], x, sum[r][c]);                             \
                }                                                                                                     \
            }                                                                                                         \
            for (int r = 0; r < (R); r++)                                                                             \
                for (int c = 0; c < (W); c++) VF_STORE(acc[r] + j0 + LANES * c, sum[r][c]);                           \
        }                                                                                                             \
    } while (0)

static inline void weigh_one(const float *const p[1], const int32_t *keys, int64_t n, const float *v, int64_t stride,
                             int64_t D, float *const acc[1]) {
    enum { LANES = (int)(sizeof(vf) / sizeof(float)) };
    int64_t j0 = 0;
    WEIGH(1, 64 / LANES);  /* 4 or 8 chains per key */
    WEIGH(1, 16 / LANES);  /* the last 16, 32 or 48 columns */
}

static inline void weigh_two(const float *const p[2], const int32_t *keys, int64_t n, const float *v, int64_t stride,
                             int64_t D, float *const acc[2]) {
    enum { LANES = (int)(sizeof(vf) / sizeof(float)) };
    int64_t j0 = 0;
    WEIGH(2, 4);  /* 8 chains per key: 64 columns on AVX-512, 32 on AVX2 */
    WEIGH(2, 1);
}

/* A query row (batch row b, head h, position s) up to its weights: its visible keys (keys, n), softmax weights p =
 * oh_expf(score - max) (in scores) and their sum (total), where its values are (vb) and its output goes (o). */
typedef struct {
    const float *vb;
    float *o;
    float *scores;
    int32_t *keys;
    int64_t n;
    float total;
} oh_row;

static void prepare_row(const float *q, const float *k, const float *v, const uint8_t *mask, const int64_t *p,
                        float scale, int64_t r, oh_row *row) {
    const int64_t hq = p[1], hkv = p[2], S = p[3], T = p[4], D = p[5], causal = p[19];
    const int64_t b = r / (hq * S), h = r / S % hq, s = r % S, kvh = h / (hq / hkv);
    const float *qr = q + b * p[6] + h * p[7] + s * p[8];
    const float *kb = k + b * p[9] + kvh * p[10];
    const uint8_t *mr = mask ? mask + b * p[15] + h * p[16] + s * p[17] : NULL;
    float *scores = row->scores;
    int32_t *keys = row->keys;
    row->vb = v + b * p[12] + kvh * p[13];
    int64_t last = causal < 0 ? T - 1 : s + causal;
    if (last > T - 1) last = T - 1;
    int64_t n = 0;
    if (mr) {
        for (int64_t t = 0; t <= last; t++)
            if (mr[t * p[18]]) keys[n++] = (int32_t)t;
    } else {
        for (int64_t t = 0; t <= last; t++) keys[t] = (int32_t)t;
        n = last + 1 > 0 ? last + 1 : 0;
    }
    int64_t i = 0;  /* the visible keys' scores, 4 at a time (the same bits as one at a time) */
    for (; i + 4 <= n; i += 4) {
        const float *rows4[4] = {kb + (int64_t)keys[i] * p[11], kb + (int64_t)keys[i + 1] * p[11],
                                 kb + (int64_t)keys[i + 2] * p[11], kb + (int64_t)keys[i + 3] * p[11]};
        float dots[4];
        dot16x4(qr, rows4, D, dots);
        for (int t = 0; t < 4; t++) scores[i + t] = dots[t] * scale;
    }
    for (; i < n; i++) scores[i] = dot16(qr, kb + (int64_t)keys[i] * p[11], D) * scale;
    row->n = n;
    if (n == 0) return;
    exp_shifted(scores, n, max_of(scores, n));
    row->total = sum16(scores, n);
}

/* Rows [first, end), two at a time: both prepared, then their values weighed together over the keys they share
 * from the first (a prefill's neighbouring positions, a decode step's heads of one key head), then each alone over
 * the rest; o = acc / total. Per row, exactly the operations of the row alone. scratch: 2 x (2T + D) floats. */
static void attend_rows(const float *q, const float *k, const float *v, const uint8_t *mask, const int64_t *p,
                        float scale, int64_t first, int64_t end, float *scratch, float *out) {
    const int64_t hq = p[1], S = p[3], T = p[4] > 0 ? p[4] : 1, D = p[5];
    oh_row rows[2];
    float *acc[2];
    for (int r = 0; r < 2; r++) {
        rows[r].scores = scratch + r * (2 * T + D);
        rows[r].keys = (int32_t *)(rows[r].scores + T);
        acc[r] = rows[r].scores + 2 * T;
    }
    for (int64_t r = first; r < end; r += 2) {
        const int count = end - r >= 2 ? 2 : 1;
        for (int c = 0; c < count; c++) {
            const int64_t row = r + c, b = row / (hq * S), h = row / S % hq, s = row % S;
            prepare_row(q, k, v, mask, p, scale, row, &rows[c]);
            rows[c].o = out + ((b * S + s) * hq + h) * D;
            memset(acc[c], 0, sizeof(float) * (size_t)D);
        }
        int64_t shared = 0;
        if (count == 2 && rows[0].vb == rows[1].vb) {
            const int64_t most = rows[0].n < rows[1].n ? rows[0].n : rows[1].n;
            while (shared < most && rows[0].keys[shared] == rows[1].keys[shared]) shared++;
            const float *const weights[2] = {rows[0].scores, rows[1].scores};
            weigh_two(weights, rows[0].keys, shared, rows[0].vb, p[14], D, acc);
        }
        for (int c = 0; c < count; c++) {
            oh_row *row = &rows[c];
            if (row->n == 0) {  /* no visible key */
                memset(row->o, 0, sizeof(float) * (size_t)D);
                continue;
            }
            const float *const weights[1] = {row->scores + shared};
            float *const sums[1] = {acc[c]};
            weigh_one(weights, row->keys + shared, row->n - shared, row->vb, p[14], D, sums);
            const vf divisor = VF_SET1(row->total);
            enum { LANES = (int)(sizeof(vf) / sizeof(float)) };
            for (int64_t j = 0; j < D; j += LANES) VF_STORE(row->o + j, VF_DIV(VF_LOADU(acc[c] + j), divisor));
        }
    }
}

/* out = attention over q [B, Hq, S, D], k and v [B, Hkv, T, D] (each row computed by attend_row, the same way
 * whatever the call). p: B, Hq, Hkv, S, T, D at 0..5; strides in elements: q (b, h, s) at 6..8, k (b, h, t) at
 * 9..11, v (b, h, t) at 12..14, mask (b, h, s, t) at 15..18; at 19 "causal": query s sees keys t <= s + causal
 * (-1: every key; PyTorch's is_causal is 0, aligned to the first key). The last dimension of q, k and v is
 * contiguous. mask: NULL, or one byte per (b, h, s, t) through its strides (0 for a broadcast dimension), nonzero =
 * visible. Query head h reads key head h / (Hq / Hkv). out [B, S, Hq, D] contiguous (what transformers' attention
 * functions return). A row with no visible key gets zeros. Returns 0; -2 when out of memory; -3 on bad sizes. */
#endif

int oh_attention(const float *q, const float *k, const float *v, const uint8_t *mask, const int64_t *p, float scale,
                 int threads, float *out) {
#if !OH_KERNEL
    (void)q; (void)k; (void)v; (void)mask; (void)p; (void)scale; (void)threads; (void)out;
    return -1;
#else
    const int64_t B = p[0], hq = p[1], hkv = p[2], S = p[3], T = p[4], D = p[5];
    if (B < 0 || S < 0 || T < 0 || D <= 0 || hkv <= 0 || hq <= 0 || hq % hkv != 0 || D % 16 != 0 || T > INT32_MAX)
        return -3;
    const int64_t rows = B * hq * S, per = 2 * (2 * (T > 0 ? T : 1) + D);  /* scratch floats per part */
    if (rows == 0) return 0;
    const int64_t parts = threads > 1 ? (rows < threads ? rows : threads) : 1;
    float *scratch = (float *)malloc(sizeof(float) * (size_t)(per * parts));
    if (!scratch) return -2;
    /* rows split into `parts` contiguous ranges, one per thread, each with its own scratch; no OpenMP region for
     * one part (entering one costs about a microsecond) */
    if (parts > 1) {
        #pragma omp parallel for schedule(static) num_threads(parts)
        for (int64_t part = 0; part < parts; part++)
            attend_rows(q, k, v, mask, p, scale, rows * part / parts, rows * (part + 1) / parts, scratch + part * per,
                        out);
    } else {
        attend_rows(q, k, v, mask, p, scale, 0, rows, scratch, out);
    }
    free(scratch);
    return 0;
#endif
}

#if OH_KERNEL
/* Row r of oh_attention_rows: oh_attention's parameters for that session's cache, then its rows (one per head). */
static void attend_session_row(const float *q, int64_t q_row, int64_t q_head, const float *const *k,
                               const float *const *v, const int64_t *meta, int64_t hq, int64_t hkv, int64_t D,
                               float scale, int64_t r, float *scratch, float *out) {
    const int64_t *m = meta + 5 * r;
    const int64_t p[20] = {1, hq, hkv, 1, m[0], D, 0, q_head, 0, 0, m[1], m[2], 0, m[3], m[4], 0, 0, 0, 0, -1};
    attend_rows(q + r * q_row, k[r], v[r], NULL, p, scale, 0, hq, scratch, out + r * hq * D);
}

/* Whether oh_attention_rows' sizes are ones it computes, every T_r at least ``least`` (appending calls need 1). */
static int rows_sizes_ok(int64_t R, const int64_t *meta, int64_t hq, int64_t hkv, int64_t D, int64_t least) {
    if (R < 0 || D <= 0 || hkv <= 0 || hq <= 0 || hq % hkv != 0 || D % 16 != 0) return 0;
    for (int64_t r = 0; r < R; r++)
        if (meta[5 * r] < least || meta[5 * r] > INT32_MAX) return 0;
    return 1;
}
#endif

/* oh_attention for R one-position rows, each over its own keys and values (continuous batching: each row a session
 * with its own cache): row r is q + r * q_row [Hq, D] (heads q_head apart), its keys k[r] and values v[r] [Hkv, T_r,
 * D] with meta[5 r ..] = T_r, then the key strides (head, position), then the value strides. out [R, Hq, D]
 * contiguous. Each row is computed exactly as oh_attention computes it alone. Returns 0, -2 out of memory, -3 bad
 * sizes. */
int oh_attention_rows(const float *q, int64_t q_row, int64_t q_head, int64_t R, const float *const *k,
                      const float *const *v, const int64_t *meta, int64_t hq, int64_t hkv, int64_t D, float scale,
                      int threads, float *out) {
#if !OH_KERNEL
    (void)q; (void)q_row; (void)q_head; (void)R; (void)k; (void)v; (void)meta; (void)hq; (void)hkv; (void)D;
    (void)scale; (void)threads; (void)out;
    return -1;
#else
    if (!rows_sizes_ok(R, meta, hq, hkv, D, 0)) return -3;
    int64_t most = 1;
    for (int64_t r = 0; r < R; r++) most = meta[5 * r] > most ? meta[5 * r] : most;
    const int64_t per = 2 * (2 * most + D);
    const int64_t parts = threads > 1 ? (R < threads ? (R > 0 ? R : 1) : threads) : 1;
    float *scratch = (float *)malloc(sizeof(float) * (size_t)(per * parts));
    if (!scratch) return -2;
    if (parts > 1) {
        #pragma omp parallel for schedule(static) num_threads(parts)
        for (int64_t part = 0; part < parts; part++)
            for (int64_t r = R * part / parts; r < R * (part + 1) / parts; r++)
                attend_session_row(q, q_row, q_head, k, v, meta, hq, hkv, D, scale, r, scratch + part * per, out);
    } else {  /* no OpenMP region for one thread (entering one costs about a microsecond) */
        for (int64_t r = 0; r < R; r++)
            attend_session_row(q, q_row, q_head, k, v, meta, hq, hkv, D, scale, r, scratch, out);
    }
    free(scratch);
    return 0;
#endif
}

/* oh_attention_rows after appending each row's new position to its own cache (a batched decode step's appends and
 * attention in one call, runtime/lowbit.py append_attention_rows): row r's new key kn + r * kn_row and value
 * vn + r * vn_row [Hkv, D] (heads kn_head / vn_head apart) are copied to position T_r - 1 of k[r] and v[r] (meta as
 * oh_attention_rows': T_r counts the new position), all rows before any attends, then oh_attention_rows. The copies
 * are exact, so every row has the bits of an append followed by oh_attention_rows. Two rows must not share a cache.
 * Returns as oh_attention_rows. */
int oh_append_attention_rows(const float *q, int64_t q_row, int64_t q_head, const float *kn, int64_t kn_row,
                             int64_t kn_head, const float *vn, int64_t vn_row, int64_t vn_head, int64_t R,
                             float *const *k, float *const *v, const int64_t *meta, int64_t hq, int64_t hkv,
                             int64_t D, float scale, int threads, float *out) {
#if !OH_KERNEL
    (void)q; (void)q_row; (void)q_head; (void)kn; (void)kn_row; (void)kn_head; (void)vn; (void)vn_row;
    (void)vn_head; (void)R; (void)k; (void)v; (void)meta; (void)hq; (void)hkv; (void)D; (void)scale; (void)threads;
    (void)out;
    return -1;
#else
    if (!rows_sizes_ok(R, meta, hq, hkv, D, 1)) return -3;  /* checked before anything is written */
    for (int64_t r = 0; r < R; r++) {
        const int64_t *m = meta + 5 * r;
        for (int64_t h = 0; h < hkv; h++) {
            memcpy(k[r] + h * m[1] + (m[0] - 1) * m[2], kn + r * kn_row + h * kn_head, sizeof(float) * (size_t)D);
            memcpy(v[r] + h * m[3] + (m[0] - 1) * m[4], vn + r * vn_row + h * vn_head, sizeof(float) * (size_t)D);
        }
    }
    return oh_attention_rows(q, q_row, q_head, R, (const float *const *)k, (const float *const *)v, meta, hq, hkv, D,
                             scale, threads, out);
#endif
}
