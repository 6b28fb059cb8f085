// The tokens of a call through an activation-sparse SwiGLU FFN on the CPU, reading only the kept weight rows (TEAL).
// Built and loaded by cpu_kernels.py, which says why it exists; SparseFFN's docstring says what it computes.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

// One token: columns each thread accumulates at a time, up to 128 KB of fp32 sums (in its L2 cache) while the kept
// rows stream past. Long pieces of each row keep memory streaming: every piece starts a new stream, which the
// hardware prefetcher takes a while to follow (8 KB pieces were much slower than 128 KB ones on the machine
// this was written on, in a probe whose output was not kept).
constexpr int64_t TOKEN_TILE = 32768;
// One token: rows added to the sums at a time. One row at a time, each 64 bytes of weights came with a load and
// a store of 64 bytes of sums from L2; 8 rows at a time (8 streams from memory, a load and a store of the sums
// per 8 rows' bytes) one thread read the kept rows about twice as fast (bench/README.md, the teal kernel's
// one-token table before and after).
constexpr int64_t TOKEN_ROWS = 8;
// Several tokens: at most this many columns per tile.
constexpr int64_t TILE = 2048;
// Several tokens: their sums are held in registers over CHUNK columns (8 vectors of 16) while a block of
// BLOCK_ROWS weight rows (16 KB in fp32, in L1) is read once from memory and then from L1 by every token that
// keeps a row; a thread's columns go in tiles of at most TILE_SUMS sums over all tokens (64 KB, in its L2).
constexpr int64_t CHUNK = 128;
constexpr int64_t BLOCK_ROWS = 32;
constexpr int64_t TILE_SUMS = 16384;
// From this many tokens a block is copied before they read it (`pack`); fewer read too little of it to repay.
constexpr int64_t PACK_FROM = 4;
// A copy prefetches its rows' pieces this many chunks on.
constexpr int64_t PACK_AHEAD = 2;
// The bricks' gate|up rows of several tokens are prefetched this many bytes on (at least a tile of 4 rows).
constexpr int64_t PREFETCH_BYTES = 32 << 10;
constexpr int64_t LONG_ROW = 4 << 10;  // bytes: rows this long are left to the hardware prefetcher
// Fewest columns worth handing to another thread.
constexpr int64_t GRAIN = 256;

// Sixteen lanes (GCC's vector extensions): of 32 bits, one AVX-512 register; of 16 bits (bf16, fp16), half of one.
typedef float vfloat __attribute__((vector_size(64)));
typedef int32_t vint __attribute__((vector_size(64)));
typedef uint16_t vhalfbits __attribute__((vector_size(32)));
typedef uint32_t vuint __attribute__((vector_size(64)));
typedef _Float16 vhalf __attribute__((vector_size(32)));

// 16 weights as fp32.
template <typename T>
inline vfloat load16(const T* p) {  // any dtype (fp64): one at a time
  vfloat v;
  for (int i = 0; i < 16; ++i) v[i] = static_cast<float>(p[i]);
  return v;
}
inline vfloat load16(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
// bf16 is the top half of an fp32. With AVX-512, in two instructions: compilers tuned for CPUs that prefer
// 256-bit vectors split the generic conversion into halves and shuffles, several times the instructions.
inline vfloat load16(const c10::BFloat16* p) {
#ifdef __AVX512F__
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return reinterpret_cast<vfloat>(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
#else
  vhalfbits b;
  std::memcpy(&b, p, sizeof b);
  return reinterpret_cast<vfloat>(__builtin_convertvector(b, vuint) << 16);
#endif
}
inline vfloat load16(const c10::Half* p) {
#ifdef __AVX512F__
  return reinterpret_cast<vfloat>(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
#else
  vhalf h;
  std::memcpy(&h, p, sizeof h);
  return __builtin_convertvector(h, vfloat);
#endif
}

// AVX2 without AVX-512: GCC lowers the 16-lane generic vectors (`vfloat`) to AVX2 through the stack where they
// are kept across a loop, so the hot loops have versions in AVX2's own 8 lanes (see add_rows).
#if defined(__AVX2__) && !defined(__AVX512F__)
#define AVX2_LANES 1
#else
#define AVX2_LANES 0
#endif

#if AVX2_LANES
// 8 weights as fp32, in one AVX2 register.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(b), 16));
}
#ifdef __F16C__
inline __m256 load8(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
#endif
// The sum of v's 8 lanes.
inline float lanes_sum8(__m256 v) {
  const __m128 four = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 two = _mm_add_ps(four, _mm_movehl_ps(four, four));
  return _mm_cvtss_f32(_mm_add_ss(two, _mm_movehdup_ps(two)));
}

template <typename R>
constexpr bool HAS_LOAD8 = std::is_same_v<R, float> || std::is_same_v<R, c10::BFloat16>
#ifdef __F16C__
                           || std::is_same_v<R, c10::Half>
#endif
    ;
#endif

// out[0, n) = v as fp32, 16 at a time; the input and output conversions of a call otherwise cost a batch of 32
// small tokens as much as their selection.
template <typename T>
void to_float(const T* v, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const vfloat f = load16(v + i);
    std::memcpy(out + i, &f, sizeof f);
  }
  for (; i < n; ++i) out[i] = static_cast<float>(v[i]);
}

// out[0, n) = v rounded to T (to nearest even), 16 at a time where the CPU converts them in one instruction.
template <typename T>
void from_float(const float* v, T* out, int64_t n) {
  int64_t i = 0;
#ifdef __AVX512BF16__
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    for (; i + 16 <= n; i += 16) {
      const __m256bh b = _mm512_cvtneps_pbh(_mm512_loadu_ps(v + i));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), reinterpret_cast<const __m256i&>(b));
    }
  }
#endif
#ifdef __AVX512F__
  if constexpr (std::is_same_v<T, c10::Half>) {
    for (; i + 16 <= n; i += 16) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i),
                          _mm512_cvtps_ph(_mm512_loadu_ps(v + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
  }
#endif
  for (; i < n; ++i) out[i] = static_cast<T>(v[i]);
}

// exp of 16 floats (Cephes' single-precision method: 2^n times a polynomial on [-ln2/2, ln2/2], about 1 ulp):
// the activation of a token called std::exp once per neuron, as long as a small FFN's sums. NaN stays NaN.
inline vfloat exp16(vfloat x) {
  const vfloat hi = vfloat{} + 88.3762626647949f, lo = vfloat{} - 88.3762626647949f;
  x = x > hi ? hi : x;
  x = x < lo ? lo : x;
  const float round = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const vfloat n = (x * 1.44269504088896341f + round) - round;
  const vfloat r = x - n * 0.693359375f - n * -2.12194440e-4f;
  vfloat p = 1.9875691500e-4f * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const vint e = (__builtin_convertvector(n, vint) + 127) << 23;
  return p * reinterpret_cast<vfloat>(e);
}

// a[i] = silu(g[i]) * u[i] for i in [0, n): SwiGLU's activation.
void silu_mul(const float* g, const float* u, float* a, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const vfloat gv = load16(g + i);
    const vfloat av = gv / (1.0f + exp16(-gv)) * load16(u + i);
    std::memcpy(a + i, &av, sizeof av);
  }
  for (; i < n; ++i) a[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
}

// Magnitude used for ranking; NaN ranks first, as in torch.topk, so that a NaN input is kept and shows.
inline float magnitude(float v) {
  return std::isnan(v) ? std::numeric_limits<float>::infinity() : std::abs(v);
}

// What one token keeps of a projection's input: the rows (increasing) and their values.
struct Kept {
  std::vector<int64_t> rows;  // the first `count` (the vectors only grow, see `scratch`)
  std::vector<float> values;
  int64_t count = 0;
};

// Buffers that live as long as their thread and only grow, so that a call allocates nothing: freeing a large
// buffer can let the C library hand its pages back to the system, and the next call would take page faults on
// fresh ones.
template <typename V>
V& scratch(V& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v;
}

// The keep-th largest of the n keys (0 < keep <= n) whose bits above `top_bit` are 0, a bit at a time from the
// top: the answer is the largest bit pattern with at least `keep` keys at or above it, and each bit is set where
// that leaves `keep` of them. top_bit + 1 counts of n comparisons, which the compiler vectorizes (16 a step with
// AVX-512), and nothing branches on the data. The radix selection this replaced (a byte at a time, a histogram of
// each byte's values) took a scalar increment per candidate and pass, the largest cost after the sums in a
// 32-token call (bench/README.md, "Several tokens": before and after). Once exactly `keep` keys are at or above the
// answer so far, the rest of its bits are those of the least of them: one pass finds it, where the remaining bits
// took a pass each. Magnitudes of random normal values part from each other after 16-20 of the 31 bits (576 to 11008
// of them, a simulation whose output was not kept).
uint32_t kth_largest_key(const uint32_t* keys, int64_t n, int64_t keep, int top_bit) {
  // Bits that no key has set are 0 in the answer too: the bisection stops above them. The magnitudes of bf16 or
  // fp16 values, in fp32, have their low 16 or 13 bits 0: without this they took 31 passes where 15 or 18 decide.
  uint32_t any = 0;
  for (int64_t i = 0; i < n; ++i) any |= keys[i];
  const int lowest = any == 0 ? 0 : __builtin_ctz(any);
  uint32_t answer = 0;
  for (int bit = top_bit; bit >= lowest; --bit) {
    const uint32_t candidate = answer | (1u << bit);
    uint32_t at_or_above = 0;
    for (int64_t i = 0; i < n; ++i) at_or_above += keys[i] >= candidate;
    if (at_or_above >= static_cast<uint64_t>(keep)) answer = candidate;
    if (at_or_above == static_cast<uint64_t>(keep) && bit > lowest) {
      constexpr uint32_t none = std::numeric_limits<uint32_t>::max();
      uint32_t least = none;
      for (int64_t i = 0; i < n; ++i) least = std::min(least, keys[i] >= candidate ? keys[i] : none);
      return least;
    }
  }
  return answer;
}

// The keep-th largest of the n magnitudes m: the bits of a non-negative float order as it does (the sign bit, 31,
// is 0). Integer comparisons, so that a CPU treating subnormals as zero would change nothing.
float kth_largest(const float* m, int64_t n, int64_t keep) {
  thread_local std::vector<uint32_t> bits_buffer;
  uint32_t* bits = scratch(bits_buffer, n).data();
  std::memcpy(bits, m, n * sizeof(float));
  const uint32_t answer = kth_largest_key(bits, n, keep, 30);
  float kth;
  std::memcpy(&kth, &answer, sizeof kth);
  return kth;
}

// m[0, n) = magnitude(v[0, n)).
void magnitudes(const float* v, int64_t n, float* m) {
  int64_t i = 0;
#ifdef __AVX512F__
  const __m512 inf = _mm512_set1_ps(std::numeric_limits<float>::infinity());
  for (; i + 16 <= n; i += 16) {
    const __m512 x = _mm512_loadu_ps(v + i);
    _mm512_storeu_ps(m + i, _mm512_mask_mov_ps(_mm512_abs_ps(x), _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), inf));
  }
#endif
  for (; i < n; ++i) m[i] = magnitude(v[i]);
}

// Appends to idx the i in [0, n) with m[i] > bound, and the first `ties` with m[i] == bound, in increasing order;
// returns their count. idx has room for 16 more than n (a vector's store goes past the last kept index).
int64_t collect(const float* m, int64_t n, float bound, int64_t ties, int64_t* idx) {
  int64_t count = 0, i = 0;
#ifdef __AVX512F__
  // 16 at a time: a mask of the kept, their indices packed by the register form of vpcompressq (the form that
  // writes memory is microcoded and slow on some CPUs), stored whole.
  const __m512 b = _mm512_set1_ps(bound);
  const __m512i iota = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
  for (; i + 16 <= n; i += 16) {
    const __m512 x = _mm512_loadu_ps(m + i);
    uint32_t keep = _mm512_cmp_ps_mask(x, b, _CMP_GT_OQ);
    uint32_t equal = ties > 0 ? _mm512_cmp_ps_mask(x, b, _CMP_EQ_OQ) : 0;
    for (; equal != 0 && ties > 0; --ties) {  // the first ties (the k-th magnitude itself, usually alone)
      keep |= equal & (0u - equal);
      equal &= equal - 1;
    }
    const __m512i low = _mm512_add_epi64(_mm512_set1_epi64(i), iota);
    _mm512_storeu_si512(idx + count, _mm512_maskz_compress_epi64(static_cast<__mmask8>(keep), low));
    count += __builtin_popcount(keep & 255);
    _mm512_storeu_si512(idx + count, _mm512_maskz_compress_epi64(static_cast<__mmask8>(keep >> 8),
                                                                   _mm512_add_epi64(low, _mm512_set1_epi64(8))));
    count += __builtin_popcount(keep >> 8);
  }
#endif
  // Which entries are kept differs from token to token, so that a branch per entry would be mispredicted about
  // every other time: write every index and advance by the test's result instead.
  for (; i < n; ++i) {
    const bool tie = m[i] == bound && ties > 0;
    ties -= tie;
    idx[count] = i;
    count += (m[i] > bound) | tie;
  }
  return count;
}

