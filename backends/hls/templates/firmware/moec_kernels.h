// moec HLS kernels: the building blocks the generated top function calls.
//
// Every kernel takes a small configuration struct (sizes, parallel lanes, reuse factor) from
// parameters.h. Loops over tokens, features and experts are bounded and pipelined; only the
// `lanes` loops (at most the `max_unroll` knob) are unrolled. Matrix products run in the
// declared fixed-point types (weight_t x act_t summed in accum_t); per-token statistics of
// norms and softmaxes (one value per token or head) run in single-precision float through
// hls::exp / hls::sqrt at synthesis and <cmath> in C simulation.
#ifndef MOEC_KERNELS_H_
#define MOEC_KERNELS_H_

#include "defines.h"

#ifdef __SYNTHESIS__
#include "hls_math.h"
#define MOEC_EXP hls::exp
#define MOEC_SQRT hls::sqrt
#define MOEC_TANH hls::tanh
#define MOEC_ERF hls::erf
#else
#include <cmath>
#define MOEC_EXP std::exp
#define MOEC_SQRT std::sqrt
#define MOEC_TANH std::tanh
#define MOEC_ERF std::erf
#endif

#ifndef __SYNTHESIS__
namespace moec {
// C simulation only: the largest |value| an accumulator (accum_t) was asked to take, before its
// rounding and overflow; moec csim reads it to warn when accum_t saturates or wraps.
inline double &accum_peak() {
    static double peak = 0.0;
    return peak;
}
inline void note_sum(double v) {
    if (v < 0) v = -v;
    if (v > accum_peak()) accum_peak() = v;
}
}  // namespace moec
#define MOEC_NOTE_SUM(v) moec::note_sum(v)
#else
#define MOEC_NOTE_SUM(v) ((void)0)
#endif

