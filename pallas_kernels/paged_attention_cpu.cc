// Paged attention for XLA:CPU, registered through the XLA FFI: the contract of reference.py (docs/
// architecture.md) read straight from the paged cache.
//
// Why a custom call: the pure-JAX formulations (xla_attention.py) first gather every row's whole page-table
// width of keys and values into a dense copy and attend over all of it, masked; at 32 decode rows with 16
// pages each that was ~6 ms per layer of SmolLM2-135M on a 2-core EPYC, more than the layer's int8
// matmuls. Here each (row, KV head) walks its own pages up to its own length: no copy, no masked work.
//
// Per query: scores over the visible keys (positions max(0, p - window + 1) .. p, p = q_start + t; a query
// at p >= seq_len is padding and returns zeros), optional soft cap, float32 softmax, weighted sum of values.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel_for.h"
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Problem {
  const float *q, *k, *v;  // q [B, Tq, H, D]; k, v [L, KV, P, S, D]
  const int32_t *page_table, *seq_lens, *q_start;  // [B, W], [B], [B]
  float* out;  // [B, Tq, H, D]
  int64_t layer, B, Tq, H, KV, P, S, D, W;
  float scale, soft_cap;  // soft_cap 0: none
  int64_t window;         // 0: none
};

float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// exp(x) for the softmax (x <= 0 after the max is subtracted): 2^n * e^r with |r| <= ln2 / 2, e^r by a
// degree-6 polynomial (relative error ~2e-7, like expf), in float and integer operations a simd loop can
// vectorize (libm's expf is a scalar call per element: a third of the kernel's time at 200 keys).
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.f);  // e^-87 ~ 1.6e-38: the smallest normal float's range; below it weights are 0 anyway
  const float n = std::nearbyint(x * 1.44269504f);
  const float r = x - n * 0.693145752f - n * 1.42860677e-06f;  // ln2 split in two for an exact n * ln2_hi
  float e = 1.f / 720.f;
  e = e * r + 1.f / 120.f;
  e = e * r + 1.f / 24.f;
  e = e * r + 1.f / 6.f;
  e = e * r + 0.5f;
  e = e * r + 1.f;
  e = e * r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return e * scale;
}

// All queries of row b that share KV head `kvh` (Tq tokens x H / KV heads). Keys are walked page by page
// (no division per key), and each key row is read once for the group's query heads. Any head_dim.
void attend_generic(const Problem& p, int64_t b, int64_t kvh, std::vector<float>& scores) {
  const int64_t group = p.H / p.KV, D = p.D, stride = p.W * p.S + 1;  // + 1: the spare slot below
  const int64_t seq_len = p.seq_lens[b], limit = std::min<int64_t>(seq_len, stride);
  const int32_t* pages = p.page_table + b * p.W;
  const int64_t head_stride = p.P * p.S * D;
  const float* k_head = p.k + (p.layer * p.KV + kvh) * head_stride;
  const float* v_head = p.v + (p.layer * p.KV + kvh) * head_stride;
  // fn(j, row) for keys lo .. hi - 1, row = that key's D floats in `head`.
  auto walk = [&](const float* head, int64_t lo, int64_t hi, auto&& fn) {
    for (int64_t j = lo; j < hi;) {
      const int64_t off = j % p.S, run = std::min(p.S - off, hi - j);
      const float* row = head + (int64_t(pages[j / p.S]) * p.S + off) * D;
      for (int64_t i = 0; i < run; ++i, ++j, row += D) fn(j, row);
    }
  };
  for (int64_t t = 0; t < p.Tq; ++t) {
    const int64_t pos = int64_t(p.q_start[b]) + t;
    const int64_t lo = p.window > 0 ? std::max<int64_t>(0, pos - p.window + 1) : 0;
    const int64_t hi = std::min(pos + 1, limit);  // keys lo .. hi - 1
    const float* q = p.q + ((b * p.Tq + t) * p.H + kvh * group) * D;  // the group's heads, D apart
    float* out = p.out + ((b * p.Tq + t) * p.H + kvh * group) * D;
    std::fill(out, out + group * D, 0.f);
    if (pos >= seq_len || lo >= hi) continue;  // padding query: exact zeros
    const int64_t n = hi - lo;
    walk(k_head, lo, hi, [&](int64_t j, const float* row) {
      for (int64_t g = 0; g < group; ++g) scores[g * stride + j - lo] = dot(q + g * D, row, D) * p.scale;
    });
    for (int64_t g = 0; g < group; ++g) {
      float* sg = scores.data() + g * stride;
      if (p.soft_cap > 0.f)
        for (int64_t j = 0; j < n; ++j) sg[j] = p.soft_cap * std::tanh(sg[j] / p.soft_cap);
      float peak = -INFINITY;
      for (int64_t j = 0; j < n; ++j) peak = std::max(peak, sg[j]);
      float total = 0.f;
#pragma omp simd reduction(+ : total)
      for (int64_t j = 0; j < n; ++j) {
        sg[j] = exp_nonpositive(sg[j] - peak);
        total += sg[j];
      }
      sg[n] = 1.f / total;  // scores has a spare slot per head
    }
    walk(v_head, lo, hi, [&](int64_t j, const float* row) {
      for (int64_t g = 0; g < group; ++g) {
        const float w = scores[g * stride + j - lo];
        float* o = out + g * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) o[d] += w * row[d];
      }
    });
    for (int64_t g = 0; g < group; ++g) {
      const float inv = scores[g * stride + n];
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) out[g * D + d] *= inv;
    }
  }
}

