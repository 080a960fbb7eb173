/* Fused CPU kernels for the torch engine's forward pass (loaded by cpu_kernels.py).
 *
 * Why: on a small model a decode step is dozens of tiny tensor ops per layer, and paged attention
 * in plain torch first copies every sequence's KV blocks into one padded batch. These kernels
 * read the block pool in place and fuse the elementwise chains. OpenMP threads come from the
 * libgomp torch has already loaded (same SONAME), so torch.set_num_threads governs them too.
 *
 * Each kernel is written once, over a storage type chosen by a compile-time flag (bf16 = 0: fp32,
 * bf16 = 1: bfloat16 stored as uint16_t), and exported as <name>_f32 and <name>_bf16. Arithmetic
 * is fp32; bf16 results are rounded where an unfused bf16 forward rounds (after each tensor op).
 * Vector code uses GCC/Clang vector extensions (16 fp32 lanes), lowered to whatever -march has.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define INLINE static inline __attribute__((always_inline))

#if defined(__AVX512BF16__) /* -march=native on a CPU with AVX512-BF16 (Zen 4, Cooper Lake, ...) */
#include <immintrin.h>
#define HAVE_DPBF16 1
#else
#define HAVE_DPBF16 0
#endif

typedef float v16f __attribute__((vector_size(64)));
typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));

/* ---- scalar and vector loads/stores over either storage type ------------------------------ */

