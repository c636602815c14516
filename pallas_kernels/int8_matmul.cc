// int8 x int8 matmul for XLA:CPU, registered through the XLA FFI (jaxserve's CPU linear layers):
//
//   y[m, n] = w_scale[n] * sum_g x_scale[m, g] * sum_{k in group g} xq[m, k] * w[k, n]
//
// x (float32) is quantized inside the call, symmetric per row and group of kGroup = 64 inputs (127 / max|x|
// over the group): LLM activations carry outlier channels, and one scale per row would spend the 8 bits on
// them (the default model's perplexity rose 6-8% with row scales, under 2% with groups of 64). w is int8 with
// one float32 scale per output channel, packed by `pallas_kernels.int8_matmul.pack` into blocks of 16
// channels x 4 k ([Np / 16][K / 4][16][4] bytes): one 64-byte load holds 4 consecutive k of 16 channels, so one
// instruction (AVX-512 VNNI's vpdpbusd) multiplies them by 4 k of a row and adds into 16 int32 lanes, one per
// channel, and outputs come out of the accumulators with no horizontal reductions. Each group's exact int32
// sums are scaled into float32 accumulators; the channel scale is applied at the end.
//
// Why a custom call: XLA:CPU has no fused int8 path (its int8 dots widen the weights to float first and
// run slower than float32), and a decode step is bound by reading weights: int8 reads a quarter of float32's
// bytes. Built per machine with -march=native (pallas_kernels/native_build.py): AVX-512 VNNI where the CPU
// has it, else AVX2 (vpmaddubsw, below), else a portable loop over the same layout, which keeps results
// identical but is slow, so the start-up plan keeps float32 there.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define JAXSERVE_VNNI 1
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define JAXSERVE_AVX2 1
#endif

#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kLanes = 16;  // channels per packed block (int32 lanes of a 512-bit register)
constexpr int64_t kGroup = 64;  // inputs per activation scale (K is padded to a multiple)
constexpr int64_t kGroupSteps = kGroup / 4;  // 4-input steps per group

struct Problem {
  const uint8_t* xq;      // [M, K] quantized rows (+ 128 for VNNI and portable, signed bytes for AVX2)
  const float* x_scale;   // [M, K / kGroup]
  const int8_t* w;        // packed [Np / 16][K / 4][16][4]
  const float* w_scale;   // [Np]
  const int32_t* wsum;    // [K / kGroup, Np]: sum of w over each group (the +128 correction)
  float* y;               // [M, Np]
  int64_t M, K, Np;
  int64_t groups() const { return K / kGroup; }
};

// Symmetric int8 of one group of a row (round half to even, as jnp.round), stored with `bias` added.
float quantize_group_scalar(const float* x, int64_t n, int bias, uint8_t* out) {
  float a = 0.f;
  for (int64_t k = 0; k < n; ++k) a = std::max(a, std::fabs(x[k]));
  a = std::max(a, 1e-30f);
  const float inv = 127.f / a;
  for (int64_t k = 0; k < n; ++k) out[k] = static_cast<uint8_t>(static_cast<int>(std::nearbyint(x[k] * inv)) + bias);
  return a / 127.f;
}

#ifdef JAXSERVE_VNNI
// vpdpbusd takes unsigned x bytes: x is stored as q + 128 and 128 * wsum is subtracted per group.
constexpr int64_t kBlocksTile = 2;  // channel blocks per tile: 32 outputs share each x broadcast
constexpr int64_t kRowsTile = 4;    // rows per tile: each weight load feeds 4 rows

template <int R, int B>
void tile(const Problem& p, int64_t m, int64_t block) {
  __m512 out[R][B];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < B; ++b) out[r][b] = _mm512_setzero_ps();
  const int64_t k4 = p.K / 4, groups = p.groups();
  const int8_t* wb = p.w + block * k4 * 64;
  const uint8_t* x = p.xq + m * p.K;
  for (int64_t g = 0; g < groups; ++g) {
    __m512i acc[R][B];
    for (int r = 0; r < R; ++r)
      for (int b = 0; b < B; ++b) acc[r][b] = _mm512_setzero_si512();
    for (int64_t k = g * kGroupSteps; k < (g + 1) * kGroupSteps; ++k) {
      __m512i wv[B];
      for (int b = 0; b < B; ++b) wv[b] = _mm512_loadu_si512(wb + (b * k4 + k) * 64);
      for (int r = 0; r < R; ++r) {
        int32_t four;
        std::memcpy(&four, x + r * p.K + 4 * k, 4);
        const __m512i xv = _mm512_set1_epi32(four);
        for (int b = 0; b < B; ++b) acc[r][b] = _mm512_dpbusd_epi32(acc[r][b], xv, wv[b]);
      }
    }
    for (int b = 0; b < B; ++b) {
      const __m512i offset = _mm512_slli_epi32(_mm512_loadu_si512(p.wsum + g * p.Np + (block + b) * kLanes), 7);
      for (int r = 0; r < R; ++r) {
        const __m512 dot = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][b], offset));
        out[r][b] = _mm512_fmadd_ps(dot, _mm512_set1_ps(p.x_scale[(m + r) * groups + g]), out[r][b]);
      }
    }
  }
  for (int b = 0; b < B; ++b) {
    const int64_t n = (block + b) * kLanes;
    const __m512 ws = _mm512_loadu_ps(p.w_scale + n);
    for (int r = 0; r < R; ++r) _mm512_storeu_ps(p.y + (m + r) * p.Np + n, _mm512_mul_ps(out[r][b], ws));
  }
}