#if defined(__AVX2__) && defined(__FMA__)
inline float hsum(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}

// The same for head_dim = 8 * V with AVX2: one query head at a time, its D floats held in registers while
// the row's keys stream past (then its values, L2-resident after the first head), so every key costs V
// loads and V fused multiply-adds and no accumulator leaves the registers. ~10x the generic loop.
template <int V>
void attend_avx2(const Problem& p, int64_t b, int64_t kvh, std::vector<float>& scores) {
  const int64_t group = p.H / p.KV, D = 8 * V, S = p.S;
  const int64_t seq_len = p.seq_lens[b], limit = std::min<int64_t>(seq_len, p.W * S);
  const int32_t* pages = p.page_table + b * p.W;
  const int64_t head_stride = p.P * S * D;
  const float* k_head = p.k + (p.layer * p.KV + kvh) * head_stride;
  const float* v_head = p.v + (p.layer * p.KV + kvh) * head_stride;
  float* sc = scores.data();
  for (int64_t t = 0; t < p.Tq; ++t) {
    const int64_t pos = int64_t(p.q_start[b]) + t;
    const int64_t lo = p.window > 0 ? std::max<int64_t>(0, pos - p.window + 1) : 0;
    const int64_t hi = std::min(pos + 1, limit);
    for (int64_t g = 0; g < group; ++g) {
      const int64_t h = kvh * group + g;
      float* out = p.out + ((b * p.Tq + t) * p.H + h) * D;
      if (pos >= seq_len || lo >= hi) {
        std::fill(out, out + D, 0.f);
        continue;
      }
      const float* q = p.q + ((b * p.Tq + t) * p.H + h) * D;
      __m256 qr[V];
      for (int i = 0; i < V; ++i) qr[i] = _mm256_loadu_ps(q + 8 * i);
      float peak = -INFINITY;
      for (int64_t j = lo; j < hi;) {
        const int64_t off = j % S, run = std::min(S - off, hi - j);
        const float* row = k_head + (int64_t(pages[j / S]) * S + off) * D;
        for (int64_t r = 0; r < run; ++r, ++j, row += D) {
          __m256 a0 = _mm256_mul_ps(qr[0], _mm256_loadu_ps(row)), a1 = _mm256_setzero_ps();
          for (int i = 1; i < V; ++i) {
            if (i % 2) a1 = _mm256_fmadd_ps(qr[i], _mm256_loadu_ps(row + 8 * i), a1);
            else a0 = _mm256_fmadd_ps(qr[i], _mm256_loadu_ps(row + 8 * i), a0);
          }
          float s = hsum(_mm256_add_ps(a0, a1)) * p.scale;
          if (p.soft_cap > 0.f) s = p.soft_cap * std::tanh(s / p.soft_cap);
          sc[j - lo] = s;
          peak = std::max(peak, s);
        }
      }
      const int64_t n = hi - lo;
      float total = 0.f;
#pragma omp simd reduction(+ : total)
      for (int64_t j = 0; j < n; ++j) {
        sc[j] = exp_nonpositive(sc[j] - peak);
        total += sc[j];
      }
      __m256 acc[V];
      for (int i = 0; i < V; ++i) acc[i] = _mm256_setzero_ps();
      for (int64_t j = lo; j < hi;) {
        const int64_t off = j % S, run = std::min(S - off, hi - j);
        const float* row = v_head + (int64_t(pages[j / S]) * S + off) * D;
        for (int64_t r = 0; r < run; ++r, ++j, row += D) {
          const __m256 w = _mm256_set1_ps(sc[j - lo]);
          for (int i = 0; i < V; ++i) acc[i] = _mm256_fmadd_ps(w, _mm256_loadu_ps(row + 8 * i), acc[i]);
        }
      }
      const __m256 inv = _mm256_set1_ps(1.f / total);
      for (int i = 0; i < V; ++i) _mm256_storeu_ps(out + 8 * i, _mm256_mul_ps(acc[i], inv));
    }
  }
}
#endif