// The kept entries of v[0, n) with their values, in increasing order (the weight rows in memory order): the `keep`
// largest magnitudes when keep >= 0, else those above `threshold`. The top-k finds the keep-th largest magnitude
// and collects the indices in one pass, in order, so there is nothing to sort: entries above it, then ties with
// it in the places left, first come first kept.
void kept(const float* v, int64_t n, int64_t keep, float threshold, Kept& out) {
  int64_t* idx = scratch(out.rows, n + 16).data();
  thread_local std::vector<float> magnitude_buffer;
  float* m = scratch(magnitude_buffer, n).data();
  magnitudes(v, n, m);
  if (keep >= n) {
    for (int64_t i = 0; i < n; ++i) idx[i] = i;
    out.count = n;
  } else if (keep < 0) {
    out.count = collect(m, n, threshold, 0, idx);
  } else if (keep == 0) {
    out.count = 0;
  } else {
    const float kth = kth_largest(m, n, keep);
    int64_t above = 0;
    for (int64_t i = 0; i < n; ++i) above += m[i] > kth;
    out.count = collect(m, n, kth, keep - above, idx);
  }
  float* values = scratch(out.values, out.count).data();
  for (int64_t j = 0; j < out.count; ++j) values[j] = v[idx[j]];
}

// out[c] = sum over j of v[idx[j]] * w[idx[j], c] for c in [0, width), one token: the columns split over the
// threads, each thread's columns in tiles; fp32 sums whatever the weights' dtype. The rows go TOKEN_ROWS at a time
// through each 16 sums held in a register, in the same order (rows increasing) as one at a time.
template <typename T>
void token_rows_sum(const T* w, int64_t width, const int64_t* idx, int64_t n, const float* v, float* out,
                    bool parallel) {
  auto columns = [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> sums;
    float* acc = scratch(sums, TOKEN_TILE).data();
    for (int64_t c0 = begin; c0 < end; c0 += TOKEN_TILE) {
      const int64_t len = std::min(TOKEN_TILE, end - c0), body = len - len % 16;
      std::fill(acc, acc + len, 0.0f);
      for (int64_t j = 0; j < n; j += TOKEN_ROWS) {
        const int64_t m = std::min(TOKEN_ROWS, n - j);
        const T* row[TOKEN_ROWS];
        float s[TOKEN_ROWS];
        for (int64_t q = 0; q < m; ++q) {
          row[q] = w + idx[j + q] * width + c0;
          s[q] = v[idx[j + q]];
        }
#if AVX2_LANES
        if constexpr (HAS_LOAD8<T>) {  // in AVX2's own lanes (see add_rows)
          __m256 sv[TOKEN_ROWS];
          for (int64_t q = 0; q < m; ++q) sv[q] = _mm256_set1_ps(s[q]);
          for (int64_t k = 0; k < body; k += 8) {
            __m256 a = _mm256_loadu_ps(acc + k);
            for (int64_t q = 0; q < m; ++q) a = _mm256_fmadd_ps(sv[q], load8(row[q] + k), a);
            _mm256_storeu_ps(acc + k, a);
          }
        } else
#endif
        for (int64_t k = 0; k < body; k += 16) {
          vfloat a = load16(acc + k);
          for (int64_t q = 0; q < m; ++q) a += s[q] * load16(row[q] + k);
          std::memcpy(acc + k, &a, sizeof a);
        }
        for (int64_t q = 0; q < m; ++q) {
          for (int64_t k = body; k < len; ++k) acc[k] += s[q] * static_cast<float>(row[q][k]);
        }
      }
      std::copy(acc, acc + len, out + c0);
    }
  };
  if (parallel) {
    at::parallel_for(0, width, GRAIN, columns);
  } else {
    columns(0, width);
  }
}

// Into L2 (prefetcht1), the `columns` from c of w's row r (a chunk), that a copy (`pack`, `pack_pairs`) will read
// PACK_AHEAD chunks on. Each row's piece is short, and the hardware prefetcher follows none of a block's rows far
// enough by itself. Not into L1: the lines of two chunks ahead of every row of a block outnumber L1's buffers for
// misses, and requests for L1 stalled the copy (a probe whose output was not kept: about 1.5x slower). Each copy
// prefetches as it goes, a row per row it copies: all of a block's rows in a burst before the copy made it slower.
template <typename T>
inline void prefetch_piece(const T* w, int64_t width, int64_t r, int64_t c, int64_t columns = CHUNK) {
  const char* piece = reinterpret_cast<const char*>(w + r * width + c);
  const int64_t bytes = std::min(columns, width - c) * static_cast<int64_t>(sizeof(T));
  for (int64_t line = 0; line < bytes; line += 64) __builtin_prefetch(piece + line, 0, 2);
}

// block = w[r0, r1) x [c, c + len) as fp32, rows CHUNK apart (len a multiple of 16, at most CHUNK). Read in place,
// the rows of a block lie a row's width apart, often a multiple of 4 KB (a 3072-wide fp32 gate|up row is 12 KB):
// they fall in the same few sets of the L1 cache, which then holds a quarter of the block, and every token that
// keeps a row would fetch it again. The copy holds the whole block in L1, and bf16 or fp16 rows are converted once
// for all the tokens.
// The rows [a0, a1) over the columns from `ahead` are prefetched meanwhile (see prefetch_piece).
template <typename T>
void pack(const T* w, int64_t width, int64_t r0, int64_t r1, int64_t c, int64_t len, float* block, int64_t a0,
          int64_t a1, int64_t ahead) {
  for (int64_t r = r0; r < r1; ++r) {
    if (a0 + r - r0 < a1) prefetch_piece(w, width, a0 + r - r0, ahead);
    const T* row = w + r * width + c;
    float* to = block + (r - r0) * CHUNK;
    for (int i = 0; i < len / 16; ++i) {
      const vfloat v = load16(row + 16 * i);
      std::memcpy(to + 16 * i, &v, sizeof v);
    }
  }
}

// Where a copy PACK_AHEAD chunks on in a tile's order (each block's chunks in turn, then the next block's) reads:
// the block (0 this one, 1 the next, ...) and its column. At a block's last chunks, the next block's first: each
// block's first chunks were otherwise read with nothing prefetched, half of all the reads where a tile is 4 chunks
// wide (32 fp32 tokens), an eighth where it is 16 (bf16 pairs).
struct Ahead {
  int64_t block, column;
};
inline Ahead ahead_of(int64_t c0, int64_t c1, int64_t c, int64_t chunk = CHUNK) {
  const int64_t chunks = (c1 - c0 + chunk - 1) / chunk, step = (c - c0) / chunk + PACK_AHEAD;
  return {step / chunks, c0 + step % chunks * chunk};
}

// s[0, 16 * N) += values[j] * row rows[j] of `from` (rows `row_width` apart, the first being `first_row`), for j in
// [lo, hi): the sums in N registers meanwhile (2N without AVX-512).
template <int N, typename R>
inline void add_rows(float* s, const R* from, int64_t first_row, int64_t row_width, const int64_t* rows,
                     const float* values, size_t lo, size_t hi) {
#if AVX2_LANES
  // GCC lowers the 16-lane vectors below to AVX2 through the stack: the sums, and 16 copies of each value, went to
  // memory and back at every row, and batches ran several times slower than the dense FFN (a profile on an
  // AVX2-only CPU). In AVX2's own 8 lanes they stay in registers.
  if constexpr (HAS_LOAD8<R>) {
    __m256 acc[2 * N];
    for (int i = 0; i < 2 * N; ++i) acc[i] = _mm256_loadu_ps(s + 8 * i);
    for (size_t j = lo; j < hi; ++j) {
      const R* row = from + (rows[j] - first_row) * row_width;
      const __m256 v = _mm256_set1_ps(values[j]);
      for (int i = 0; i < 2 * N; ++i) acc[i] = _mm256_fmadd_ps(v, load8(row + 8 * i), acc[i]);
    }
    for (int i = 0; i < 2 * N; ++i) _mm256_storeu_ps(s + 8 * i, acc[i]);
    return;
  }
#endif
  vfloat acc[N];
  for (int i = 0; i < N; ++i) acc[i] = load16(s + 16 * i);
  for (size_t j = lo; j < hi; ++j) {
    const R* row = from + (rows[j] - first_row) * row_width;
    const float v = values[j];
    for (int i = 0; i < N; ++i) acc[i] += v * load16(row + 16 * i);
  }
  for (int i = 0; i < N; ++i) std::memcpy(s + 16 * i, &acc[i], sizeof(vfloat));
}

// Vectors of 16 sums a token holds in registers at a time: 8 take 8 of AVX-512's 32 registers; without AVX-512
// each takes two of AVX2's 16, and 4 leave room for the value and a row's load.
#ifdef __AVX512F__
constexpr int REGISTER_VECTORS = 8;
#else
constexpr int REGISTER_VECTORS = 4;
#endif

// f(std::integral_constant<int, min(k, Max)>{}) for k >= 1: a count the compiler must know, such as the vectors of
// sums held in registers over a chunk (one at the end of a thread's columns may be shorter than CHUNK).
template <int Max, typename F>
inline void with_count(int64_t k, const F& f) {
  if constexpr (Max > 1) {
    if (k < Max) return with_count<Max - 1>(k, f);
  }
  f(std::integral_constant<int, Max>{});
}

// add_rows over a chunk's `vectors` vectors of columns, REGISTER_VECTORS at a time.
template <typename R>
inline void add_chunk_rows(int64_t vectors, float* s, const R* from, int64_t first_row, int64_t row_width,
                           const int64_t* rows, const float* values, size_t lo, size_t hi) {
  for (int64_t v = 0; v < vectors; v += REGISTER_VECTORS) {
    with_count<REGISTER_VECTORS>(vectors - v, [&](auto n) {
      add_rows<n>(s + 16 * v, from + 16 * v, first_row, row_width, rows, values, lo, hi);
    });
  }
}

// f(begin, end) over the columns [0, width), split over the threads in whole vectors of 16 columns, as evenly as
// they allow (when `parallel`). Split in whole CHUNKs, a 576-wide down projection gave one of two threads 384
// columns and the other 192, and the first's work set the call's time.
template <typename F>
void columns_over_threads(int64_t width, bool parallel, const F& f) {
  if (!parallel) {
    f(0, width);
    return;
  }
  at::parallel_for(0, (width + 15) / 16, std::max<int64_t>(1, GRAIN / 16), [&](int64_t begin, int64_t end) {
    f(begin * 16, std::min(width, end * 16));
  });
}

// out[t, c] = sum over the rows j token t keeps of its value * w[j, c], for several tokens (w has `n_rows` rows):
// each thread takes its columns CHUNK at a time, a column's sum added in the same order (rows increasing)
// whatever the thread count; a block of rows is read from memory once (`pack`) for all the tokens that keep its
// rows, each token's CHUNK sums in registers over its kept rows of the block.
template <typename T>
void tokens_rows_sum(const T* w, int64_t width, int64_t n_rows, const std::vector<Kept>& kept, int64_t tokens,
                     float* out, bool parallel) {
  // Tokens that read the rows in place read long pieces of them, as one token does (see TOKEN_TILE).
  const int64_t tile_columns = tokens < PACK_FROM ? TOKEN_TILE / tokens : std::min<int64_t>(TILE, TILE_SUMS / tokens);
  const int64_t tile = std::max<int64_t>(1, tile_columns / CHUNK) * CHUNK;
  columns_over_threads(width, parallel, [&](int64_t begin, int64_t end) {
    // A tile's sums per token, no wider than this thread's columns: a whole tile's (2048 columns) for the 288
    // columns of a thread's share of a 576-wide down projection would be zeroed for nothing.
    const int64_t stride = std::min(tile, end - begin);
    thread_local std::vector<float> sums_buffer;
    thread_local std::vector<size_t> cursor_buffer, lo_buffer;
    float* sums = scratch(sums_buffer, tokens * stride).data();
    size_t* cursor = scratch(cursor_buffer, tokens).data();
    size_t* lo = scratch(lo_buffer, tokens).data();
    alignas(64) float block[BLOCK_ROWS * CHUNK];
    for (int64_t c0 = begin; c0 < end; c0 += tile) {
      const int64_t c1 = std::min(end, c0 + tile);
      std::fill_n(sums, tokens * stride, 0.0f);
      std::fill_n(cursor, tokens, 0);
      for (int64_t r1 = BLOCK_ROWS; r1 < n_rows + BLOCK_ROWS; r1 += BLOCK_ROWS) {
        for (int64_t t = 0; t < tokens; ++t) {  // each token's kept rows in this block: [lo, cursor)
          const auto& rows = kept[t].rows;
          lo[t] = cursor[t];
          while (cursor[t] < static_cast<size_t>(kept[t].count) && rows[cursor[t]] < r1) ++cursor[t];
        }
        for (int64_t c = c0; c < c1; c += CHUNK) {
          const int64_t len = std::min(CHUNK, c1 - c);
          for (int64_t t = 0; t < tokens; ++t) {
            const int64_t* rows = kept[t].rows.data();
            const float* values = kept[t].values.data();
            float* s = sums + t * stride + (c - c0);
            if (len % 16 != 0) {  // the last columns of a width that is not a multiple of 16, one at a time
              for (size_t j = lo[t]; j < cursor[t]; ++j) {
                const T* row = w + rows[j] * width + c;
                for (int64_t k = 0; k < len; ++k) s[k] += values[j] * static_cast<float>(row[k]);
              }
            } else if (tokens >= PACK_FROM) {
              if (t == 0) {
                const Ahead a = ahead_of(c0, c1, c);
                const int64_t a0 = r1 - BLOCK_ROWS + a.block * BLOCK_ROWS;
                pack(w, width, r1 - BLOCK_ROWS, std::min(r1, n_rows), c, len, block, a0,
                     std::min(a0 + BLOCK_ROWS, n_rows), a.column);
              }
              add_chunk_rows(len / 16, s, block, r1 - BLOCK_ROWS, CHUNK, rows, values, lo[t], cursor[t]);
            } else {
              add_chunk_rows(len / 16, s, w + c, 0, width, rows, values, lo[t], cursor[t]);
            }
          }
        }
      }
      for (int64_t t = 0; t < tokens; ++t) std::copy_n(sums + t * stride, c1 - c0, out + t * width + c0);
    }
  });
}

