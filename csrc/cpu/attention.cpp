// Attention forward and backward on the CPU, blocked as FlashAttention is: query blocks x key blocks
// with the online softmax, so no (Nq, Nk) buffer exists. The QK^T and PV tiles (and the five tiles
// of the backward) run through BLAS; exp, max and the rescaling are vectorised row loops.
//
// Semantics (those of fastattn's Triton kernel and of torch SDPA): q (B, Hq, Nq, D), k (B, Hkv, Nk, D),
// v (B, Hkv, Nk, Dv), any strides, query head h reads key/value head h / (Hq / Hkv); top-left causal
// (query i sees keys j <= i); mask a (B, Hq, Nq, Nk) view read through its strides (stride 0 where
// broadcast), bool (true = attend) or floating (added to the scaled scores); dropout on the weights
// with the Philox RNG of dropout_rng.h (stream b·Hq + h, row i, column j). lse is float32, +inf for a fully masked row (whose
// output and gradients are 0). Inputs in bfloat16/float16 are computed in float32.
#include <torch/library.h>

#include <cmath>

#include "common.h"

namespace fastattn::cpu {
namespace {

// Forward tiles: up to 256 query rows against 512 keys. Tall query blocks re-read each key/value
// block fewer times and give BLAS long GEMMs; the query block shrinks (to 32) when the problem is
// too small to give every thread a few tasks (forward_block_rows).
constexpr int64_t kFwdMaxBlockQ = 256;
constexpr int64_t kFwdMinBlockQ = 32;
constexpr int64_t kFwdBlockK = 512;
// Backward tiles: five GEMMs and three score-sized buffers per tile pair, so smaller tiles.
constexpr int64_t kBwdBlockQ = 64;
constexpr int64_t kBwdBlockK = 128;

// The attention mask, read in place: bool entries become 0 / -inf, floating ones are added.
struct MaskReader {
  const char* data = nullptr;
  at::ScalarType dtype = at::kBool;
  int64_t stride_b = 0, stride_h = 0, stride_i = 0, stride_j = 0;

  explicit MaskReader(const c10::optional<at::Tensor>& mask) {
    if (!mask.has_value()) return;
    const at::Tensor& m = *mask;
    data = static_cast<const char*>(m.const_data_ptr());
    dtype = m.scalar_type();
    stride_b = m.stride(0) * m.element_size();
    stride_h = m.stride(1) * m.element_size();
    stride_i = m.stride(2) * m.element_size();
    stride_j = m.stride(3) * m.element_size();
  }

  bool present() const { return data != nullptr; }

  // Applies the mask of query row (b, h, i) over keys [j0, j0 + n) to the scores s.
  void apply(float* s, int64_t n, int64_t b, int64_t h, int64_t i, int64_t j0) const {
    const char* row = data + b * stride_b + h * stride_h + i * stride_i + j0 * stride_j;
    switch (dtype) {
      case at::kBool:
        for (int64_t c = 0; c < n; ++c)
          if (!*reinterpret_cast<const bool*>(row + c * stride_j)) s[c] = -kInf;
        break;
      case at::kFloat:
        add<float>(s, n, row);
        break;
      case at::kDouble:
        add<double>(s, n, row);
        break;
      case at::kBFloat16:
        add<at::BFloat16>(s, n, row);
        break;
      case at::kHalf:
        add<at::Half>(s, n, row);
        break;
      default:
        TORCH_CHECK(false, "unreachable mask dtype");
    }
  }

  template <typename T>
  void add(float* s, int64_t n, const char* row) const {
    for (int64_t c = 0; c < n; ++c) s[c] += load_float(reinterpret_cast<const T*>(row + c * stride_j));
  }
};

struct Dropout {
  bool active = false;
  uint64_t seed = 0;
  uint32_t threshold = 0;
  float keep_scale = 1.f;

