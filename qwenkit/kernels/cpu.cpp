// qwenkit's CPU kernels for weight-only int4, int8 and bf16 linears, mostly at decode shapes (a few rows of x).
//
// y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]) where W is stored as qwenkit's Int4Linear / Int8Linear
// keep it, read in place (no repacked copy):
//   int4: qweight uint8 [N, K/2], byte j of a row holds k = 2j (low nibble) and k = 2j + 1 (high);
//         W[n, k] = (q - zeros[n, g]) * scales[n, g], g = k / group_size
//   int8: weight int8 [N, K] (symmetric, |w| <= 127); W[n, k] = w * scales[n]
// Each row of x is quantized to int8 in blocks of 32 (one float scale per block, as llama.cpp's
// Q8_0), so every product is an integer dot product (AVX2 maddubs, AVX-512 VNNI dpbusd) scaled once
// per block. For int4 the activations are stored in the weight's nibble order (per chunk of 4 or 2
// blocks: its even k, then its odd k) so that one load, a shift and two masks unpack a chunk; the zero
// point becomes one term per group, min * (sum of the group's activations).
//
// One op computes several weights that read the same x (q/k/v, gate/up) into one output, side by
// side along its columns: the output rows of all of them are split among torch's threads.
// For many rows of x (prefill) int8_gemm / int4_gemm multiply the same stored weights by x rounded to
// int16 per block instead (AVX-512 or AVX2 code, as built; see "many rows" below).
// Below them, a product over bf16 weights (float32 sums of exact products), and the small ops of an
// eager decode step (RMS norm, decode attention) in one call each. Then LargeBlocks: torch's CPU allocator
// for large tensors once qwenkit/runtime/allocator.py registers it. Last, tensor-parallel collectives through
// shared memory.
// Built once per instruction set (-mavx2, -mavx512*) by qwenkit/kernels/__init__.py.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/Allocator.h>
#include <c10/util/BFloat16.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kBlock = 32;  // activations quantized per 32 inputs
constexpr int64_t kRowsAtOnce = 4;  // rows of x sharing one pass over a weight row
constexpr float kTinyBlock = 1e-30f;  // blocks of activations no larger than this are quantized to zero

// --------------------------------------------------------------------------- activations

struct QuantizedX {
  int64_t rows = 0, blocks = 0, groups = 0;
  std::vector<int8_t> q;        // [rows][blocks * 32]
  std::vector<float> d;         // [rows][blocks]: x ~= d * q within a block
  std::vector<float> lane_d;    // [rows][blocks][4]: d repeated, int4 only (one per int32 lane of a block)
  std::vector<float> group_sum; // [rows][groups]: the sum of d * q over a weight group, for int4 zero points
};

template <typename T>
inline float as_float(T v) { return static_cast<float>(v); }

// The int4 kernel walks K in chunks of blocks whose nibbles one vector load unpacks: 4 blocks (64 bytes)
// with AVX-512, then 2 (32 bytes, AVX2), then 1. A chunk unpacks as its even k (the low nibbles), then its
// odd k, so its activations are stored in that order. An integer lane holds the even and the odd k of one
// block, so both halves' sums go into one accumulator before one conversion to float.
#if defined(__AVX512BW__)
constexpr int64_t kWide = 4;
#elif defined(__AVX2__)
constexpr int64_t kWide = 2;
#else
constexpr int64_t kWide = 1;
#endif

// The chunk that holds block b: its first block and how many blocks it has.
inline std::pair<int64_t, int64_t> chunk_of(int64_t b, int64_t blocks) {
  const int64_t wide = blocks / kWide * kWide, pairs = wide + (blocks - wide) / 2 * 2;
  if (b < wide) return {b / kWide * kWide, kWide};
  if (b < pairs) return {wide + (b - wide) / 2 * 2, 2};
  return {b, 1};
}

#if defined(__AVX2__)
// 8 or 16 scales or zeros as floats (bfloat16: its bits, moved up).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline __m256 load8(const c10::BFloat16* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(
      _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
#endif

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline __m512 load16(const c10::BFloat16* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
#if defined(__AVX512BW__) && defined(__AVX512VL__)
// The lanes in `mask` (the others 0), reading nothing past them.
inline __m512 load16(const float* p, __mmask16 mask) { return _mm512_maskz_loadu_ps(mask, p); }
inline __m512 load16(const c10::BFloat16* p, __mmask16 mask) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16));
}
#endif
#endif

// One block of 32 values as int8: q = round(x * 127 / amax) (ties to even: the CPU's default rounding, as
// std::nearbyint), d = amax / 127, in the block's order; a block no larger than kTinyBlock is zero (and 127 /
// amax would overflow to inf). Returns the sum of q.
template <typename T>
inline int quantize_block(const T* src, int8_t* q, float* d) {
#if defined(__AVX512F__)
  const __m512 lo = load16(src), hi = load16(src + 16);
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
#elif defined(__AVX2__)
  const __m256 v[4] = {load8(src), load8(src + 8), load8(src + 16), load8(src + 24)};
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                           _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
#else
  float amax = 0.f;
  for (int i = 0; i < kBlock; ++i) amax = std::max(amax, std::fabs(as_float(src[i])));
#endif
  const bool zero = !(amax > kTinyBlock);
  *d = zero ? 0.f : amax / 127.f;
  const float inv = zero ? 0.f : 127.f / amax;
#if defined(__AVX512F__)
  const __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, _mm512_set1_ps(inv)));
  const __m512i qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, _mm512_set1_ps(inv)));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtepi32_epi8(qlo));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm512_cvtepi32_epi8(qhi));
  return _mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));
#elif defined(__AVX2__)
  __m256i qi[4];
  for (int i = 0; i < 4; ++i) qi[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], _mm256_set1_ps(inv)));
  // The packs interleave 128-bit lanes; the permute puts the 32 bytes back in order.
  const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(qi[0], qi[1]), _mm256_packs_epi32(qi[2], qi[3]));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q),
                      _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  const __m256i sum = _mm256_add_epi32(_mm256_add_epi32(qi[0], qi[1]), _mm256_add_epi32(qi[2], qi[3]));
  __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1)));
#else
  int total = 0;
  for (int i = 0; i < kBlock; ++i) {
    q[i] = static_cast<int8_t>(static_cast<int>(std::nearbyint(as_float(src[i]) * inv)));
    total += q[i];
  }
  return total;
#endif
}

// Quantize each row of x [rows, K] to int8 per block of 32; with a group size (int4), the values go in
// the chunks' nibble order (chunk_of), each block's scale is repeated for its four integer lanes, and the
// sums per group are kept.
template <typename T>
void quantize_rows(const T* x, int64_t rows, int64_t k, int64_t group_size, QuantizedX& out) {
  const bool nibble_order = group_size > 0;
  out.rows = rows;
  out.blocks = k / kBlock;
  out.groups = nibble_order ? k / group_size : 0;
  out.q.resize(rows * k);
  out.d.resize(rows * out.blocks);
  out.lane_d.resize(nibble_order ? rows * out.blocks * 4 : 0);
  out.group_sum.assign(rows * out.groups, 0.f);
  for (int64_t m = 0; m < rows; ++m) {
    int8_t* row = out.q.data() + m * k;
    for (int64_t b = 0; b < out.blocks; ++b) {
      float& d = out.d[m * out.blocks + b];
      if (!nibble_order) {
        quantize_block(x + m * k + b * kBlock, row + b * kBlock, &d);
        continue;
      }
      alignas(32) int8_t q[kBlock];
      const int total = quantize_block(x + m * k + b * kBlock, q, &d);
      // Value i of the block goes to its chunk's even half (i even) or odd half, at i / 2.
      const auto [start, n] = chunk_of(b, out.blocks);
      int8_t* even = row + start * kBlock + (b - start) * (kBlock / 2);
      int8_t* odd = even + n * (kBlock / 2);
#if defined(__AVX2__)
      // Within each 16-byte lane, its even bytes then its odd ones; then the lanes' evens, then their odds.
      const __m256i lanes = _mm256_shuffle_epi8(
          _mm256_load_si256(reinterpret_cast<const __m256i*>(q)),
          _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                           0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15));
      const __m256i halves = _mm256_permute4x64_epi64(lanes, 0xD8);  // quads 0, 2, 1, 3
      _mm_storeu_si128(reinterpret_cast<__m128i*>(even), _mm256_castsi256_si128(halves));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(odd), _mm256_extracti128_si256(halves, 1));
#else
      for (int i = 0; i < kBlock / 2; ++i) {
        even[i] = q[2 * i];
        odd[i] = q[2 * i + 1];
      }
#endif
      for (int j = 0; j < 4; ++j) out.lane_d[(m * out.blocks + b) * 4 + j] = d;
      out.group_sum[m * out.groups + b * kBlock / group_size] += d * static_cast<float>(total);
    }
  }
}

// --------------------------------------------------------------------------- integer dot products

#if defined(__AVX2__)
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 16 bytes of nibbles -> 32 values 0..15: the low nibbles, then the high ones.
inline __m256i unpack_nibbles(const uint8_t* p) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(bytes, mask);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
  return _mm256_set_m128i(hi, lo);
}

// sum of u[i] * s[i] over 32 unsigned x signed bytes, as 8 int32 partial sums converted to float.
inline __m256 dot_u8s8(__m256i u, __m256i s) {
  const __m256i pairs = _mm256_maddubs_epi16(u, s);  // |15 * 127 * 2| and |127 * 127 * 2| fit int16
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}
#endif

#if defined(__AVX512BW__)
// Two floats p[0], p[1] spread over the 16 lanes by `lanes` (each lane's index, 0 or 1).
inline __m512 spread2(const float* p, __m512i lanes) {
  const __m128 pair = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(p)));
  return _mm512_permutexvar_ps(lanes, _mm512_castps128_ps512(pair));
}

// 64 unsigned x signed byte products summed in fours: 16 int32 as float (8 per block of 32).
inline __m512 dot_u8s8(__m512i u, __m512i s) {
#if defined(__AVX512VNNI__)
  return _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), u, s));
#else
  return _mm512_cvtepi32_ps(_mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1)));
#endif
}
#endif

// --------------------------------------------------------------------------- int4

// sum over groups of zeros[g] * scales[g] * group_sum[g]: what the zero points take from a row's dot
// product. Once per row, 16 or 8 groups at a time (in the chunk loop it would cost a spread per chunk).
template <typename S>
inline float zero_term(const S* zeros, const S* scales, const float* group_sum, int64_t groups) {
  int64_t g = 0;
  float total = 0.f;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; g + 16 <= groups; g += 16) {
    acc = _mm512_fmadd_ps(_mm512_mul_ps(load16(zeros + g), load16(scales + g)), _mm512_loadu_ps(group_sum + g), acc);
  }
#if defined(__AVX512BW__) && defined(__AVX512VL__)
  if (g < groups) {  // the last groups under a mask: K = 896 at group 128 has only 7
    const __mmask16 tail = static_cast<__mmask16>((1u << (groups - g)) - 1);
    acc = _mm512_mask3_fmadd_ps(_mm512_mul_ps(load16(zeros + g, tail), load16(scales + g, tail)),
                                _mm512_maskz_loadu_ps(tail, group_sum + g), acc, tail);
    g = groups;
  }