INLINE float bf16_to_f32(uint16_t v) {
    const uint32_t bits = ((uint32_t)v) << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

INLINE uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch; NaN stays NaN */
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

INLINE float sload(const void *p, int64_t i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

INLINE void sstore(void *p, int64_t i, float v, int bf16) {
    if (bf16)
        ((uint16_t *)p)[i] = f32_to_bf16(v);
    else
        ((float *)p)[i] = v;
}

INLINE float sround(float v, int bf16) { return bf16 ? bf16_to_f32(f32_to_bf16(v)) : v; }

INLINE v16f vselect(v16i mask, v16f a, v16f b) { /* lanes of a where mask, else b */
    v16i ai, bi;
    memcpy(&ai, &a, sizeof ai);
    memcpy(&bi, &b, sizeof bi);
    const v16i r = (ai & mask) | (bi & ~mask);
    v16f f;
    memcpy(&f, &r, sizeof f);
    return f;
}

INLINE v16f vload(const void *p, int64_t i, int bf16) {
    v16f f;
    if (bf16) {
        v16h h;
        memcpy(&h, (const uint16_t *)p + i, sizeof h);
        const v16u u = __builtin_convertvector(h, v16u) << 16;
        memcpy(&f, &u, sizeof f);
    } else {
        memcpy(&f, (const float *)p + i, sizeof f);
    }
    return f;
}

INLINE v16u vround_bits(v16f v) { /* fp32 bits rounded to bf16 precision (low half zero) */
    v16u bits;
    memcpy(&bits, &v, sizeof bits);
    const v16u rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) & 0xffff0000u;
    v16i nan = v != v;
    v16u keep;
    memcpy(&keep, &nan, sizeof keep);
    return (rounded & ~keep) | ((bits | 0x400000u) & keep);
}

INLINE v16f vround(v16f v, int bf16) {
    if (!bf16) return v;
    const v16u bits = vround_bits(v);
    v16f f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

INLINE void vstore(void *p, int64_t i, v16f v, int bf16) {
    if (bf16) {
        const v16h h = __builtin_convertvector(vround_bits(v) >> 16, v16h);
        memcpy((uint16_t *)p + i, &h, sizeof h);
    } else {
        memcpy((float *)p + i, &v, sizeof v);
    }
}

INLINE float vsum(v16f v) { /* a tree of register shuffles (memcpy halves would stall store forwarding) */
    const v8f s8 = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                   __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    const v4f s4 = __builtin_shufflevector(s8, s8, 0, 1, 2, 3) + __builtin_shufflevector(s8, s8, 4, 5, 6, 7);
    return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

/* exp(x) on 16 lanes: Cody-Waite range reduction and a degree-6 polynomial (Cephes' expf
 * coefficients), ~1 ulp; below -87 flushes to 0. Softmax and SiLU need millions a step, and
 * libm's scalar expf does not vectorize. */
INLINE v16f vexp(v16f x) {
    const v16f zero = {0};
    const v16i underflow = x < -87.f;
    x = vselect(underflow, zero - 87.f, x);
    x = vselect(x > 88.f, zero + 88.f, x);
    const v16f magic = zero + 12582912.f; /* 1.5 * 2^23: adding it rounds to an integer */
    const v16f n = (x * 1.44269504088896341f + magic) - magic;
    const v16f r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
    v16f p = zero + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    const v16i bits = (__builtin_convertvector(n, v16i) + 127) << 23;
    v16f scale;
    memcpy(&scale, &bits, sizeof scale);
    return vselect(underflow, zero, p * scale);
}

INLINE float sexp(float x) { /* the same exp for one value, so tails match the lanes */
    const v16f v = (v16f){0} + x;
    return vexp(v)[0];
}

/* <name>_f32 and <name>_bf16: the one implementation, specialised for each storage type. */
#define EXPORT2(name, params, ...)                               \
    void name##_f32 params { name##_impl(__VA_ARGS__, 0); }      \
    void name##_bf16 params { name##_impl(__VA_ARGS__, 1); }

/* ---- paged decode attention -------------------------------------------------------------
 * One query token per sequence, attending over its own blocks read through its block table.
 *   q        [D, H, hd], rows q_stride elements apart (a view into the fused qkv)
 *   out      [D, H, hd] contiguous
 *   k/v pool [num_blocks, bs, KVH, hd]
 *   table    [D, max_blocks] int64; ctx_lens [D] int64 (keys to attend: position + 1)
 *   window   0: full attention; else only keys with q_pos - k_pos < window
 * A task is one sequence (or, with few sequences, one of its KV heads). One pass over the keys
 * scores every query head of the task: a token's K row for all the task's heads is one
 * contiguous read, so the pool streams like a sequential read and loads overlap the arithmetic,
 * and each head's slice is widened to fp32 once for its G = H / KVH query heads. Then a softmax
 * per head, and one pass over the values into fp32 accumulators, in the same token order.
 * (Walking the keys head by head instead, with the query or accumulator in registers, was
 * faster with the pool in cache and slower from memory, where decode finds it.)
 */
#define MAX_HD 256

INLINE void decode_attention_nv(const void *q, const void *kc, const void *vc, const int64_t *table,
                                const int64_t *ctx_lens, void *out, int64_t q_stride, int64_t D,
                                int64_t H, int64_t KVH, int64_t hd, int64_t bs, int64_t max_blocks,
                                float scale, int64_t window, int bf16, const int64_t nv) {
    /* nv: 16-lane vectors per head, a constant for the common head sizes so the loops over a
     * row unroll into registers; 0: the scalar path (head sizes not a multiple of 16). */
    const int64_t G = H / KVH;
    const int64_t splits = D >= 4 ? 1 : KVH; /* head ranges per sequence */
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t task = 0; task < D * splits; task++) {
        const int64_t d = task / splits;
        const int64_t lo = (task % splits) * (KVH / splits), hi = lo + KVH / splits;
        const int64_t nh = (hi - lo) * G; /* query heads in this task */
        const int64_t L = ctx_lens[d];
        const int64_t first = (window > 0 && L > window) ? L - window : 0;
        const int64_t n = L - first;
        if (n <= 0) continue;
        const int64_t *blocks = table + d * max_blocks;
        float *buf = aligned_alloc(64, sizeof(float) * (size_t)((2 * nh * hd + nh * n + 15) & ~15));
        float *qf = buf, *acc = qf + nh * hd, *scores = acc + nh * hd;
        /* Each key's row offset in the pool, walked block by block (no divide per token). */
        int64_t *rows = malloc(sizeof(int64_t) * (size_t)n);
        for (int64_t b = first / bs, off = first % bs, t = 0; t < n; b++, off = 0)
            for (; off < bs && t < n; off++, t++) rows[t] = ((blocks[b] * bs + off) * KVH + lo) * hd;
        const int64_t qoff = d * q_stride + lo * G * hd;
        for (int64_t j = 0; j < nh * hd; j++) qf[j] = sload(q, qoff + j, bf16) * scale;

        /* scores[j * n + t] = q_j . k_t, for query head j of the task */
#if HAVE_DPBF16
        if (bf16 && hd % 32 == 0 && hd <= MAX_HD) {
            /* bf16 pairs straight into fp32 sums (vdpbf16ps): no widening; products are exact */
            const uint16_t *qh = (const uint16_t *)q + qoff;
            for (int64_t t = 0; t < n; t++) {
                for (int64_t kvh = 0; kvh < hi - lo; kvh++) {
                    const uint16_t *kp = (const uint16_t *)kc + rows[t] + kvh * hd;
                    __m512bh k[MAX_HD / 32];
                    for (int64_t i = 0; i < hd / 32; i++) k[i] = (__m512bh)_mm512_loadu_si512(kp + 32 * i);
                    for (int64_t j = kvh * G; j < (kvh + 1) * G; j++) {
                        __m512 a = _mm512_setzero_ps();
                        for (int64_t i = 0; i < hd / 32; i++)
                            a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(qh + j * hd + 32 * i), k[i]);
                        scores[j * n + t] = _mm512_reduce_add_ps(a) * scale;
                    }
                }
            }
        } else
#endif
        for (int64_t t = 0; t < n; t++) {
            for (int64_t kvh = 0; kvh < hi - lo; kvh++) {
                const int64_t kr = rows[t] + kvh * hd;
                if (nv) {
                    v16f k[MAX_HD / 16];
                    for (int64_t i = 0; i < nv; i++) k[i] = vload(kc, kr + 16 * i, bf16);
                    for (int64_t j = kvh * G; j < (kvh + 1) * G; j++) {
                        v16f a = {0};
                        for (int64_t i = 0; i < nv; i++) a += vload(qf, j * hd + 16 * i, 0) * k[i];
                        scores[j * n + t] = vsum(a);
                    }
                } else {
                    for (int64_t j = kvh * G; j < (kvh + 1) * G; j++) {
                        float a = 0.f;
                        for (int64_t i = 0; i < hd; i++) a += qf[j * hd + i] * sload(kc, kr + i, bf16);
                        scores[j * n + t] = a;
                    }
                }
            }
        }
        /* softmax over each query head's scores */
        for (int64_t j = 0; j < nh; j++) {
            float *sj = scores + j * n, mx = -INFINITY, sum = 0.f;
            for (int64_t t = 0; t < n; t++) mx = sj[t] > mx ? sj[t] : mx;
            int64_t t = 0;
            for (; t + 16 <= n; t += 16) {
                const v16f e = vexp(vload(sj, t, 0) - mx);
                memcpy(sj + t, &e, sizeof e);
                sum += vsum(e);
            }
            for (; t < n; t++) {
                sj[t] = sexp(sj[t] - mx);
                sum += sj[t];
            }
            const float inv = 1.f / sum;
            for (t = 0; t < n; t++) sj[t] *= inv;
        }
        /* out_j = sum_t p_jt v_t */
        memset(acc, 0, sizeof(float) * (size_t)(nh * hd));
        for (int64_t t = 0; t < n; t++) {
            for (int64_t kvh = 0; kvh < hi - lo; kvh++) {
                const int64_t vr = rows[t] + kvh * hd;
                if (nv) {
                    v16f v[MAX_HD / 16];
                    for (int64_t i = 0; i < nv; i++) v[i] = vload(vc, vr + 16 * i, bf16);
                    for (int64_t j = kvh * G; j < (kvh + 1) * G; j++) {
                        const float p = scores[j * n + t];
                        for (int64_t i = 0; i < nv; i++) {
                            const v16f r = vload(acc, j * hd + 16 * i, 0) + p * v[i];
                            memcpy(acc + j * hd + 16 * i, &r, sizeof r);
                        }
                    }
                } else {
                    for (int64_t j = kvh * G; j < (kvh + 1) * G; j++)
                        for (int64_t i = 0; i < hd; i++) acc[j * hd + i] += scores[j * n + t] * sload(vc, vr + i, bf16);
                }
            }
        }
        const int64_t ooff = (d * H + lo * G) * hd;
        for (int64_t j = 0; j < nh * hd; j++) sstore(out, ooff + j, acc[j], bf16);
        free(rows);
        free(buf);
    }
}

INLINE void paged_decode_attention_impl(const void *q, const void *kc, const void *vc,
                                            const int64_t *table, const int64_t *ctx_lens, void *out,
                                            int64_t q_stride, int64_t D, int64_t H, int64_t KVH,
                                            int64_t hd, int64_t bs, int64_t max_blocks, float scale,
                                            int64_t window, int bf16) {
#define ATTN(NV) \
    decode_attention_nv(q, kc, vc, table, ctx_lens, out, q_stride, D, H, KVH, hd, bs, \
                                max_blocks, scale, window, bf16, NV)
    switch (hd) {
        case 64: ATTN(4); break;
        case 128: ATTN(8); break;
        case 32: ATTN(2); break;
        case 256: ATTN(16); break;
        default: ATTN(hd % 16 == 0 && hd <= MAX_HD ? hd / 16 : 0);
    }
#undef ATTN
}

EXPORT2(paged_decode_attention,
        (const void *q, const void *kc, const void *vc, const int64_t *table, const int64_t *ctx_lens,
         void *out, int64_t q_stride, int64_t D, int64_t H, int64_t KVH, int64_t hd, int64_t bs,
         int64_t max_blocks, float scale, int64_t window),
        q, kc, vc, table, ctx_lens, out, q_stride, D, H, KVH, hd, bs, max_blocks, scale, window)

/* ---- residual add + RMSNorm ---------------------------------------------------------------
 * If delta is given: h += delta (in place, rounded to the storage type), then
 * out = weight * (h * rsqrt(mean(h^2) + eps)), the norm in fp32 as transformers computes it.
 *   h, delta, out [rows, N]; weight [N]
 */
INLINE void add_rms_norm_impl(void *h, const void *delta, const void *weight, void *out, int64_t rows,
                              int64_t N, float eps, int bf16) {
#pragma omp parallel for schedule(static) if (rows * N > 65536)
    for (int64_t r = 0; r < rows; r++) {
        const int64_t base = r * N;
        v16f ssv = {0};
        float ss = 0.f;
        int64_t i = 0;
        for (; i + 16 <= N; i += 16) {
            v16f v = vload(h, base + i, bf16);
            if (delta) {
                v = vround(v + vload(delta, base + i, bf16), bf16);
                vstore(h, base + i, v, bf16);
            }
            ssv += v * v;
        }
        for (; i < N; i++) {
            float v = sload(h, base + i, bf16);
            if (delta) {
                v = sround(v + sload(delta, base + i, bf16), bf16);
                sstore(h, base + i, v, bf16);
            }
            ss += v * v;
        }
        const float inv = 1.f / sqrtf((vsum(ssv) + ss) / (float)N + eps);
        for (i = 0; i + 16 <= N; i += 16)
            vstore(out, base + i, vload(weight, i, bf16) * vround(vload(h, base + i, bf16) * inv, bf16), bf16);
        for (; i < N; i++)
            sstore(out, base + i, sload(weight, i, bf16) * sround(sload(h, base + i, bf16) * inv, bf16), bf16);
    }
}

EXPORT2(add_rms_norm,
        (void *h, const void *delta, const void *weight, void *out, int64_t rows, int64_t N, float eps),
        h, delta, weight, out, rows, N, eps)

/* ---- rotary embedding + KV cache write ----------------------------------------------------
 * qkv [T, H + 2*KVH, hd]: rotates the H query heads and KVH key heads in place (rotate-half
 * form, as Llama), then copies each token's key and value heads into the pools at its slot.
 *   cos, sin [T, hd/2] fp32 (rounded to bf16 first for bf16, as the unfused path casts them);
 *   slots [T] int64 (block * bs + offset); k/v pool [slots, KVH, hd]
 */
INLINE void rope_and_cache_impl(void *qkv, const float *cos_t, const float *sin_t, const int64_t *slots,
                                void *kc, void *vc, int64_t tokens, int64_t H, int64_t KVH, int64_t hd,
                                int bf16) {
    const int64_t half = hd / 2, heads = H + 2 * KVH, esize = bf16 ? 2 : 4;
#pragma omp parallel for schedule(static) if (tokens * heads * hd > 65536)
    for (int64_t t = 0; t < tokens; t++) {
        const float *c = cos_t + t * half, *s = sin_t + t * half;
        for (int64_t h = 0; h < H + KVH; h++) {
            const int64_t x = (t * heads + h) * hd;
            for (int64_t i = 0; i < half; i++) {
                const float x1 = sload(qkv, x + i, bf16), x2 = sload(qkv, x + i + half, bf16);
                const float c_ = sround(c[i], bf16), s_ = sround(s[i], bf16);
                sstore(qkv, x + i, sround(x1 * c_, bf16) - sround(x2 * s_, bf16), bf16);
                sstore(qkv, x + i + half, sround(x2 * c_, bf16) + sround(x1 * s_, bf16), bf16);
            }
        }
        const char *row = (const char *)qkv + t * heads * hd * esize;
        const size_t kv_bytes = (size_t)(KVH * hd * esize);
        memcpy((char *)kc + slots[t] * (int64_t)kv_bytes, row + H * hd * esize, kv_bytes);
        memcpy((char *)vc + slots[t] * (int64_t)kv_bytes, row + (H + KVH) * hd * esize, kv_bytes);
    }
}

EXPORT2(rope_and_cache,
        (void *qkv, const float *cos_t, const float *sin_t, const int64_t *slots, void *kc, void *vc,
         int64_t tokens, int64_t H, int64_t KVH, int64_t hd),
        qkv, cos_t, sin_t, slots, kc, vc, tokens, H, KVH, hd)

/* ---- SiLU(gate) * up --------------------------------------------------------------------
 *   gate_up [T, 2*I] (gate first, as the fused projection emits it) -> out [T, I]
 * bf16 rounds SiLU's result before the product, as two bf16 tensor ops would.
 */
INLINE void silu_mul_impl(const void *gate_up, void *out, int64_t tokens, int64_t I, int bf16) {
#pragma omp parallel for schedule(static) if (tokens * I > 65536)
    for (int64_t t = 0; t < tokens; t++) {
        const int64_t g = t * 2 * I, u = g + I, o = t * I;
        int64_t i = 0;
        for (; i + 16 <= I; i += 16) {
            const v16f gv = vload(gate_up, g + i, bf16);
            const v16f silu = vround(gv / (1.f + vexp(-gv)), bf16);
            vstore(out, o + i, silu * vload(gate_up, u + i, bf16), bf16);
        }
        for (; i < I; i++) {
            const float x = sload(gate_up, g + i, bf16);
            sstore(out, o + i, sround(x / (1.f + sexp(-x)), bf16) * sload(gate_up, u + i, bf16), bf16);
        }
    }
}

EXPORT2(silu_mul, (const void *gate_up, void *out, int64_t tokens, int64_t I), gate_up, out, tokens, I)
