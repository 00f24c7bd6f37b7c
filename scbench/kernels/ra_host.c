/* RetrievalAttention's host half in C (OpenMP over heads): exact inner-product search of one layer's stored keys,
 * top-k by a radix select on the float order, and attention over the selected rows. Loaded with ctypes by
 * scbench/kernels/ra_host.py (compiled there on first use); the torch path (methods/retrieval_host.host_partial)
 * is the reference. Layouts: keys / values [B, Hkv, cap, D] contiguous (float32 or bfloat16), q [B, Hq, D] float32,
 * out [B, Hq, D] float32, lse [B, Hq] float32. scores: a caller-owned float32 buffer of B * Hq * (hi - lo).
 * qb: q in bfloat16 when bfloat16 holds it exactly (else NULL): with bfloat16 keys and AVX512-BF16 the scan uses
 * vdpbf16ps (the same products, float32 sums in another order). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static inline float bf16_to_f32(uint16_t x) {
    union { uint32_t u; float f; } c;
    c.u = (uint32_t)x << 16;
    return c.f;
}

static inline float round_bf16(float x) { /* round to nearest even bfloat16, back to float32 (finite x) */
    union { uint32_t u; float f; } c;
    c.f = x;
    c.u = (c.u + 0x7FFF + ((c.u >> 16) & 1)) & 0xFFFF0000u;
    return c.f;
}

static inline uint32_t okey(float x) { /* unsigned order = float order */
    union { uint32_t u; float f; } c;
    c.f = x;
    return (c.u >> 31) ? ~c.u : (c.u | 0x80000000u);
}

/* Rows of [lo, hi) of one KV head's keys times its rep query heads -> s[h * m + (row - lo)], rows [r0, r1). */
static void scan(const float *q, const void *kbase, int kbf16, int D, int rep, int64_t m, int lo, int64_t r0,
                 int64_t r1, float *s) {
    float kr[512];
    for (int64_t r = r0; r < r1; r++) {
        const float *krow;
        if (kbf16) {
            const uint16_t *src = (const uint16_t *)kbase + (int64_t)(lo + r) * D;
            for (int d = 0; d < D; d++) kr[d] = bf16_to_f32(src[d]);
            krow = kr;
        } else {
            krow = (const float *)kbase + (int64_t)(lo + r) * D;
        }
        for (int h = 0; h < rep; h++) {
            const float *qh = q + (int64_t)h * D;
            float acc[16] = {0};
            int d = 0;
            for (; d + 16 <= D; d += 16)
                for (int j = 0; j < 16; j++) acc[j] += qh[d + j] * krow[d + j];
            float t = 0.f;
            for (; d < D; d++) t += qh[d] * krow[d];
            for (int j = 0; j < 16; j++) t += acc[j];
            s[(int64_t)h * m + r] = t;
        }
    }
}

static int scan_ahead = 32; /* rows prefetched ahead by the bf16 scan (0: none; 32: measured best of 0-128 at 131K) */
static int scan_l2 = 0; /* the scan's prefetches into L2 only (prefetcht1: more misses in flight than L1's buffers) */
static int sampled_select = 1; /* long rows: select_fast (a sampled bound, then select_top over the candidates) */

static int64_t fallbacks = 0, sampled_rows = 0; /* select_fast's whole-row fallbacks, and rows it took */
int64_t ra_host_counts(int which) { return which ? sampled_rows : fallbacks; }

/* Knobs for measurement (scripts/bench_ra_host.py): the scan's prefetch distance in rows, the select. */
void ra_host_tune(int ahead, int sampled, int l2) {
    scan_ahead = ahead;
    sampled_select = sampled;
    scan_l2 = l2;
}

#if defined(__AVX512F__)
#include <immintrin.h>
/* [sum a, sum b, sum c, sum d] of four 16-lane vectors (one reduction tree for four heads). */
static inline __m128 hsum4(__m512 a, __m512 b, __m512 c, __m512 d) {
#define HALF(x) _mm256_add_ps(_mm512_castps512_ps256(x), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)))
    __m256 ab = _mm256_hadd_ps(HALF(a), HALF(b)), cd = _mm256_hadd_ps(HALF(c), HALF(d));
#undef HALF
    __m256 abcd = _mm256_hadd_ps(ab, cd);
    return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

static inline __m512 load16(const void *base, int64_t i, int kbf16) {
    if (kbf16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)base + i))), 16));
    return _mm512_loadu_ps((const float *)base + i);
}