#endif
  total = _mm512_reduce_add_ps(acc);
#endif
#if defined(__AVX2__)
  __m256 acc8 = _mm256_setzero_ps();
  for (; g + 8 <= groups; g += 8) {
    acc8 = _mm256_fmadd_ps(_mm256_mul_ps(load8(zeros + g), load8(scales + g)), _mm256_loadu_ps(group_sum + g), acc8);
  }
  total += hsum(acc8);
#endif
  for (; g < groups; ++g) total += as_float(zeros[g]) * as_float(scales[g]) * group_sum[g];
  return total;
}

// The weight scale of each int32 lane of a chunk starting at block b (a multiple of the chunk's size):
// lanes 4p .. 4p + 3 hold block b + p, whose group is (b + p) >> shift.
#if defined(__AVX2__)
template <typename S>
inline __m256 chunk_scales2(const S* s, int64_t b, int shift) {
  if (shift >= 1) return _mm256_set1_ps(as_float(s[b >> shift]));
  return _mm256_setr_m128(_mm_set1_ps(as_float(s[b])), _mm_set1_ps(as_float(s[b + 1])));
}
#endif

#if defined(__AVX512BW__)
inline __m128 load4(const float* p) { return _mm_loadu_ps(p); }
inline __m128 load4(const c10::BFloat16* p) {
  const __m128i bits = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(bits), 16));
}

template <typename S>
inline __m512 chunk_scales4(const S* s, int64_t b, int shift) {
  if (shift >= 2) return _mm512_set1_ps(as_float(s[b >> shift]));
  if (shift == 1) {
    const __m512i lanes = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m128 pair = _mm_setr_ps(as_float(s[b >> 1]), as_float(s[(b >> 1) + 1]), 0.f, 0.f);
    return _mm512_permutexvar_ps(lanes, _mm512_castps128_ps512(pair));
  }
  const __m512i lanes = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  return _mm512_permutexvar_ps(lanes, _mm512_castps128_ps512(load4(s + b)));
}
#endif

// Rows m0 .. m0 + MC - 1 of x against NR consecutive int4 weight rows (row j at qrow + j * K / 2, its
// scales and zeros at + j * groups) into out[r * NR + j]. MC and NR are constants so that the MC * NR
// accumulators stay in registers. Each chunk's nibbles are unpacked once for all MC rows of x. A short row
// (K = 896: 7 chunks) spent as long on its call, reduction and zero term as on its chunks; a tile of rows
// shares them (a decode token's int4 products ~30 % faster with the weights in cache). The rows are read one
// after the other, as stored: interleaving their chunks was faster from cache but slower from memory (the
// hardware prefetcher follows one stream).
template <int MC, int NR, typename S>
void int4_tile(const uint8_t* qrow, const S* scales, const S* zeros, int64_t k, int64_t group_size,
               const QuantizedX& x, int64_t m0, float* out /* [MC * NR] */) {
  const int64_t blocks = k / kBlock, groups = k / group_size, row_bytes = k / 2;
  const int shift = __builtin_ctzll(group_size / kBlock);  // block b's group is b >> shift
  const int8_t* xq = x.q.data() + m0 * k;
  const float* xd = x.d.data() + m0 * blocks;
  const float* xl = x.lane_d.data() + m0 * blocks * 4;
  int64_t b = 0;
  float total[MC][NR] = {};
#if defined(__AVX512BW__)
  {
    const int64_t wide = blocks / 4 * 4;
    __m512 acc[MC][NR];
    for (int r = 0; r < MC; ++r)
      for (int j = 0; j < NR; ++j) acc[r][j] = _mm512_setzero_ps();
    for (int j = 0; j < NR; ++j) {
      for (b = 0; b < wide; b += 4) {
        const __m512i bytes = _mm512_loadu_si512(qrow + j * row_bytes + b * (kBlock / 2));
        const __m512i even = _mm512_and_si512(bytes, _mm512_set1_epi8(0x0F));
        const __m512i odd = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), _mm512_set1_epi8(0x0F));
        const __m512 ws = chunk_scales4(scales + j * groups, b, shift);
        for (int r = 0; r < MC; ++r) {
          const int8_t* xr = xq + r * k + b * kBlock;
#if defined(__AVX512VNNI__)
          const __m512i sum = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), even,
                                                                      _mm512_loadu_si512(xr)),
                                                  odd, _mm512_loadu_si512(xr + 64));
#else  // |15 * 127 * 2| twice fits int16
          const __m512i sum = _mm512_madd_epi16(_mm512_add_epi16(_mm512_maddubs_epi16(even, _mm512_loadu_si512(xr)),
                                                                 _mm512_maddubs_epi16(odd, _mm512_loadu_si512(xr + 64))),
                                                _mm512_set1_epi16(1));
#endif
          acc[r][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum),
                                      _mm512_mul_ps(ws, _mm512_loadu_ps(xl + r * blocks * 4 + b * 4)), acc[r][j]);
        }
      }
    }
    for (int r = 0; r < MC; ++r)
      for (int j = 0; j < NR; ++j) total[r][j] += _mm512_reduce_add_ps(acc[r][j]);
  }
#endif
#if defined(__AVX2__)
  {
    const int64_t first = b, pairs = b + (blocks - b) / 2 * 2;
    __m256 acc[MC][NR];
    for (int r = 0; r < MC; ++r)
      for (int j = 0; j < NR; ++j) acc[r][j] = _mm256_setzero_ps();
    for (int j = 0; j < NR; ++j) {
      for (b = first; b < pairs; b += 2) {
        const __m256i bytes =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qrow + j * row_bytes + b * (kBlock / 2)));
        const __m256i even = _mm256_and_si256(bytes, _mm256_set1_epi8(0x0F));
        const __m256i odd = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), _mm256_set1_epi8(0x0F));
        const __m256 ws = chunk_scales2(scales + j * groups, b, shift);
        for (int r = 0; r < MC; ++r) {
          const int8_t* xr = xq + r * k + b * kBlock;
          const __m256i pairs16 = _mm256_add_epi16(  // |15 * 127 * 2| twice fits int16
              _mm256_maddubs_epi16(even, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr))),
              _mm256_maddubs_epi16(odd, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr + 32))));
          const __m256 sum = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs16, _mm256_set1_epi16(1)));
          acc[r][j] = _mm256_fmadd_ps(sum, _mm256_mul_ps(ws, _mm256_loadu_ps(xl + r * blocks * 4 + b * 4)), acc[r][j]);
        }
      }
      for (; b < blocks; ++b) {  // the last block, alone
        const __m256i w = unpack_nibbles(qrow + j * row_bytes + b * (kBlock / 2));
        const float s = as_float(scales[j * groups + (b >> shift)]);
        for (int r = 0; r < MC; ++r) {
          const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + r * k + b * kBlock));
          acc[r][j] = _mm256_fmadd_ps(dot_u8s8(w, xv), _mm256_set1_ps(s * xd[r * blocks + b]), acc[r][j]);
        }
      }
    }
    for (int r = 0; r < MC; ++r)
      for (int j = 0; j < NR; ++j) total[r][j] += hsum(acc[r][j]);
  }
#endif
  const int64_t first = b;
  for (int j = 0; j < NR; ++j) {  // no vectors at all
    for (b = first; b < blocks; ++b) {
      const uint8_t* wp = qrow + j * row_bytes + b * (kBlock / 2);
      const float s = as_float(scales[j * groups + (b >> shift)]);
      for (int r = 0; r < MC; ++r) {
        const int8_t* xv = xq + r * k + b * kBlock;
        int dot = 0;
        for (int i = 0; i < 16; ++i) dot += (wp[i] & 0x0F) * xv[i] + (wp[i] >> 4) * xv[16 + i];
        total[r][j] += s * xd[r * blocks + b] * static_cast<float>(dot);
      }
    }
  }
  for (int r = 0; r < MC; ++r) {
    for (int j = 0; j < NR; ++j) {
      out[r * NR + j] = total[r][j] - zero_term(zeros + j * groups, scales + j * groups,
                                                x.group_sum.data() + (m0 + r) * x.groups, x.groups);
    }
  }
}

// --------------------------------------------------------------------------- int8

// Rows m0 .. m0 + MC - 1 of x against NR consecutive int8 weight rows (row j at wrow + j * K, its scale
// scales[j]) into out[r * NR + j], as int4_tile.
template <int MC, int NR>
void int8_tile(const int8_t* wrow, const float* scales, int64_t k, const QuantizedX& x, int64_t m0, float* out) {
  const int64_t blocks = k / kBlock;
  const int8_t* xq = x.q.data() + m0 * k;
  const float* xd = x.d.data() + m0 * blocks;
  int64_t b = 0;
  float total[MC][NR] = {};
#if defined(__AVX512BW__)
  {
    const __m512i lanes = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);  // b, then b + 1
    const int64_t pairs = blocks / 2 * 2;
    __m512 acc[MC][NR];
    for (int r = 0; r < MC; ++r)
      for (int j = 0; j < NR; ++j) acc[r][j] = _mm512_setzero_ps();
    for (int j = 0; j < NR; ++j) {
      for (b = 0; b < pairs; b += 2) {
        const __m512i w = _mm512_loadu_si512(wrow + j * k + b * kBlock);
        const __m512i aw = _mm512_abs_epi8(w);  // |w| as the unsigned operand, w's sign moved onto x
        const __mmask64 negative = _mm512_movepi8_mask(w);
        for (int r = 0; r < MC; ++r) {
          const __m512i xv = _mm512_loadu_si512(xq + r * k + b * kBlock);
          const __m512i sx = _mm512_mask_sub_epi8(xv, negative, _mm512_setzero_si512(), xv);
          acc[r][j] = _mm512_fmadd_ps(dot_u8s8(aw, sx), spread2(xd + r * blocks + b, lanes), acc[r][j]);
        }
      }
    }
    for (int r = 0; r < MC; ++r)
      for (int j = 0; j < NR; ++j) total[r][j] += _mm512_reduce_add_ps(acc[r][j]);
  }
#endif
#if defined(__AVX2__)
  {
    const int64_t first = b;
    __m256 acc[MC][NR];
    for (int r = 0; r < MC; ++r)
      for (int j = 0; j < NR; ++j) acc[r][j] = _mm256_setzero_ps();
    for (int j = 0; j < NR; ++j) {
      for (b = first; b < blocks; ++b) {
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wrow + j * k + b * kBlock));
        const __m256i aw = _mm256_sign_epi8(w, w);  // |w|, so maddubs sees an unsigned operand
        for (int r = 0; r < MC; ++r) {
          const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + r * k + b * kBlock));
          acc[r][j] = _mm256_fmadd_ps(dot_u8s8(aw, _mm256_sign_epi8(xv, w)), _mm256_broadcast_ss(xd + r * blocks + b),
                                      acc[r][j]);
        }
      }
    }
    for (int r = 0; r < MC; ++r)
      for (int j = 0; j < NR; ++j) total[r][j] += hsum(acc[r][j]);
  }