// f(t) for every token, over the threads when there are several tokens.
template <typename F>
void per_token(int64_t tokens, bool parallel, const F& f) {
  if (parallel && tokens > 1) {
    at::parallel_for(0, tokens, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) f(t);
    });
  } else {
    for (int64_t t = 0; t < tokens; ++t) f(t);
  }
}

#ifdef __AVX512BF16__
// Several tokens with bf16 weights: AVX-512's bf16 dot product (vdpbf16ps) adds two products per fp32 lane, the
// weights of rows 2p and 2p + 1 in one column times a token's two values of them, so that a pair of rows costs
// one instruction per 16 columns, and the block is copied as bf16 (half the bytes of fp32). A token that keeps
// one row of a pair multiplies the other by 0. Per token, that is one instruction per pair it touches (0.75 of
// the pairs with half the rows kept at random) where fp32 sums take one per row it keeps (0.5 of the rows).
// A block is 64 pairs over PAIR_CHUNK = 64 columns (16 KB of bf16, in L1), one add_block call's columns (4
// vectors): each call loads and stores its sums once, so that the more pairs it runs the less that costs. As 32
// pairs over 128 columns (the same bytes, two calls of half the pairs) the bf16 batches took about a tenth longer
// on a Zen 4 (bench/README.md, "On an AMD Zen 4 CPU": the batches before and after).
constexpr int64_t BLOCK_PAIRS = 64;
constexpr int64_t PAIR_CHUNK = 64;
constexpr int64_t PAIR_TILE_SUMS = 65536;  // the most fp32 sums of all the tokens in a tile: 256 KB, in L2
// A block that most of the tokens touch is run densely (`add_block`): every pair for every token, a 0 word where
// a token keeps neither row. BLOCK_TOKENS tokens at once, each of the block's vectors is loaded once for all of them
// and 24 sums are in flight (a token's own pairs, in `add_pairs`, load every vector for it alone). A block runs
// densely where the tokens touch at least 3 in 5 of its (token, pair) products; on the Zen 5 this was measured on,
// any share from 0.4 to 0.7 timed the same (a probe whose output was not kept). bench/README.md, "On an AMD Zen 5
// CPU", has the batches before and after.
constexpr int BLOCK_TOKENS = 6;  // 6 x 4 sums, 4 vectors of the block and a token's word: 29 of 32 registers
constexpr int BLOCK_VECTORS = 4;
static_assert(PAIR_CHUNK / 16 == BLOCK_VECTORS, "a chunk of a block is one add_block call's columns");
constexpr int64_t DENSE_OVER = 5, DENSE_UNDER = 3;  // dense when touched * 5 >= tokens * pairs * 3

// What the tokens keep of a projection's input, by pairs of rows (2p, 2p + 1): the pairs any token keeps
// (`active`, increasing; the others are not read at all), and per token the positions in `active` of the pairs
// it keeps, with its two values as bf16 (0 for a row it drops) in one 32-bit word, as vdpbf16ps takes them.
struct Pairs {
  std::vector<int64_t> active;
  std::vector<int64_t> index;  // pair -> position in active, or -1
  std::vector<std::vector<int64_t>> position;
  std::vector<std::vector<uint32_t>> values;
  std::vector<int64_t> count;  // per token, of position and values
  int64_t n_active = 0;
  // Per block b of BLOCK_PAIRS active pairs: token t's pairs in it are [first[b * tokens + t],
  // first[(b + 1) * tokens + t]) of its positions, and dense[b] says whether the block runs densely.
  std::vector<int64_t> first;
  std::vector<uint8_t> dense;
  int64_t multiplied = 0;  // rows multiplied by a token's value, summed over the tokens (0 for a row dropped too)
};

// Pairs::first, dense and multiplied, once per projection: every thread and tile goes over the same blocks (all of
// them densely with `all_dense`).
void plan_blocks(int64_t tokens, int64_t n_rows, Pairs& p, bool all_dense) {
  const int64_t n_blocks = (p.n_active + BLOCK_PAIRS - 1) / BLOCK_PAIRS;
  int64_t* first = scratch(p.first, (n_blocks + 1) * tokens).data();
  uint8_t* dense = scratch(p.dense, n_blocks).data();
  for (int64_t t = 0; t < tokens; ++t) {
    const int64_t* position = p.position[t].data();
    int64_t i = 0;
    for (int64_t b = 0; b < n_blocks; ++b) {
      first[b * tokens + t] = i;
      while (i < p.count[t] && position[i] < (b + 1) * BLOCK_PAIRS) ++i;
    }
    first[n_blocks * tokens + t] = i;
  }
  // An odd row count leaves the last pair one row (its second is 0 in the block): it multiplies one.
  const bool lone = n_rows % 2 && p.n_active > 0 && p.active[p.n_active - 1] == n_rows / 2;
  p.multiplied = 0;
  for (int64_t b = 0; b < n_blocks; ++b) {
    const int64_t np = std::min(BLOCK_PAIRS, p.n_active - b * BLOCK_PAIRS);
    const bool last = b == n_blocks - 1;
    int64_t touched = 0, touch_lone = 0;
    for (int64_t t = 0; t < tokens; ++t) {
      const int64_t end = first[(b + 1) * tokens + t];
      touched += end - first[b * tokens + t];
      touch_lone += last && lone && end > first[b * tokens + t] && p.position[t][end - 1] == p.n_active - 1;
    }
    dense[b] = all_dense || touched * DENSE_OVER >= tokens * np * DENSE_UNDER;
    p.multiplied += dense[b] ? tokens * (2 * np - (last && lone)) : 2 * touched - touch_lone;
  }
}

void pairs_of(const std::vector<Kept>& kept, int64_t tokens, int64_t n_rows, Pairs& p, bool parallel, bool all_dense) {
  const int64_t n_pairs = (n_rows + 1) / 2;
  int64_t* index = scratch(p.index, n_pairs).data();
  std::fill_n(index, n_pairs, -1);
  for (int64_t t = 0; t < tokens; ++t) {
    const int64_t* rows = kept[t].rows.data();
    for (int64_t j = 0; j < kept[t].count; ++j) index[rows[j] / 2] = 0;
  }
  int64_t* active = scratch(p.active, n_pairs).data();
  int64_t n_active = 0;
  for (int64_t q = 0; q < n_pairs; ++q) {  // branch-free (see `collect`)
    const bool on = index[q] == 0;
    active[n_active] = q;
    index[q] = on ? n_active : -1;
    n_active += on;
  }
  p.n_active = n_active;
  scratch(p.position, tokens);
  scratch(p.values, tokens);
  scratch(p.count, tokens);
  per_token(tokens, parallel, [&](int64_t t) {
    const int64_t* rows = kept[t].rows.data();
    const float* kept_values = kept[t].values.data();
    const int64_t count = kept[t].count;
    int64_t* position = scratch(p.position[t], count).data();
    uint32_t* values = scratch(p.values[t], count).data();
    // Branch-free, as in `collect`: a row that is its pair's second, right after the first, steps back onto it.
    // The word written last stays in a register: read back from memory, each row waited on the previous store.
    int64_t n = 0, last = -1;
    uint32_t word = 0;
    for (int64_t j = 0; j < count; ++j) {
      const int64_t row = rows[j];
      const uint32_t bits = c10::BFloat16(kept_values[j]).x;  // rounded to nearest even, as torch rounds
      const bool second = row / 2 == last;
      last = row / 2;
      n -= second;
      word = (second ? word : 0u) | (row % 2 ? bits << 16 : bits);
      position[n] = index[row / 2];
      values[n] = word;
      ++n;
    }
    p.count[t] = n;
  });
  plan_blocks(tokens, n_rows, p, all_dense);
}

// 16 bf16 weights of a row from column `from` of a chunk whose first `len` columns lie in the weight; 0 past them.
inline __m256i load_bf16(const c10::BFloat16* row, int64_t from, int64_t len) {
  if (from + 16 <= len) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + from));
  if (from >= len) return _mm256_setzero_si256();
  return _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << (len - from)) - 1), row + from);
}

// 16 columns of two rows, each column's two weights side by side: word i takes bf16 i of `first`, then of `second`.
inline __m512i side_by_side(__m256i first, __m256i second) {
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22,
                                              6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(interleave, _mm512_inserti64x4(_mm512_castsi256_si512(first), second, 1));
}

// block[j] = the active pairs [j0, j0 + np) over the columns [c, c + len) and on to a whole vector (0 past len),
// each column's two weights side by side, as vdpbf16ps takes them; the pairs ahead[0, n_ahead) over the columns
// from `ahead_c` are prefetched meanwhile (see prefetch_piece).
void pack_pairs(const c10::BFloat16* w, int64_t width, int64_t n_rows, const int64_t* active, int64_t np, int64_t c,
                int64_t len, __m512i* block, const int64_t* ahead, int64_t n_ahead, int64_t ahead_c) {
  for (int64_t j = 0; j < np; ++j) {
    const int64_t r = 2 * active[j];
    const c10::BFloat16* first = w + r * width + c;
    const c10::BFloat16* second = first + width;
    const bool pair = r + 1 < n_rows;  // an odd row count leaves the last row alone
    if (j < n_ahead) {
      prefetch_piece(w, width, 2 * ahead[j], ahead_c, PAIR_CHUNK);
      if (2 * ahead[j] + 1 < n_rows) prefetch_piece(w, width, 2 * ahead[j] + 1, ahead_c, PAIR_CHUNK);
    }
    for (int64_t v = 0; v < (len + 15) / 16; ++v) {
      const __m256i a = load_bf16(first, 16 * v, len);
      const __m256i b = pair ? load_bf16(second, 16 * v, len) : _mm256_setzero_si256();
      block[j * (PAIR_CHUNK / 16) + v] = side_by_side(a, b);
    }
  }
}

// s[0, 16 * N) += the token's pairs [lo, hi) of the block (whose first active pair is j0), the sums in registers.
// Not inlined, nor is add_block: inlined together into tokens_pairs_sum, this loop was compiled with its sums moved
// between registers and ran about 8% slower (32 tokens at compute 0.25, 4096x11008, where no block runs densely; a
// probe whose output was not kept).
template <int N>
__attribute__((noinline)) void add_pairs(float* s, const __m512i* block, int64_t j0, const int64_t* position,
                                         const uint32_t* values, int64_t lo, int64_t hi) {
  __m512 acc[N];
  for (int v = 0; v < N; ++v) acc[v] = _mm512_loadu_ps(s + 16 * v);
  for (int64_t i = lo; i < hi; ++i) {
    const __m512i* pair = block + (position[i] - j0) * (PAIR_CHUNK / 16);
    const __m512bh x = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(values[i])));
    for (int v = 0; v < N; ++v) acc[v] = _mm512_dpbf16_ps(acc[v], x, reinterpret_cast<__m512bh>(pair[v]));
  }
  for (int v = 0; v < N; ++v) _mm512_storeu_ps(s + 16 * v, acc[v]);
}

// For T tokens at once: s[t * s_stride + [0, 16 * V)) += every pair j of the block times words[j * w_stride + t],
// token t's two values of it (0 for a row it drops). Each pair's V vectors are loaded once for the T tokens, and
// T x V sums are in flight, where add_pairs loads them for every token and has V sums in flight.
template <int T, int V>
__attribute__((noinline)) void add_block(float* s, int64_t s_stride, const __m512i* block, int64_t np,
                                         const uint32_t* words, int64_t w_stride) {
  __m512 acc[T][V];
  for (int t = 0; t < T; ++t)
    for (int v = 0; v < V; ++v) acc[t][v] = _mm512_loadu_ps(s + t * s_stride + 16 * v);
  for (int64_t j = 0; j < np; ++j) {
    __m512bh w[V];
    for (int v = 0; v < V; ++v) w[v] = reinterpret_cast<__m512bh>(block[j * (PAIR_CHUNK / 16) + v]);
    for (int t = 0; t < T; ++t) {
      const __m512bh x = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(words[j * w_stride + t])));
      for (int v = 0; v < V; ++v) acc[t][v] = _mm512_dpbf16_ps(acc[t][v], x, w[v]);
    }
  }
  for (int t = 0; t < T; ++t)
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(s + t * s_stride + 16 * v, acc[t][v]);
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
// AMX, the tile unit of Intel's Xeons from Sapphire Rapids on: one tdpbf16ps multiplies 16 tokens' words of 16
// pairs (a 16 x 32 tile of bf16) by the block's 16 pairs over 16 columns, in the layout pack_pairs copies them to,
// into 16 x 16 fp32 sums: 8192 products, where vdpbf16ps makes 32. On such a Xeon (bench/README.md, "On an Intel
// Xeon with AMX") vdpbf16ps ran at one a cycle, half the rate of fp32 FMAs, and add_block at about a third of that,
// half of a bf16 batch's time. Where AMX runs, every block of a batch runs densely on it: 16 rows of tokens cost
// what one does, and a sparse block's own pairs (add_pairs) would cost more than the whole block there.
constexpr int64_t AMX_TOKENS = 16;  // rows of a tile: the tokens go in groups of 16, the last padded with 0 words
// A block of AMX_PAIRS pairs over a tile of AMX_TILE columns is copied (512 KB) and multiplied while in the thread's
// L2 cache, each tile of sums held over all its pairs: per load and store of the sums, 8 tile products.
constexpr int64_t AMX_PAIRS = 128;
static_assert(AMX_PAIRS % BLOCK_PAIRS == 0, "an AMX block of pairs spans whole blocks of the plan");
constexpr int64_t AMX_TILE = 1024;