/* AVX-512F scan, four query heads at a time (rep % 4 == 0, D % 16 == 0): float32 FMAs of the converted keys. */
static void scan4(const float *q, const void *kbase, int kbf16, int D, int rep, int64_t m, int lo, int64_t r0,
                  int64_t r1, float *s) {
    for (int64_t r = r0; r < r1; r++) {
        const int64_t row = (int64_t)(lo + r) * D;
        for (int h = 0; h < rep; h += 4) {
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            const float *qh = q + (int64_t)h * D;
            for (int d = 0; d < D; d += 16) {
                __m512 k = load16(kbase, row + d, kbf16);
                a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qh + d), k, a0);
                a1 = _mm512_fmadd_ps(_mm512_loadu_ps(qh + D + d), k, a1);
                a2 = _mm512_fmadd_ps(_mm512_loadu_ps(qh + 2 * D + d), k, a2);
                a3 = _mm512_fmadd_ps(_mm512_loadu_ps(qh + 3 * D + d), k, a3);
            }
            float t[4];
            _mm_storeu_ps(t, hsum4(a0, a1, a2, a3));
            for (int j = 0; j < 4; j++) s[(int64_t)(h + j) * m + r] = t[j];
        }
    }
}
#define HAVE_AVX512 1
#else
#define HAVE_AVX512 0
#endif

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#define HAVE_DPBF16 1
/* bf16 keys and a query that bf16 holds exactly: vdpbf16ps (pairs of bf16 products summed into float32 lanes). */
static void scan_dp(const uint16_t *qb, const uint16_t *kbase, int D, int rep, int64_t m, int lo, int64_t r0,
                    int64_t r1, float *s) {
    int64_t r = r0;
    for (; r + 1 < r1; r += 2) { /* two rows at a time: two independent chains per head (the dot products' latency) */
        const uint16_t *k = kbase + (int64_t)(lo + r) * D, *k2 = k + D;
        if (scan_ahead > 0 && r + scan_ahead < r1) /* rows scan_ahead ahead: more loads in flight per core */
        {
            const char *pf = (const char *)(k + (int64_t)scan_ahead * D);
            if (scan_l2)
                for (int o = 0; o < D * 4; o += 64) __builtin_prefetch(pf + o, 0, 2);
            else
                for (int o = 0; o < D * 4; o += 64) __builtin_prefetch(pf + o, 0, 3);
        }
        for (int h = 0; h < rep; h += 4) {
            const uint16_t *qh = qb + (int64_t)h * D;
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
            for (int d = 0; d < D; d += 32) {
                __m512bh kv = (__m512bh)_mm512_loadu_si512(k + d), kw = (__m512bh)_mm512_loadu_si512(k2 + d);
                __m512bh q0 = (__m512bh)_mm512_loadu_si512(qh + d), q1 = (__m512bh)_mm512_loadu_si512(qh + D + d);
                __m512bh q2 = (__m512bh)_mm512_loadu_si512(qh + 2 * D + d);
                __m512bh q3 = (__m512bh)_mm512_loadu_si512(qh + 3 * D + d);
                a0 = _mm512_dpbf16_ps(a0, q0, kv);
                b0 = _mm512_dpbf16_ps(b0, q0, kw);
                a1 = _mm512_dpbf16_ps(a1, q1, kv);
                b1 = _mm512_dpbf16_ps(b1, q1, kw);
                a2 = _mm512_dpbf16_ps(a2, q2, kv);
                b2 = _mm512_dpbf16_ps(b2, q2, kw);
                a3 = _mm512_dpbf16_ps(a3, q3, kv);
                b3 = _mm512_dpbf16_ps(b3, q3, kw);
            }
            float t[8];
            _mm_storeu_ps(t, hsum4(a0, a1, a2, a3));
            _mm_storeu_ps(t + 4, hsum4(b0, b1, b2, b3));
            for (int j = 0; j < 4; j++) {
                s[(int64_t)(h + j) * m + r] = t[j];
                s[(int64_t)(h + j) * m + r + 1] = t[4 + j];
            }
        }
    }
    for (; r < r1; r++) { /* the last odd row */
        const uint16_t *k = kbase + (int64_t)(lo + r) * D;
        for (int h = 0; h < rep; h += 4) {
            const uint16_t *qh = qb + (int64_t)h * D;
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int d = 0; d < D; d += 32) {
                __m512bh kv = (__m512bh)_mm512_loadu_si512(k + d);
                a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(qh + d), kv);
                a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(qh + D + d), kv);
                a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(qh + 2 * D + d), kv);
                a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(qh + 3 * D + d), kv);
            }
            float t[4];
            _mm_storeu_ps(t, hsum4(a0, a1, a2, a3));
            for (int j = 0; j < 4; j++) s[(int64_t)(h + j) * m + r] = t[j];
        }
    }
}
#else
#define HAVE_DPBF16 0
#endif