#endif
  const int64_t first = b;
  for (int j = 0; j < NR; ++j) {  // no vectors at all
    for (b = first; b < blocks; ++b) {
      for (int r = 0; r < MC; ++r) {
        const int8_t* xv = xq + r * k + b * kBlock;
        int dot = 0;
        for (int i = 0; i < kBlock; ++i) dot += wrow[j * k + b * kBlock + i] * xv[i];
        total[r][j] += xd[r * blocks + b] * static_cast<float>(dot);
      }
    }
  }
  for (int r = 0; r < MC; ++r)
    for (int j = 0; j < NR; ++j) out[r * NR + j] = scales[j] * total[r][j];
}

// Calls row<MC>(m0) for MC = the rows of x left, up to kRowsAtOnce at a time.
template <typename Row>
inline void over_x_rows(int64_t m_rows, const Row& row) {
  for (int64_t m0 = 0; m0 < m_rows; m0 += kRowsAtOnce) {
    switch (std::min(kRowsAtOnce, m_rows - m0)) {
      case 1: row(std::integral_constant<int, 1>(), m0); break;
      case 2: row(std::integral_constant<int, 2>(), m0); break;
      case 3: row(std::integral_constant<int, 3>(), m0); break;
      default: row(std::integral_constant<int, 4>(), m0); break;
    }
  }
}

// Calls tile<NR>(n) over weight rows n0 .. n1 - 1: kWeightRows rows at a time (half as many when more than two
// rows of x share them, so that the MC * NR sums stay in registers), then the rest one by one.
constexpr int64_t kWeightRows = 4;
template <int NR, typename Tile>
inline void weight_tiles(int64_t n0, int64_t n1, const Tile& tile) {
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) tile(std::integral_constant<int, NR>(), n);
  for (; n < n1; ++n) tile(std::integral_constant<int, 1>(), n);
}
template <typename Tile>
inline void over_weight_rows(int64_t m_rows, int64_t n0, int64_t n1, const Tile& tile) {
  if (m_rows <= 2) weight_tiles<kWeightRows>(n0, n1, tile);
  else weight_tiles<kWeightRows / 2>(n0, n1, tile);
}

// --------------------------------------------------------------------------- the ops

// The output columns of several weights laid side by side: which weight, and where, a column is.
struct Columns {
  std::vector<int64_t> starts;  // first output column of each weight, then the total
  explicit Columns(const std::vector<int64_t>& rows) {
    starts.push_back(0);
    for (int64_t n : rows) starts.push_back(starts.back() + n);
  }
  int64_t total() const { return starts.back(); }
  int64_t weight_of(int64_t col) const {
    int64_t i = 0;
    while (starts[i + 1] <= col) ++i;
    return i;
  }
};

void check_x(const at::Tensor& x, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k, "x must be [M, ", k, "], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  TORCH_CHECK(k % kBlock == 0, "in_features must be a multiple of ", kBlock, ", got ", k);
}

// fn(weight i, its rows n0 .. n1 - 1, the output column of n0) over every output column, in runs of one
// weight's rows, the columns split among torch's threads.
template <typename Fn>
void for_each_column(const Columns& cols, const Fn& fn) {
  // Grain: enough columns per task that the threads' start-up is paid back, few enough to split N.
  const int64_t grain = std::max<int64_t>(16, cols.total() / (8 * at::get_num_threads()));
  at::parallel_for(0, cols.total(), grain, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin, i = cols.weight_of(begin); c < end; ++i) {
      const int64_t stop = std::min(end, cols.starts[i + 1]);
      if (stop > c) fn(i, c - cols.starts[i], stop - cols.starts[i], c);
      c = std::max(c, stop);
    }
  });
}

// Where the op writes: out [M, N] in x's dtype, each value the float sum plus its column's bias.
struct Output {
  at::Tensor out;
  float* f32 = nullptr;
  c10::BFloat16* bf16 = nullptr;
  const float* bias = nullptr;  // per column
  int64_t n;

  Output(const at::Tensor& x, int64_t n, const c10::optional<at::Tensor>& b) : n(n) {
    out = at::empty({x.size(0), n}, x.options());
    if (out.scalar_type() == at::kFloat) f32 = out.data_ptr<float>();
    else bf16 = reinterpret_cast<c10::BFloat16*>(out.data_ptr());
    if (b.has_value()) {
      TORCH_CHECK(b->scalar_type() == at::kFloat && b->is_contiguous() && b->numel() == n,
                  "bias must be contiguous float32 with one value per output column");
      bias = b->data_ptr<float>();
    }
  }
  void write(int64_t m, int64_t c, float v) {
    if (bias) v += bias[c];
    if (f32) f32[m * n + c] = v;
    else bf16[m * n + c] = c10::BFloat16(v);
  }
};

template <typename Fn>
void with_quantized_x(const at::Tensor& x, int64_t group_size, const Fn& fn) {
  thread_local QuantizedX qx;
  const at::Tensor xc = x.contiguous();
  if (xc.scalar_type() == at::kFloat) {
    quantize_rows(xc.data_ptr<float>(), xc.size(0), xc.size(1), group_size, qx);
  } else {
    quantize_rows(reinterpret_cast<const c10::BFloat16*>(xc.data_ptr()), xc.size(0), xc.size(1), group_size, qx);
  }
  fn(qx);
}

// The int4 ops' weights, checked, as raw pointers: a Tensor's checked accessors cost more than a row's work.
struct Int4Operands {
  std::vector<const uint8_t*> q;
  std::vector<const void*> s, z;
  std::vector<bool> s_float;  // float32 scales and zeros, else bfloat16
  float scale(size_t i, int64_t at) const { return read(s[i], s_float[i], at); }
  float zero(size_t i, int64_t at) const { return read(z[i], s_float[i], at); }
  static float read(const void* p, bool is_float, int64_t at) {
    return is_float ? static_cast<const float*>(p)[at] : static_cast<float>(static_cast<const c10::BFloat16*>(p)[at]);
  }
};

// Checks the int4 ops' arguments; appends each weight's output rows to `rows`.
Int4Operands int4_operands(int64_t k, at::TensorList qweights, at::TensorList scales, at::TensorList zeros,
                           int64_t group_size, std::vector<int64_t>& rows) {
  TORCH_CHECK(group_size % kBlock == 0 && k % group_size == 0 && __builtin_popcountll(group_size) == 1,
              "group_size must be a power of two from 32 dividing K");
  TORCH_CHECK(qweights.size() == scales.size() && scales.size() == zeros.size(), "one scales and zeros per weight");
  Int4Operands w;
  for (size_t i = 0; i < qweights.size(); ++i) {
    const auto &q = qweights[i], &s = scales[i], &z = zeros[i];
    TORCH_CHECK(q.scalar_type() == at::kByte && q.is_contiguous() && q.dim() == 2 && q.size(1) * 2 == k,
                "qweight must be contiguous uint8 [N, K/2]");
    TORCH_CHECK(s.sizes() == z.sizes() && s.size(0) == q.size(0) && s.size(1) == k / group_size &&
                s.is_contiguous() && z.is_contiguous() && s.scalar_type() == z.scalar_type() &&
                (s.scalar_type() == at::kFloat || s.scalar_type() == at::kBFloat16),
                "scales and zeros must be contiguous float32 or bfloat16 [N, K/group_size]");
    rows.push_back(q.size(0));
    w.q.push_back(static_cast<const uint8_t*>(q.data_ptr()));
    w.s.push_back(s.data_ptr());
    w.z.push_back(z.data_ptr());
    w.s_float.push_back(s.scalar_type() == at::kFloat);
  }
  return w;
}

// Checks the int8 ops' weights; appends each one's output rows to `rows`.
std::vector<const int8_t*> int8_operands(int64_t k, at::TensorList weights, std::vector<int64_t>& rows) {
  std::vector<const int8_t*> w;
  for (const auto& t : weights) {
    TORCH_CHECK(t.scalar_type() == at::kChar && t.is_contiguous() && t.dim() == 2 && t.size(1) == k,
                "weight must be contiguous int8 [N, K]");
    rows.push_back(t.size(0));
    w.push_back(static_cast<const int8_t*>(t.data_ptr()));
  }
  return w;
}

const float* int8_scales(const at::Tensor& scales, const Columns& cols) {
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.numel() == cols.total() && scales.is_contiguous(),
              "scales must be contiguous float32 [sum of N]");
  return scales.data_ptr<float>();
}

at::Tensor int4_linear(const at::Tensor& x, at::TensorList qweights, at::TensorList scales, at::TensorList zeros,
                       const c10::optional<at::Tensor>& bias, int64_t group_size) {
  const int64_t k = x.size(-1), m_rows = x.size(0);
  check_x(x, k);
  std::vector<int64_t> rows;
  const Int4Operands w = int4_operands(k, qweights, scales, zeros, group_size, rows);
  const Columns cols(rows);
  Output y(x, cols.total(), bias);
  const int64_t groups = k / group_size;
  with_quantized_x(x, group_size, [&](const QuantizedX& qx) {
    for_each_column(cols, [&](int64_t i, int64_t n0, int64_t n1, int64_t c0) {
      over_weight_rows(m_rows, n0, n1, [&](auto nr, int64_t n) {
        over_x_rows(m_rows, [&](auto mc, int64_t m0) {
          float part[kRowsAtOnce * kWeightRows];
          if (w.s_float[i]) {
            int4_tile<mc, nr>(w.q[i] + n * (k / 2), static_cast<const float*>(w.s[i]) + n * groups,
                              static_cast<const float*>(w.z[i]) + n * groups, k, group_size, qx, m0, part);
          } else {
            int4_tile<mc, nr>(w.q[i] + n * (k / 2), static_cast<const c10::BFloat16*>(w.s[i]) + n * groups,
                              static_cast<const c10::BFloat16*>(w.z[i]) + n * groups, k, group_size, qx, m0, part);
          }
          for (int r = 0; r < mc; ++r)
            for (int j = 0; j < nr; ++j) y.write(m0 + r, c0 + n - n0 + j, part[r * nr + j]);
        });
      });
    });
  });
  return y.out;
}

at::Tensor int8_linear(const at::Tensor& x, at::TensorList weights, const at::Tensor& scales,
                       const c10::optional<at::Tensor>& bias) {
  const int64_t k = x.size(-1), m_rows = x.size(0);
  check_x(x, k);
  std::vector<int64_t> rows;
  const std::vector<const int8_t*> w_ptr = int8_operands(k, weights, rows);
  const Columns cols(rows);
  const float* s = int8_scales(scales, cols);
  Output y(x, cols.total(), bias);
  with_quantized_x(x, 0, [&](const QuantizedX& qx) {
    for_each_column(cols, [&](int64_t i, int64_t n0, int64_t n1, int64_t c0) {
      over_weight_rows(m_rows, n0, n1, [&](auto nr, int64_t n) {
        const int64_t c = c0 + n - n0;
        over_x_rows(m_rows, [&](auto mc, int64_t m0) {
          float part[kRowsAtOnce * kWeightRows];
          int8_tile<mc, nr>(w_ptr[i] + n * k, s + c, k, qx, m0, part);
          for (int r = 0; r < mc; ++r)
            for (int j = 0; j < nr; ++j) y.write(m0 + r, c + j, part[r * nr + j]);
        });
      });
    });
  });
  return y.out;
}