  Dropout(double p, int64_t seed_) {
    active = p > 0.0;
    seed = static_cast<uint64_t>(seed_);
    threshold = dropout_threshold(p);
    keep_scale = static_cast<float>(1.0 / (1.0 - p));
  }
  // Calls fn(c, kept) for the columns j0 + c, c in [0, n), of row `row` of stream `stream` (b·Hq + h
  // for the (B, Hq, Nq, Nk) weights). One Philox call per 4 columns (dropout_rng.h).
  template <typename Fn>
  void for_each_keep(int64_t stream, int64_t row, int64_t j0, int64_t n, Fn&& fn) const {
    dropout_row_keep(seed, threshold, static_cast<uint32_t>(stream), static_cast<uint32_t>(row), j0, n, fn);
  }
  // The same with the factor: 0 when dropped, 1 / (1 - p) when kept.
  template <typename Fn>
  void for_each_factor(int64_t stream, int64_t row, int64_t j0, int64_t n, Fn&& fn) const {
    const float kept_scale = keep_scale;
    for_each_keep(stream, row, j0, n, [&fn, kept_scale](int64_t c, bool kept) { fn(c, kept ? kept_scale : 0.f); });
  }
};

// Everything a tile loop needs, as raw float32 pointers and strides (in elements).
struct Problem {
  int64_t batch, heads_q, heads_kv, group, n_q, n_k, dim, dim_v;
  const float *q, *k, *v;
  int64_t q_sb, q_sh, q_sn, k_sb, k_sh, k_sn, v_sb, v_sh, v_sn;
  float scale;
  bool causal;
  MaskReader mask;
  Dropout dropout;

  Problem(const at::Tensor& q32, const at::Tensor& k32, const at::Tensor& v32, const c10::optional<at::Tensor>& m,
          double scale_, bool causal_, double p, int64_t seed)
      : mask(m), dropout(p, seed) {
    batch = q32.size(0), heads_q = q32.size(1), n_q = q32.size(2), dim = q32.size(3);
    heads_kv = k32.size(1), n_k = k32.size(2), dim_v = v32.size(3);
    if (dropout.active) check_dropout_extent(batch * heads_q, n_q, n_k, "attention");
    group = heads_q / heads_kv;
    q = q32.const_data_ptr<float>(), k = k32.const_data_ptr<float>(), v = v32.const_data_ptr<float>();
    q_sb = q32.stride(0), q_sh = q32.stride(1), q_sn = q32.stride(2);
    k_sb = k32.stride(0), k_sh = k32.stride(1), k_sn = k32.stride(2);
    v_sb = v32.stride(0), v_sh = v32.stride(1), v_sn = v32.stride(2);
    scale = static_cast<float>(scale_);
    causal = causal_;
  }

  const float* q_rows(int64_t b, int64_t h, int64_t i) const { return q + b * q_sb + h * q_sh + i * q_sn; }
  const float* k_rows(int64_t b, int64_t h, int64_t j) const {
    return k + b * k_sb + (h / group) * k_sh + j * k_sn;
  }
  const float* v_rows(int64_t b, int64_t h, int64_t j) const {
    return v + b * v_sb + (h / group) * v_sh + j * v_sn;
  }
  // Keys [0, key_end) can be seen by some query of rows [i0, i0 + rows).
  int64_t key_end(int64_t i0, int64_t rows) const { return causal ? std::min(n_k, i0 + rows) : n_k; }
  // First query that can see key j0 (top-left causal: i >= j).
  int64_t first_query(int64_t j0) const { return causal ? std::min(j0, n_q) : 0; }