int ra_host_has_dpbf16(void) { return HAVE_DPBF16 * 2 + HAVE_AVX512; }

/* Bucket b (of nb) holding the need-th largest key, counting from the top; *above: keys in higher buckets. */
static int boundary(const uint32_t *hist, int nb, int64_t need, int64_t *above) {
    int64_t acc = 0;
    int b = nb - 1;
    for (; b > 0; b--) {
        if (acc + hist[b] >= need) break;
        acc += hist[b];
    }
    *above = acc;
    return b;
}

/* Indices (into [0, m)) of the kk largest of r[0, m) (ties: the lowest indices) -> idx[0, kk), unordered: a radix
 * select on the float order in 11 + 11 + 10 bits, each level's 2,048-bin histogram in L1 (the first over every key,
 * the next two over the boundary bucket's keys only). cand: 2 * m scratch. */
static void select_top(const float *r, int64_t m, int64_t kk, int32_t *idx, uint32_t *hist, uint64_t *cand) {
    memset(hist, 0, 2048 * sizeof(uint32_t));
    for (int64_t i = 0; i < m; i++) hist[okey(r[i]) >> 21]++;
    int64_t above;
    uint32_t b = (uint32_t)boundary(hist, 2048, kk, &above);
    int64_t n = 0, nc = 0;
    for (int64_t i = 0; i < m; i++) { /* above the bucket: taken; in it: candidates (key, row), in row order */
        uint32_t u = okey(r[i]);
        if ((u >> 21) > b) idx[n++] = (int32_t)i;
        else if ((u >> 21) == b) cand[nc++] = ((uint64_t)u << 32) | (uint64_t)i;
    }
    uint64_t *next = cand + m;
    for (int level = 0; level < 2 && n < kk; level++) {
        const int shift = level == 0 ? 10 : 0, nb = level == 0 ? 2048 : 1024;
        memset(hist, 0, 2048 * sizeof(uint32_t));
        for (int64_t j = 0; j < nc; j++) hist[(cand[j] >> (32 + shift)) & (nb - 1)]++;
        b = (uint32_t)boundary(hist, nb, kk - n, &above);
        int64_t nn = 0;
        for (int64_t j = 0; j < nc; j++) {
            uint32_t d = (cand[j] >> (32 + shift)) & (nb - 1);
            if (d > b) idx[n++] = (int32_t)(cand[j] & 0xFFFFFFFFu);
            else if (d == b) next[nn++] = cand[j];
        }
        uint64_t *t = cand;
        cand = next, next = t, nc = nn;
    }
    for (int64_t j = 0; n < kk && j < nc; j++) idx[n++] = (int32_t)(cand[j] & 0xFFFFFFFFu); /* ties: lowest rows */
}