// Linux gives a process AMX's tile registers only on request (arch_prctl, once; the first tile instruction without
// it kills the process), and a kernel or a virtual machine can refuse. BRICKS_CPU_AMX=0 turns it off, to compare.
bool amx_enabled() {
  static const bool enabled = [] {
    const char* setting = std::getenv("BRICKS_CPU_AMX");
    if (setting != nullptr && std::strcmp(setting, "0") == 0) return false;
    constexpr long REQUEST_PERMISSION = 0x1023, TILE_DATA = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
    return syscall(SYS_arch_prctl, REQUEST_PERMISSION, TILE_DATA) == 0;
  }();
  return enabled;
}

// Tiles 0-3: sums of 16 tokens over 16 columns each; 4: the tokens' words of 16 pairs; 5 and 6: 16 pairs of the
// block over 16 columns. Every row is 64 bytes.
void amx_configure() {
  struct alignas(64) {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t bytes_per_row[16] = {};
    uint8_t rows[16] = {};
  } config;
  for (int i = 0; i < 7; ++i) {
    config.bytes_per_row[i] = 64;
    config.rows[i] = AMX_TOKENS;
  }
  _tile_loadconfig(&config);
}

// s[t * s_stride + [0, 16 * vectors)) += the sum over the block's pairs j < np16 of words[t * AMX_PAIRS + j]
// (token t's two values of pair j) times pair j's weights, for the AMX_TOKENS tokens t (add_block's function; the
// pairs from the block's own count to np16, a multiple of 16, are 0 in the block and in the words).
void amx_block(float* s, int64_t s_stride, const __m512i* block, int64_t np16, const uint32_t* words,
               int64_t vectors) {
  const int s_bytes = static_cast<int>(s_stride * 4), pair_bytes = CHUNK / 16 * 64, word_bytes = AMX_PAIRS * 4;
  for (int64_t v0 = 0; v0 < vectors; v0 += 4) {  // four tiles of sums at a time, over 64 columns
    const int64_t n = std::min<int64_t>(4, vectors - v0);
    float* c = s + 16 * v0;
    // Tile numbers are immediates, hence one statement per tile.
    _tile_loadd(0, c, s_bytes);
    if (n > 1) _tile_loadd(1, c + 16, s_bytes);
    if (n > 2) _tile_loadd(2, c + 32, s_bytes);
    if (n > 3) _tile_loadd(3, c + 48, s_bytes);
    for (int64_t j = 0; j < np16; j += 16) {
      const __m512i* pairs = block + j * (CHUNK / 16) + v0;
      _tile_loadd(4, words + j, word_bytes);
      _tile_loadd(5, pairs, pair_bytes);
      _tile_dpbf16ps(0, 4, 5);
      if (n > 1) {
        _tile_loadd(6, pairs + 1, pair_bytes);
        _tile_dpbf16ps(1, 4, 6);
      }
      if (n > 2) {
        _tile_loadd(5, pairs + 2, pair_bytes);
        _tile_dpbf16ps(2, 4, 5);
      }
      if (n > 3) {
        _tile_loadd(6, pairs + 3, pair_bytes);
        _tile_dpbf16ps(3, 4, 6);
      }
    }
    _tile_stored(0, c, s_bytes);
    if (n > 1) _tile_stored(1, c + 16, s_bytes);
    if (n > 2) _tile_stored(2, c + 32, s_bytes);
    if (n > 3) _tile_stored(3, c + 48, s_bytes);
  }
}

// The block's pairs over a whole tile of columns [c0, c1), a chunk after another: packed[(k * AMX_PAIRS + j) *
// (CHUNK / 16) + v] is pair j's vector v of chunk k: pair by pair, each pair's two rows side by side, as pack_pairs
// lays out its shorter chunk (PAIR_CHUNK columns) for the dot products (0 for the pairs [np, np16)).
// Each pair's two rows are read from c0 to c1 in one go. Chunk by chunk, as pack_pairs copies, the copy read a short
// piece of each of the block's 64 rows in turn and a tile product waited on each chunk: slower on the Xeon of
// bench/README.md's "On an Intel Xeon with AMX" (its figures and results files).
void pack_pairs_tile(const c10::BFloat16* w, int64_t width, int64_t n_rows, const int64_t* active, int64_t np,
                     int64_t np16, int64_t c0, int64_t c1, __m512i* packed) {
  const int64_t chunks = (c1 - c0 + CHUNK - 1) / CHUNK;
  for (int64_t j = 0; j < np16; ++j) {
    const bool real = j < np;
    const int64_t r = real ? 2 * active[j] : 0;
    const c10::BFloat16* first = w + r * width;
    const bool pair = real && r + 1 < n_rows;  // an odd row count leaves the last row alone
    for (int64_t k = 0; k < chunks; ++k) {
      const int64_t c = c0 + k * CHUNK, len = std::min(CHUNK, c1 - c);
      __m512i* to = packed + (k * AMX_PAIRS + j) * (CHUNK / 16);
      for (int64_t v = 0; v < (len + 15) / 16; ++v) {
        const __m256i a = real ? load_bf16(first + c, 16 * v, len) : _mm256_setzero_si256();
        const __m256i b = pair ? load_bf16(first + width + c, 16 * v, len) : _mm256_setzero_si256();
        to[v] = side_by_side(a, b);
      }
    }
  }
}

// out[t, :] = the sum over the active pairs of token t's words times their rows, on AMX's tiles: every block of
// pairs densely, AMX_TOKENS tokens to a tile, each block copied over a whole tile of columns before its products
// (pack_pairs_tile). fill(j0, np, words) writes the words of the active pairs [j0, j0 + np), words[t * AMX_PAIRS + j]
// for token t (the words of the padding tokens stay 0).
template <typename Fill>
void pairs_tiles_amx(const c10::BFloat16* w, int64_t width, int64_t n_rows, const int64_t* active, int64_t n_active,
                     int64_t tokens, float* out, bool parallel, const Fill& fill) {
  const int64_t rows = (tokens + AMX_TOKENS - 1) / AMX_TOKENS * AMX_TOKENS;  // the last group padded with 0 words
  const int64_t tile = AMX_TILE;
  columns_over_threads(width, parallel, [&](int64_t begin, int64_t end) {
    // No wider than this thread's columns, with room for the last vector's columns past the width, and 16 more: a
    // tile of sums is 16 rows a stride apart, which at a multiple of 4 KB all fall in one set of the L1 cache (the
    // large bf16 batch of 32 took 24-27 ms with the 16, 30-31 ms without: a probe whose output was not kept).
    const int64_t stride = std::min(tile, (end - begin + 15) / 16 * 16) + 16;
    thread_local std::vector<float> sums_buffer;
    thread_local std::vector<uint32_t> words_buffer;
    thread_local std::vector<__m512i> packed_buffer;
    float* sums = scratch(sums_buffer, rows * stride).data();
    uint32_t* words = scratch(words_buffer, rows * AMX_PAIRS).data();  // [token][pair]: a tile's rows
    __m512i* packed = scratch(packed_buffer, (tile / CHUNK + 1) * AMX_PAIRS * (CHUNK / 16)).data();
    amx_configure();  // a thread's own tiles
    for (int64_t c0 = begin; c0 < end; c0 += tile) {
      const int64_t c1 = std::min(end, c0 + tile);
      std::fill_n(sums, rows * stride, 0.0f);
      for (int64_t j0 = 0; j0 < n_active; j0 += AMX_PAIRS) {
        const int64_t np = std::min(AMX_PAIRS, n_active - j0), np16 = (np + 15) / 16 * 16;
        std::fill_n(words, rows * AMX_PAIRS, 0u);
        fill(j0, np, words);
        pack_pairs_tile(w, width, n_rows, active + j0, np, np16, c0, c1, packed);
        for (int64_t c = c0, k = 0; c < c1; c += CHUNK, ++k) {
          const int64_t vectors = (std::min(CHUNK, c1 - c) + 15) / 16;
          for (int64_t t0 = 0; t0 < rows; t0 += AMX_TOKENS)
            amx_block(sums + t0 * stride + (c - c0), stride, packed + k * AMX_PAIRS * (CHUNK / 16), np16,
                      words + t0 * AMX_PAIRS, vectors);
        }
      }
      for (int64_t t = 0; t < tokens; ++t) std::copy_n(sums + t * stride, c1 - c0, out + t * width + c0);
    }
    _tile_release();  // the tile state would be saved and restored at every switch of this thread
  });
}

// tokens_pairs_sum on AMX's tiles (pairs_tiles_amx), the words from each token's kept rows (pairs_of).
int64_t tokens_pairs_sum_amx(const c10::BFloat16* w, int64_t width, int64_t n_rows, const std::vector<Kept>& kept,
                             int64_t tokens, float* out, bool parallel) {
  thread_local Pairs pairs;
  pairs_of(kept, tokens, n_rows, pairs, parallel, true);
  const Pairs& p = pairs;
  pairs_tiles_amx(w, width, n_rows, p.active.data(), p.n_active, tokens, out, parallel,
                  [&](int64_t j0, int64_t np, uint32_t* words) {
                    // token t's pairs in the block: [lo[t], hi[t]), from the plan's blocks of BLOCK_PAIRS it spans
                    const int64_t* lo = p.first.data() + j0 / BLOCK_PAIRS * tokens;
                    const int64_t* hi = p.first.data() + (j0 + np + BLOCK_PAIRS - 1) / BLOCK_PAIRS * tokens;
                    for (int64_t t = 0; t < tokens; ++t)
                      for (int64_t i = lo[t]; i < hi[t]; ++i) words[t * AMX_PAIRS + p.position[t][i] - j0] = p.values[t][i];
                  });
  return p.multiplied;
}

// The bricks' down projection on AMX's tiles: out[t, :] = the sum of a[t, r] * w[r, :] over the n_rows rows, a
// [tokens, n_rows] 0 outside the bricks token t selected. The active pairs are those of the bricks any token
// selected, their words token t's two activations as bf16: no lists of kept rows, which rows_sum builds for any
// selection (their building and pairs_of: about 6% of a small bf16 batch of 32's samples under perf, against 33%
// for the tile products; bench/results/xeon_probes/output_bricks_down.txt has the calls before and after). Returns
// the rows multiplied, every active pair's for every token (all blocks run densely on AMX).
int64_t bricks_down_amx(const c10::BFloat16* w, int64_t width, int64_t n_bricks, int64_t size, const bool* sel,
                        const float* a, int64_t tokens, float* out, bool parallel) {
  const int64_t n_rows = n_bricks * size, n_pairs = (n_rows + 1) / 2;
  thread_local std::vector<int64_t> active_buffer;
  thread_local std::vector<uint8_t> on_buffer;
  uint8_t* on = scratch(on_buffer, n_pairs).data();
  std::fill_n(on, n_pairs, uint8_t{0});
  for (int64_t b = 0; b < n_bricks; ++b) {
    bool any = false;
    for (int64_t t = 0; t < tokens; ++t) any |= sel[t * n_bricks + b];
    if (any) std::fill(on + b * size / 2, on + ((b + 1) * size + 1) / 2, uint8_t{1});
  }
  int64_t* active = scratch(active_buffer, n_pairs).data();
  int64_t n_active = 0;
  for (int64_t q = 0; q < n_pairs; ++q) {  // branch-free (see `collect`)
    active[n_active] = q;
    n_active += on[q];
  }
  pairs_tiles_amx(w, width, n_rows, active, n_active, tokens, out, parallel,
                  [&](int64_t j0, int64_t np, uint32_t* words) {
                    for (int64_t t = 0; t < tokens; ++t) {
                      const float* at = a + t * n_rows;
                      for (int64_t j = 0; j < np; ++j) {
                        const int64_t r = 2 * active[j0 + j];
                        const uint32_t second = r + 1 < n_rows ? c10::BFloat16(at[r + 1]).x : 0;
                        words[t * AMX_PAIRS + j] = c10::BFloat16(at[r]).x | second << 16;  // rounded as torch rounds
                      }
                    }
                  });
  const bool lone = n_rows % 2 && n_active > 0 && active[n_active - 1] == n_rows / 2;  // one row in the last pair
  return tokens * (2 * n_active - lone);
}
#else
bool amx_enabled() { return false; }
int64_t tokens_pairs_sum_amx(const c10::BFloat16*, int64_t, int64_t, const std::vector<Kept>&, int64_t, float*, bool) {
  return 0;  // not reached: amx_enabled() is false
}
#endif