// --------------------------------------------------------------------------- many rows (prefill)
// With many rows of x each weight is read once per tile of 16 output columns and reused for every row, so
// the products are bound by arithmetic, not memory. On AVX2 (float32 FMAs: 16 multiply-adds a cycle) int16
// pairs (vpmaddwd on the multiply ports, the int32 adds on the others) run ~1.6x faster than the float32
// GEMM over the dequantized layer (benchmarks/results/README.md, "An integer GEMM for prefill on AVX2").
// x is quantized to int16 per block of up to 128 inputs (one float scale each): 15 bits, so a product is
// within ~1e-5 of the float product of the same weights, as the float GEMM was, unlike the decode kernels'
// int8 activations. The sums stay exact in int32: 64 pairs of |32767 * 127| * 2 per block.

constexpr int64_t kTile = 16;     // output columns per tile: two vectors of 8 int32 sums
constexpr int64_t kTileRows = 4;  // rows of x per pass: 8 int32 sums + 2 weights + 1 x in registers
constexpr float kInt16Max = 32767.f;

struct QuantizedX16 {
  int64_t rows = 0, block = 0, blocks = 0;
  at::Tensor q;                   // int16 [rows][K], a tensor so that a large one comes from LargeBlocks
  std::vector<float> d;           // [rows][blocks]: x ~= d * q within a block
  std::vector<float> block_sum;   // [rows][blocks]: d * (sum of q), for int4 zero points
};

template <typename T>
void quantize_rows16(const T* x, int64_t rows, int64_t k, int64_t block, QuantizedX16& out) {
  out.rows = rows;
  out.block = block;
  out.blocks = k / block;
  out.q = at::empty({rows, k}, at::kShort);
  out.d.resize(rows * out.blocks);
  out.block_sum.resize(rows * out.blocks);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      for (int64_t b = 0; b < out.blocks; ++b) {
        const T* src = x + m * k + b * block;
        float amax = 0.f;
        for (int64_t i = 0; i < block; ++i) amax = std::max(amax, std::fabs(as_float(src[i])));
        const bool zero = !(amax > kTinyBlock);
        const float d = zero ? 0.f : amax / kInt16Max;
        const float inv = zero ? 0.f : kInt16Max / amax;
        int16_t* q = out.q.data_ptr<int16_t>() + m * k + b * block;
        int64_t total = 0;
        for (int64_t i = 0; i < block; ++i) {
          q[i] = static_cast<int16_t>(std::nearbyint(as_float(src[i]) * inv));
          total += q[i];
        }
        out.d[m * out.blocks + b] = d;
        out.block_sum[m * out.blocks + b] = d * static_cast<float>(total);
      }
    }
  });
}

// 16 output columns' weights as int16 pairs: w[j][c] = (W[c, 2j], W[c, 2j + 1]), so one vpmaddwd against a
// broadcast pair of x gives 8 columns' partial sums; and their scales per group (and scale * zero for int4).
// Columns past the last weight are zero.
struct WeightTile {
  std::vector<int16_t> w;          // [K/2][16][2]
  std::vector<float> scale;        // [groups][16]
  std::vector<float> zero_scale;   // [groups][16], int4 only
  void reset(int64_t k, int64_t groups, bool zeros) {
    w.assign(k * kTile, 0);
    scale.assign(groups * kTile, 0.f);
    zero_scale.assign(zeros ? groups * kTile : 0, 0.f);
  }
};

// Lays out the tile's int16 pairs from its columns' weight rows (`rows`, null past the last column):
// `pairs8(row, j)` gives a row's pairs j..j+7 as 8 int32 lanes (low half the even k, high half the odd),
// `pair(row, j)` one of them as two int16. Eight rows' pairs at a time are transposed in registers.
template <typename Row, typename Pairs8, typename Pair>
void lay_out_pairs(WeightTile& t, Row* const* rows, int64_t k, const Pairs8& pairs8, const Pair& pair) {
#if defined(__AVX2__)
  for (int64_t half = 0; half < kTile / 8; ++half) {
    Row* const* r8 = rows + half * 8;
    for (int64_t j0 = 0; j0 < k / 2; j0 += 8) {
      __m256i r[8];
      for (int c = 0; c < 8; ++c) r[c] = r8[c] ? pairs8(r8[c], j0) : _mm256_setzero_si256();
      __m256i u[8];
      for (int c = 0; c < 8; c += 4) {  // the 32-bit lanes of rows c..c+3, four pairs per 128-bit half
        const __m256i lo01 = _mm256_unpacklo_epi32(r[c], r[c + 1]), hi01 = _mm256_unpackhi_epi32(r[c], r[c + 1]);
        const __m256i lo23 = _mm256_unpacklo_epi32(r[c + 2], r[c + 3]), hi23 = _mm256_unpackhi_epi32(r[c + 2], r[c + 3]);
        u[c] = _mm256_unpacklo_epi64(lo01, lo23);      // pairs 0 and 4
        u[c + 1] = _mm256_unpackhi_epi64(lo01, lo23);  // 1 and 5
        u[c + 2] = _mm256_unpacklo_epi64(hi01, hi23);  // 2 and 6
        u[c + 3] = _mm256_unpackhi_epi64(hi01, hi23);  // 3 and 7
      }
      int16_t* out = t.w.data() + j0 * 2 * kTile + half * 16;
      for (int j = 0; j < 4; ++j) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j * 2 * kTile),
                            _mm256_permute2x128_si256(u[j], u[j + 4], 0x20));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (j + 4) * 2 * kTile),
                            _mm256_permute2x128_si256(u[j], u[j + 4], 0x31));
      }
    }
  }
#else
  (void)pairs8;
  for (int64_t c = 0; c < kTile; ++c) {
    if (!rows[c]) continue;
    for (int64_t j = 0; j < k / 2; ++j) {
      const auto [even, odd] = pair(rows[c], j);
      t.w[j * 2 * kTile + c * 2] = even;
      t.w[j * 2 * kTile + c * 2 + 1] = odd;
    }
  }
#endif
}

// out[r][c] = sum over blocks of d[m0 + r, b] * scale[g(b), c] * (q[m0 + r, b] . w[b, c])
//             - block_sum[m0 + r, b] * zero_scale[g(b), c]
template <int MR>
void gemm_tile(const QuantizedX16& qx, int64_t k, const WeightTile& t, int64_t blocks_per_group, int64_t m0,
               float out[][kTile]) {
  const int64_t block = qx.block;
  const bool zeros = !t.zero_scale.empty();
  const int16_t* xq[MR];
  for (int r = 0; r < MR; ++r) xq[r] = qx.q.data_ptr<int16_t>() + (m0 + r) * k;
#if defined(__AVX512BW__)
  // One 512-bit vector holds the tile's 16 columns (their pairs for one k, or their sums): the same layout.
  for (int r = 0; r < MR; ++r) std::fill(out[r], out[r] + kTile, 0.f);
  for (int64_t b = 0; b < qx.blocks; ++b) {
    __m512i acc[MR];
    for (int r = 0; r < MR; ++r) acc[r] = _mm512_setzero_si512();
    const int16_t* w = t.w.data() + b * block * kTile;
    for (int64_t j = 0; j < block / 2; ++j) {
      const __m512i wj = _mm512_loadu_si512(w + j * 2 * kTile);
      for (int r = 0; r < MR; ++r) {
        int32_t pair;
        std::memcpy(&pair, xq[r] + b * block + 2 * j, sizeof(pair));
#if defined(__AVX512VNNI__)
        acc[r] = _mm512_dpwssd_epi32(acc[r], _mm512_set1_epi32(pair), wj);
#else
        acc[r] = _mm512_add_epi32(acc[r], _mm512_madd_epi16(_mm512_set1_epi32(pair), wj));
#endif
      }
    }
    const int64_t g = b / blocks_per_group;
    const __m512 s = _mm512_loadu_ps(t.scale.data() + g * kTile);
    const __m512 z = zeros ? _mm512_loadu_ps(t.zero_scale.data() + g * kTile) : _mm512_setzero_ps();
    for (int r = 0; r < MR; ++r) {
      const __m512 d = _mm512_set1_ps(qx.d[(m0 + r) * qx.blocks + b]);
      __m512 f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r]), _mm512_mul_ps(d, s), _mm512_loadu_ps(out[r]));
      if (zeros) f = _mm512_fnmadd_ps(_mm512_set1_ps(qx.block_sum[(m0 + r) * qx.blocks + b]), z, f);
      _mm512_storeu_ps(out[r], f);
    }
  }
#elif defined(__AVX2__)
  // The float sums live in `out` (touched once a block): the registers hold the int32 sums, the weights and x.
  for (int r = 0; r < MR; ++r) std::fill(out[r], out[r] + kTile, 0.f);
  for (int64_t b = 0; b < qx.blocks; ++b) {
    __m256i acc[MR][2];
    for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
    const int16_t* w = t.w.data() + b * block * kTile;
    for (int64_t j = 0; j < block / 2; ++j) {
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * 2 * kTile));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * 2 * kTile + kTile));
      for (int r = 0; r < MR; ++r) {
        int32_t pair;
        std::memcpy(&pair, xq[r] + b * block + 2 * j, sizeof(pair));
        const __m256i xb = _mm256_set1_epi32(pair);
        acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(xb, w0));
        acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(xb, w1));
      }
    }
    const int64_t g = b / blocks_per_group;
    const __m256 s0 = _mm256_loadu_ps(t.scale.data() + g * kTile), s1 = _mm256_loadu_ps(t.scale.data() + g * kTile + 8);
    const __m256 z0 = zeros ? _mm256_loadu_ps(t.zero_scale.data() + g * kTile) : _mm256_setzero_ps();
    const __m256 z1 = zeros ? _mm256_loadu_ps(t.zero_scale.data() + g * kTile + 8) : _mm256_setzero_ps();
    for (int r = 0; r < MR; ++r) {
      const __m256 d = _mm256_set1_ps(qx.d[(m0 + r) * qx.blocks + b]);
      __m256 f0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][0]), _mm256_mul_ps(d, s0), _mm256_loadu_ps(out[r]));
      __m256 f1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][1]), _mm256_mul_ps(d, s1), _mm256_loadu_ps(out[r] + 8));
      if (zeros) {
        const __m256 sum = _mm256_set1_ps(qx.block_sum[(m0 + r) * qx.blocks + b]);
        f0 = _mm256_fnmadd_ps(sum, z0, f0);
        f1 = _mm256_fnmadd_ps(sum, z1, f1);
      }
      _mm256_storeu_ps(out[r], f0);
      _mm256_storeu_ps(out[r] + 8, f1);
    }
  }