/* Rows of r[0, m) at or above t, in row order -> (cv values, ci rows); returns how many. */
static int64_t compact_ge(const float *r, int64_t m, float t, float *cv, int32_t *ci) {
    int64_t nc = 0, i = 0;
#if HAVE_AVX512
    const __m512 tv = _mm512_set1_ps(t);
    __m512i iv = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i sixteen = _mm512_set1_epi32(16);
    for (; i + 16 <= m; i += 16) {
        __m512 v = _mm512_loadu_ps(r + i);
        __mmask16 k = _mm512_cmp_ps_mask(v, tv, _CMP_GE_OQ);
        _mm512_mask_compressstoreu_ps(cv + nc, k, v);
        _mm512_mask_compressstoreu_epi32(ci + nc, k, iv);
        nc += __builtin_popcount((unsigned)k);
        iv = _mm512_add_epi32(iv, sixteen);
    }
#endif
    for (; i < m; i++) {
        cv[nc] = r[i];
        ci[nc] = (int32_t)i;
        nc += r[i] >= t;
    }
    return nc;
}

#define SAMPLE_EVERY 256 /* the sample: the first SAMPLE_RUN scores of every SAMPLE_EVERY (one cache line) */
#define SAMPLE_RUN 16

/* select_top's result (the same rows, ties included: the candidates keep the row order) for long rows with fewer
 * passes over them: a lower bound t of the kk-th largest from a sample (its j-th largest, j a few standard deviations
 * above the sample's expected share of the top kk), the rows >= t compacted (one vectorised pass), select_top over
 * those; if fewer than kk rows are >= t (a sample that missed), select_top over the whole row. sv: m floats,
 * cv: m + 1 floats, ci: m + 1 ints of scratch; idx: room for max(kk, m / 16 + 16). */
static void select_fast(const float *r, int64_t m, int64_t kk, int32_t *idx, uint32_t *hist, uint64_t *cand,
                        float *sv, float *cv, int32_t *ci) {
    if (!sampled_select || m < 16384 || m < 8 * kk) {
        select_top(r, m, kk, idx, hist, cand);
        return;
    }
    int64_t ns = 0;
    for (int64_t i = 0; i + SAMPLE_RUN <= m; i += SAMPLE_EVERY)
        for (int j = 0; j < SAMPLE_RUN; j++) sv[ns++] = r[i + j];
    const double e = (double)ns * (double)kk / (double)m;
    int64_t j = (int64_t)ceil(e + 4.0 * sqrt(e) + 16.0);
    int64_t nc = -1;
    if (j < ns) {
        select_top(sv, ns, j, idx, hist, cand); /* idx: scratch here (j < ns <= m / 16 + 16) */
        float t = INFINITY;
        for (int64_t a = 0; a < j; a++) t = sv[idx[a]] < t ? sv[idx[a]] : t;
        nc = compact_ge(r, m, t, cv, ci);
    }
    __atomic_fetch_add(&sampled_rows, 1, __ATOMIC_RELAXED);
    if (nc < kk) {
        __atomic_fetch_add(&fallbacks, 1, __ATOMIC_RELAXED);
        select_top(r, m, kk, idx, hist, cand);
        return;
    }
    select_top(cv, nc, kk, idx, hist, cand);
    for (int64_t a = 0; a < kk; a++) idx[a] = ci[idx[a]];
}

#define PREFETCH 32

/* Softmax over the selected logits of one query head and the weighted sum of their value rows. */
static void attend(const float *s, const int32_t *idx, int64_t kk, const void *vbase, int vbf16, int D, int lo,
                   float scale, float *out, float *lse, float *p) {
    float mx = -INFINITY;
    for (int64_t j = 0; j < kk; j++) {
        p[j] = s[idx[j]] * scale;
        if (p[j] > mx) mx = p[j];
    }
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < kk; j++) {
        p[j] = expf(p[j] - mx);
        sum += p[j];
    }
    float l = mx + logf(sum), inv = 1.f / sum;
    *lse = l;
    float acc[512];
    for (int d = 0; d < D; d++) acc[d] = 0.f;
    const int64_t rowbytes = (int64_t)D * (vbf16 ? 2 : 4);
    for (int64_t j = 0; j < kk; j++) {
        if (j + PREFETCH < kk) { /* random rows: keep several in flight (memory latency, not bandwidth, bounds) */
            const char *pf = (const char *)vbase + ((int64_t)lo + idx[j + PREFETCH]) * rowbytes;
            for (int64_t o = 0; o < rowbytes; o += 64) __builtin_prefetch(pf + o, 0, 0);
        }
        float w = p[j] * inv;
        int64_t row = (int64_t)lo + idx[j];
        if (vbf16) {
            w = round_bf16(w); /* weights rounded to the values' precision, as flash attention's P @ V */
            const uint16_t *v = (const uint16_t *)vbase + row * D;
            for (int d = 0; d < D; d++) acc[d] += w * bf16_to_f32(v[d]);
        } else {
            const float *v = (const float *)vbase + row * D;
            for (int d = 0; d < D; d++) acc[d] += w * v[d];
        }
    }
    for (int d = 0; d < D; d++) out[d] = acc[d];
}