  // Scores tile rows: S = scale * Q K^T was computed; this masks (causal, mask) row r = query i for
  // keys [j0, j0 + cols).
  void mask_row(float* s, int64_t cols, int64_t b, int64_t h, int64_t i, int64_t j0) const {
    if (causal) {
      const int64_t visible = std::clamp<int64_t>(i - j0 + 1, 0, cols);
      std::fill(s + visible, s + cols, -kInf);
    }
    if (mask.present()) mask.apply(s, cols, b, h, i, j0);
  }

};

// One query block of one (batch, head): online softmax over the key blocks.
void forward_block(const Problem& p, int64_t b, int64_t h, int64_t i0, int64_t block_q, float* out, float* lse,
                   float* scratch) {
  const int64_t rows = std::min(block_q, p.n_q - i0);
  float* scores = scratch;                     // block_q x kFwdBlockK
  float* acc = scores + block_q * kFwdBlockK;  // block_q x dim_v
  float* row_m = acc + block_q * p.dim_v;      // running max
  float* row_l = row_m + block_q;              // running sum of exp
  std::fill(acc, acc + rows * p.dim_v, 0.f);
  std::fill(row_m, row_m + rows, -kInf);
  std::fill(row_l, row_l + rows, 0.f);

  const float* q_tile = p.q_rows(b, h, i0);
  const int64_t key_end = p.key_end(i0, rows);
  for (int64_t j0 = 0; j0 < key_end; j0 += kFwdBlockK) {
    const int64_t cols = std::min(kFwdBlockK, key_end - j0);
    gemm(false, true, rows, cols, p.dim, p.scale, q_tile, p.q_sn, p.k_rows(b, h, j0), p.k_sn, 0.f, scores,
         kFwdBlockK);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = i0 + r;
      float* s = scores + r * kFwdBlockK;
      p.mask_row(s, cols, b, h, i, j0);
      const float block_max = row_max(s, cols);  // NaN (a NaN query row or scale) stays NaN: std::max
      const float m_new = std::max(block_max, row_m[r]);  // returns its first argument when unordered
      if (m_new == -kInf) {  // nothing visible yet: this block adds nothing
        std::fill(s, s + cols, 0.f);
        continue;
      }
      const float correction = row_m[r] == -kInf ? 0.f : exp_scalar(row_m[r] - m_new);
      row_l[r] = row_l[r] * correction + exp_shift_sum(s, cols, m_new);
      row_m[r] = m_new;
      if (correction != 1.f) scale_row(acc + r * p.dim_v, p.dim_v, correction);
      if (p.dropout.active) {
        p.dropout.for_each_factor(b * p.heads_q + h, i, j0, cols, [s](int64_t c, float f) { s[c] *= f; });
      }
    }
    gemm(false, false, rows, p.dim_v, cols, 1.f, scores, kFwdBlockK, p.v_rows(b, h, j0), p.v_sn, 1.f, acc, p.dim_v);
  }

  for (int64_t r = 0; r < rows; ++r) {
    float* dst = out + r * p.dim_v;
    const bool empty = row_l[r] == 0.f;  // fully masked row: zeros, lse = +inf
    const float inv = empty ? 0.f : 1.f / row_l[r];
    for (int64_t c = 0; c < p.dim_v; ++c) dst[c] = acc[r * p.dim_v + c] * inv;
    lse[r] = empty ? kInf : row_m[r] + std::log(row_l[r]);
  }
}

// Query rows per forward task: the tallest block that still gives each thread about four tasks.
int64_t forward_block_rows(int64_t n_q, int64_t heads_total) {
  const int64_t wanted_tasks = 4 * at::get_num_threads();
  int64_t block = kFwdMaxBlockQ;
  while (block > kFwdMinBlockQ && heads_total * ((n_q + block - 1) / block) < wanted_tasks) block /= 2;
  return block;
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const c10::optional<at::Tensor>& mask, double dropout_p) {
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
                    "fastattn attention: q, k, v must be 4-D (B, H, N, D), got ", q.sizes(), ", ", k.sizes(), ", ",
                    v.sizes());
  check_dtype(q, "q");
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                   "fastattn attention: q, k, v must share a dtype");
  TORCH_CHECK_VALUE(k.size(0) == q.size(0) && v.size(0) == q.size(0), "fastattn attention: batch sizes differ");
  TORCH_CHECK_VALUE(k.size(3) == q.size(3), "fastattn attention: k's head dim must equal q's");
  TORCH_CHECK_VALUE(v.size(1) == k.size(1) && v.size(2) == k.size(2),
                    "fastattn attention: v's (heads, length) must equal k's");
  TORCH_CHECK_VALUE(k.size(1) > 0 && q.size(1) % k.size(1) == 0,
                    "fastattn attention: q heads must be a multiple of k/v heads, got ", q.size(1), " and ", k.size(1));
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, "fastattn attention: dropout_p must be in [0, 1)");
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK_VALUE(m.sizes() == at::IntArrayRef({q.size(0), q.size(1), q.size(2), k.size(2)}),
                      "fastattn attention: mask must be a (B, Hq, Nq, Nk) view, got ", m.sizes());
    const auto dt = m.scalar_type();
    TORCH_CHECK_TYPE(dt == at::kBool || dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 ||
                         dt == at::kHalf,
                     "fastattn attention: mask must be bool or floating, got ", dt);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const c10::optional<at::Tensor>& mask, double scale, bool is_causal,
                                                 double dropout_p, const c10::optional<at::Tensor>& seed) {
  check_inputs(q, k, v, mask, dropout_p);
  const int64_t batch = q.size(0), heads = q.size(1), n_q = q.size(2), dim_v = v.size(3);
  at::Tensor out = new_output({batch, heads, n_q, dim_v}, q.options());
  at::Tensor lse = new_output({batch, heads, n_q}, q.options().dtype(at::kFloat));
  if (lse.numel() == 0) return {out, lse};

  const at::Tensor q32 = float_rows(q), k32 = float_rows(k), v32 = float_rows(v);
  const Problem p(q32, k32, v32, mask, scale, is_causal, dropout_p, read_seed(seed, dropout_p));
  at::Tensor out32 = out.scalar_type() == at::kFloat ? out : at::empty(out.sizes(), out.options().dtype(at::kFloat));
  float* out_data = out32.data_ptr<float>();
  float* lse_data = lse.data_ptr<float>();

  // Tasks: (query block, batch x head), the last query blocks first: under causal masking they see
  // the most keys, and starting the longest tasks first balances the threads.
  const int64_t heads_total = batch * heads;
  const int64_t block_q = forward_block_rows(n_q, heads_total);
  const int64_t q_blocks = (n_q + block_q - 1) / block_q;
  const int64_t scratch = block_q * (kFwdBlockK + dim_v + 2);
  parallel_tasks(q_blocks * heads_total, scratch, [&](int64_t t, float* buffer) {
    const int64_t qb = q_blocks - 1 - t / heads_total, bh = t % heads_total;
    const int64_t b = bh / heads, h = bh % heads, i0 = qb * block_q;
    forward_block(p, b, h, i0, block_q, out_data + (bh * n_q + i0) * dim_v, lse_data + bh * n_q + i0, buffer);
  });
  if (!out32.is_same(out)) out.copy_(out32);
  return {out, lse};
}