void attend(const Problem& p, int64_t b, int64_t kvh, std::vector<float>& scores) {
#if defined(__AVX2__) && defined(__FMA__)
  if (p.D == 64) return attend_avx2<8>(p, b, kvh, scores);
  if (p.D == 128) return attend_avx2<16>(p, b, kvh, scores);
#endif
  attend_generic(p, b, kvh, scores);
}


ffi::Error PagedAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                          ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> page_table,
                          ffi::Buffer<ffi::S32> seq_lens, ffi::Buffer<ffi::S32> q_start, float scale, float soft_cap,
                          int32_t window, ffi::ResultBuffer<ffi::F32> out) {
  const auto qd = q.dimensions(), kd = k.dimensions(), pd = page_table.dimensions();
  if (qd.size() != 4 || kd.size() != 5 || pd.size() != 2 || v.element_count() != k.element_count() || kd[4] != qd[3] ||
      pd[0] != qd[0] || qd[2] % kd[1] != 0 || seq_lens.element_count() != qd[0] ||
      q_start.element_count() != qd[0] || layer.element_count() != 1)
    return ffi::Error::InvalidArgument("paged_attention_cpu: q [B, Tq, H, D], caches [L, KV, P, S, D], "
                                       "page_table [B, W], seq_lens and q_start [B], layer a scalar");
  const int64_t L = kd[0], layer_index = layer.typed_data()[0];
  if (layer_index < 0 || layer_index >= L)
    return ffi::Error::InvalidArgument("paged_attention_cpu: layer out of range");
  const Problem p{q.typed_data(), k.typed_data(), v.typed_data(), page_table.typed_data(), seq_lens.typed_data(),
                  q_start.typed_data(), out->typed_data(), layer_index, qd[0], qd[1], qd[2], kd[1], kd[2], kd[3],
                  kd[4], pd[1], scale, soft_cap, window};
  const int64_t tasks = p.B * p.KV, max_keys = p.W * p.S;
  // Below ~16K multiply-adds of scores a second thread costs more than it saves.
  const int64_t threads = p.B * p.Tq * p.H * max_keys * p.D < (int64_t{1} << 14) ? 1 : pool.num_threads();
  // Rows differ in length: 4 ranges per thread, claimed as threads free up.
  jaxserve::parallel_for(pool, tasks, threads, 4 * threads, [&](int64_t begin, int64_t end) {
    std::vector<float> scores((p.H / p.KV) * (max_keys + 1));
    for (int64_t task = begin; task < end; ++task) attend(p, task / p.KV, task % p.KV, scores);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxservePagedAttentionCpu, PagedAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k cache
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v cache
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer
                                  .Arg<ffi::Buffer<ffi::S32>>()  // page_table
                                  .Arg<ffi::Buffer<ffi::S32>>()  // seq_lens
                                  .Arg<ffi::Buffer<ffi::S32>>()  // q_start
                                  .Attr<float>("scale")
                                  .Attr<float>("soft_cap")
                                  .Attr<int32_t>("window")
                                  .Ret<ffi::Buffer<ffi::F32>>());