#define CHUNK 2048

/* Per-thread scratch kept between calls (a fresh large malloc is a fresh mmap whose pages fault on every call). */
static __thread void *bufs[8];
static __thread size_t sizes[8];

static void *buffer(int i, size_t n) {
    if (sizes[i] < n) {
        free(bufs[i]);
        bufs[i] = malloc(n);
        sizes[i] = n;
    }
    return bufs[i];
}

/* Returns 0, or -1 for unsupported sizes (D > 512). */
int ra_host_partial(const float *q, const uint16_t *qb, const void *keys, int kbf16, int64_t kcap, const void *vals, int vbf16,
                    int64_t vcap, int B, int Hq, int Hkv, int D, int lo, int hi, int top_k, int group, float scale,
                    float *out, float *lse, float *scores, int nthreads) {
    if (D > 512 || hi <= lo) return -1;
    const int rep = Hq / Hkv;
    const int64_t m = hi - lo, kk = top_k < m ? top_k : m;
    const int64_t nch = (m + CHUNK - 1) / CHUNK;
    const size_t esk = kbf16 ? 2 : 4, esv = vbf16 ? 2 : 4;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t t = 0; t < (int64_t)B * Hkv * nch; t++) {
        int64_t bg = t / nch, c = t % nch;
        int64_t r0 = c * CHUNK, r1 = r0 + CHUNK < m ? r0 + CHUNK : m;
        const char *kb = (const char *)keys + bg * kcap * D * esk;
#if HAVE_DPBF16
        if (qb != NULL && kbf16 && D % 32 == 0 && rep % 4 == 0) {
            scan_dp(qb + bg * rep * D, (const uint16_t *)kb, D, rep, m, lo, r0, r1, scores + bg * rep * m);
            continue;
        }
#endif
#if HAVE_AVX512
        if (D % 16 == 0 && rep % 4 == 0) {
            scan4(q + bg * rep * D, kb, kbf16, D, rep, m, lo, r0, r1, scores + bg * rep * m);
            continue;
        }
#endif
        scan(q + bg * rep * D, kb, kbf16, D, rep, m, lo, r0, r1, scores + bg * rep * m);
    }
    const int hs = group ? Hkv : Hq; /* ranked rows per batch row */
