/*
 * CPU kernels for the quantised levels of the Holo modules (loaded through ctypes).
 *
 * Why a C file: torch's CPU weight-only kernels cover one 4-bit stage in bf16 activations
 * (`_weight_int4pack_mm_for_cpu`); the 8-bit level is two stages, and decoding the fragments
 * with torch ops costs several elementwise passes over the weight per call. These kernels read
 * the fragments as stored (no repacking, so the resident bytes stay the fragments' bytes):
 *
 *   ta_linear       out = rot(x) · W_levelᵀ for a few input rows, reading each weight row's
 *                   nibbles once per 4 input rows;
 *   ta_decode_rows  rows of the rotated W_level in fp32 (chunks for a dense matmul);
 *   ta_weight_rows  rows of W_level itself, un-rotated (a conv's weight, an embedding lookup);
 *   ta_rotate_rows  the input's incoherence rotation (x ⊙ s)·H.
 * The rotations run as fast Walsh-Hadamard transforms instead of dense matmuls by H.
 *
 * Values: w = (q₁ - 8)·s₁ + z₁ [+ (q₂ - 7.5)·s₂], s₂ = s₁·2^(r/32 - 8); a symmetric level 1
 * has z₁ = s₁/2. The sums run in fp32. Single-threaded; AVX2+FMA only: on other CPUs
 * ta_isa() returns 0 and Python keeps its torch decode path.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TA_KERNELS_ABI 2

typedef struct {
    int64_t out_features;
    int64_t in_features;
    int64_t padded;      /* Kp: codes per row */
    int64_t group_size;  /* a multiple of 32 */
    const uint8_t *hi;   /* [out, Kp/2] level-1 nibbles, even index in the low nibble */
    const uint8_t *lo;   /* [out, Kp/2] level-2 nibbles, or NULL for level 1 */
    const uint16_t *scales;   /* bf16 [G, out, pairs]: scale (, zero) */
    int64_t pairs;            /* 1 (symmetric) or 2 */
    const uint8_t *lo_ratio;  /* [G, out], read when lo != NULL */
    const uint8_t *signs;     /* [ceil(Kp/8)] rotation sign bits: bit k%8 of byte k/8 set = -1 */
    int64_t block;            /* Hadamard block (1: not rotated) */
} ta_codes;

int ta_abi_version(void) { return TA_KERNELS_ABI; }

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

/* 2^(r/32 - 8) for each lo_ratio code r, filled by ta_isa() (which Python calls before any kernel). */
static float ratio_values[256];
/* The 8 signs (+-1) a byte of packed rotation signs holds, bit j first; filled by ta_isa(). */
static float sign_values[256][8];

static float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* One group's grid: value = q₁·a₁ + b (+ q₂·a₂). */
typedef struct {
    float a1, a2, b;
} group_grid;

static group_grid grid_of(const ta_codes *c, int64_t group, int64_t row) {
    int64_t at = group * c->out_features + row;
    group_grid grid;
    float scale = bf16_to_float(c->scales[at * c->pairs]);
    float zero = c->pairs == 2 ? bf16_to_float(c->scales[at * c->pairs + 1]) : scale / 2;
    grid.a1 = scale;
    grid.b = zero - 8 * scale;
    grid.a2 = 0;
    if (c->lo) {
        grid.a2 = scale * ratio_values[c->lo_ratio[at]];
        grid.b += -7.5f * grid.a2;
    }
    return grid;
}


#define TA_AVX2 __attribute__((target("avx2,fma")))

/* In place, unnormalised: v = v·H for one Hadamard block, a power of two >= 32 (the kernels
 * take group sizes that are multiples of 32, so Kp and its largest power-of-two block are too). */