#else
  for (int r = 0; r < MR; ++r) {
    for (int64_t c = 0; c < kTile; ++c) {
      float sum = 0.f;
      for (int64_t b = 0; b < qx.blocks; ++b) {
        int32_t acc = 0;
        for (int64_t i = 0; i < block; ++i) acc += xq[r][b * block + i] * t.w[(b * block + i) / 2 * 2 * kTile + c * 2 + i % 2];
        const int64_t g = b / blocks_per_group;
        sum += static_cast<float>(acc) * (qx.d[(m0 + r) * qx.blocks + b] * t.scale[g * kTile + c]);
        if (zeros) sum -= qx.block_sum[(m0 + r) * qx.blocks + b] * t.zero_scale[g * kTile + c];
      }
      out[r][c] = sum;
    }
  }
#endif
}

// y = x W^T over many rows: x quantized once (int16 per `block`), then each thread takes tiles of 16 output
// columns, lays out their weights with `fill(tile, first column)` and runs every row of x against them.
template <typename Fill>
at::Tensor int16_gemm(const at::Tensor& x, const Columns& cols, const c10::optional<at::Tensor>& bias, int64_t block,
                      int64_t groups, bool zeros, const Fill& fill) {
  const int64_t k = x.size(1), m_rows = x.size(0);
  Output y(x, cols.total(), bias);
  QuantizedX16 qx;  // one per call: a thread_local would not reach the tasks below (each reads its own thread's)
  const at::Tensor xc = x.contiguous();
  if (xc.scalar_type() == at::kFloat) {
    quantize_rows16(xc.data_ptr<float>(), m_rows, k, block, qx);
  } else {
    quantize_rows16(reinterpret_cast<const c10::BFloat16*>(xc.data_ptr()), m_rows, k, block, qx);
  }
  const int64_t blocks_per_group = qx.blocks / groups;
  const int64_t tiles = (cols.total() + kTile - 1) / kTile;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    thread_local WeightTile t;
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t c0 = tile * kTile, width = std::min(kTile, cols.total() - c0);
      t.reset(k, groups, zeros);
      fill(t, c0, width);
      float part[kTileRows][kTile];
      for (int64_t m0 = 0; m0 < m_rows; m0 += kTileRows) {
        const int64_t mc = std::min(kTileRows, m_rows - m0);
        switch (mc) {
          case 1: gemm_tile<1>(qx, k, t, blocks_per_group, m0, part); break;
          case 2: gemm_tile<2>(qx, k, t, blocks_per_group, m0, part); break;
          case 3: gemm_tile<3>(qx, k, t, blocks_per_group, m0, part); break;
          default: gemm_tile<kTileRows>(qx, k, t, blocks_per_group, m0, part); break;
        }
        for (int64_t r = 0; r < mc; ++r)
          for (int64_t c = 0; c < width; ++c) y.write(m0 + r, c0 + c, part[r][c]);
      }
    }
  });
  return y.out;
}

// The activation block for K: as wide as the int32 sums allow and the weight groups divide.
int64_t x_block(int64_t k, int64_t group_size) {
  for (int64_t block : {128, 64, 32})
    if (block <= group_size && group_size % block == 0 && k % block == 0) return block;
  return kBlock;
}

at::Tensor int8_gemm(const at::Tensor& x, at::TensorList weights, const at::Tensor& scales,
                     const c10::optional<at::Tensor>& bias) {
  const int64_t k = x.size(-1);
  check_x(x, k);
  std::vector<int64_t> rows;
  const std::vector<const int8_t*> w_ptr = int8_operands(k, weights, rows);
  const Columns cols(rows);
  const float* s = int8_scales(scales, cols);
  return int16_gemm(x, cols, bias, x_block(k, k), 1, false, [&](WeightTile& t, int64_t c0, int64_t width) {
    const int8_t* rows[kTile] = {};
    for (int64_t c = 0; c < width; ++c) {
      const int64_t i = cols.weight_of(c0 + c);
      rows[c] = w_ptr[i] + (c0 + c - cols.starts[i]) * k;
      t.scale[c] = s[c0 + c];
    }
    lay_out_pairs(t, rows, k,
#if defined(__AVX2__)
                  [](const int8_t* row, int64_t j) {  // 16 bytes widened: pairs j..j+7
                    return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * j)));
                  },
#else
                  nullptr,
#endif
                  [](const int8_t* row, int64_t j) { return std::pair<int16_t, int16_t>(row[2 * j], row[2 * j + 1]); });
  });
}

at::Tensor int4_gemm(const at::Tensor& x, at::TensorList qweights, at::TensorList scales, at::TensorList zeros,
                     const c10::optional<at::Tensor>& bias, int64_t group_size) {
  const int64_t k = x.size(-1);
  check_x(x, k);
  std::vector<int64_t> rows;
  const Int4Operands w = int4_operands(k, qweights, scales, zeros, group_size, rows);
  const Columns cols(rows);
  const int64_t groups = k / group_size;
  return int16_gemm(x, cols, bias, x_block(k, group_size), groups, true, [&](WeightTile& t, int64_t c0,
                                                                              int64_t width) {
    const uint8_t* rows[kTile] = {};
    for (int64_t c = 0; c < width; ++c) {
      const int64_t i = cols.weight_of(c0 + c), n = c0 + c - cols.starts[i];
      rows[c] = w.q[i] + n * (k / 2);
      for (int64_t g = 0; g < groups; ++g) {
        const float scale = w.scale(i, n * groups + g), zero = w.zero(i, n * groups + g);
        t.scale[g * kTile + c] = scale;
        t.zero_scale[g * kTile + c] = scale * zero;
      }
    }
    // Byte j of a row holds k = 2j in its low nibble and 2j + 1 in its high one: pair j.
    lay_out_pairs(t, rows, k,
#if defined(__AVX2__)
                  [](const uint8_t* row, int64_t j) {
                    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + j)));
                    return _mm256_or_si256(_mm256_and_si256(b, _mm256_set1_epi32(0x0F)),
                                           _mm256_slli_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0xF0)), 12));
                  },
#else
                  nullptr,
#endif
                  [](const uint8_t* row, int64_t j) {
                    return std::pair<int16_t, int16_t>(row[j] & 0xF, row[j] >> 4);
                  });
  });
}

// --------------------------------------------------------------------------- the small ops of a decode step
// Eager decode pays a dispatch and an allocation per torch op: a norm is five of them, decode attention
// a dozen. These do the same arithmetic in one call each.

template <typename T>
inline void to_float(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// sum of a[i] * b[i] over n, b read as float; four partial sums in flight (one chain of dependent FMAs
// would stall on their latency, not on reading b: a bf16 weight row is read at the memory's rate).
template <typename T>
inline float dot(const float* a, const T* b, int64_t n) {
  int64_t i = 0;
  float total = 0.f;
#if defined(__AVX512F__)
  __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
  for (; i + 64 <= n; i += 64) {
    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), load16(b + i), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), load16(b + i + 16), acc1);
    acc2 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 32), load16(b + i + 32), acc2);
    acc3 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 48), load16(b + i + 48), acc3);
  }
  for (; i + 16 <= n; i += 16) acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), load16(b + i), acc0);
  total = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc0, acc1), _mm512_add_ps(acc2, acc3)));
#elif defined(__AVX2__)
  __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
  for (; i + 32 <= n; i += 32) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), load8(b + i + 8), acc1);
    acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), load8(b + i + 16), acc2);
    acc3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), load8(b + i + 24), acc3);
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), acc0);
  total = hsum(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
#endif
  for (; i < n; ++i) total += a[i] * static_cast<float>(b[i]);
  return total;
}

// out[i] += p * b[i] over n, b read as float.
template <typename T>
inline void add_scaled(float p, const T* b, float* out, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 pv = _mm512_set1_ps(p);
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(out + i, _mm512_fmadd_ps(pv, load16(b + i), _mm512_loadu_ps(out + i)));
#elif defined(__AVX2__)
  const __m256 pv = _mm256_set1_ps(p);
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_fmadd_ps(pv, load8(b + i), _mm256_loadu_ps(out + i)));
#endif
  for (; i < n; ++i) out[i] += p * static_cast<float>(b[i]);
}

template <typename T>
inline T round_to(float v) { return static_cast<T>(v); }

// y = w * dtype(x * rsqrt(mean(x^2) + eps)), the norm in float32 and rounded to x's dtype before the
// scale, as model.RMSNorm does.
template <typename T>
void rms_norm_rows(const T* x, const T* w, T* y, int64_t rows, int64_t k, float eps) {
  std::vector<float> xf(k);
  for (int64_t m = 0; m < rows; ++m) {
    to_float(x + m * k, xf.data(), k);
    const float ss = dot(xf.data(), xf.data(), k);
    const float r = 1.f / std::sqrt(ss / static_cast<float>(k) + eps);
    for (int64_t i = 0; i < k; ++i) {
      const float normed = static_cast<float>(round_to<T>(xf[i] * r));
      y[m * k + i] = round_to<T>(static_cast<float>(w[i]) * normed);
    }
  }
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.scalar_type() == weight.scalar_type() && weight.dim() == 1 && x.size(-1) == weight.size(0),
              "rms_norm: x [..., K] and weight [K] of one dtype");
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  at::Tensor y = at::empty_like(xc);
  const int64_t k = x.size(-1), rows = k ? xc.numel() / k : 0;
  if (x.scalar_type() == at::kFloat) {
    rms_norm_rows(xc.data_ptr<float>(), wc.data_ptr<float>(), y.data_ptr<float>(), rows, k, static_cast<float>(eps));
  } else {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16, "rms_norm: float32 or bfloat16");
    using B = c10::BFloat16;
    rms_norm_rows(reinterpret_cast<const B*>(xc.data_ptr()), reinterpret_cast<const B*>(wc.data_ptr()),
                  reinterpret_cast<B*>(y.data_ptr()), rows, k, static_cast<float>(eps));
  }
  return y;
}

// exp(x) for x <= 0 (scores less their maximum), a vector at a time: 2^n * p(r) with r = x - n ln2, n the
// nearest integer to x log2(e), p Cephes expf's polynomial (within 2 ulp of std::exp); 0 below -87.3,
// where float exp underflows, and for -inf (a masked key).
constexpr float kExpFloor = -87.3f, kLog2e = 1.44269504088896341f, kLn2High = 0.693359375f, kLn2Low = -2.12194440e-4f;
constexpr float kExpPoly[] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f,
                              1.6666665459e-1f, 5.0000001201e-1f};
#if defined(__AVX512F__)
inline __m512 exp_nonpositive(__m512 x) {
  const __m512 floor_x = _mm512_set1_ps(kExpFloor);
  const __mmask16 live = _mm512_cmp_ps_mask(x, floor_x, _CMP_GE_OQ);
  x = _mm512_max_ps(x, floor_x);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2High), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Low), r);
  __m512 p = _mm512_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpPoly[i]));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_maskz_mov_ps(live, _mm512_scalef_ps(p, n));
}
#elif defined(__AVX2__)
inline __m256 exp_nonpositive(__m256 x) {
  const __m256 floor_x = _mm256_set1_ps(kExpFloor);
  const __m256 live = _mm256_cmp_ps(x, floor_x, _CMP_GE_OQ);
  x = _mm256_max_ps(x, floor_x);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2High), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Low), r);
  __m256 p = _mm256_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpPoly[i]));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  // 2^n from its exponent bits: n >= -126 here, so the result is a normal float.
  const __m256 two_n = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n),
                                                                               _mm256_set1_epi32(127)), 23));
  return _mm256_and_ps(live, _mm256_mul_ps(p, two_n));
}
#endif