#pragma omp parallel num_threads(nthreads)
    {
        uint32_t *hist = buffer(0, 2048 * sizeof(uint32_t));
        uint64_t *cand = buffer(1, 2 * m * sizeof(uint64_t));
        int32_t *idx = buffer(2, (kk > m / 16 + 16 ? kk : m / 16 + 16) * sizeof(int32_t)); /* also the sample's */
        float *p = buffer(3, kk * sizeof(float));
        float *rank = buffer(4, m * sizeof(float));
        float *sv = buffer(5, m * sizeof(float)), *cv = buffer(6, (m + 1) * sizeof(float));
        int32_t *ci = buffer(7, (m + 1) * sizeof(int32_t));
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < (int64_t)B * hs; t++) {
            int64_t bi = t / hs, h = t % hs, g = group ? h : h / rep;
            const char *vbase = (const char *)vals + (bi * Hkv + g) * vcap * D * esv;
            if (group) {
                const float *sg = scores + (bi * Hkv + g) * rep * m;
                for (int64_t i = 0; i < m; i++) {
                    float x = sg[i];
                    for (int r = 1; r < rep; r++) x = sg[r * m + i] > x ? sg[r * m + i] : x;
                    rank[i] = x;
                }
                select_fast(rank, m, kk, idx, hist, cand, sv, cv, ci);
                for (int r = 0; r < rep; r++) {
                    int64_t qh = bi * Hq + g * rep + r;
                    attend(sg + r * m, idx, kk, vbase, vbf16, D, lo, scale, out + qh * D, lse + qh, p);
                }
            } else {
                const float *sh = scores + (bi * Hq + h) * m;
                select_fast(sh, m, kk, idx, hist, cand, sv, cv, ci);
                int64_t qh = bi * Hq + h;
                attend(sh, idx, kk, vbase, vbf16, D, lo, scale, out + qh * D, lse + qh, p);
            }
        }
    }
    return 0;
}

/* Stream jobs (methods/retrieval_host.py, the asynchronous split): each runs as a CUDA host function
 * (cuLaunchHostFunc) in the decode stream's order, so the Python thread goes on launching the step while the host
 * half of a layer runs; the Python side sets every field before it launches the job and reads nothing back until
 * the stream has passed it. ``done`` is set last (the Python side waits for the stream before it reuses a job whose
 * ``done`` is still 0). */
typedef struct {
    const uint16_t *q;  /* [B, Hq, D] bfloat16: the query as the device copied it (pinned host memory) */
    float *qf;          /* [B, Hq, D] float32 scratch */
    const void *keys;
    int64_t kcap;
    const void *vals;
    int64_t vcap;
    int kbf16, vbf16, B, Hq, Hkv, D, lo, hi, top_k, group, nthreads, rc, done, pad;
    float scale;
    float *out, *lse, *scores; /* scratch: [B, Hq, D], [B, Hq], B * Hq * (hi - lo) */
    float *part;               /* [B, Hq, D + 1]: out, then lse (pinned host memory; the device copies it back) */
    double seconds;            /* host seconds of this job, summed over runs (the Python side takes and zeroes it) */
} ra_host_job;

void ra_host_job_run(void *arg) {
    ra_host_job *j = (ra_host_job *)arg;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    const int64_t nq = (int64_t)j->B * j->Hq, D = j->D;
    for (int64_t i = 0; i < nq * D; i++) j->qf[i] = bf16_to_f32(j->q[i]);
    /* the query is bfloat16, so bfloat16 holds it exactly: qb is the query itself, as host_partial passes it */
    j->rc = ra_host_partial(j->qf, j->kbf16 ? j->q : NULL, j->keys, j->kbf16, j->kcap, j->vals, j->vbf16, j->vcap,
                            j->B, j->Hq, j->Hkv, j->D, j->lo, j->hi, j->top_k, j->group, j->scale, j->out, j->lse,
                            j->scores, j->nthreads);
    for (int64_t i = 0; i < nq && j->rc == 0; i++) { /* a failed call wrote nothing: the caller raises on rc */
        memcpy(j->part + i * (D + 1), j->out + i * D, D * sizeof(float));
        j->part[i * (D + 1) + D] = j->lse[i];
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    j->seconds += (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
    __atomic_store_n(&j->done, 1, __ATOMIC_RELEASE);
}

/* A decode token's new rows into a host tier's capacity buffer: heads blocks of rows * rowbytes, contiguous in src
 * (a pinned staging copy the device wrote just before), dst_stride apart in dst. */
typedef struct {
    const char *src;
    char *dst;
    int64_t heads, rows, rowbytes, dst_stride;
    int done, pad;
} ra_copy_job;

void ra_copy_job_run(void *arg) {
    ra_copy_job *j = (ra_copy_job *)arg;
    const int64_t n = j->rows * j->rowbytes;
    for (int64_t h = 0; h < j->heads; h++) memcpy(j->dst + h * j->dst_stride, j->src + h * n, n);
    __atomic_store_n(&j->done, 1, __ATOMIC_RELEASE);
}