// tokens_rows_sum for bf16 weights by pairs of rows (see BLOCK_PAIRS): the same threads, tiles and chunks. Returns
// the rows multiplied by the tokens' values (Pairs::multiplied).
int64_t tokens_pairs_sum(const c10::BFloat16* w, int64_t width, int64_t n_rows, const std::vector<Kept>& kept,
                         int64_t tokens, float* out, bool parallel) {
  thread_local Pairs pairs;
  pairs_of(kept, tokens, n_rows, pairs, parallel, false);
  // TILE columns up to 32 tokens, whose sums take 256 KB of L2 (shorter pieces of the rows slowed the copy more
  // than that cost, in a probe whose output was not kept), fewer for more tokens.
  const int64_t tile = std::max<int64_t>(1, std::min<int64_t>(TILE, PAIR_TILE_SUMS / tokens) / PAIR_CHUNK) * PAIR_CHUNK;
  const Pairs& p = pairs;
  // Tokens in groups as even as BLOCK_TOKENS allows (8 tokens as 4 + 4, not 6 + 2).
  const int64_t groups = (tokens + BLOCK_TOKENS - 1) / BLOCK_TOKENS;
  columns_over_threads(width, parallel, [&](int64_t begin, int64_t end) {
    // no wider than this thread's columns, and room for the last vector's columns past the width
    const int64_t stride = std::min(tile, (end - begin + 15) / 16 * 16);
    thread_local std::vector<float> sums_buffer;
    thread_local std::vector<uint32_t> words_buffer;
    float* sums = scratch(sums_buffer, tokens * stride).data();
    uint32_t* words = scratch(words_buffer, BLOCK_PAIRS * tokens).data();  // a dense block's: [pair][token]
    alignas(64) __m512i block[BLOCK_PAIRS * (PAIR_CHUNK / 16)];
    for (int64_t c0 = begin; c0 < end; c0 += tile) {
      const int64_t c1 = std::min(end, c0 + tile);
      std::fill_n(sums, tokens * stride, 0.0f);
      for (int64_t j0 = 0, b = 0; j0 < p.n_active; j0 += BLOCK_PAIRS, ++b) {
        const int64_t np = std::min(BLOCK_PAIRS, p.n_active - j0);
        const int64_t* lo = p.first.data() + b * tokens;  // token t's pairs in the block: [lo[t], hi[t])
        const int64_t* hi = lo + tokens;
        if (p.dense[b]) {
          std::fill_n(words, np * tokens, 0u);
          for (int64_t t = 0; t < tokens; ++t)
            for (int64_t i = lo[t]; i < hi[t]; ++i) words[(p.position[t][i] - j0) * tokens + t] = p.values[t][i];
        }
        for (int64_t c = c0; c < c1; c += PAIR_CHUNK) {
          const int64_t len = std::min(PAIR_CHUNK, c1 - c);
          const Ahead a = ahead_of(c0, c1, c, PAIR_CHUNK);
          const int64_t ja = std::min(p.n_active, j0 + a.block * BLOCK_PAIRS);
          pack_pairs(w, width, n_rows, p.active.data() + j0, np, c, len, block, p.active.data() + ja,
                     std::min(BLOCK_PAIRS, p.n_active - ja), a.column);
          const int64_t vectors = (len + 15) / 16;
          if (p.dense[b]) {
            for (int64_t g = 0, t0 = 0; g < groups; ++g) {
              const int64_t size = tokens / groups + (g < tokens % groups);
              with_count<BLOCK_TOKENS>(size, [&](auto nt) {
                with_count<BLOCK_VECTORS>(vectors, [&](auto nv) {
                  add_block<nt, nv>(sums + t0 * stride + (c - c0), stride, block, np, words + t0, tokens);
                });
              });
              t0 += size;
            }
          } else {
            with_count<PAIR_CHUNK / 16>(vectors, [&](auto n) {
              for (int64_t t = 0; t < tokens; ++t) {
                add_pairs<n>(sums + t * stride + (c - c0), block, j0, p.position[t].data(), p.values[t].data(), lo[t],
                             hi[t]);
              }
            });
          }
        }
      }
      for (int64_t t = 0; t < tokens; ++t) std::copy_n(sums + t * stride, c1 - c0, out + t * width + c0);
    }
  });
  return p.multiplied;
}
#endif


// out[t, c] = sum over the rows j token t keeps of its value * w[j, c] (v: the one token's input, all its entries).
// Returns the rows multiplied, summed over the tokens: those they keep, and by pairs of bf16 rows also the rows
// they drop beside them (multiplied by 0).
template <typename T>
int64_t rows_sum(const T* w, int64_t width, int64_t n_rows, const std::vector<Kept>& kept, int64_t tokens,
                 const float* v, float* out, bool parallel) {
  if (tokens == 1) {
    token_rows_sum(w, width, kept[0].rows.data(), kept[0].count, v, out, parallel);
    return kept[0].count;
  }
#ifdef __AVX512BF16__
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (tokens >= PACK_FROM) {
      return amx_enabled() ? tokens_pairs_sum_amx(w, width, n_rows, kept, tokens, out, parallel)
                           : tokens_pairs_sum(w, width, n_rows, kept, tokens, out, parallel);
    }
  }
#endif
  tokens_rows_sum(w, width, n_rows, kept, tokens, out, parallel);
  int64_t multiplied = 0;
  for (int64_t t = 0; t < tokens; ++t) multiplied += kept[t].count;
  return multiplied;
}

template <typename T>
at::Tensor ffn(const at::Tensor& x, const at::Tensor& w_in_t, const at::Tensor& w_down_t, int64_t keep_in,
               int64_t keep_act, double t_in, double t_act, bool parallel, at::Tensor& counts) {
  const int64_t tokens = x.size(0), hidden = x.size(1), width = w_in_t.size(1), d_ff = width / 2;
  thread_local std::vector<float> buffer;
  thread_local std::vector<Kept> in_buffer, act_buffer;
  float* xf = scratch(buffer, tokens * (2 * hidden + width + d_ff)).data();
  float* h = xf + tokens * hidden;
  float* a = h + tokens * width;
  float* y = a + tokens * d_ff;
  std::vector<Kept>& in = scratch(in_buffer, tokens);
  std::vector<Kept>& act = scratch(act_buffer, tokens);
  const T* xp = x.data_ptr<T>();
  to_float(xp, xf, tokens * hidden);
  const T* w_in = w_in_t.data_ptr<T>();
  const T* w_down = w_down_t.data_ptr<T>();

  per_token(tokens, parallel, [&](int64_t t) {
    kept(xf + t * hidden, hidden, keep_in, static_cast<float>(t_in), in[t]);
  });
  const int64_t multiplied_in = rows_sum(w_in, width, hidden, in, tokens, xf, h, parallel);
  per_token(tokens, parallel, [&](int64_t t) {  // SwiGLU: silu(gate) * up, gate first as in SparseFFN's w_in_t
    const float* ht = h + t * width;
    silu_mul(ht, ht + d_ff, a + t * d_ff, d_ff);
    kept(a + t * d_ff, d_ff, keep_act, static_cast<float>(t_act), act[t]);
  });
  const int64_t multiplied_act = rows_sum(w_down, hidden, d_ff, act, tokens, a, y, parallel);

  int64_t* c = counts.data_ptr<int64_t>();
  c[0] += tokens;
  c[3] += multiplied_in;
  c[4] += multiplied_act;
  for (int64_t t = 0; t < tokens; ++t) {
    c[1] += in[t].count;
    c[2] += act[t].count;
    c[3] -= in[t].count;
    c[4] -= act[t].count;
  }
  at::Tensor out = at::empty({tokens, hidden}, x.options());
  T* op = out.data_ptr<T>();
  from_float(y, op, tokens * hidden);
  return out;
}

// y [tokens, hidden] of tokens x [tokens, hidden]: keep_in / keep_act >= 0 keep that many entries of each token by
// magnitude (top-k), < 0 keep those above t_in / t_act (calibrated thresholds). `parallel`: over torch's threads,
// else on the calling thread (no change of the thread count, which costs the other operations of a decode step).
// counts [5] (int64) gains the tokens, the input and neuron rows they keep (a row several tokens keep counts for
// each), and the rows they multiply beside those (by pairs of bf16 rows: a dropped row beside a kept one, and
// every row of a block run densely, multiplied by 0).
at::Tensor teal_ffn(const at::Tensor& x, const at::Tensor& w_in_t, const at::Tensor& w_down_t, int64_t keep_in,
                    int64_t keep_act, double t_in, double t_act, bool parallel, at::Tensor counts) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(0) > 0,
              "teal_ffn: x must be contiguous tokens [tokens, hidden]");
  TORCH_CHECK(w_in_t.dim() == 2 && w_in_t.is_contiguous() && w_in_t.size(0) == x.size(1) && w_in_t.size(1) % 2 == 0,
              "teal_ffn: w_in_t must be a contiguous [hidden, 2 * d_ff] gate|up weight");
  TORCH_CHECK(w_down_t.dim() == 2 && w_down_t.is_contiguous() && w_down_t.size(0) * 2 == w_in_t.size(1) &&
                  w_down_t.size(1) == x.size(1),
              "teal_ffn: w_down_t must be a contiguous [d_ff, hidden] down weight");
  TORCH_CHECK(x.scalar_type() == w_in_t.scalar_type() && x.scalar_type() == w_down_t.scalar_type(),
              "teal_ffn: x and the weights must share one dtype");
  TORCH_CHECK(counts.scalar_type() == at::kLong && counts.numel() == 5 && counts.is_contiguous(),
              "teal_ffn: counts must be 5 contiguous int64");
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "teal_ffn", [&] {
    out = ffn<scalar_t>(x, w_in_t, w_down_t, keep_in, keep_act, t_in, t_act, parallel, counts);
  });
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// One token through the bricks a router selected (BrickedFFN): each brick's gate|up rows as dot products with the
// token, then its down rows. In eager torch that is a few small matmuls per brick, whose fixed cost (tens of
// microseconds each, more in bf16) outweighs a small FFN's whole dense call.

// sum of w[i] * x[i] for i in [0, n), in fp32.
template <typename T>
inline float dot(const T* w, const float* x, int64_t n) {
  int64_t i = 0;
#if AVX2_LANES
  if constexpr (HAS_LOAD8<T>) {  // in AVX2's own lanes (see add_rows); four chains of sums
    __m256 a = _mm256_setzero_ps(), b = a, c = a, d = a;
    for (; i + 32 <= n; i += 32) {
      a = _mm256_fmadd_ps(load8(w + i), _mm256_loadu_ps(x + i), a);
      b = _mm256_fmadd_ps(load8(w + i + 8), _mm256_loadu_ps(x + i + 8), b);
      c = _mm256_fmadd_ps(load8(w + i + 16), _mm256_loadu_ps(x + i + 16), c);
      d = _mm256_fmadd_ps(load8(w + i + 24), _mm256_loadu_ps(x + i + 24), d);
    }
    for (; i + 8 <= n; i += 8) a = _mm256_fmadd_ps(load8(w + i), _mm256_loadu_ps(x + i), a);
    float sum = lanes_sum8(_mm256_add_ps(_mm256_add_ps(a, b), _mm256_add_ps(c, d)));
    for (; i < n; ++i) sum += static_cast<float>(w[i]) * x[i];
    return sum;
  }
#endif
  vfloat first = {}, second = {};  // two chains of sums, so that each waits on half as many additions
  for (; i + 32 <= n; i += 32) {
    first += load16(w + i) * load16(x + i);
    second += load16(w + i + 16) * load16(x + i + 16);
  }
  for (; i + 16 <= n; i += 16) first += load16(w + i) * load16(x + i);
#ifdef __AVX512BW__
  // The last n - i < 16 in one masked step, rather than up to 15 scalar ones (a hidden size that is not a multiple
  // of 16).
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>) {
    if (i < n) {
      const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
      const vfloat xs = reinterpret_cast<vfloat>(_mm512_maskz_loadu_ps(m, x + i));
      if constexpr (std::is_same_v<T, float>) {
        second += reinterpret_cast<vfloat>(_mm512_maskz_loadu_ps(m, w + i)) * xs;
      } else {
        const __m256i b = _mm256_maskz_loadu_epi16(m, w + i);
        second += reinterpret_cast<vfloat>(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16)) * xs;
      }
      i = n;
    }
  }
#endif
  first += second;
  float sum = 0.0f;
  for (int lane = 0; lane < 16; ++lane) sum += first[lane];
  for (; i < n; ++i) sum += static_cast<float>(w[i]) * x[i];
  return sum;
}

template <typename T>
at::Tensor bricks_token(const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& w_down, const at::Tensor& sel,
                        bool parallel) {
  const int64_t hidden = x.size(1), n_bricks = w_in.size(0), size = w_in.size(1) / 2;
  thread_local std::vector<float> buffer;
  thread_local std::vector<int64_t> chosen_buffer, rows_buffer;
  const bool* selected = sel.data_ptr<bool>();
  int64_t* chosen = scratch(chosen_buffer, n_bricks).data();
  int64_t n_chosen = 0;
  for (int64_t b = 0; b < n_bricks; ++b) {  // branch-free (see `collect`)
    chosen[n_chosen] = b;
    n_chosen += selected[b];
  }
  // x as fp32, then per chosen brick its gate|up pre-activations and its activations; y last.
  float* xf = scratch(buffer, hidden + n_chosen * 3 * size + hidden).data();
  float* h = xf + hidden;
  float* a = h + n_chosen * 2 * size;
  float* y = a + n_chosen * size;
  to_float(x.data_ptr<T>(), xf, hidden);
  const T* wi = w_in.data_ptr<T>();
  const T* wd = w_down.data_ptr<T>();
  auto pre = [&](int64_t begin, int64_t end) {  // bricks [begin, end) of the chosen
    for (int64_t j = begin; j < end; ++j) {
      const T* rows = wi + chosen[j] * 2 * size * hidden;
      float* hj = h + j * 2 * size;
      for (int64_t r = 0; r < 2 * size; ++r) hj[r] = dot(rows + r * hidden, xf, hidden);
      silu_mul(hj, hj + size, a + j * size, size);
    }
  };
  if (parallel) {
    at::parallel_for(0, n_chosen, 1, pre);
  } else {
    pre(0, n_chosen);
  }
  // The chosen bricks' rows of w_down [n, size, hidden], summed as teal sums its kept rows.
  int64_t* rows = scratch(rows_buffer, n_chosen * size).data();
  thread_local std::vector<float> values_buffer;
  float* values = scratch(values_buffer, n_bricks * size).data();
  for (int64_t j = 0; j < n_chosen; ++j) {
    for (int64_t r = 0; r < size; ++r) {
      rows[j * size + r] = chosen[j] * size + r;
      values[chosen[j] * size + r] = a[j * size + r];
    }
  }
  token_rows_sum(wd, hidden, rows, n_chosen * size, values, y, parallel);
  at::Tensor out = at::empty({1, hidden}, x.options());
  from_float(y, out.data_ptr<T>(), hidden);
  return out;
}

