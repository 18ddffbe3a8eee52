/* bookgen's CPU kernels, built at first use by bookgen/native.py with the system C compiler.

   PyTorch's CPU tanh GELU takes about 2-3 ns an element on a core where one pass over memory takes 0.5, and
   bookgen's NumPy dropout about 3 ns (PCG64's words drawn one call at a time, then a compare, a scale and a
   product, each its own pass). Here each is one loop over memory:

   - GELU (GPT-2's gelu_new): 0.5 x (1 + tanh(z)) with z = sqrt(2/pi) (x + 0.044715 x^3), computed as
     x / (1 + exp(-2z)) (the same function: 0.5 (1 + tanh(z)) is the logistic of 2z). exp is a Cephes-style
     polynomial the compiler vectorises; its relative error is a few float32 ulps.
   - Dropout: NumPy's PCG64 stream (128-bit LCG, XSL-RR output) from the state NumPy seeded, each 64-bit word
     giving two 32-bit draws (low half first, as NumPy's random_raw viewed as uint32). An element is kept
     where its draw >= threshold. The stream is split into LANES contiguous parts, each started by the
     LCG's jump-ahead, so the multiplications of the parts overlap; every element gets the draw it gets from
     NumPy in order.
   - The blocked attention's softmax (its -inf tile added in the same pass) and the scores' gradient through
     softmax and dropout, one pass each where PyTorch takes three.
*/
#include <stdint.h>
#include <string.h>

typedef unsigned __int128 u128;

/* ---------- GELU ---------- */

static inline float exp_approx(float x) {
    /* within a few ulps over the float32 normal range; 0 below it (so exp(-inf) = 0, as a masked score needs),
       exp(88) above it, NaN for NaN */
    float below = x < -87.0f ? 0.0f : 1.0f;
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float n = __builtin_rintf(x * 1.44269504088896341f);
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale * below;
}

#define GELU_K 0.7978845608028654f  /* sqrt(2 / pi) */
#define GELU_C 0.044715f

void bg_gelu_forward(const float *restrict x, float *restrict y, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        float v = x[i];
        float two_z = 2.0f * GELU_K * (v + GELU_C * v * v * v);
        y[i] = v / (1.0f + exp_approx(-two_z));
    }
}

void bg_gelu_backward(const float *restrict grad, const float *restrict x, float *restrict dx, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        float v = x[i];
        float two_z = 2.0f * GELU_K * (v + GELU_C * v * v * v);
        float e = exp_approx(-two_z);
        float s = 1.0f / (1.0f + e);
        /* d/dx [x s(2z)] = s + x s (1 - s) d(2z)/dx, and s (1 - s) = s s e without the cancellation */
        float d_two_z = 2.0f * GELU_K * (1.0f + 3.0f * GELU_C * v * v);
        dx[i] = grad[i] * (s + v * s * s * e * d_two_z);
    }
}

/* ---------- attention's softmax ---------- */

/* probs = softmax of rows first..last-1 of `k` scores; from column mask_from on, a row first gets its bias row
   (row % queries of the (queries, k - mask_from) tile, -inf where it may not look) added. Every row must see
   at least one key. */
void bg_softmax(const float *restrict scores, float *restrict probs, int64_t first, int64_t last, int64_t k,
                const float *restrict bias, int64_t mask_from, int64_t queries) {
    for (int64_t r = first; r < last; r++) {
        const float *s = scores + r * k;
        float *p = probs + r * k;
        const float *b = bias ? bias + (r % queries) * (k - mask_from) : 0;
        int64_t plain = bias ? mask_from : k;
        float top = -__builtin_inff();
#pragma omp simd reduction(max : top)
        for (int64_t j = 0; j < plain; j++) top = s[j] > top ? s[j] : top;
#pragma omp simd reduction(max : top)
        for (int64_t j = plain; j < k; j++) {
            p[j] = s[j] + b[j - plain];
            top = p[j] > top ? p[j] : top;
        }
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < plain; j++) {
            p[j] = exp_approx(s[j] - top);
            sum += p[j];
        }
#pragma omp simd reduction(+ : sum)
        for (int64_t j = plain; j < k; j++) {
            p[j] = exp_approx(p[j] - top);
            sum += p[j];
        }
        float inv = 1.0f / sum;
#pragma omp simd
        for (int64_t j = 0; j < k; j++) p[j] *= inv;
    }
}

/* the scores' gradient of rows first..last-1, in place of d_kept: kept * d_kept - probs * row_dot, where
   kept = probs * mask and row_dot = rowsum(dOut * Out), for row i (head i / queries, query i % queries) at
   row_dot[head * head_stride + query * query_stride] */