// p[i] = exp(p[i] - top) over n, in place; returns their sum.
inline float exp_shifted(float* p, int64_t n, float top) {
  int64_t i = 0;
  float total = 0.f;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(p + i), _mm512_set1_ps(top)));
    _mm512_storeu_ps(p + i, e);
    acc = _mm512_add_ps(acc, e);
  }
  total = _mm512_reduce_add_ps(acc);
#elif defined(__AVX2__)
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(p + i), _mm256_set1_ps(top)));
    _mm256_storeu_ps(p + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  total = hsum(acc);
#endif
  for (; i < n; ++i) {
    p[i] = p[i] == -INFINITY ? 0.f : std::exp(p[i] - top);
    total += p[i];
  }
  return total;
}

// out[0, dim) = sum over l < n of p[l] * v[l * stride + i], each output's sum in order of l. Up to 8 output
// vectors stay in registers while the rows go by: with one, every FMA waited on the one before (4 cycles),
// which made this loop most of decode attention's time.
template <int kVectors, typename T>
inline void weighted_rows_block(const float* p, const T* v, int64_t stride, int64_t n, float* out) {
#if defined(__AVX512F__)
  __m512 acc[kVectors];
  for (int c = 0; c < kVectors; ++c) acc[c] = _mm512_setzero_ps();
  for (int64_t l = 0; l < n; ++l) {
    const __m512 pl = _mm512_set1_ps(p[l]);
    for (int c = 0; c < kVectors; ++c) acc[c] = _mm512_fmadd_ps(pl, load16(v + l * stride + 16 * c), acc[c]);
  }
  for (int c = 0; c < kVectors; ++c) _mm512_storeu_ps(out + 16 * c, acc[c]);
#elif defined(__AVX2__)
  __m256 acc[kVectors];
  for (int c = 0; c < kVectors; ++c) acc[c] = _mm256_setzero_ps();
  for (int64_t l = 0; l < n; ++l) {
    const __m256 pl = _mm256_set1_ps(p[l]);
    for (int c = 0; c < kVectors; ++c) acc[c] = _mm256_fmadd_ps(pl, load8(v + l * stride + 8 * c), acc[c]);
  }
  for (int c = 0; c < kVectors; ++c) _mm256_storeu_ps(out + 8 * c, acc[c]);
#endif
}

template <typename T>
inline void weighted_rows(const float* p, const T* v, int64_t stride, int64_t n, float* out, int64_t dim) {
  int64_t i = 0;
#if defined(__AVX512F__) || defined(__AVX2__)
#if defined(__AVX512F__)
  constexpr int64_t kWidth = 16;
#else
  constexpr int64_t kWidth = 8;
#endif
  for (; i + 8 * kWidth <= dim; i += 8 * kWidth) weighted_rows_block<8>(p, v + i, stride, n, out + i);
  for (; i + 4 * kWidth <= dim; i += 4 * kWidth) weighted_rows_block<4>(p, v + i, stride, n, out + i);
  for (; i + kWidth <= dim; i += kWidth) weighted_rows_block<1>(p, v + i, stride, n, out + i);
#endif
  for (; i < dim; ++i) {
    float acc = 0.f;
    for (int64_t l = 0; l < n; ++l) acc += p[l] * static_cast<float>(v[l * stride + i]);
    out[i] = acc;
  }
}

// Where a cache's keys or values are: the values [B, G, >= length, D] with D contiguous (a cache and its used
// prefix) and their strides; for an int8 cache also one float32 scale per row, head and position.
template <typename KV>
struct CacheSide {
  const KV* values;
  std::array<int64_t, 3> strides;
  const float* scales = nullptr;
  std::array<int64_t, 3> scale_strides{};
  const KV* at(int64_t b, int64_t g) const { return values + b * strides[0] + g * strides[1]; }
  const float* scales_at(int64_t b, int64_t g) const {
    return scales ? scales + b * scale_strides[0] + g * scale_strides[1] : nullptr;
  }
};

// One query per row against the first `length` cached positions, as model.decode_attention computes it:
// scores and softmax in float32, the probabilities rounded to the query's dtype before they meet v,
// the sum in float32. q [B, H, D]; mask [B, length] bool or None; query head h reads kv head h / (H / G).
// An int8 cache's scales multiply each key's score and each value's probability (the values are not widened
// to a float copy first). The H / G query heads of a kv head go together (its keys and values are read from
// memory once for all of them), the exponentials a vector at a time, and the value sums in registers.
template <typename T, typename KV>
void attend_one(const T* q, CacheSide<KV> k, CacheSide<KV> v, const bool* mask, T* y, int64_t batch, int64_t heads,
                int64_t kv_heads, int64_t length, int64_t dim) {
  const int64_t group = heads / kv_heads;
  const float scale = 1.f / std::sqrt(static_cast<float>(dim));
  // Short caches in one thread: a split would cost more than it saves.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, group * length * dim));
  at::parallel_for(0, batch * kv_heads, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * dim), out(dim), scores(group * length);
    for (int64_t bg = begin; bg < end; ++bg) {
      const int64_t b = bg / kv_heads, first = bg * group;  // the first query head (over all rows) of this kv head
      to_float(q + first * dim, qf.data(), group * dim);
      const int64_t g = bg % kv_heads;
      const KV *kb = k.at(b, g), *vb = v.at(b, g);
      const float *k_scales = k.scales_at(b, g), *v_scales = v.scales_at(b, g);
      for (int64_t l = 0; l < length; ++l) {
        const bool seen = !mask || mask[b * length + l];
        const float key_scale = k_scales ? scale * k_scales[l * k.scale_strides[2]] : scale;
        for (int64_t j = 0; j < group; ++j) {
          scores[j * length + l] = seen ? dot(qf.data() + j * dim, kb + l * k.strides[2], dim) * key_scale : -INFINITY;
        }
      }
      for (int64_t j = 0; j < group; ++j) {
        float* row = scores.data() + j * length;
        float top = -INFINITY;
        for (int64_t l = 0; l < length; ++l) top = std::max(top, row[l]);
        const float total = exp_shifted(row, length, top);
        for (int64_t l = 0; l < length; ++l) {
          const float value_scale = v_scales ? v_scales[l * v.scale_strides[2]] : 1.f;
          row[l] = static_cast<float>(round_to<T>(row[l] / total)) * value_scale;
        }
        weighted_rows(row, vb, v.strides[2], length, out.data(), dim);
        for (int64_t i = 0; i < dim; ++i) y[(first + j) * dim + i] = round_to<T>(out[i]);
      }
    }
  });
}

template <typename KV>
CacheSide<KV> cache_side(const at::Tensor& values, const c10::optional<at::Tensor>& scales) {
  CacheSide<KV> side{reinterpret_cast<const KV*>(values.data_ptr()),
                     {values.stride(0), values.stride(1), values.stride(2)}};
  if (scales.has_value()) {
    side.scales = scales->data_ptr<float>();
    side.scale_strides = {scales->stride(0), scales->stride(1), scales->stride(2)};
  }
  return side;
}

// q [B, H, 1, D] float32 or bfloat16; k and v [B, G, L, D] of q's dtype, or int8 with k_scale and v_scale
// float32 [B, G, L, 1] (an int8 KVCache's used prefix).
at::Tensor attention_one_query(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const c10::optional<at::Tensor>& k_scale, const c10::optional<at::Tensor>& v_scale,
                               const c10::optional<at::Tensor>& mask) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1 && k.dim() == 4 && v.sizes() == k.sizes() && k.size(0) == q.size(0) &&
              k.size(3) == q.size(3) && q.size(1) % k.size(1) == 0,
              "decode_attention: q [B, H, 1, D], k and v [B, G, L, D] with G dividing H");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "decode_attention: k and v contiguous along D");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16,
              "decode_attention: q float32 or bfloat16");
  const bool int8 = k.scalar_type() == at::kChar;
  TORCH_CHECK(k.scalar_type() == v.scalar_type() && (int8 || k.scalar_type() == q.scalar_type()),
              "decode_attention: k and v of q's dtype, or int8 with scales");
  TORCH_CHECK(int8 == (k_scale.has_value() && v_scale.has_value()), "decode_attention: int8 k and v need scales");
  if (int8) {
    TORCH_CHECK(k_scale->scalar_type() == at::kFloat && v_scale->scalar_type() == at::kFloat &&
                k_scale->numel() == k.numel() / k.size(3) && v_scale->numel() == v.numel() / v.size(3),
                "decode_attention: scales float32 [B, G, L, 1]");
  }
  const int64_t batch = q.size(0), heads = q.size(1), kv_heads = k.size(1), length = k.size(2), dim = q.size(3);
  at::Tensor mask_rows;
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->numel() == batch * length,
                "decode_attention: mask bool [B, 1, 1, L]");
    mask_rows = mask->reshape({batch, length}).contiguous();
  }
  const at::Tensor qc = q.contiguous();
  at::Tensor y = at::empty_like(qc);
  const bool* m = mask.has_value() ? mask_rows.data_ptr<bool>() : nullptr;
  const auto run = [&](auto* q_ptr, auto kv_type) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(q_ptr)>>;
    using KV = decltype(kv_type);
    attend_one(q_ptr, cache_side<KV>(k, k_scale), cache_side<KV>(v, v_scale), m, reinterpret_cast<T*>(y.data_ptr()),
               batch, heads, kv_heads, length, dim);
  };
  if (q.scalar_type() == at::kFloat) {
    const float* qp = qc.data_ptr<float>();
    int8 ? run(qp, int8_t{}) : run(qp, float{});
  } else {
    const auto* qp = reinterpret_cast<const c10::BFloat16*>(qc.data_ptr());
    int8 ? run(qp, int8_t{}) : run(qp, c10::BFloat16{});
  }
  return y;
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const c10::optional<at::Tensor>& mask) {
  return attention_one_query(q, k, v, c10::nullopt, c10::nullopt, mask);
}

at::Tensor decode_attention_int8(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& k_scale, const at::Tensor& v_scale,
                                 const c10::optional<at::Tensor>& mask) {
  TORCH_CHECK(k.scalar_type() == at::kChar, "decode_attention_int8: int8 k and v");
  return attention_one_query(q, k, v, k_scale, v_scale, mask);
}

// One query's rotary embedding, x * cos + rotate_half(x) * sin in float32 as model.apply_rotary computes it
// (rotate_half(x) * sin as x rolled by half a head times a sign-carrying sin; the two products rounded apart,
// then added: fp-contract off, so that no FMA changes a bit), rounded to T.
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
template <typename T>
void rotate_head(const T* x, const float* cos, const float* sin, T* out, int64_t d) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < d; ++i) {
    const float a = static_cast<float>(x[i]) * cos[i];
    const float b = static_cast<float>(x[i < half ? i + half : i - half]) * sin[i];
    out[i] = static_cast<T>(a + b);
  }
}
#pragma GCC pop_options