// Several tokens: brick by brick, each brick's gate|up rows are read from memory once for all the tokens that
// selected it, a tile of four rows against four tokens at a time with the sums in registers. The eager `bricks`
// path does the same with a matmul per brick on its gathered tokens, at tens of microseconds per matmul.

inline float lanes_sum(vfloat v) {
  float sum = 0.0f;
  for (int lane = 0; lane < 16; ++lane) sum += v[lane];
  return sum;
}

#ifdef __AVX512F__
// out[q * stride + r] = the sum of acc[r][q]'s 16 lanes, for a 4 x 4 tile: the 16 vectors halved together, two at a
// time (16 -> 8 -> 4 -> 2 -> 1, 45 instructions), rather than each on its own (16 horizontal sums of 8).
template <typename V>  // __m512 or vfloat, the same 16 floats
inline void sums_4x4(const V (&acc)[4][4], float* out, int64_t stride) {
  // Every loop unrolled, so that the sums stay in registers (see tile_dots).
  __m512 v[8];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {  // v[i]: 8 partial sums of vector 2i in its low half, of 2i + 1 in its high half
    const __m512 a = __m512(acc[i / 2][(2 * i) % 4]), b = __m512(acc[i / 2][(2 * i) % 4 + 1]);
    v[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i)  // 4 in each 128-bit lane
    v[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xDD));
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i)  // 2 in each 32-bit pair of a lane
    v[i] = _mm512_add_ps(_mm512_shuffle_ps(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_ps(v[2 * i], v[2 * i + 1], 0xEE));
  // Lane 4q + r of the result sums acc[r][q] (worked out by hand, checked against the kernel tests' references).
  const __m512 sums = _mm512_add_ps(_mm512_shuffle_ps(v[0], v[1], 0x88), _mm512_shuffle_ps(v[0], v[1], 0xDD));
#pragma GCC unroll 4
  for (int q = 0; q < 4; ++q) _mm_storeu_ps(out + q * stride, _mm512_extractf32x4_ps(sums, q));
}
#endif

#if AVX2_LANES
// tile_dots (below) in AVX2's 8 lanes, two rows at a time against the Q tokens: a 4 x 4 tile of 16-lane sums is
// 32 of AVX2's 16 registers, and GCC's lowering kept them on the stack (as in add_rows). Each row is still read
// once; the tokens, in cache, once per two rows.
template <int R, int Q, typename T>
inline void tile_dots_avx2(const T* w, int64_t hidden, const float* const* xs, float* out, int64_t stride) {
#pragma GCC unroll 2
  for (int r0 = 0; r0 < R; r0 += 2) {
    constexpr int P = R < 2 ? R : 2;  // rows in this pass (R is 1 or a multiple of 2)
    __m256 acc[P][Q];
#pragma GCC unroll 2
    for (int r = 0; r < P; ++r)
#pragma GCC unroll 4
      for (int q = 0; q < Q; ++q) acc[r][q] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= hidden; i += 8) {
      __m256 rows[P];
#pragma GCC unroll 2
      for (int r = 0; r < P; ++r) rows[r] = load8(w + (r0 + r) * hidden + i);
#pragma GCC unroll 4
      for (int q = 0; q < Q; ++q) {
        const __m256 xv = _mm256_loadu_ps(xs[q] + i);
#pragma GCC unroll 2
        for (int r = 0; r < P; ++r) acc[r][q] = _mm256_fmadd_ps(rows[r], xv, acc[r][q]);
      }
    }
    for (int r = 0; r < P; ++r) {
      for (int q = 0; q < Q; ++q) {
        float sum = lanes_sum8(acc[r][q]);
        for (int64_t k = i; k < hidden; ++k) sum += static_cast<float>(w[(r0 + r) * hidden + k]) * xs[q][k];
        out[q * stride + r0 + r] = sum;
      }
    }
  }
}
#endif

// out[q * stride + r] = row r of w (rows `hidden` apart) . token q of xs, for R rows and Q tokens, in fp32.
template <int R, int Q, typename T>
inline void tile_dots(const T* w, int64_t hidden, const float* const* xs, float* out, int64_t stride) {
#if AVX2_LANES
  if constexpr (HAS_LOAD8<T> && (R == 1 || R % 2 == 0)) {
    tile_dots_avx2<R, Q>(w, hidden, xs, out, stride);
    return;
  }
#endif
  vfloat acc[R][Q] = {};  // in registers: the loops over R and Q unrolled (see the bf16 version)
  const float* x[Q];
#pragma GCC unroll 4
  for (int q = 0; q < Q; ++q) x[q] = xs[q];
  int64_t i = 0;
  for (; i + 16 <= hidden; i += 16) {
    vfloat rows[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) rows[r] = load16(w + r * hidden + i);
#pragma GCC unroll 4
    for (int q = 0; q < Q; ++q) {
      const vfloat xv = load16(x[q] + i);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) acc[r][q] += rows[r] * xv;
    }
  }
#ifdef __AVX512F__
  if constexpr (R == 4 && Q == 4) {  // 16 lane-by-lane sums were a large share of a one-thread profile's samples
    sums_4x4(acc, out, stride);
  } else
#endif
  {
    for (int r = 0; r < R; ++r)
      for (int q = 0; q < Q; ++q) out[q * stride + r] = lanes_sum(acc[r][q]);
  }
  for (int r = 0; r < R; ++r) {
    for (int q = 0; q < Q; ++q) {
      for (int64_t k = i; k < hidden; ++k) out[q * stride + r] += static_cast<float>(w[r * hidden + k]) * xs[q][k];
    }
  }
}

#ifdef __AVX512BF16__
// The same for bf16 weights and bf16 tokens (their own values, no rounding): vdpbf16ps, 32 products per
// instruction; the last piece of a row is loaded masked, its missing entries 0 in both operands.
template <int R, int Q>
inline void tile_dots(const c10::BFloat16* w, int64_t hidden, const c10::BFloat16* const* xs, float* out,
                      int64_t stride) {
  // Loops over R and Q unrolled: with the sums in an array indexed by loop variables, GCC stored every sum to the
  // stack after each instruction (perf annotate), which bounded the loop by stores.
  __m512 acc[R][Q];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int q = 0; q < Q; ++q) acc[r][q] = _mm512_setzero_ps();
  const c10::BFloat16* x[Q];
#pragma GCC unroll 4
  for (int q = 0; q < Q; ++q) x[q] = xs[q];
  for (int64_t i = 0; i < hidden; i += 32) {
    const __mmask32 m = hidden - i >= 32 ? ~__mmask32(0) : static_cast<__mmask32>((1u << (hidden - i)) - 1);
    __m512bh rows[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) rows[r] = reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi16(m, w + r * hidden + i));
#pragma GCC unroll 4
    for (int q = 0; q < Q; ++q) {
      const __m512bh xv = reinterpret_cast<__m512bh>(_mm512_maskz_loadu_epi16(m, x[q] + i));
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) acc[r][q] = _mm512_dpbf16_ps(acc[r][q], rows[r], xv);
    }
  }
  if constexpr (R == 4 && Q == 4) {
    sums_4x4(acc, out, stride);
  } else {
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int q = 0; q < Q; ++q) out[q * stride + r] = _mm512_reduce_add_ps(acc[r][q]);
  }
}
#endif

// tile_dots for R rows and 1-4 tokens.
template <int R, typename T, typename X>
inline void tile_dots_for(int64_t q, const T* w, int64_t hidden, const X* const* xs, float* out, int64_t stride) {
  switch (q) {
    case 1: tile_dots<R, 1>(w, hidden, xs, out, stride); break;
    case 2: tile_dots<R, 2>(w, hidden, xs, out, stride); break;
    case 3: tile_dots<R, 3>(w, hidden, xs, out, stride); break;
    default: tile_dots<R, 4>(w, hidden, xs, out, stride); break;
  }
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
// brick_activations for bf16 on AMX's tiles (see amx_block): a brick's gate|up rows are the tiles' A operand, 16 rows
// of 32 weights read in place (a row's width apart), and the tokens are B, 16 words (pairs of inputs 2k, 2k + 1) of
// 16 tokens, transposed once per call. A brick is multiplied by every token of a group of 16 in which any token
// selected it: a tile product costs the same for 1 token as for 16, and the sums of the tokens that did not select
// it are dropped. vdpbf16ps, one a cycle on the Xeon this was written on, made the small FFN's bf16 batches slower
// than torch's dense matmuls, which run on AMX (bench/README.md, "On an Intel Xeon with AMX").
// Returns the (token, brick) pairs multiplied: the selected ones and those of the other tokens of their groups.
int64_t brick_activations_amx(const c10::BFloat16* x, const c10::BFloat16* w_in, const bool* sel, int64_t tokens,
                              int64_t n_bricks, int64_t size, int64_t hidden, float* a, bool parallel) {
  const int64_t words = (hidden + 31) / 32 * 16;  // a token's words, to whole tiles (0 past the input)
  const int64_t groups = (tokens + AMX_TOKENS - 1) / AMX_TOKENS, rows16 = (2 * size + 15) / 16 * 16;
  const int64_t last_row = n_bricks * 2 * size;  // rows of w_in: a tile read in place must end within them
  const bool whole_words = hidden % 32 == 0;  // else every tile's last words are copied, with 0 past the input
  // Tiles of sums in flight, each over 16 of the brick's rows, which every step of 32 inputs reads a line of: long
  // rows (LONG_ROW) take a page each, and 64 of them at once (four tiles) left the hardware prefetcher behind.
  // The large bf16 batch of 8 at 0.5 took 32-39 ms with four tiles, 16-19 with two or one (dense: 16-20; a probe's
  // output in bench/results/xeon_probes/output_brick_tiles.txt). Short rows lie a few to a page.
  const int64_t tiles = hidden * static_cast<int64_t>(sizeof(c10::BFloat16)) >= LONG_ROW ? 2 : 4;
  // xt[(g * words + k) * 16 + i] = word k of token 16 g + i (its inputs 2k and 2k + 1): a group's B tiles in turn.
  thread_local std::vector<uint32_t> xt_buffer;
  uint32_t* xt = scratch(xt_buffer, groups * words * AMX_TOKENS).data();
  std::fill_n(xt, groups * words * AMX_TOKENS, 0u);
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(x);
  for (int64_t t = 0; t < tokens; ++t) {
    uint32_t* to = xt + t / AMX_TOKENS * words * AMX_TOKENS + t % AMX_TOKENS;
    const uint16_t* row = bits + t * hidden;
    for (int64_t k = 0; k < hidden / 2; ++k) to[k * AMX_TOKENS] = row[2 * k] | uint32_t{row[2 * k + 1]} << 16;
    if (hidden % 2 == 1) to[hidden / 2 * AMX_TOKENS] = row[hidden - 1];
  }
  std::atomic<int64_t> multiplied{0};
  auto bricks = [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> h_buffer;
    thread_local std::vector<c10::BFloat16> copy_buffer;
    thread_local std::vector<int64_t> group_buffer;
    float* h = scratch(h_buffer, groups * rows16 * AMX_TOKENS).data();  // [group][row][token]: the C tiles
    c10::BFloat16* copy = scratch(copy_buffer, 16 * 2 * words).data();  // a tile's 16 rows where not read in place
    int64_t* touched = scratch(group_buffer, groups).data();
    amx_configure();  // a thread's own tiles
    int64_t own = 0;
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t t = 0; t < tokens; ++t) {
        if (!sel[t * n_bricks + b]) std::fill_n(a + (t * n_bricks + b) * size, size, 0.0f);
      }
      int64_t n_touched = 0;
      for (int64_t g = 0; g < groups; ++g) {
        bool any = false;
        for (int64_t t = g * AMX_TOKENS; t < std::min(tokens, (g + 1) * AMX_TOKENS); ++t) any |= sel[t * n_bricks + b];
        if (any) {
          touched[n_touched++] = g;
          own += std::min(tokens, (g + 1) * AMX_TOKENS) - g * AMX_TOKENS;
        }
      }
      const c10::BFloat16* rows = w_in + b * 2 * size * hidden;
      for (int64_t r0 = 0; r0 < rows16 && n_touched > 0; r0 += 16 * tiles) {
        const int64_t n = std::min<int64_t>(tiles, (rows16 - r0) / 16);
        const c10::BFloat16* from[4];
        int64_t stride[4];
        for (int64_t i = 0; i < n; ++i) {
          const int64_t r = r0 + 16 * i;
          if (whole_words && b * 2 * size + r + 16 <= last_row) {  // rows past the brick's are read, not kept
            from[i] = rows + r * hidden;
            stride[i] = hidden * 2;
          } else {
            // Only one tile's copy is kept: a brick whose last tiles need copies takes them one at a time.
            from[i] = nullptr;
            stride[i] = words * 4;
          }
        }
        for (int64_t q = 0; q < n_touched; ++q) {
          const uint32_t* xg = xt + touched[q] * words * AMX_TOKENS;
          float* hg = h + touched[q] * rows16 * AMX_TOKENS + r0 * AMX_TOKENS;
          for (int64_t i = 0; i < n; ++i) {
            if (from[i] != nullptr) continue;
            const int64_t r = r0 + 16 * i;
            std::fill_n(copy, 16 * 2 * words, c10::BFloat16(0.0f));
            for (int64_t j = 0; j < 16 && r + j < 2 * size; ++j)
              std::copy_n(rows + (r + j) * hidden, hidden, copy + j * 2 * words);
            // one tile of sums over every word, from the copy
            _tile_zero(0);
            for (int64_t k = 0; k < words; k += 16) {
              _tile_loadd(4, xg + k * AMX_TOKENS, 64);
              _tile_loadd(5, copy + 2 * k, static_cast<int>(stride[i]));
              _tile_dpbf16ps(0, 5, 4);
            }
            _tile_stored(0, hg + 16 * i * AMX_TOKENS, 64);
          }
          // The tiles read in place, up to four at a time over every word.
          _tile_zero(0);
          _tile_zero(1);
          _tile_zero(2);
          _tile_zero(3);
          const bool in_place[4] = {n > 0 && from[0] != nullptr, n > 1 && from[1] != nullptr,
                                    n > 2 && from[2] != nullptr, n > 3 && from[3] != nullptr};
          if (!(in_place[0] || in_place[1] || in_place[2] || in_place[3])) continue;
          for (int64_t k = 0; k < words; k += 16) {
            _tile_loadd(4, xg + k * AMX_TOKENS, 64);
            // Tile numbers are immediates (the intrinsics paste them into the instruction's text, so not even a
            // template parameter will do), hence one statement per tile.
            if (in_place[0]) {
              _tile_loadd(5, from[0] + 2 * k, static_cast<int>(stride[0]));
              _tile_dpbf16ps(0, 5, 4);
            }
            if (in_place[1]) {
              _tile_loadd(6, from[1] + 2 * k, static_cast<int>(stride[1]));
              _tile_dpbf16ps(1, 6, 4);
            }
            if (in_place[2]) {
              _tile_loadd(5, from[2] + 2 * k, static_cast<int>(stride[2]));
              _tile_dpbf16ps(2, 5, 4);
            }
            if (in_place[3]) {
              _tile_loadd(6, from[3] + 2 * k, static_cast<int>(stride[3]));
              _tile_dpbf16ps(3, 6, 4);
            }
          }
          if (in_place[0]) _tile_stored(0, hg, 64);
          if (in_place[1]) _tile_stored(1, hg + 16 * AMX_TOKENS, 64);
          if (in_place[2]) _tile_stored(2, hg + 32 * AMX_TOKENS, 64);
          if (in_place[3]) _tile_stored(3, hg + 48 * AMX_TOKENS, 64);
        }
      }
      for (int64_t q = 0; q < n_touched; ++q) {
        const int64_t g = touched[q];
        float* hg = h + g * rows16 * AMX_TOKENS;
        // gate rows [0, size), up rows [size, 2 size), each row's 16 tokens side by side: one activation for all
        silu_mul(hg, hg + size * AMX_TOKENS, hg, size * AMX_TOKENS);
        for (int64_t t = g * AMX_TOKENS; t < std::min(tokens, (g + 1) * AMX_TOKENS); ++t) {
          if (!sel[t * n_bricks + b]) continue;
          float* to = a + (t * n_bricks + b) * size;
          for (int64_t r = 0; r < size; ++r) to[r] = hg[r * AMX_TOKENS + t % AMX_TOKENS];
        }
      }
    }
    _tile_release();  // the tile state would be saved and restored at every switch of this thread
    multiplied += own;
  };
  if (parallel) {
    at::parallel_for(0, n_bricks, 1, bricks);
  } else {
    bricks(0, n_bricks);
  }
  return multiplied;
}
#endif