void bg_softmax_backward(float *d_kept, const float *kept, const float *probs, const float *row_dot,
                         int64_t head_stride, int64_t query_stride, int64_t first, int64_t last, int64_t k,
                         int64_t queries) {
    for (int64_t r = first; r < last; r++) {
        float dot = row_dot[(r / queries) * head_stride + (r % queries) * query_stride];
        float *d = d_kept + r * k;
        const float *kp = kept + r * k, *pp = probs + r * k;
#pragma omp simd
        for (int64_t j = 0; j < k; j++) d[j] = kp[j] * d[j] - pp[j] * dot;
    }
}

/* ---------- dropout ---------- */

#define LANES 4   /* four 128-bit states and the constants fit the registers */
#define WORDS 256 /* words per lane and round: the round's draws stay in L1 */
static const u128 PCG_MULT = ((u128)0x2360ED051FC65DA4ULL << 64) | 0x4385DF649FCCF645ULL;

static inline uint64_t pcg_next(u128 *state, u128 inc) {
    *state = *state * PCG_MULT + inc;
    uint64_t hi = (uint64_t)(*state >> 64), lo = (uint64_t)*state;
    uint64_t v = hi ^ lo;
    unsigned rot = (unsigned)(hi >> 58);
    return (v >> rot) | (v << ((-rot) & 63));
}

/* the state after `delta` steps: the LCG's jump-ahead by squaring (as pcg_advance_lcg_128 does) */
static u128 pcg_advance(u128 state, u128 delta, u128 inc) {
    u128 acc_mult = 1, acc_plus = 0, cur_mult = PCG_MULT, cur_plus = inc;
    while (delta > 0) {
        if (delta & 1) {
            acc_mult *= cur_mult;
            acc_plus = acc_plus * cur_mult + cur_plus;
        }
        cur_plus = (cur_mult + 1) * cur_plus;
        cur_mult *= cur_mult;
        delta >>= 1;
    }
    return acc_mult * state + acc_plus;
}

/* count elements of out = x * mask from their 32-bit draws (a word's low half first, as NumPy's uint32 view) */
static void apply(const uint64_t *words, const float *restrict x, float *restrict out, float *restrict mask,
                  int64_t count, uint32_t threshold, float scale) {
    const uint32_t *draw = (const uint32_t *)words;
    if (mask) {
        for (int64_t i = 0; i < count; i++) {
            float m = draw[i] >= threshold ? scale : 0.0f;
            mask[i] = m;
            out[i] = x[i] * m;
        }
    } else {
        for (int64_t i = 0; i < count; i++) out[i] = x[i] * (draw[i] >= threshold ? scale : 0.0f);
    }
}

/* out = x * mask (and the mask stored where `mask` is not NULL) for n elements, the mask 0 where dropped and
   `scale` where kept, drawn from the PCG64 state (state_hi, state_lo) with increment (inc_hi, inc_lo) as NumPy
   holds them after seeding, `skip` words further on (a part of a larger tensor starting at element 2 skip) */
void bg_dropout(const float *x, float *out, float *mask, int64_t n, int64_t skip, uint64_t state_hi,
                uint64_t state_lo, uint64_t inc_hi, uint64_t inc_lo, uint32_t threshold, float scale) {
    u128 inc = ((u128)inc_hi << 64) | inc_lo;
    u128 state = pcg_advance(((u128)state_hi << 64) | state_lo, (u128)skip, inc);
    int64_t words = (n + 1) / 2, per_lane = words / LANES;
    u128 s0 = state, s1 = pcg_advance(state, (u128)per_lane, inc), s2 = pcg_advance(state, (u128)(2 * per_lane), inc),
         s3 = pcg_advance(state, (u128)(3 * per_lane), inc);
    uint64_t buf[LANES][WORDS];
    for (int64_t i0 = 0; i0 < per_lane; i0 += WORDS) {
        int64_t nb = per_lane - i0 < WORDS ? per_lane - i0 : WORDS;
        for (int64_t k = 0; k < nb; k++) {  /* four independent chains: their multiplications overlap */
            buf[0][k] = pcg_next(&s0, inc);
            buf[1][k] = pcg_next(&s1, inc);
            buf[2][k] = pcg_next(&s2, inc);
            buf[3][k] = pcg_next(&s3, inc);
        }
        for (int j = 0; j < LANES; j++) {
            int64_t at = 2 * (j * per_lane + i0);
            apply(buf[j], x + at, out + at, mask ? mask + at : 0, 2 * nb, threshold, scale);
        }
    }
    u128 tail = pcg_advance(state, (u128)(LANES * per_lane), inc);
    for (int64_t w0 = LANES * per_lane; w0 < words; w0 += WORDS) {
        int64_t nb = words - w0 < WORDS ? words - w0 : WORDS;
        for (int64_t k = 0; k < nb; k++) buf[0][k] = pcg_next(&tail, inc);
        int64_t at = 2 * w0, count = n - at < 2 * nb ? n - at : 2 * nb;
        apply(buf[0], x + at, out + at, mask ? mask + at : 0, count, threshold, scale);
    }
}