namespace {

// Buffers the backward writes: float32, contiguous.
struct Grads {
  float* dq;       // (split, B, Hq, Nq, D): one partial dQ per key split
  float* dk;       // (B, Hq, Nk, D): per query head (summed over the GQA group afterwards)
  float* dv;       // (B, Hq, Nk, Dv)
  const float* do_;  // dO rows
  int64_t do_sb, do_sh, do_sn;
  const float* lse;  // (B, Hq, Nq)
  const float* delta;  // (B, Hq, Nq): rowsum(dO * O)
};

// Key blocks [kb_begin, kb_end) of one (batch, head): their dK, dV in full and their share of dQ.
void backward_blocks(const Problem& p, const Grads& g, int64_t b, int64_t h, int64_t kb_begin, int64_t kb_end,
                     float* dq, float* scratch) {
  const int64_t bh = b * p.heads_q + h;
  float* probs = scratch;                           // P, kBwdBlockQ x kBwdBlockK
  float* dscores = probs + kBwdBlockQ * kBwdBlockK;  // dP, then dS
  float* dropped = dscores + kBwdBlockQ * kBwdBlockK;  // P with dropout applied (when active)
  const float* lse = g.lse + bh * p.n_q;
  const float* delta = g.delta + bh * p.n_q;

  for (int64_t kb = kb_begin; kb < kb_end; ++kb) {
    const int64_t j0 = kb * kBwdBlockK, cols = std::min(kBwdBlockK, p.n_k - j0);
    float* dk = g.dk + (bh * p.n_k + j0) * p.dim;
    float* dv = g.dv + (bh * p.n_k + j0) * p.dim_v;
    std::fill(dk, dk + cols * p.dim, 0.f);
    std::fill(dv, dv + cols * p.dim_v, 0.f);
    const float* k_tile = p.k_rows(b, h, j0);
    const float* v_tile = p.v_rows(b, h, j0);

    for (int64_t i0 = p.first_query(j0) / kBwdBlockQ * kBwdBlockQ; i0 < p.n_q; i0 += kBwdBlockQ) {
      const int64_t rows = std::min(kBwdBlockQ, p.n_q - i0);
      const float* q_tile = p.q_rows(b, h, i0);
      const float* do_tile = g.do_ + b * g.do_sb + h * g.do_sh + i0 * g.do_sn;
      gemm(false, true, rows, cols, p.dim, p.scale, q_tile, p.q_sn, k_tile, p.k_sn, 0.f, probs, kBwdBlockK);
      gemm(false, true, rows, cols, p.dim_v, 1.f, do_tile, g.do_sn, v_tile, p.v_sn, 0.f, dscores, kBwdBlockK);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = i0 + r;
        float* s = probs + r * kBwdBlockK;
        float* ds = dscores + r * kBwdBlockK;
        if (lse[i] == kInf) {  // fully masked row: no weight, no gradient
          std::fill(s, s + cols, 0.f);
          std::fill(ds, ds + cols, 0.f);
          if (p.dropout.active) std::fill(dropped + r * kBwdBlockK, dropped + r * kBwdBlockK + cols, 0.f);
          continue;
        }
        p.mask_row(s, cols, b, h, i, j0);
        exp_shift(s, cols, lse[i]);  // P = exp(S - lse), exactly the forward's weights
        if (p.dropout.active) {      // dV takes the dropped weights; dP flows only through kept ones
          float* pd = dropped + r * kBwdBlockK;
          p.dropout.for_each_factor(bh, i, j0, cols, [pd, s, ds](int64_t c, float f) {
            pd[c] = s[c] * f;
            ds[c] *= f;
          });
        }
        softmax_grad_row(ds, s, cols, delta[i]);  // dS = P * (dP - rowsum(dO * O))
      }
      const float* weights = p.dropout.active ? dropped : probs;
      gemm(true, false, cols, p.dim_v, rows, 1.f, weights, kBwdBlockK, do_tile, g.do_sn, 1.f, dv, p.dim_v);
      gemm(true, false, cols, p.dim, rows, p.scale, dscores, kBwdBlockK, q_tile, p.q_sn, 1.f, dk, p.dim);
      gemm(false, false, rows, p.dim, cols, p.scale, dscores, kBwdBlockK, k_tile, p.k_sn, 1.f,
           dq + (bh * p.n_q + i0) * p.dim, p.dim);
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(const at::Tensor& dout, const at::Tensor& q,
                                                             const at::Tensor& k, const at::Tensor& v,
                                                             const at::Tensor& out, const at::Tensor& lse,
                                                             const c10::optional<at::Tensor>& mask, double scale,
                                                             bool is_causal, double dropout_p,
                                                             const c10::optional<at::Tensor>& seed) {
  check_inputs(q, k, v, mask, dropout_p);
  const int64_t batch = q.size(0), heads = q.size(1), n_q = q.size(2), dim = q.size(3);
  const int64_t heads_kv = k.size(1), n_k = k.size(2), dim_v = v.size(3);
  TORCH_CHECK_VALUE(dout.sizes() == at::IntArrayRef({batch, heads, n_q, dim_v}) && out.sizes() == dout.sizes(),
                    "fastattn attention_bwd: dout and out must have shape (B, Hq, Nq, Dv)");
  TORCH_CHECK_VALUE(lse.sizes() == at::IntArrayRef({batch, heads, n_q}) && lse.scalar_type() == at::kFloat,
                    "fastattn attention_bwd: lse must be float32 (B, Hq, Nq)");
  at::Tensor dq = new_output(q.sizes(), q.options());
  at::Tensor dk = new_output(k.sizes(), k.options());
  at::Tensor dv = new_output(v.sizes(), v.options());
  if (dq.numel() == 0 && dk.numel() == 0 && dv.numel() == 0) return {dq, dk, dv};
  if (batch * heads * n_q * n_k == 0) {  // no weights: every gradient is 0
    dq.zero_(), dk.zero_(), dv.zero_();
    return {dq, dk, dv};
  }

  const at::Tensor q32 = float_rows(q), k32 = float_rows(k), v32 = float_rows(v), do32 = float_rows(dout);
  const Problem p(q32, k32, v32, mask, scale, is_causal, dropout_p, read_seed(seed, dropout_p));
  const at::Tensor delta = (do32 * out.to(at::kFloat)).sum(-1).contiguous();
  const at::Tensor lse_c = lse.contiguous();

  // Parallel over (batch, head) and, when that gives too few tasks for the threads, over splits of
  // the key blocks too; each split owns its dK/dV rows and accumulates its own partial dQ.
  const int64_t heads_total = batch * heads;
  const int64_t k_blocks = (n_k + kBwdBlockK - 1) / kBwdBlockK;
  const int64_t threads = at::get_num_threads();
  const int64_t splits = std::clamp<int64_t>((2 * threads + heads_total - 1) / heads_total, 1, k_blocks);
  const int64_t blocks_per_split = (k_blocks + splits - 1) / splits;

  // float32 accumulators; for float32 inputs without splits or GQA, the outputs themselves.
  const auto f32 = q.options().dtype(at::kFloat);
  const bool fp32 = q.scalar_type() == at::kFloat;
  at::Tensor dq_parts = splits == 1 && fp32 ? dq.zero_().unsqueeze(0) : at::zeros({splits, batch, heads, n_q, dim}, f32);
  const bool direct_kv = heads == heads_kv;  // no GQA group to sum over
  at::Tensor dk32 = direct_kv && fp32 ? dk : at::empty({batch, heads, n_k, dim}, f32);
  at::Tensor dv32 = direct_kv && fp32 ? dv : at::empty({batch, heads, n_k, dim_v}, f32);
  const Grads g{dq_parts.data_ptr<float>(), dk32.data_ptr<float>(), dv32.data_ptr<float>(),
                do32.const_data_ptr<float>(), do32.stride(0), do32.stride(1), do32.stride(2),
                lse_c.const_data_ptr<float>(), delta.const_data_ptr<float>()};

  const int64_t scratch = 3 * kBwdBlockQ * kBwdBlockK;
  parallel_tasks(splits * heads_total, scratch, [&](int64_t t, float* buffer) {
    const int64_t split = t / heads_total, bh = t % heads_total;
    const int64_t kb_begin = split * blocks_per_split, kb_end = std::min(k_blocks, kb_begin + blocks_per_split);
    float* dq_split = g.dq + split * heads_total * n_q * dim;
    backward_blocks(p, g, bh / heads, bh % heads, kb_begin, kb_end, dq_split, buffer);
  });

  if (!dq_parts.is_alias_of(dq)) dq.copy_(splits == 1 ? dq_parts[0] : dq_parts.sum(0));
  if (direct_kv) {
    if (!dk32.is_same(dk)) dk.copy_(dk32), dv.copy_(dv32);
  } else {
    const int64_t group = heads / heads_kv;
    dk.copy_(dk32.view({batch, heads_kv, group, n_k, dim}).sum(2));
    dv.copy_(dv32.view({batch, heads_kv, group, n_k, dim_v}).sum(2));
  }
  return {dq, dk, dv};
}

// The keep mask of the dropout (true = kept) for a tensor of like's shape, read as (S, R, C) as
// dropout_rng.h says: for attention like is (B, Hq, Nq, Nk), for the FFN (M, hidden).
at::Tensor dropout_mask(const at::Tensor& like, double p, const at::Tensor& seed) {
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, "fastattn dropout_mask: p must be in [0, 1)");
  at::Tensor keep = at::empty(like.sizes(), like.options().dtype(at::kBool));
  if (keep.numel() == 0) return keep;
  const int64_t cols = like.dim() >= 1 ? like.size(-1) : 1, rows = like.dim() >= 2 ? like.size(-2) : 1;
  const int64_t streams = keep.numel() / (rows * cols);
  check_dropout_extent(streams, rows, cols, "dropout_mask");
  bool* data = keep.data_ptr<bool>();
  const Dropout d(p, read_seed(seed, p));
  at::parallel_for(0, streams * rows, std::max<int64_t>(1, (1 << 14) / cols), [&](int64_t begin, int64_t end) {
    for (int64_t sr = begin; sr < end; ++sr) {
      bool* out = data + sr * cols;
      d.for_each_keep(sr / rows, sr % rows, 0, cols, [out](int64_t c, bool kept) { out[c] = kept; });
    }
  });
  return keep;
}

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
  m.impl("dropout_mask", &dropout_mask);
}

}  // namespace fastattn::cpu