// A decode step's attention for rows that all write one position (batch-1 decode), in one call instead of a
// dozen: qkv [B, 1, (H + 2G) * D], the joint q/k/v projection's output; cos, sin [B or 1, 1, 1, D] float32. q and
// k are rotated, k and v written into the caches [B, G, L, D] at position write_pos[0], and q attends to their
// first `length` positions (decode_attention's arithmetic). Returns [B, 1, H * D], as the model reshapes it.
template <typename T>
at::Tensor decode_self_attention_as(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                                    at::Tensor& k_cache, at::Tensor& v_cache, int64_t pos, int64_t length,
                                    int64_t heads, int64_t kv_heads, const c10::optional<at::Tensor>& mask) {
  const int64_t b_rows = qkv.size(0), d = k_cache.size(3);
  at::Tensor q = at::empty({b_rows, heads, 1, d}, qkv.options());
  const T* in = reinterpret_cast<const T*>(qkv.data_ptr());
  T* q_out = reinterpret_cast<T*>(q.data_ptr());
  T* k_out = reinterpret_cast<T*>(k_cache.data_ptr());
  T* v_out = reinterpret_cast<T*>(v_cache.data_ptr());
  const int64_t cache_len = k_cache.size(2), width = (heads + 2 * kv_heads) * d;
  for (int64_t b = 0; b < b_rows; ++b) {
    const int64_t angle = cos.size(0) == 1 ? 0 : b;
    const float* c = cos.data_ptr<float>() + angle * d;
    const float* s = sin.data_ptr<float>() + angle * d;
    const T* row = in + b * width;
    for (int64_t h = 0; h < heads; ++h) rotate_head(row + h * d, c, s, q_out + (b * heads + h) * d, d);
    for (int64_t g = 0; g < kv_heads; ++g) {
      const int64_t at = ((b * kv_heads + g) * cache_len + pos) * d;
      rotate_head(row + (heads + g) * d, c, s, k_out + at, d);
      std::memcpy(v_out + at, row + (heads + kv_heads + g) * d, d * sizeof(T));
    }
  }
  return attention_one_query(q, k_cache.narrow(2, 0, length), v_cache.narrow(2, 0, length), c10::nullopt,
                             c10::nullopt, mask).view({b_rows, 1, heads * d});
}

at::Tensor decode_self_attention(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                                 at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& write_pos, int64_t length,
                                 int64_t heads, int64_t kv_heads, const c10::optional<at::Tensor>& mask) {
  const int64_t b_rows = qkv.size(0), d = k_cache.size(3);
  TORCH_CHECK(qkv.dim() == 3 && qkv.size(1) == 1 && qkv.size(2) == (heads + 2 * kv_heads) * d && qkv.is_contiguous(),
              "decode_self_attention: qkv [B, 1, (H + 2G) * D], contiguous");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.sizes() == v_cache.sizes() &&
                  k_cache.size(0) == b_rows && k_cache.size(1) == kv_heads && k_cache.scalar_type() == qkv.scalar_type()
                  && v_cache.scalar_type() == qkv.scalar_type(),
              "decode_self_attention: caches [B, G, L, D] of qkv's dtype, contiguous");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.numel() == sin.numel() && cos.size(-1) == d &&
                  (cos.numel() == d || cos.numel() == b_rows * d),
              "decode_self_attention: cos and sin float32 [B or 1, 1, 1, D]");
  TORCH_CHECK(write_pos.numel() == 1 && write_pos.scalar_type() == at::kLong, "decode_self_attention: one position");
  const int64_t pos = write_pos.item<int64_t>();
  TORCH_CHECK(pos >= 0 && pos < length && length <= k_cache.size(2), "decode_self_attention: position ", pos,
              " outside the ", length, " attended of the cache's ", k_cache.size(2));
  if (qkv.scalar_type() == at::kFloat) {
    return decode_self_attention_as<float>(qkv, cos, sin, k_cache, v_cache, pos, length, heads, kv_heads, mask);
  }
  TORCH_CHECK(qkv.scalar_type() == at::kBFloat16, "decode_self_attention: float32 or bfloat16");
  return decode_self_attention_as<c10::BFloat16>(qkv, cos, sin, k_cache, v_cache, pos, length, heads, kv_heads,
                                                 mask);
}

// --------------------------------------------------------------------------- bf16 weights

// y = x · Wᵀ (+ bias) for bf16 weights read as stored and x float32 or bf16. A bf16 value widens to
// float32 exactly, so each product is exact in float32 and only the order of the float32 sums differs
// from a float GEMM over the same values. Decode is bound by reading W: 2 bytes a weight, not 4.
at::Tensor bf16_linear(const at::Tensor& x, at::TensorList weights, const c10::optional<at::Tensor>& bias) {
  const int64_t k = x.size(-1), m_rows = x.size(0);
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "x must be float32 or bfloat16 [M, K]");
  std::vector<int64_t> rows;
  std::vector<const c10::BFloat16*> w_ptr;
  for (const auto& w : weights) {
    TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.is_contiguous() && w.dim() == 2 && w.size(1) == k,
                "weight must be contiguous bfloat16 [N, K]");
    rows.push_back(w.size(0));
    w_ptr.push_back(reinterpret_cast<const c10::BFloat16*>(w.data_ptr()));
  }
  const Columns cols(rows);
  Output y(x, cols.total(), bias);
  const at::Tensor xf = x.to(at::kFloat).contiguous();  // converted once, not once per weight row
  const float* xp = xf.data_ptr<float>();
  for_each_column(cols, [&](int64_t i, int64_t n0, int64_t n1, int64_t c0) {
    for (int64_t n = n0, c = c0; n < n1; ++n, ++c) {
      const c10::BFloat16* wrow = w_ptr[i] + n * k;
      for (int64_t m = 0; m < m_rows; ++m) y.write(m, c, dot(xp + m * k, wrow, k));  // W's row stays in L1
    }
  });
  return y.out;
}

// --------------------------------------------------------------------------- large CPU blocks

// torch's CPU tensors come from malloc. A prefill frees and makes again, layer after layer, tensors of a few
// megabytes. glibc's heap keeps them (qwenkit/runtime/allocator.py raises its thresholds, since an unmapped
// block is faulted in again page by page) but fragments: the demo's 512-token prefill grew the heap by ~250 MiB
// for ~60 MiB of live tensors. LargeBlocks, registered as torch's CPU allocator, maps each tensor of at least
// `min_bytes` on its own and keeps it when freed, for the next tensor it fits (up to twice its size): memory
// already faulted in is reused, and what is kept is what the same shapes need again. A free block that no
// tensor has taken for `idle` large allocations (left from other shapes), or beyond `max_free` bytes of free
// blocks (the least recently freed first), is unmapped; -1 turns either rule off. Smaller tensors go to the
// allocator it replaced.
class LargeBlocks final : public c10::Allocator {
 public:
  explicit LargeBlocks(c10::Allocator* small) : small_(small) {}

  void configure(int64_t min_bytes, int64_t max_free, int64_t idle) {
    std::vector<Block> unmap;
    {
      std::lock_guard<std::mutex> lock(mu_);
      min_bytes_ = static_cast<size_t>(min_bytes);
      max_free_ = max_free;
      idle_ = idle;
      evict(unmap);
    }
    unmap_all(unmap);
  }

  c10::DataPtr allocate(size_t n) override {
    if (n < min_bytes_.load()) return small_->allocate(n);
    void* p = take((n + kPage - 1) / kPage * kPage);
    return {p, p, &free_block, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &free_block; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  void release_free() {
    std::vector<Block> unmap;
    {
      std::lock_guard<std::mutex> lock(mu_);
      unmap.swap(free_);
      free_bytes_ = 0;
      for (const Block& b : unmap) mapped_bytes_ -= b.size;
    }
    unmap_all(unmap);
  }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return {mapped_bytes_, free_bytes_};
  }

  static LargeBlocks* instance;
  std::mutex mu_;  // public for pthread_atfork: a child must not inherit it locked

 private:
  struct Block {
    void* p;
    size_t size;
    int64_t freed_at;  // clock_ when freed
  };
  static constexpr size_t kPage = 4096;

  static void free_block(void* p) { instance->give_back(p); }

  void* take(size_t size) {
    std::vector<Block> unmap;
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      ++clock_;
      evict(unmap);
      size_t best = free_.size();
      for (size_t i = 0; i < free_.size(); ++i)
        if (free_[i].size >= size && free_[i].size <= 2 * size &&
            (best == free_.size() || free_[i].size < free_[best].size))
          best = i;
      if (best < free_.size()) {
        p = free_[best].p;
        size = free_[best].size;
        free_bytes_ -= static_cast<int64_t>(size);
        free_[best] = free_.back();
        free_.pop_back();
      } else {
        p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p != MAP_FAILED) mapped_bytes_ += static_cast<int64_t>(size);
      }
      if (p != MAP_FAILED) live_[p] = size;
    }
    unmap_all(unmap);
    TORCH_CHECK(p != MAP_FAILED, "out of memory: could not map ", size, " bytes for a CPU tensor");
    if (c10::memoryProfilingEnabled()) report(p, static_cast<int64_t>(size));
    return p;
  }

  void give_back(void* p) {
    std::vector<Block> unmap;
    size_t size = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = live_.find(p);
      if (it == live_.end()) {  // from the small allocator, through raw_deallocate
        small_->raw_deleter()(p);
        return;
      }
      size = it->second;
      live_.erase(it);
      free_.push_back({p, size, clock_});
      free_bytes_ += static_cast<int64_t>(size);
      evict(unmap);
    }
    unmap_all(unmap);
    if (c10::memoryProfilingEnabled()) report(p, -static_cast<int64_t>(size));
  }

  // Moves the free blocks the rules give up into `unmap` (mu_ held).
  void evict(std::vector<Block>& unmap) {
    auto drop = [&](size_t i) {
      unmap.push_back(free_[i]);
      free_bytes_ -= static_cast<int64_t>(free_[i].size);
      mapped_bytes_ -= static_cast<int64_t>(free_[i].size);
      free_[i] = free_.back();
      free_.pop_back();
    };
    if (idle_ >= 0)
      for (size_t i = 0; i < free_.size();)
        if (clock_ - free_[i].freed_at > idle_) drop(i); else ++i;
    while (max_free_ >= 0 && free_bytes_ > max_free_) {
      size_t oldest = 0;
      for (size_t i = 1; i < free_.size(); ++i)
        if (free_[i].freed_at < free_[oldest].freed_at) oldest = i;
      drop(oldest);
    }
  }

  static void unmap_all(const std::vector<Block>& blocks) {
    for (const Block& b : blocks) munmap(b.p, b.size);
  }

  void report(void* p, int64_t size) {
    const auto s = stats();
    c10::reportMemoryUsageToProfiler(p, size, s[0] - s[1], s[0], c10::Device(c10::DeviceType::CPU));
  }

  c10::Allocator* small_;
  std::atomic<size_t> min_bytes_{0};
  int64_t max_free_ = -1, idle_ = -1, clock_ = 0;
  int64_t mapped_bytes_ = 0, free_bytes_ = 0;
  std::unordered_map<void*, size_t> live_;
  std::vector<Block> free_;
};