void quantize_rows(const float* x, int64_t M, int64_t K, uint8_t* xq, float* x_scale) {
  const int64_t groups = K / kGroup;
  const __m512i bias = _mm512_set1_epi32(128);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < groups; ++g) {
      const float* in = x + m * K + g * kGroup;
      __m512 amax = _mm512_setzero_ps();
      for (int64_t k = 0; k < kGroup; k += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_loadu_ps(in + k)));
      const float a = std::max(_mm512_reduce_max_ps(amax), 1e-30f);
      x_scale[m * groups + g] = a / 127.f;
      const __m512 inv = _mm512_set1_ps(127.f / a);
      uint8_t* out = xq + m * K + g * kGroup;
      for (int64_t k = 0; k < kGroup; k += 16) {
        const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(in + k), inv));  // nearest even
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + k), _mm512_cvtepi32_epi8(_mm512_add_epi32(q, bias)));
      }
    }
}

#elif defined(JAXSERVE_AVX2)
// AVX2 has no vpdpbusd: vpmaddubsw multiplies unsigned x bytes by signed w bytes into saturating int16
// pairs, and vpmaddwd widens them to int32. With x stored signed, |x| and w * sign(x) (vpsignb) keep every
// pair within int16 (2 * 127 * 127 < 32768): no saturation, the same exact integers, no wsum correction.
// 16 channels are two 256-bit halves; 4 rows x 1 block: 8 int32 accumulators in the 16 ymm registers.
constexpr int64_t kBlocksTile = 1;
constexpr int64_t kRowsTile = 4;

template <int R, int B>
void tile(const Problem& p, int64_t m, int64_t block) {
  __m256 out[R][2 * B];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 2 * B; ++j) out[r][j] = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t k4 = p.K / 4, groups = p.groups();
  const int8_t* wb = p.w + block * k4 * 64;
  const uint8_t* x = p.xq + m * p.K;
  for (int64_t g = 0; g < groups; ++g) {
    __m256i acc[R][2 * B];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < 2 * B; ++j) acc[r][j] = _mm256_setzero_si256();
    for (int64_t k = g * kGroupSteps; k < (g + 1) * kGroupSteps; ++k) {
      __m256i wv[2 * B];
      for (int j = 0; j < 2 * B; ++j)
        wv[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + ((j / 2) * k4 + k) * 64 + (j % 2) * 32));
      for (int r = 0; r < R; ++r) {
        int32_t four;
        std::memcpy(&four, x + r * p.K + 4 * k, 4);
        const __m256i xv = _mm256_set1_epi32(four);
        const __m256i ax = _mm256_abs_epi8(xv);
        for (int j = 0; j < 2 * B; ++j) {
          const __m256i pairs = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(wv[j], xv));
          acc[r][j] = _mm256_add_epi32(acc[r][j], _mm256_madd_epi16(pairs, ones));
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const __m256 xs = _mm256_set1_ps(p.x_scale[(m + r) * groups + g]);
      for (int j = 0; j < 2 * B; ++j) out[r][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][j]), xs, out[r][j]);
    }
  }
  for (int j = 0; j < 2 * B; ++j) {
    const int64_t n = (block + j / 2) * kLanes + (j % 2) * 8;
    const __m256 ws = _mm256_loadu_ps(p.w_scale + n);
    for (int r = 0; r < R; ++r) _mm256_storeu_ps(p.y + (m + r) * p.Np + n, _mm256_mul_ps(out[r][j], ws));
  }
}

void quantize_rows(const float* x, int64_t M, int64_t K, uint8_t* xq, float* x_scale) {
  const int64_t groups = K / kGroup;
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  // vpacksswb interleaves 128-bit lanes; this dword permutation restores the input order.
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < groups; ++g) {
      const float* in = x + m * K + g * kGroup;
      __m256 amax = _mm256_setzero_ps();
      for (int64_t k = 0; k < kGroup; k += 8)
        amax = _mm256_max_ps(amax, _mm256_and_ps(_mm256_loadu_ps(in + k), magnitude));
      __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
      m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
      const float a = std::max(_mm_cvtss_f32(m4), 1e-30f);
      x_scale[m * groups + g] = a / 127.f;
      const __m256 inv = _mm256_set1_ps(127.f / a);
      uint8_t* out = xq + m * K + g * kGroup;
      for (int64_t k = 0; k < kGroup; k += 32) {
        __m256i q[4];
        for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(in + k + 8 * i), inv));
        const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k), _mm256_permutevar8x32_epi32(bytes, order));
      }
    }
}
#endif