// a [tokens, n_bricks, size] = each token's activations in the bricks sel [tokens, n_bricks] selects, 0 in the
// others. bf16 tokens meet bf16 rows in vdpbf16ps where the CPU has it (on AMX's tiles from PACK_FROM tokens);
// other dtypes are summed in fp32. Returns the (token, brick) pairs multiplied.
template <typename T>
int64_t brick_activations(const T* x, const T* w_in, const bool* sel, int64_t tokens, int64_t n_bricks, int64_t size,
                          int64_t hidden, float* a, bool parallel) {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (tokens >= PACK_FROM && amx_enabled())
      return brick_activations_amx(x, w_in, sel, tokens, n_bricks, size, hidden, a, parallel);
  }
#endif
#ifdef __AVX512BF16__
  constexpr bool pairs = std::is_same_v<T, c10::BFloat16>;
#else
  constexpr bool pairs = false;
#endif
  using X = std::conditional_t<pairs, T, float>;  // what the dot products take of the tokens
  thread_local std::vector<float> xf_buffer;
  thread_local std::vector<int64_t> list_buffer;
  const X* xs = nullptr;
  if constexpr (pairs) {
    xs = x;
  } else {
    float* xf = scratch(xf_buffer, tokens * hidden).data();
    to_float(x, xf, tokens * hidden);
    xs = xf;
  }
  // Per brick the tokens that selected it: ids[starts[b], starts[b + 1]).
  int64_t* starts = scratch(list_buffer, n_bricks + 1 + tokens * n_bricks).data();
  int64_t* ids = starts + n_bricks + 1;
  starts[0] = 0;
  for (int64_t b = 0; b < n_bricks; ++b) {
    int64_t n = starts[b];
    for (int64_t t = 0; t < tokens; ++t) {  // branch-free (see `collect`)
      ids[n] = t;
      n += sel[t * n_bricks + b];
    }
    starts[b + 1] = n;
  }
  auto bricks = [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> h_buffer;
    thread_local std::vector<const X*> x_buffer;
    // Gate|up rows are prefetched into L2 `ahead` rows on, in this brick or the next one some token selected:
    // about 32 KB, which stay in L2 until used (a large FFN's whole next brick, MBs, would not). Short rows only.
    // A small FFN's rows, a KB or two, the hardware prefetcher did not follow, and in a one-thread profile the
    // loads of the weights took most of the time. A large FFN's rows of 8 KB or more it follows, and with the
    // prefetch too the large bf16 batch of 8 was slower (bench/README.md, "Bricks' calls").
    int64_t next = begin;
    const int64_t row_bytes = hidden * static_cast<int64_t>(sizeof(T));
    const int64_t ahead = row_bytes >= LONG_ROW ? 0 : std::clamp<int64_t>(PREFETCH_BYTES / row_bytes, 4, 2 * size);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t* group = ids + starts[b];
      const int64_t count = starts[b + 1] - starts[b];
      for (next = std::max(next, b + 1); next < end && starts[next + 1] == starts[next];) ++next;
      for (int64_t t = 0; t < tokens; ++t) {
        if (!sel[t * n_bricks + b]) std::fill_n(a + (t * n_bricks + b) * size, size, 0.0f);
      }
      if (count == 0) continue;
      float* h = scratch(h_buffer, count * 2 * size).data();  // [count, 2 * size]: gate rows, then up rows
      const X** xq = scratch(x_buffer, count).data();
      for (int64_t i = 0; i < count; ++i) xq[i] = xs + group[i] * hidden;
      const T* rows = w_in + b * 2 * size * hidden;
      for (int64_t r = 0; r < 2 * size; r += 4) {  // four rows stay in L1 while the tokens pass
        const int64_t target = r + ahead;
        const T* later = ahead == 0         ? nullptr
                         : target < 2 * size ? rows + target * hidden
                         : next < end        ? w_in + (next * 2 * size + target - 2 * size) * hidden
                                             : nullptr;
        if (later != nullptr) {
          const int64_t bytes = std::min<int64_t>(4, 2 * size - target % (2 * size)) * hidden * sizeof(T);
          const char* p = reinterpret_cast<const char*>(later);
          for (int64_t line = 0; line < bytes; line += 64) __builtin_prefetch(p + line, 0, 2);  // prefetcht1
        }
        for (int64_t q = 0; q < count; q += 4) {
          const int64_t n = std::min<int64_t>(4, count - q);
          if (r + 4 <= 2 * size) {
            tile_dots_for<4>(n, rows + r * hidden, hidden, xq + q, h + q * 2 * size + r, 2 * size);
          } else {
            for (int64_t k = r; k < 2 * size; ++k)
              tile_dots_for<1>(n, rows + k * hidden, hidden, xq + q, h + q * 2 * size + k, 2 * size);
          }
        }
      }
      for (int64_t i = 0; i < count; ++i) {
        const float* hi = h + i * 2 * size;
        silu_mul(hi, hi + size, a + (group[i] * n_bricks + b) * size, size);
      }
    }
  };
  if (parallel) {
    at::parallel_for(0, n_bricks, 1, bricks);
  } else {
    bricks(0, n_bricks);
  }
  return starts[n_bricks];
}

// y [tokens, hidden] for several tokens, w_down [n_bricks, size, hidden]: each token's selected
// bricks' rows summed with its activations, the rows read once for all the tokens (`rows_sum`, as teal sums them).
// `multiplied` = the rows of w_down multiplied by a token's value, summed over the tokens: with bf16 pairs, a
// block run densely multiplies the rows of bricks a token did not select by 0, and those count too. `bricks_run` =
// the (token, brick) pairs whose gate|up rows were multiplied (on AMX, every token of a group of 16 that has any).
template <typename T>
at::Tensor bricks_tokens(const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& w_down, const at::Tensor& sel,
                         bool parallel, int64_t& multiplied, int64_t& bricks_run) {
  const int64_t tokens = x.size(0), hidden = x.size(1), n_bricks = w_in.size(0), size = w_in.size(1) / 2;
  thread_local std::vector<float> buffer;
  thread_local std::vector<Kept> kept_buffer;
  float* a = scratch(buffer, tokens * (n_bricks * size + hidden)).data();
  float* y = a + tokens * n_bricks * size;
  const bool* selected = sel.data_ptr<bool>();
  bricks_run = brick_activations(x.data_ptr<T>(), w_in.data_ptr<T>(), selected, tokens, n_bricks, size, hidden, a,
                                 parallel);
  at::Tensor out = at::empty({tokens, hidden}, x.options());
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (tokens >= PACK_FROM && amx_enabled()) {
      multiplied = bricks_down_amx(w_down.data_ptr<T>(), hidden, n_bricks, size, selected, a, tokens, y, parallel);
      from_float(y, out.data_ptr<T>(), tokens * hidden);
      return out;
    }
  }
#endif
  std::vector<Kept>& kept = scratch(kept_buffer, tokens);
  per_token(tokens, parallel, [&](int64_t t) {
    int64_t* rows = scratch(kept[t].rows, n_bricks * size).data();
    float* values = scratch(kept[t].values, n_bricks * size).data();
    int64_t n = 0;
    for (int64_t b = 0; b < n_bricks; ++b) {
      if (!selected[t * n_bricks + b]) continue;
      for (int64_t r = 0; r < size; ++r, ++n) {
        rows[n] = b * size + r;
        values[n] = a[(t * n_bricks + b) * size + r];
      }
    }
    kept[t].count = n;
  });
  multiplied = rows_sum(w_down.data_ptr<T>(), hidden, n_bricks * size, kept, tokens, a, y, parallel);
  from_float(y, out.data_ptr<T>(), tokens * hidden);
  return out;
}

// y [tokens, hidden] of tokens x [tokens, hidden] through the bricks `sel` [tokens, n_bricks] (bool) selects, for a
// gated SiLU FFN stored brick-major: w_in [n_bricks, 2 * size, hidden] (each brick's gate rows, then its up rows),
// w_down [n_bricks, size, hidden] (each brick's rows of W_down^T). No bias, no shared brick (the caller adds it).
// `parallel` as in teal_ffn.
// counts[0] += the rows of w_down multiplied, counts[1] += the (token, brick) pairs whose gate|up rows were (see
// bricks_tokens): the executed fraction's shares of the down projection and of gate|up.
at::Tensor brick_ffn(const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& w_down, const at::Tensor& sel,
                     bool parallel, at::Tensor counts) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1 && x.is_contiguous(), "brick_ffn: x must be contiguous tokens [tokens, hidden]");
  TORCH_CHECK(w_in.dim() == 3 && w_in.is_contiguous() && w_in.size(2) == x.size(1) && w_in.size(1) % 2 == 0,
              "brick_ffn: w_in must be a contiguous [n_bricks, 2 * size, hidden] gate|up weight");
  const int64_t n = w_in.size(0), size = w_in.size(1) / 2;
  TORCH_CHECK(w_down.dim() == 3 && w_down.is_contiguous() && w_down.size(0) == n && w_down.size(1) == size &&
                  w_down.size(2) == x.size(1),
              "brick_ffn: w_down must be a contiguous [n_bricks, size, hidden] weight");
  TORCH_CHECK(sel.scalar_type() == at::kBool && sel.numel() == x.size(0) * n && sel.is_contiguous(),
              "brick_ffn: sel must be contiguous bools [tokens, n_bricks]");
  TORCH_CHECK(x.scalar_type() == w_in.scalar_type() && x.scalar_type() == w_down.scalar_type(),
              "brick_ffn: x and the weights must share one dtype");
  TORCH_CHECK(counts.scalar_type() == at::kLong && counts.numel() >= 2 && counts.is_contiguous() && counts.is_cpu(),
              "brick_ffn: counts must be a contiguous int64 CPU tensor of at least 2 entries");
  at::Tensor out;
  int64_t multiplied = 0, bricks_run = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "brick_ffn", [&] {
    if (x.size(0) == 1) {
      out = bricks_token<scalar_t>(x, w_in, w_down, sel, parallel);
      const bool* selected = sel.data_ptr<bool>();  // one token reads the rows of the bricks it selected only
      bricks_run = std::count(selected, selected + n, true);
      multiplied = bricks_run * size;
    } else {
      out = bricks_tokens<scalar_t>(x, w_in, w_down, sel, parallel, multiplied, bricks_run);
    }
  });
  counts.data_ptr<int64_t>()[0] += multiplied;
  counts.data_ptr<int64_t>()[1] += bricks_run;
  return out;
}