TA_AVX2 static void fwht_block(float *v, int64_t block) {
    /* Butterflies of span 1, 2 and 4 inside each 8-lane vector: lanes of the upper half of a
     * span take partner - self, the lower ones self + partner. */
    for (int64_t i = 0; i < block; i += 8) {
        __m256 x = _mm256_loadu_ps(v + i);
        __m256 partner = _mm256_permute_ps(x, 0xB1);
        x = _mm256_blend_ps(_mm256_add_ps(x, partner), _mm256_sub_ps(partner, x), 0xAA);
        partner = _mm256_permute_ps(x, 0x4E);
        x = _mm256_blend_ps(_mm256_add_ps(x, partner), _mm256_sub_ps(partner, x), 0xCC);
        partner = _mm256_permute2f128_ps(x, x, 0x01);
        x = _mm256_blend_ps(_mm256_add_ps(x, partner), _mm256_sub_ps(partner, x), 0xF0);
        _mm256_storeu_ps(v + i, x);
    }
    for (int64_t h = 8; h < block; h *= 2)
        for (int64_t i = 0; i < block; i += 2 * h)
            for (int64_t j = i; j < i + h; j += 8) {
                __m256 a = _mm256_loadu_ps(v + j), b = _mm256_loadu_ps(v + j + h);
                _mm256_storeu_ps(v + j, _mm256_add_ps(a, b));
                _mm256_storeu_ps(v + j + h, _mm256_sub_ps(a, b));
            }
}

/* v[k] *= scale·s[k] for k < n, s the packed rotation signs: 8 signs per table row, so the loop
 * over a byte's 8 values vectorises. A bit test per value made HoloEmbedding's int4 rows for 128
 * tokens 8.9x the nn.Embedding lookup, this 4.8x (bench_nn.py --quick; int8 signs measured 4.0x). */
TA_AVX2 static void multiply_signs(float *v, int64_t n, const uint8_t *signs, float scale) {
    int64_t whole = n & ~(int64_t)7;
    for (int64_t k = 0; k < whole; k += 8) {
        const float *s = sign_values[signs[k >> 3]];
        for (int j = 0; j < 8; j++) v[k + j] *= scale * s[j];
    }
    for (int64_t k = whole; k < n; k++) v[k] *= scale * sign_values[signs[k >> 3]][k & 7];
}

/* out[m] = blockwise ((x[m] zero-padded to Kp) ⊙ s) · H, H the orthonormal Sylvester Hadamard. */
TA_AVX2 void ta_rotate_rows(const float *x, int64_t rows, int64_t in_features, const uint8_t *signs,
                            int64_t padded, int64_t block, float *out) {
    float norm = 1.0f / sqrtf((float)block);
    for (int64_t m = 0; m < rows; m++) {
        float *row = out + m * padded;
        const float *src = x + m * in_features;
        memcpy(row, src, sizeof(float) * (size_t)in_features);
        multiply_signs(row, in_features, signs, 1.0f);
        for (int64_t k = in_features; k < padded; k++) row[k] = 0;
        if (block > 1) {
            for (int64_t start = 0; start < padded; start += block) fwht_block(row + start, block);
            for (int64_t k = 0; k < padded; k++) row[k] *= norm;
        }
    }
}

/* row = blockwise (row · H) ⊙ s, in place (the inverse of the rotation). */
TA_AVX2 static void unrotate_row(float *row, int64_t padded, const uint8_t *signs, int64_t block) {
    float norm = 1.0f / sqrtf((float)block);
    if (block > 1)
        for (int64_t start = 0; start < padded; start += block) fwht_block(row + start, block);
    multiply_signs(row, padded, signs, norm);
}

/* 32 codes from 16 packed bytes, in order, as four vectors of 8 floats. */
TA_AVX2 static inline void codes32(const uint8_t *packed, __m256 out[4]) {
    const __m128i low4 = _mm_set1_epi8(0x0F);
    __m128i bytes = _mm_loadu_si128((const __m128i *)packed);
    __m128i even = _mm_and_si128(bytes, low4);
    __m128i odd = _mm_and_si128(_mm_srli_epi16(bytes, 4), low4);
    __m128i first = _mm_unpacklo_epi8(even, odd);
    __m128i second = _mm_unpackhi_epi8(even, odd);
    out[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(first));
    out[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(first, 8)));
    out[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(second));
    out[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(second, 8)));
}