LargeBlocks* LargeBlocks::instance = nullptr;

// Registers LargeBlocks as torch's CPU allocator (once; later calls change its rules). Tensors made before
// keep their own allocator's deleter.
bool keep_large_blocks(int64_t min_bytes, int64_t max_free_bytes, int64_t idle_allocations) {
  static std::once_flag registered;
  std::call_once(registered, [] {
    LargeBlocks::instance = new LargeBlocks(c10::GetAllocator(c10::DeviceType::CPU));  // never freed: tensors
    c10::SetAllocator(c10::DeviceType::CPU, LargeBlocks::instance);                   // may outlive everything
    pthread_atfork([] { LargeBlocks::instance->mu_.lock(); }, [] { LargeBlocks::instance->mu_.unlock(); },
                   [] { LargeBlocks::instance->mu_.unlock(); });
  });
  LargeBlocks::instance->configure(min_bytes, max_free_bytes, idle_allocations);
  return true;
}

// [bytes mapped, bytes of them free], zeros before keep_large_blocks.
std::vector<int64_t> large_block_stats() {
  return LargeBlocks::instance ? LargeBlocks::instance->stats() : std::vector<int64_t>{0, 0};
}

void release_free_blocks() {
  if (LargeBlocks::instance) LargeBlocks::instance->release_free();
}

// --------------------------------------------------------------------------- collectives through shared memory
// The forwards' collectives of tensor-parallel ranks on one machine (qwenkit/parallel.py, SharedMemoryCollectives)
// go through one mapped area instead of gloo's loopback sockets:
//   a header of one 64-byte line a rank: the last step it published (int64), then its pid (int64);
//   two sets of `size` slots of `slot_bytes` each, step s using set s % 2.
// In a step each rank copies its part into its slot, publishes s (release) and waits until every rank has
// (acquire), then reads the slots. A rank writes set s % 2 again at step s + 2 only after every rank published
// s + 1, which each does after it has read step s: one wait a step is enough. Every rank sums the slots in rank
// order, so all hold the same bits, as after gloo's all-reduce.

struct SharedArea {
  uint8_t* base;
  int64_t rank, size, slot_bytes;

  std::atomic<int64_t>* published(int64_t r) const { return reinterpret_cast<std::atomic<int64_t>*>(base + 64 * r); }
  int64_t pid(int64_t r) const { return reinterpret_cast<const int64_t*>(base + 64 * r)[1]; }
  uint8_t* slot(int64_t step, int64_t r) const { return base + 64 * size + ((step & 1) * size + r) * slot_bytes; }
};

SharedArea area_of(const at::Tensor& area, int64_t rank, int64_t size, int64_t slot_bytes) {
  TORCH_CHECK(area.scalar_type() == at::kByte && area.is_contiguous() &&
                  area.numel() >= 64 * size + 2 * size * slot_bytes,
              "the shared area is too small for ", size, " ranks of ", slot_bytes, " bytes");
  return SharedArea{area.data_ptr<uint8_t>(), rank, size, slot_bytes};
}

// Whether process `pid` still runs: not gone, nor a zombie (a killed rank its parent has not reaped yet).
bool running(int64_t pid) {
  if (kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH) return false;
  char path[64], stat[256] = {0};
  std::snprintf(path, sizeof path, "/proc/%lld/stat", static_cast<long long>(pid));
  FILE* f = std::fopen(path, "r");
  if (f == nullptr) return true;  // (no /proc: kill's answer)
  const size_t n = std::fread(stat, 1, sizeof stat - 1, f);
  std::fclose(f);
  const char* end = std::strrchr(stat, ')');  // "pid (name) S ...": the state follows the name
  return n == 0 || end == nullptr || end[1] == 0 || (end[2] != 'Z' && end[2] != 'X');
}

// Publish `step` and wait until every rank has; an error names a rank that is gone or that did not come within
// `timeout_s` (stopped, or stuck), rather than wait for ever.
void meet(const SharedArea& a, int64_t step, double timeout_s) {
  a.published(a.rank)->store(step, std::memory_order_release);
  const auto start = std::chrono::steady_clock::now();
  for (int64_t r = 0; r < a.size; ++r) {
    for (int64_t spins = 0; a.published(r)->load(std::memory_order_acquire) < step; ++spins) {
      if (spins < 4096) {  // a rank a few microseconds behind: spin
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
        continue;
      }
      if (spins % 256 == 0) {
        const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        TORCH_CHECK(waited < timeout_s, "timed out after ", timeout_s, " s waiting for rank ", r,
                    " in a collective (stopped or stuck?)");
        const int64_t pid = a.pid(r);
        TORCH_CHECK(pid <= 0 || running(pid), "rank ", r, " (pid ", pid, ") is gone");
      }
      sched_yield();  // (more ranks and threads than cores: let the late one run)
    }
  }
}

// x (float32 or bfloat16, contiguous) summed over the ranks in place, a slot at a time; returns the next step.
int64_t shm_all_reduce(at::Tensor x, const at::Tensor& area, int64_t rank, int64_t size, int64_t slot_bytes,
                       int64_t step, double timeout_s) {
  TORCH_CHECK(x.is_contiguous() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "shm_all_reduce takes contiguous float32 or bfloat16 tensors");
  const SharedArea a = area_of(area, rank, size, slot_bytes);
  const int64_t item = x.element_size(), per_slot = slot_bytes / item;
  uint8_t* data = static_cast<uint8_t*>(x.data_ptr());
  for (int64_t start = 0; start < x.numel(); start += per_slot, ++step) {
    const int64_t n = std::min(per_slot, x.numel() - start);
    std::memcpy(a.slot(step, rank), data + start * item, n * item);
    meet(a, step, timeout_s);
    if (x.scalar_type() == at::kFloat) {
      float* out = reinterpret_cast<float*>(data) + start;
      for (int64_t i = 0; i < n; ++i) out[i] = reinterpret_cast<const float*>(a.slot(step, 0))[i];
      for (int64_t r = 1; r < size; ++r) {
        const float* part = reinterpret_cast<const float*>(a.slot(step, r));
        for (int64_t i = 0; i < n; ++i) out[i] += part[i];
      }
    } else {  // summed in float32, rounded once
      c10::BFloat16* out = reinterpret_cast<c10::BFloat16*>(data) + start;
      for (int64_t i = 0; i < n; ++i) {
        float sum = 0.0f;
        for (int64_t r = 0; r < size; ++r) sum += static_cast<float>(reinterpret_cast<const c10::BFloat16*>(
                                               a.slot(step, r))[i]);
        out[i] = c10::BFloat16(sum);
      }
    }
  }
  return step;
}

// Every rank's x (contiguous, any dtype, the same shape on every rank) as [size, numel]; and the next step.
std::tuple<at::Tensor, int64_t> shm_all_gather(const at::Tensor& x, const at::Tensor& area, int64_t rank,
                                               int64_t size, int64_t slot_bytes, int64_t step, double timeout_s) {
  TORCH_CHECK(x.is_contiguous(), "shm_all_gather takes a contiguous tensor");
  const SharedArea a = area_of(area, rank, size, slot_bytes);
  at::Tensor out = at::empty({size, x.numel()}, x.options());
  const int64_t bytes = x.numel() * x.element_size();
  const uint8_t* data = static_cast<const uint8_t*>(x.data_ptr());
  uint8_t* gathered = static_cast<uint8_t*>(out.data_ptr());
  for (int64_t start = 0; start < bytes; start += slot_bytes, ++step) {
    const int64_t n = std::min(slot_bytes, bytes - start);
    std::memcpy(a.slot(step, rank), data + start, n);
    meet(a, step, timeout_s);
    for (int64_t r = 0; r < size; ++r) std::memcpy(gathered + r * bytes + start, a.slot(step, r), n);
  }
  return {out, step};
}

// The instruction set this library was built for, so Python can tell what it loaded.
std::string isa() {
#if defined(__AVX512VNNI__)
  return "avx512_vnni";
#elif defined(__AVX512BW__)
  return "avx512";
#elif defined(__AVX2__)
  return "avx2";
#else
  return "scalar";
#endif
}

}  // namespace

TORCH_LIBRARY(qwenkit_cpu, m) {
  // bias: float32, added before the output is rounded to x's dtype.
  m.def("int4_linear(Tensor x, Tensor[] qweights, Tensor[] scales, Tensor[] zeros, Tensor? bias, int group_size)"
        " -> Tensor");
  m.def("int8_linear(Tensor x, Tensor[] weights, Tensor scales, Tensor? bias) -> Tensor");
  // The same products for many rows of x (prefill), with int16 activations: see int16_gemm.
  m.def("int4_gemm(Tensor x, Tensor[] qweights, Tensor[] scales, Tensor[] zeros, Tensor? bias, int group_size)"
        " -> Tensor");
  m.def("int8_gemm(Tensor x, Tensor[] weights, Tensor scales, Tensor? bias) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask) -> Tensor");
  m.def("decode_attention_int8(Tensor q, Tensor k, Tensor v, Tensor k_scale, Tensor v_scale, Tensor? mask) -> Tensor");
  m.def("bf16_linear(Tensor x, Tensor[] weights, Tensor? bias) -> Tensor");
  m.def("decode_self_attention(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache,"
        " Tensor write_pos, int length, int heads, int kv_heads, Tensor? mask) -> Tensor");
  m.def("isa() -> str", &isa);
  // Process-wide, not per tensor: qwenkit/runtime/allocator.py.
  m.def("keep_large_blocks(int min_bytes, int max_free_bytes, int idle_allocations) -> bool", &keep_large_blocks);
  m.def("large_block_stats() -> int[]", &large_block_stats);
  m.def("release_free_blocks() -> ()", &release_free_blocks);
  // Tensor parallelism on one machine: qwenkit/parallel.py.
  m.def("shm_all_reduce(Tensor(a!) x, Tensor area, int rank, int size, int slot_bytes, int step, float timeout)"
        " -> int");
  m.def("shm_all_gather(Tensor x, Tensor area, int rank, int size, int slot_bytes, int step, float timeout)"
        " -> (Tensor, int)");
}

TORCH_LIBRARY_IMPL(qwenkit_cpu, CPU, m) {
  m.impl("int4_linear", &int4_linear);
  m.impl("int8_linear", &int8_linear);
  m.impl("int4_gemm", &int4_gemm);
  m.impl("int8_gemm", &int8_gemm);
  m.impl("rms_norm", &rms_norm);
  m.impl("decode_attention", &decode_attention);
  m.impl("decode_attention_int8", &decode_attention_int8);
  m.impl("bf16_linear", &bf16_linear);
  m.impl("decode_self_attention", &decode_self_attention);
  m.impl("shm_all_reduce", &shm_all_reduce);
  m.impl("shm_all_gather", &shm_all_gather);
}