// a [rows, size] = silu(h[:, :size]) * h[:, size:] for h [rows, 2 * size]: every brick's gate values, then its up
// values, as the brick-major matmul of all bricks leaves them (`BrickedFFN._masked`). torch's elementwise kernels
// on those strided halves, 24 values long on the small shape, took about 4x the time of a contiguous activation of
// the same size. Here in fp32 through contiguous buffers, rows over the threads.
template <typename T>
void gated_silu_rows(const T* h, T* a, int64_t rows, int64_t size) {
  const int64_t step = std::max<int64_t>(1, 4096 / size);  // rows whose fp32 copies stay in L1/L2 (48 KB)
  at::parallel_for(0, rows, step, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> buffer;
    // A thread's range in pieces of `step` rows: converted all at once, a prefill's range took three fp32 copies of
    // tens of MB through memory, slower than torch's two bf16 operations (bench/README.md, "On an AMD Zen 4 CPU").
    for (int64_t first = begin; first < end; first += step) {
      const int64_t last = std::min(end, first + step), n = (last - first) * size;
      float* g = scratch(buffer, 3 * n).data();
      float* u = g + n;
      float* out = u + n;
      for (int64_t r = first; r < last; ++r) {
        to_float(h + r * 2 * size, g + (r - first) * size, size);
        to_float(h + r * 2 * size + size, u + (r - first) * size, size);
      }
      silu_mul(g, u, out, n);
      from_float(out, a + first * size, n);
    }
  });
}

at::Tensor gated_silu(const at::Tensor& h, int64_t size) {
  TORCH_CHECK(size > 0 && h.is_contiguous() && h.dim() >= 1 && h.size(-1) % (2 * size) == 0,
              "gated_silu: h must be contiguous [..., k * 2 * size], each piece gate values then up values");
  TORCH_CHECK(h.scalar_type() != at::kDouble, "gated_silu: it computes in fp32, below float64's precision");
  const int64_t rows = h.numel() / (2 * size);
  std::vector<int64_t> shape(h.sizes().begin(), h.sizes().end());
  shape.back() /= 2;
  at::Tensor out = at::empty(shape, h.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), "gated_silu", [&] {
    gated_silu_rows(h.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, size);
  });
  return out;
}

// A float's bits as an unsigned key that orders as the float does: positives above negatives (their sign bit set),
// negatives reversed, -0.0 equal to 0.0; NaN above everything, as torch.topk ranks it.
// keep(i, kept) for i in [0, n): whether keys[i] is among the k largest (0 <= k <= n), ties to the lower index,
// as `kept` chooses (top_bit: the keys' highest bit that can be set). One comparison per entry, which the compiler
// vectorizes: all of the ties where all are kept (nearly always for fp32 values, the k-th alone), else none of
// them, and then a walk to the first ones left (bf16's few mantissa bits make ties common). A walk over every
// entry, a step each, made the ranking of 512 tokens several times slower (a probe whose output was not kept).
template <typename Keep>
void mark_largest(const uint32_t* keys, int64_t n, int64_t k, int top_bit, const Keep& keep) {
  if (k == 0) {
    for (int64_t i = 0; i < n; ++i) keep(i, false);
    return;
  }
  const uint32_t kth = kth_largest_key(keys, n, k, top_bit);
  int64_t above = 0, equal = 0;
  for (int64_t i = 0; i < n; ++i) {
    above += keys[i] > kth;
    equal += keys[i] == kth;
  }
  int64_t ties = k - above;
  if (ties == equal) {
    for (int64_t i = 0; i < n; ++i) keep(i, keys[i] >= kth);
    return;
  }
  for (int64_t i = 0; i < n; ++i) keep(i, keys[i] > kth);
  for (int64_t i = 0; ties > 0 && i < n; ++i) {
    if (keys[i] != kth) continue;
    --ties;
    keep(i, true);
  }
}

inline uint32_t order_key(float v) {
  if (v != v) return 0xFFFFFFFFu;
  if (v == 0.0f) v = 0.0f;
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// sel [rows, n] (bool): each row's k largest scores, ties to the lower index. What a router's top-k is in torch,
// topk, a mask of zeros and a scatter, three operations of tens of microseconds each in a decode step, longer than
// the selection itself (n is a few dozen bricks).
at::Tensor top_k_mask(const at::Tensor& scores, int64_t k) {
  TORCH_CHECK(scores.dim() == 2 && scores.is_contiguous(), "top_k_mask: scores must be contiguous [rows, n]");
  const int64_t rows = scores.size(0), n = scores.size(1);
  TORCH_CHECK(k >= 1 && k <= n, "top_k_mask: k must be in [1, n], got ", k, " of ", n);
  TORCH_CHECK(scores.scalar_type() != at::kDouble, "top_k_mask: it ranks in fp32, below float64's precision");
  at::Tensor sel = at::empty({rows, n}, scores.options().dtype(at::kBool));
  bool* out = sel.data_ptr<bool>();
  std::vector<uint32_t> keys(n);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, scores.scalar_type(), "top_k_mask", [&] {
    const scalar_t* v = scores.data_ptr<scalar_t>();
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t i = 0; i < n; ++i) keys[i] = order_key(static_cast<float>(v[r * n + i]));
      bool* row = out + r * n;
      mark_largest(keys.data(), n, k, 31, [row](int64_t i, bool kept) { row[i] = kept; });
    }
  });
  return sel;
}

// sel [rows, n] (bool): each row's k largest of x [rows, hidden] . w [n, hidden]^T, the scores summed in fp32 (bf16
// tokens meet bf16 rows in vdpbf16ps where the CPU has it) and ranked as top_k_mask ranks them. A linear router's
// scores and top-k in one call: torch's small bf16 matmul alone, 1-32 tokens by 64 centroids of 576, took 28-32
// microseconds on the Xeon of bench/README.md's "On an Intel Xeon with AMX", a fifth of the small FFN's whole routed
// call at one token (bench/results/xeon_probes/output_router_select.txt).
template <typename T>
void linear_top_k_rows(const T* x, const T* w, int64_t rows, int64_t n, int64_t hidden, int64_t k, bool* out) {
#ifdef __AVX512BF16__
  constexpr bool pairs = std::is_same_v<T, c10::BFloat16>;
#else
  constexpr bool pairs = false;
#endif
  using X = std::conditional_t<pairs, T, float>;  // what the dot products take of the tokens
  // Scratch that lives as long as the thread (see `scratch`): a router runs once per layer of every decode step.
  thread_local std::vector<float> xf_buffer, scores_buffer;
  thread_local std::vector<const X*> xs_buffer;
  thread_local std::vector<uint32_t> keys_buffer;
  float* scores = scratch(scores_buffer, rows * n).data();
  const X** xs = scratch(xs_buffer, rows).data();
  if constexpr (pairs) {
    for (int64_t r = 0; r < rows; ++r) xs[r] = x + r * hidden;
  } else {
    float* xf = scratch(xf_buffer, rows * hidden).data();
    to_float(x, xf, rows * hidden);
    for (int64_t r = 0; r < rows; ++r) xs[r] = xf + r * hidden;
  }
  for (int64_t b = 0; b < n; b += 4) {  // four of w's rows in L1 while the tokens pass, as brick_activations does
    for (int64_t q = 0; q < rows; q += 4) {
      const int64_t m = std::min<int64_t>(4, rows - q);
      if (b + 4 <= n) {
        tile_dots_for<4>(m, w + b * hidden, hidden, xs + q, scores + q * n + b, n);
      } else {
        for (int64_t i = b; i < n; ++i)
          tile_dots_for<1>(m, w + i * hidden, hidden, xs + q, scores + q * n + i, n);
      }
    }
  }
  uint32_t* keys = scratch(keys_buffer, n).data();
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < n; ++i) keys[i] = order_key(scores[r * n + i]);
    bool* row = out + r * n;
    mark_largest(keys, n, k, 31, [row](int64_t i, bool kept) { row[i] = kept; });
  }
}

at::Tensor linear_top_k(const at::Tensor& x, const at::Tensor& w, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "linear_top_k: x must be contiguous [rows, hidden]");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.size(1) == x.size(1),
              "linear_top_k: w must be contiguous [n, hidden] with x's hidden size");
  TORCH_CHECK(k >= 1 && k <= w.size(0), "linear_top_k: k must be in [1, n], got ", k, " of ", w.size(0));
  TORCH_CHECK(x.scalar_type() == w.scalar_type() && x.scalar_type() != at::kDouble,
              "linear_top_k: x and w must share one dtype below float64 (it sums in fp32)");
  at::Tensor sel = at::empty({x.size(0), w.size(0)}, x.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "linear_top_k", [&] {
    linear_top_k_rows(x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), x.size(0), w.size(0), x.size(1), k,
                      sel.data_ptr<bool>());
  });
  return sel;
}

// Each row's k largest magnitudes of v [rows, n], as `kept` chooses them (NaN the largest, ties to the lower index):
// a bool mask, or (zero_dropped) v with the other entries 0. The top-k of teal's `masked` path, which runs a
// prefill's tokens: torch's topk took longer than the default model's FFN matmuls there (bench/README.md).
at::Tensor top_magnitudes(const at::Tensor& v, int64_t k, bool zero_dropped) {
  TORCH_CHECK(v.dim() == 2 && v.is_contiguous(), "top_magnitudes: v must be contiguous [rows, n]");
  const int64_t rows = v.size(0), n = v.size(1);
  TORCH_CHECK(k >= 0 && k <= n, "top_magnitudes: k must be in [0, n], got ", k, " of ", n);
  TORCH_CHECK(v.scalar_type() != at::kDouble, "top_magnitudes: it ranks in fp32, below float64's precision");
  at::Tensor out = zero_dropped ? at::empty_like(v) : at::empty({rows, n}, v.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, v.scalar_type(), "top_magnitudes", [&] {
    const scalar_t* src = v.data_ptr<scalar_t>();
    scalar_t* values = zero_dropped ? out.data_ptr<scalar_t>() : nullptr;
    bool* mask = zero_dropped ? nullptr : out.data_ptr<bool>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, n)), [&](int64_t begin, int64_t end) {
      thread_local std::vector<float> row_buffer, magnitude_buffer;
      thread_local std::vector<uint32_t> key_buffer;
      float* row = scratch(row_buffer, n).data();
      float* m = scratch(magnitude_buffer, n).data();
      uint32_t* keys = scratch(key_buffer, n).data();
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* in = src + r * n;
        to_float(in, row, n);
        magnitudes(row, n, m);
        std::memcpy(keys, m, n * sizeof(float));  // a non-negative float's bits order as it does (see `kth_largest`)
        if (zero_dropped) {  // on the values' bits: 0 is 0 in every float type
          using Bits = std::conditional_t<sizeof(scalar_t) == 2, uint16_t, uint32_t>;
          const Bits* from = reinterpret_cast<const Bits*>(in);
          Bits* to = reinterpret_cast<Bits*>(values) + r * n;
          mark_largest(keys, n, k, 30, [from, to](int64_t i, bool kept) { to[i] = kept ? from[i] : Bits(0); });
        } else {
          bool* to = mask + r * n;
          mark_largest(keys, n, k, 30, [to](int64_t i, bool kept) { to[i] = kept; });
        }
      }
    });
  });
  return out;
}

// The vector instructions this build's hot loops use: the build is for one CPU target (cpu_kernels.py).
std::string isa() {
#if defined(__AVX512BF16__)
  return amx_enabled() ? "avx512-bf16+amx" : "avx512-bf16";
#elif defined(__AVX512F__)
  return "avx512";
#elif AVX2_LANES
  return "avx2";
#else
  return "generic";
#endif
}

}  // namespace

TORCH_LIBRARY(bricks, m) {
  m.def("teal_ffn(Tensor x, Tensor w_in_t, Tensor w_down_t, int keep_in, int keep_act, float t_in, float t_act, "
        "bool parallel, Tensor(a!) counts) -> Tensor");
  m.def("brick_ffn(Tensor x, Tensor w_in, Tensor w_down, Tensor sel, bool parallel, Tensor(a!) counts) -> Tensor");
  m.def("gated_silu(Tensor h, int size) -> Tensor");
  m.def("top_k_mask(Tensor scores, int k) -> Tensor");
  m.def("linear_top_k(Tensor x, Tensor w, int k) -> Tensor");
  m.def("top_magnitudes(Tensor v, int k, bool zero_dropped) -> Tensor");
  m.def("isa() -> str", &isa);
}

TORCH_LIBRARY_IMPL(bricks, CPU, m) {
  m.impl("teal_ffn", &teal_ffn);
  m.impl("brick_ffn", &brick_ffn);
  m.impl("gated_silu", &gated_silu);
  m.impl("top_k_mask", &top_k_mask);
  m.impl("linear_top_k", &linear_top_k);
  m.impl("top_magnitudes", &top_magnitudes);
}