TA_AVX2 static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/*
 * ta_linear works on blocks of 64 codes (32 bytes) and multiplies them as integers: the input
 * row is rounded to int16 with one scale per 32 values (relative error <= 2^-16 of that run's
 * largest value, far below a 4- or 8-bit weight's), and a block's codes are read as 16-bit
 * words, word l holding codes 4l .. 4l+3. So (word >> 4e) & 15 are the codes 4l + e, and the
 * input is stored in that order (block t: x[64t + 4l + e] at 64t + 16e + l), which turns the
 * nibble unpacking into one shift and one mask per 16 codes, followed by vpmaddwd. The int32
 * lanes 0-3 of a block sum its first 32 codes, lanes 4-7 the next 32, so every 32-code run
 * gets its own scale: group sizes that are multiples of 32 all work.
 */
#define TA_BLOCK 64
#define TA_RUN 32
#define TA_ROWS 4

typedef struct {
    __m256i part[4];
} block_codes;

TA_AVX2 static inline block_codes load_block(const uint8_t *packed) {
    const __m256i low4 = _mm256_set1_epi16(0x000F);
    __m256i words = _mm256_loadu_si256((const __m256i *)packed);
    block_codes codes;
    codes.part[0] = _mm256_and_si256(words, low4);
    codes.part[1] = _mm256_and_si256(_mm256_srli_epi16(words, 4), low4);
    codes.part[2] = _mm256_and_si256(_mm256_srli_epi16(words, 8), low4);
    codes.part[3] = _mm256_srli_epi16(words, 12);
    return codes;
}

/* Σ x·q of a block per 32-code run, as int32 lanes (0-3: first run, 4-7: second). */
TA_AVX2 static inline __m256 block_dot(const block_codes *codes, const int16_t *x) {
    __m256i sum = _mm256_madd_epi16(codes->part[0], _mm256_load_si256((const __m256i *)x));
    for (int e = 1; e < 4; e++)
        sum = _mm256_add_epi32(sum, _mm256_madd_epi16(codes->part[e], _mm256_load_si256((const __m256i *)(x + 16 * e))));
    return _mm256_cvtepi32_ps(sum);
}

/* The rows' input in the kernel's form: int16 values per block order, scales, run sums. */
typedef struct {
    int16_t *values;    /* [rows, Kp], 32-byte aligned */
    float *run_scale;   /* [rows, Kp/64, 8]: each run's int16 step, spread over its 4 lanes */
    float *run_sum;     /* [rows, Kp/32]: Σ x of each run (fp32, for the grids' offsets) */
} packed_input;

TA_AVX2 static int pack_input(const ta_codes *c, const float *x, int64_t rows, packed_input *in) {
    int64_t padded = c->padded, blocks = padded / TA_BLOCK, runs = padded / TA_RUN;
    in->values = aligned_alloc(32, sizeof(int16_t) * (size_t)(rows * padded));
    in->run_scale = malloc(sizeof(float) * (size_t)(rows * blocks * 8));
    in->run_sum = malloc(sizeof(float) * (size_t)(rows * runs));
    float *rotated = malloc(sizeof(float) * (size_t)padded);
    if (!in->values || !in->run_scale || !in->run_sum || !rotated) {
        free(rotated);
        return -1;
    }
    for (int64_t m = 0; m < rows; m++) {
        ta_rotate_rows(x + m * c->in_features, 1, c->in_features, c->signs, padded, c->block, rotated);
        for (int64_t run = 0; run < runs; run++) {
            const float *v = rotated + run * TA_RUN;
            float largest = 0, sum = 0;
            for (int k = 0; k < TA_RUN; k++) {
                largest = fmaxf(largest, fabsf(v[k]));
                sum += v[k];
            }
            float step = largest / 32767.0f, inverse = largest > 0 ? 32767.0f / largest : 0;
            int64_t t = run / 2, half = run % 2;
            int16_t *out = in->values + m * padded + t * TA_BLOCK;
            for (int k = 0; k < TA_RUN; k++) {
                int64_t l = 8 * half + k / 4, e = k % 4;
                out[16 * e + l] = (int16_t)lrintf(v[k] * inverse);
            }
            for (int lane = 0; lane < 4; lane++) in->run_scale[(m * blocks + t) * 8 + 4 * half + lane] = step;
            in->run_sum[m * runs + run] = sum;
        }
    }
    free(rotated);
    return 0;
}