#if defined(JAXSERVE_VNNI) || defined(JAXSERVE_AVX2)
template <int B>
void rows(const Problem& p, int64_t block) {
  int64_t m = 0;
  for (; m + kRowsTile <= p.M; m += kRowsTile) tile<kRowsTile, B>(p, m, block);
  switch (p.M - m) {
    case 3: tile<3, B>(p, m, block); break;
    case 2: tile<2, B>(p, m, block); break;
    case 1: tile<1, B>(p, m, block); break;
    default: break;
  }
}

void blocks(const Problem& p, int64_t b0, int64_t b1) {
  int64_t b = b0;
  for (; b + kBlocksTile <= b1; b += kBlocksTile) rows<kBlocksTile>(p, b);
  for (; b < b1; ++b) rows<1>(p, b);
}
#else
// Portable: the same packed layout and arithmetic, one output at a time (x stored + 128, as for VNNI).
constexpr int64_t kBlocksTile = 1;

void blocks(const Problem& p, int64_t b0, int64_t b1) {
  const int64_t k4 = p.K / 4, groups = p.groups();
  for (int64_t block = b0; block < b1; ++block)
    for (int64_t lane = 0; lane < kLanes; ++lane) {
      const int64_t n = block * kLanes + lane;
      for (int64_t m = 0; m < p.M; ++m) {
        float sum = 0.f;
        for (int64_t g = 0; g < groups; ++g) {
          int32_t acc = 0;
          for (int64_t k = g * kGroupSteps; k < (g + 1) * kGroupSteps; ++k)
            for (int j = 0; j < 4; ++j)
              acc += int32_t(p.xq[m * p.K + 4 * k + j]) * int32_t(p.w[((block * k4 + k) * kLanes + lane) * 4 + j]);
          sum += float(acc - 128 * p.wsum[g * p.Np + n]) * p.x_scale[m * groups + g];
        }
        p.y[m * p.Np + n] = sum * p.w_scale[n];
      }
    }
}

void quantize_rows(const float* x, int64_t M, int64_t K, uint8_t* xq, float* x_scale) {
  const int64_t groups = K / kGroup;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < groups; ++g)
      x_scale[m * groups + g] = quantize_group_scalar(x + m * K + g * kGroup, kGroup, 128, xq + m * K + g * kGroup);
}
#endif

ffi::Error Int8Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                      ffi::Buffer<ffi::F32> w_scale, ffi::Buffer<ffi::S32> wsum, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2)
    return ffi::Error::InvalidArgument("int8_matmul: x must be [M, K] and w packed [Np / 16, K * 16]");
  const int64_t M = xd[0], K = xd[1], Np = wd[0] * kLanes;
  if (K % kGroup != 0 || wd[1] != K * kLanes || w_scale.element_count() != Np ||
      wsum.element_count() != K / kGroup * Np)
    return ffi::Error::InvalidArgument("int8_matmul: operand shapes do not match a packed [K, Np] weight "
                                       "(K a multiple of 64)");
  std::vector<uint8_t> xq(M * K);
  std::vector<float> x_scale(M * (K / kGroup));
  quantize_rows(x.typed_data(), M, K, xq.data(), x_scale.data());
  const Problem p{xq.data(), x_scale.data(), w.typed_data(), w_scale.typed_data(), wsum.typed_data(),
                  y->typed_data(), M, K, Np};
  // Whole tiles of channel blocks per thread; below ~64K multiply-adds a second thread costs more than it saves.
  const int64_t num_blocks = Np / kLanes, tiles = (num_blocks + kBlocksTile - 1) / kBlocksTile;
  const int64_t threads = M * K * Np < (int64_t{1} << 16) ? 1 : pool.num_threads();
  jaxserve::parallel_for(pool, tiles, threads, threads, [&](int64_t t0, int64_t t1) {
    blocks(p, t0 * kBlocksTile, std::min(t1 * kBlocksTile, num_blocks));
  });
  return ffi::Error::Success();
}

}  // namespace

// Which instruction set this build uses (pallas_kernels.int8_matmul.ISAS): 2 AVX-512 VNNI, 1 AVX2, 0 portable.
extern "C" int jaxserve_int8_matmul_isa() {
#if defined(JAXSERVE_VNNI)
  return 2;
#elif defined(JAXSERVE_AVX2)
  return 1;
#else
  return 0;
#endif
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxserveInt8Matmul, Int8Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x [M, K]
                                  .Arg<ffi::Buffer<ffi::S8>>()    // w packed [Np / 16, K * 16]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // w_scale [Np]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // wsum [K / 64, Np]
                                  .Ret<ffi::Buffer<ffi::F32>>());  // y [M, Np]