namespace moec {

// ---- activations -------------------------------------------------------------------------
enum act_kind { ACT_IDENTITY = 0, ACT_RELU = 1, ACT_SILU = 2, ACT_GELU = 3, ACT_GELU_TANH = 4 };

template <int ACT>
inline float activate(float x) {
    if (ACT == ACT_RELU) return x > 0.0f ? x : 0.0f;
    if (ACT == ACT_SILU) return x / (1.0f + MOEC_EXP(-x));
    if (ACT == ACT_GELU) return 0.5f * x * (1.0f + MOEC_ERF(x * 0.70710678118654752f));
    if (ACT == ACT_GELU_TANH)
        return 0.5f * x * (1.0f + MOEC_TANH(0.79788456080286536f * (x + 0.044715f * x * x * x)));
    return x;
}

// ---- configurations ----------------------------------------------------------------------
// A linear layer y = x W (+ b), W stored [n_in][n_out] row-major. `lanes` outputs are computed
// in parallel (the unrolled loop); the input loop is pipelined with II = reuse, so each of the
// ceil(lanes / reuse) multipliers serves `reuse` products.
template <unsigned IN, unsigned OUT, unsigned LANES, unsigned REUSE, bool BIAS>
struct linear_config {
    static const unsigned n_in = IN;
    static const unsigned n_out = OUT;
    static const unsigned lanes = LANES;
    static const unsigned reuse = REUSE;
    static const unsigned multipliers = (LANES + REUSE - 1) / REUSE;
    static const bool bias = BIAS;
};

// ---- linear layers (one token) -----------------------------------------------------------
template <class C>
void linear(const act_t in[C::n_in], act_t out[C::n_out], const weight_t *w, const weight_t *b) {
#pragma HLS INLINE off
#pragma HLS ALLOCATION operation instances=mul limit=C::multipliers
Blocks:
    for (unsigned o0 = 0; o0 < C::n_out; o0 += C::lanes) {
        accum_t acc[C::lanes];
#pragma HLS ARRAY_PARTITION variable=acc complete
    Init:
        for (unsigned l = 0; l < C::lanes; l++) {
#pragma HLS UNROLL
            MOEC_NOTE_SUM((C::bias && o0 + l < C::n_out) ? b[o0 + l].to_double() : 0.0);
            acc[l] = (C::bias && o0 + l < C::n_out) ? accum_t(b[o0 + l]) : accum_t(0);
        }
        unsigned row = o0;  // index of w[i][o0]
    Reduce:
        for (unsigned i = 0; i < C::n_in; i++, row += C::n_out) {
#pragma HLS PIPELINE II=C::reuse
            act_t xi = in[i];
        Lanes:
            for (unsigned l = 0; l < C::lanes; l++) {
#pragma HLS UNROLL
                if (o0 + l < C::n_out) {
                    MOEC_NOTE_SUM(acc[l].to_double() + xi.to_double() * w[row + l].to_double());
                    acc[l] += xi * w[row + l];
                }
            }
        }
    Store:
        for (unsigned l = 0; l < C::lanes; l++) {
#pragma HLS UNROLL
            if (o0 + l < C::n_out) out[o0 + l] = act_t(acc[l]);
        }
    }
}

// Ternary weights in {-1, 0, 1}: the reduction only adds and subtracts; the per-matrix scale is
// applied once per output by a single multiplier.
template <class C>
void linear_ternary(const act_t in[C::n_in], act_t out[C::n_out], const tern_t *w, weight_t scale,
                    const weight_t *b) {
#pragma HLS INLINE off
Blocks:
    for (unsigned o0 = 0; o0 < C::n_out; o0 += C::lanes) {
        accum_t acc[C::lanes];
#pragma HLS ARRAY_PARTITION variable=acc complete
    Init:
        for (unsigned l = 0; l < C::lanes; l++) {
#pragma HLS UNROLL
            acc[l] = 0;
        }
        unsigned row = o0;  // index of w[i][o0], advanced by additions only
    Reduce:
        for (unsigned i = 0; i < C::n_in; i++, row += C::n_out) {
#pragma HLS PIPELINE II=C::reuse
            act_t xi = in[i];
        Lanes:
            for (unsigned l = 0; l < C::lanes; l++) {
#pragma HLS UNROLL
                if (o0 + l < C::n_out) {
                    tern_t t = w[row + l];
                    if (t == 1) {
                        MOEC_NOTE_SUM(acc[l].to_double() + xi.to_double());
                        acc[l] += xi;
                    } else if (t == -1) {
                        MOEC_NOTE_SUM(acc[l].to_double() - xi.to_double());
                        acc[l] -= xi;
                    }
                }
            }
        }
    Store:  // pipelined, not unrolled: one multiplier applies the scale to every output
        for (unsigned l = 0; l < C::lanes; l++) {
#pragma HLS PIPELINE II=1
            if (o0 + l < C::n_out) {
                MOEC_NOTE_SUM(acc[l].to_double() * scale.to_double());
                accum_t scaled = acc[l] * scale;
                out[o0 + l] = C::bias ? act_t(scaled + b[o0 + l]) : act_t(scaled);
            }
        }
    }
}

// One linear layer of either weight form; `scale` is ignored for full-precision weights.
template <class C, bool TERNARY>
struct project;

template <class C>
struct project<C, false> {
    static void run(const act_t in[C::n_in], act_t out[C::n_out], const weight_t *w, weight_t, const weight_t *b) {
        linear<C>(in, out, w, b);
    }
};

template <class C>
struct project<C, true> {
    static void run(const act_t in[C::n_in], act_t out[C::n_out], const tern_t *w, weight_t scale,
                    const weight_t *b) {
        linear_ternary<C>(in, out, w, scale, b);
    }
};

// ---- norms (all tokens) ------------------------------------------------------------------
// LAYER: (x - mean) / sqrt(var + eps) * g + b; otherwise RMSNorm: x / sqrt(mean(x^2) + eps) * g.
template <unsigned DIM, bool LAYER>
void norm(const act_t in[MOEC_MAX_TOKENS][DIM], act_t out[MOEC_MAX_TOKENS][DIM], int n, float eps,
          const weight_t g[DIM], const weight_t b[DIM]) {
#pragma HLS INLINE off
Tokens:
    for (int t = 0; t < n; t++) {
#pragma HLS LOOP_TRIPCOUNT min=1 max=MOEC_MAX_TOKENS
        float sum = 0.0f, sq = 0.0f;
    Stats:
        for (unsigned i = 0; i < DIM; i++) {
#pragma HLS PIPELINE II=1
            float v = in[t][i].to_float();
            sum += v;
            sq += v * v;
        }
        float mean = LAYER ? sum / DIM : 0.0f;
        float var = LAYER ? sq / DIM - mean * mean : sq / DIM;
        float inv = 1.0f / MOEC_SQRT((var > 0.0f ? var : 0.0f) + eps);
    Scale:
        for (unsigned i = 0; i < DIM; i++) {
#pragma HLS PIPELINE II=1
            float v = (in[t][i].to_float() - mean) * inv * g[i].to_float();
            out[t][i] = act_t(LAYER ? v + b[i].to_float() : v);
        }
    }
}

// ---- elementwise -------------------------------------------------------------------------
template <unsigned DIM>
void add(const act_t a[MOEC_MAX_TOKENS][DIM], const act_t b[MOEC_MAX_TOKENS][DIM], act_t out[MOEC_MAX_TOKENS][DIM],
         int n) {
#pragma HLS INLINE off
Tokens:
    for (int t = 0; t < n; t++) {
#pragma HLS LOOP_TRIPCOUNT min=1 max=MOEC_MAX_TOKENS
    Features:
        for (unsigned i = 0; i < DIM; i++) {
#pragma HLS PIPELINE II=1
            out[t][i] = a[t][i] + b[t][i];
        }
    }
}

template <unsigned DIM>
void zero(act_t out[MOEC_MAX_TOKENS][DIM], int n) {
#pragma HLS INLINE off
Tokens:
    for (int t = 0; t < n; t++) {
#pragma HLS LOOP_TRIPCOUNT min=1 max=MOEC_MAX_TOKENS
    Features:
        for (unsigned i = 0; i < DIM; i++) {
#pragma HLS PIPELINE II=1
            out[t][i] = 0;
        }
    }
}

// ---- attention (one sequence) ------------------------------------------------------------
// Multi-head / grouped-query self-attention with a single-pass (online) softmax per query and
// head. Q/K/V/O are linear layers of configurations QC (dim -> heads*head_dim), KC (dim ->
// kv_heads*head_dim) and OC (heads*head_dim -> dim).
template <unsigned DIM, unsigned HEADS, unsigned KV_HEADS, unsigned HEAD_DIM, bool CAUSAL, class QC, class KC,
          class OC>
void attention(const act_t x[MOEC_MAX_TOKENS][DIM], act_t y[MOEC_MAX_TOKENS][DIM], int n, const weight_t *wq,
               const weight_t *bq, const weight_t *wk, const weight_t *bk, const weight_t *wv, const weight_t *bv,
               const weight_t *wo, const weight_t *bo) {
#pragma HLS INLINE off
    static act_t q[MOEC_MAX_TOKENS][HEADS * HEAD_DIM];
    static act_t k[MOEC_MAX_TOKENS][KV_HEADS * HEAD_DIM];
    static act_t v[MOEC_MAX_TOKENS][KV_HEADS * HEAD_DIM];
    static act_t ctx[MOEC_MAX_TOKENS][HEADS * HEAD_DIM];
    const float scale = 1.0f / MOEC_SQRT(float(HEAD_DIM));
Project:
    for (int t = 0; t < n; t++) {
#pragma HLS LOOP_TRIPCOUNT min=1 max=MOEC_MAX_TOKENS
        linear<QC>(x[t], q[t], wq, bq);
        linear<KC>(x[t], k[t], wk, bk);
        linear<KC>(x[t], v[t], wv, bv);
    }
Queries:
    for (int t = 0; t < n; t++) {
#pragma HLS LOOP_TRIPCOUNT min=1 max=MOEC_MAX_TOKENS
    Heads:
        for (unsigned h = 0; h < HEADS; h++) {
            const unsigned kh = h / (HEADS / KV_HEADS);
            float m = -3.0e38f, l = 0.0f;
            float acc[HEAD_DIM];
        Clear:
            for (unsigned d = 0; d < HEAD_DIM; d++) {
#pragma HLS PIPELINE II=1
                acc[d] = 0.0f;
            }
            const int last = CAUSAL ? t : n - 1;
        Keys:
            for (int s = 0; s <= last; s++) {
#pragma HLS LOOP_TRIPCOUNT min=1 max=MOEC_MAX_TOKENS
                accum_t dot = 0;
            Dot:
                for (unsigned d = 0; d < HEAD_DIM; d++) {
#pragma HLS PIPELINE II=1
                    MOEC_NOTE_SUM(dot.to_double() + q[t][h * HEAD_DIM + d].to_double() * k[s][kh * HEAD_DIM + d].to_double());
                    dot += q[t][h * HEAD_DIM + d] * k[s][kh * HEAD_DIM + d];
                }
                float score = dot.to_float() * scale;
                float m_new = score > m ? score : m;
                float correction = MOEC_EXP(m - m_new);
                float p = MOEC_EXP(score - m_new);
                l = l * correction + p;
            Accumulate:
                for (unsigned d = 0; d < HEAD_DIM; d++) {
#pragma HLS PIPELINE II=1
                    acc[d] = acc[d] * correction + p * v[s][kh * HEAD_DIM + d].to_float();
                }
                m = m_new;
            }
        Normalise:
            for (unsigned d = 0; d < HEAD_DIM; d++) {
#pragma HLS PIPELINE II=1
                ctx[t][h * HEAD_DIM + d] = act_t(acc[d] / l);
            }
        }
    }
Output:
    for (int t = 0; t < n; t++) {
#pragma HLS LOOP_TRIPCOUNT min=1 max=MOEC_MAX_TOKENS
        linear<OC>(ctx[t], y[t], wo, bo);
    }
}

// ---- routing -----------------------------------------------------------------------------
// Token queues of one expert group: queue[e][0..count[e]) are the tokens routed to expert e and
// gate[e][...] their routing weights.
template <unsigned EXPERTS>
struct queues {
    int count[EXPERTS];
    int token[EXPERTS][MOEC_MAX_TOKENS];
    route_t gate[EXPERTS][MOEC_MAX_TOKENS];
};

inline bool in_group(int modality, unsigned long long mask) {
    return modality >= 0 && modality < 64 && ((mask >> modality) & 1ULL);
}

template <unsigned EXPERTS>
void clear_queues(queues<EXPERTS> &q) {
Experts:
    for (unsigned e = 0; e < EXPERTS; e++) {
#pragma HLS PIPELINE II=1
        q.count[e] = 0;
    }
}

// Learned top-k router: gate GEMM, then one pass over the expert logits that keeps the running
// softmax maximum and normaliser and the k best logits (insertion into a sorted list).
// SOFTMAX=false scores with a sigmoid instead.
template <unsigned DIM, unsigned EXPERTS, unsigned K, bool SOFTMAX, bool RENORMALIZE, class GC>
void route_top_k(const act_t x[MOEC_MAX_TOKENS][DIM], const int modality[MOEC_MAX_TOKENS], int n,
                 unsigned long long mask, float scale, const weight_t *w_gate, queues<EXPERTS> &q) {
#pragma HLS INLINE off
    clear_queues(q);
Tokens:
    for (int t = 0; t < n; t++) {
#pragma HLS LOOP_TRIPCOUNT min=1 max=MOEC_MAX_TOKENS
        if (!in_group(modality[t], mask)) continue;
        act_t logits[EXPERTS];
        linear<GC>(x[t], logits, w_gate, 0);
        float m = -3.0e38f, l = 0.0f;
        float best[K];
        int best_id[K];
#pragma HLS ARRAY_PARTITION variable=best complete
#pragma HLS ARRAY_PARTITION variable=best_id complete
    Reset:
        for (unsigned j = 0; j < K; j++) {
#pragma HLS UNROLL
            best[j] = -3.0e38f;
            best_id[j] = -1;
        }
    Scan:
        for (unsigned e = 0; e < EXPERTS; e++) {
#pragma HLS PIPELINE II=1
            float z = logits[e].to_float();
            if (SOFTMAX) {
                float m_new = z > m ? z : m;
                l = l * MOEC_EXP(m - m_new) + MOEC_EXP(z - m_new);
                m = m_new;
            }
            bool placed = false;
            float carry = z;
            int carry_id = int(e);
        Insert:
            for (unsigned j = 0; j < K; j++) {
#pragma HLS UNROLL
                if (placed || carry > best[j]) {
                    float tv = best[j];
                    int ti = best_id[j];
                    best[j] = carry;
                    best_id[j] = carry_id;
                    carry = tv;
                    carry_id = ti;
                    placed = true;
                }
            }
        }
        float weight[K];
        float total = 0.0f;
    Weights:
        for (unsigned j = 0; j < K; j++) {
#pragma HLS UNROLL
            weight[j] = SOFTMAX ? MOEC_EXP(best[j] - m) / l : 1.0f / (1.0f + MOEC_EXP(-best[j]));
            total += weight[j];
        }
    Enqueue:
        for (unsigned j = 0; j < K; j++) {
            float w = RENORMALIZE ? weight[j] / (SOFTMAX ? total : total + 1e-20f) : weight[j];
            int e = best_id[j];
            q.token[e][q.count[e]] = t;
            q.gate[e][q.count[e]] = route_t(w * scale);
            q.count[e]++;
        }
    }
}

// Routing without a learned router (weight 1): BY_TASK takes the task id, BY_MODALITY the
// modality id, otherwise Knuth's multiplicative hash of the token's position in the sequence.
// Returns the number of tokens whose id was out of range (they are not processed).
enum route_by { BY_MODALITY = 0, BY_TASK = 1, BY_HASH = 2 };

template <unsigned EXPERTS, int BY>
int route_fixed(const int modality[MOEC_MAX_TOKENS], const int task[MOEC_MAX_TOKENS], int n, unsigned long long mask,
                queues<EXPERTS> &q) {
#pragma HLS INLINE off
    clear_queues(q);
    int bad = 0;
Tokens:
    for (int t = 0; t < n; t++) {
#pragma HLS LOOP_TRIPCOUNT min=1 max=MOEC_MAX_TOKENS
#pragma HLS PIPELINE II=1
        if (!in_group(modality[t], mask)) continue;
        int e;
        if (BY == BY_TASK) {
            e = task[t];
        } else if (BY == BY_MODALITY) {
            e = modality[t];
        } else {
            unsigned long long h = ((unsigned long long)(unsigned)t * 2654435761ULL) & 0xffffffffULL;
            e = int((h * EXPERTS) >> 32);
        }
        if (e < 0 || e >= int(EXPERTS)) {
            bad++;
            continue;
        }
        q.token[e][q.count[e]] = t;
        q.gate[e][q.count[e]] = 1;
        q.count[e]++;
    }
    return bad;
}

// ---- experts (Edge-MoE order) ------------------------------------------------------------
// Experts run one at a time over their queued tokens, so each expert's weights are read once per
// layer; with STREAM the expert's matrices are first copied from off-chip memory (m_axi) into
// on-chip buffers. The routing weight is folded into the last linear layer: the hidden vector is
// scaled by it before the down projection, whose result is accumulated into y.
template <unsigned DIM, unsigned HIDDEN, unsigned EXPERTS, bool GLU, int ACT, bool TERNARY, bool BIAS, bool STREAM,
          class UPC, class DOWNC, class WT>
void experts(const act_t x[MOEC_MAX_TOKENS][DIM], act_t y[MOEC_MAX_TOKENS][DIM], int n, const queues<EXPERTS> &q,
             const WT *w_up, const WT *w_gate, const WT *w_down, const weight_t *b_up, const weight_t *b_gate,
             const weight_t *b_down, const weight_t *scales) {
#pragma HLS INLINE off
    static WT up_local[STREAM ? DIM * HIDDEN : 1];
    static WT gate_local[STREAM && GLU ? DIM * HIDDEN : 1];
    static WT down_local[STREAM ? HIDDEN * DIM : 1];
    zero<DIM>(y, n);
Experts:
    for (unsigned e = 0; e < EXPERTS; e++) {
        if (q.count[e] == 0) continue;  // an idle expert's weights are never read
        const WT *up = w_up + e * DIM * HIDDEN;
        const WT *gate = GLU ? w_gate + e * DIM * HIDDEN : 0;
        const WT *down = w_down + e * HIDDEN * DIM;
        if (STREAM) {
        LoadUp:
            for (unsigned i = 0; i < DIM * HIDDEN; i++) {
#pragma HLS PIPELINE II=1
                up_local[i] = up[i];
                if (GLU) gate_local[i] = gate[i];
            }
        LoadDown:
            for (unsigned i = 0; i < HIDDEN * DIM; i++) {
#pragma HLS PIPELINE II=1
                down_local[i] = down[i];
            }
            up = up_local;
            gate = gate_local;
            down = down_local;
        }
        const weight_t s_up = TERNARY ? scales[e * 3 + 0] : weight_t(0);
        const weight_t s_gate = TERNARY ? scales[e * 3 + 1] : weight_t(0);
        const weight_t s_down = TERNARY ? scales[e * 3 + 2] : weight_t(0);
    Tokens:
        for (int j = 0; j < q.count[e]; j++) {
#pragma HLS LOOP_TRIPCOUNT min=0 max=MOEC_MAX_TOKENS
            const int t = q.token[e][j];
            const route_t g = q.gate[e][j];
            act_t hu[HIDDEN], hg[HIDDEN], h[HIDDEN], o[DIM];
            project<UPC, TERNARY>::run(x[t], hu, up, s_up, BIAS ? b_up + e * HIDDEN : 0);
            if (GLU) project<UPC, TERNARY>::run(x[t], hg, gate, s_gate, BIAS ? b_gate + e * HIDDEN : 0);
        Hidden:
            for (unsigned f = 0; f < HIDDEN; f++) {
#pragma HLS PIPELINE II=1
                float a = GLU ? activate<ACT>(hg[f].to_float()) * hu[f].to_float() : activate<ACT>(hu[f].to_float());
                h[f] = act_t(a * g.to_float());
            }
            project<DOWNC, TERNARY>::run(h, o, down, s_down, 0);
        Combine:
            for (unsigned d = 0; d < DIM; d++) {
#pragma HLS PIPELINE II=1
                y[t][d] += BIAS ? act_t(o[d] + g * b_down[e * DIM + d]) : o[d];
            }
        }
    }
}

// A dense (always-on) feed-forward layer over the tokens of `mask`: one expert, weight 1. Rows
// of other tokens are zero.
template <unsigned DIM, unsigned HIDDEN, bool GLU, int ACT, bool TERNARY, bool BIAS, class UPC, class DOWNC, class WT>
void ffn(const act_t x[MOEC_MAX_TOKENS][DIM], act_t y[MOEC_MAX_TOKENS][DIM], const int modality[MOEC_MAX_TOKENS],
         int n, unsigned long long mask, const WT *w_up, const WT *w_gate, const WT *w_down, const weight_t *b_up,
         const weight_t *b_gate, const weight_t *b_down, const weight_t *scales) {
#pragma HLS INLINE off
    static queues<1> q;
    clear_queues(q);
Tokens:
    for (int t = 0; t < n; t++) {
#pragma HLS LOOP_TRIPCOUNT min=1 max=MOEC_MAX_TOKENS
        if (!in_group(modality[t], mask)) continue;
        q.token[0][q.count[0]] = t;
        q.gate[0][q.count[0]] = 1;
        q.count[0]++;
    }
    experts<DIM, HIDDEN, 1, GLU, ACT, TERNARY, BIAS, false, UPC, DOWNC, WT>(x, y, n, q, w_up, w_gate, w_down, b_up,
                                                                          b_gate, b_down, scales);
}

}  // namespace moec

#endif