/*
 * The grids of TA_COLS consecutive output rows, one vector per group (the stored scales are
 * [G, out, pairs], so a group's rows are contiguous): per-row scalar work on the grids would
 * cost as much as the row's dot product at one input row.
 */
#define TA_COLS 8

typedef struct {
    float *a1, *a2, *b;  /* [G, TA_COLS] */
} chunk_grids;

TA_AVX2 static void load_grids(const ta_codes *c, int64_t n0, chunk_grids *grids) {
    int64_t groups = c->padded / c->group_size;
    for (int64_t g = 0; g < groups; g++) {
        int64_t at = g * c->out_features + n0;
        __m256 scale, zero;
        if (c->pairs == 2) {
            __m256i pairs = _mm256_loadu_si256((const __m256i *)(c->scales + 2 * at));
            scale = _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16));
            zero = _mm256_castsi256_ps(_mm256_and_si256(pairs, _mm256_set1_epi32((int)0xFFFF0000u)));
        } else {
            __m128i half = _mm_loadu_si128((const __m128i *)(c->scales + at));
            scale = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
            zero = _mm256_mul_ps(scale, _mm256_set1_ps(0.5f));
        }
        __m256 b = _mm256_fnmadd_ps(scale, _mm256_set1_ps(8.0f), zero);
        __m256 a2 = _mm256_setzero_ps();
        if (c->lo) {
            __m128i codes = _mm_loadl_epi64((const __m128i *)(c->lo_ratio + at));
            a2 = _mm256_mul_ps(scale, _mm256_i32gather_ps(ratio_values, _mm256_cvtepu8_epi32(codes), 4));
            b = _mm256_fnmadd_ps(a2, _mm256_set1_ps(7.5f), b);
        }
        _mm256_storeu_ps(grids->a1 + g * TA_COLS, scale);
        _mm256_storeu_ps(grids->a2 + g * TA_COLS, a2);
        _mm256_storeu_ps(grids->b + g * TA_COLS, b);
    }
}

/* A block's per-lane values of one grid column: lanes 0-3 from its first run's group, 4-7 the second's. */
TA_AVX2 static inline __m256 block_lanes(const float *column, int64_t group_a, int64_t group_b) {
    __m256 first = _mm256_broadcast_ss(column + group_a * TA_COLS);
    __m256 second = _mm256_broadcast_ss(column + group_b * TA_COLS);
    return _mm256_blend_ps(first, second, 0xF0);
}

/* acc[r] += one stage's block t (codes, per-lane grid scale) against input rows m0 + r. */
TA_AVX2 static inline __attribute__((always_inline)) void add_stage(
        __m256 *acc, int nr, const block_codes *codes, __m256 scale, const packed_input *in, int64_t m0,
        int64_t t, int64_t padded, int64_t blocks) {
    for (int r = 0; r < nr; r++) {
        const int16_t *x = in->values + (m0 + r) * padded + t * TA_BLOCK;
        __m256 step = _mm256_loadu_ps(in->run_scale + ((m0 + r) * blocks + t) * 8);
        acc[r] = _mm256_fmadd_ps(block_dot(codes, x), _mm256_mul_ps(scale, step), acc[r]);
    }
}

/* Σ_k over the codes of output row n for up to TA_ROWS input rows m0.. (nr a constant after inlining). */
TA_AVX2 static inline __attribute__((always_inline)) void rows_dot(
        const ta_codes *c, const packed_input *in, int64_t m0, int nr, int64_t n, const chunk_grids *grids,
        int64_t column, const int64_t *run_group, float *out) {
    int64_t padded = c->padded, blocks = padded / TA_BLOCK;
    const uint8_t *hi = c->hi + n * (padded / 2);
    const uint8_t *lo = c->lo ? c->lo + n * (padded / 2) : NULL;
    __m256 acc[TA_ROWS];
    for (int r = 0; r < nr; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t t = 0; t < blocks; t++) {
        int64_t group_a = run_group[2 * t], group_b = run_group[2 * t + 1];
        block_codes first = load_block(hi + t * TA_BLOCK / 2);
        add_stage(acc, nr, &first, block_lanes(grids->a1 + column, group_a, group_b), in, m0, t, padded, blocks);
        if (lo) {
            block_codes second = load_block(lo + t * TA_BLOCK / 2);
            add_stage(acc, nr, &second, block_lanes(grids->a2 + column, group_a, group_b), in, m0, t, padded, blocks);
        }
    }
    for (int r = 0; r < nr; r++) out[(m0 + r) * c->out_features + n] += hsum(acc[r]);
}

/* out[m, n0 .. n0+7] = Σ_g b[g, n]·(Σx over group g of row m): the grids' offsets, 8 rows at once. */
TA_AVX2 static void add_offsets(const ta_codes *c, const packed_input *in, int64_t rows, int64_t n0,
                                const chunk_grids *grids, float *out) {
    int64_t groups = c->padded / c->group_size, runs = c->padded / TA_RUN, per_group = c->group_size / TA_RUN;
    for (int64_t m = 0; m < rows; m++) {
        __m256 total = _mm256_setzero_ps();
        for (int64_t g = 0; g < groups; g++) {
            float sum = 0;
            for (int64_t run = g * per_group; run < (g + 1) * per_group; run++) sum += in->run_sum[m * runs + run];
            total = _mm256_fmadd_ps(_mm256_loadu_ps(grids->b + g * TA_COLS), _mm256_set1_ps(sum), total);
        }
        _mm256_storeu_ps(out + m * c->out_features + n0, total);
    }
}

/*
 * out[m, n] = Σ_k rot(x)[m, k]·w[n, k] for a few rows of x ([rows, in_features] fp32): rotates
 * and packs the rows, then reads each weight row's codes once per TA_ROWS input rows.
 * Needs Kp % 64 == 0 and out_features % 8 == 0. Returns 0, or -1 when out of memory or the
 * shape does not fit.
 */
TA_AVX2 int ta_linear(const ta_codes *c, const float *x, int64_t rows, float *out) {
    int64_t padded = c->padded, runs = padded / TA_RUN, groups = padded / c->group_size;
    if (padded % TA_BLOCK || c->out_features % TA_COLS || c->group_size % TA_RUN) return -1;
    packed_input in = {0};
    float *tables = malloc(sizeof(float) * (size_t)(3 * groups * TA_COLS));
    int64_t *run_group = malloc(sizeof(int64_t) * (size_t)runs);
    int status = tables && run_group ? pack_input(c, x, rows, &in) : -1;
    if (status == 0) {
        chunk_grids grids = {tables, tables + groups * TA_COLS, tables + 2 * groups * TA_COLS};
        for (int64_t run = 0; run < runs; run++) run_group[run] = run * TA_RUN / c->group_size;
        for (int64_t n0 = 0; n0 < c->out_features; n0 += TA_COLS) {
            load_grids(c, n0, &grids);
            add_offsets(c, &in, rows, n0, &grids, out);
            for (int64_t column = 0; column < TA_COLS; column++) {
                int64_t n = n0 + column, m = 0;
                for (; m + TA_ROWS <= rows; m += TA_ROWS) rows_dot(c, &in, m, TA_ROWS, n, &grids, column, run_group, out);
                switch (rows - m) {
                    case 3: rows_dot(c, &in, m, 3, n, &grids, column, run_group, out); break;
                    case 2: rows_dot(c, &in, m, 2, n, &grids, column, run_group, out); break;
                    case 1: rows_dot(c, &in, m, 1, n, &grids, column, run_group, out); break;
                    default: break;
                }
            }
        }
    }
    free(in.values);
    free(in.run_scale);
    free(in.run_sum);
    free(tables);
    free(run_group);
    return status;
}

/* One row of the rotated W_level (Kp values) into out. */
TA_AVX2 static void decode_row(const ta_codes *c, int64_t n, float *out) {
    int64_t padded = c->padded, group_size = c->group_size, groups = padded / group_size;
    const uint8_t *hi = c->hi + n * (padded / 2);
    const uint8_t *lo = c->lo ? c->lo + n * (padded / 2) : NULL;
    for (int64_t g = 0; g < groups; g++) {
        group_grid grid = grid_of(c, g, n);
        __m256 a1 = _mm256_set1_ps(grid.a1), a2 = _mm256_set1_ps(grid.a2), b = _mm256_set1_ps(grid.b);
        for (int64_t k = g * group_size; k < (g + 1) * group_size; k += 32) {
            __m256 q[4], value[4];
            codes32(hi + k / 2, q);
            for (int j = 0; j < 4; j++) value[j] = _mm256_fmadd_ps(q[j], a1, b);
            if (lo) {
                codes32(lo + k / 2, q);
                for (int j = 0; j < 4; j++) value[j] = _mm256_fmadd_ps(q[j], a2, value[j]);
            }
            for (int j = 0; j < 4; j++) _mm256_storeu_ps(out + k + 8 * j, value[j]);
        }
    }
}

/* Rows first .. first+count-1 of the rotated W_level into out ([count, Kp] fp32). */
TA_AVX2 void ta_decode_rows(const ta_codes *c, int64_t first, int64_t count, float *out) {
    for (int64_t i = 0; i < count; i++) decode_row(c, first + i, out + i * c->padded);
}

/*
 * Rows of W_level itself (un-rotated, its first in_features columns) into out
 * ([count, in_features] fp32): rows row_ids[i], or first .. first+count-1 when row_ids is NULL.
 * Returns 0; -1 (nothing written) when a row id is outside 0 .. out_features-1 or out of memory.
 */
TA_AVX2 int ta_weight_rows(const ta_codes *c, const int64_t *row_ids, int64_t first, int64_t count, float *out) {
    for (int64_t i = 0; row_ids && i < count; i++)
        if (row_ids[i] < 0 || row_ids[i] >= c->out_features) return -1;
    float *row = malloc(sizeof(float) * (size_t)c->padded);
    if (!row) return -1;
    for (int64_t i = 0; i < count; i++) {
        decode_row(c, row_ids ? row_ids[i] : first + i, row);
        unrotate_row(row, c->padded, c->signs, c->block);
        memcpy(out + i * c->in_features, row, sizeof(float) * (size_t)c->in_features);
    }
    free(row);
    return 0;
}

int ta_isa(void) {
    for (int r = 0; r < 256; r++) {
        ratio_values[r] = exp2f((float)r / 32.0f - 8.0f);
        for (int j = 0; j < 8; j++) sign_values[r][j] = (r >> j) & 1 ? -1.0f : 1.0f;
    }
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 2 : 0;
}

#else

int ta_isa(void) { return 0; }

#endif
