// Probe: how fast add_block's loop (bricks/routing/cpu_kernels.cpp, as it was at cb99b22: 32 pairs a call, 8 vectors
// a pair) runs when its block, words and sums sit in L1: nanoseconds per vdpbf16ps, with the token's word broadcast
// into a register (the kernel's form) or read by each instruction as an embedded broadcast. Output in
// output_pair_blocks.txt.
//
//     g++ -O3 -march=native -o add_block_peak add_block_peak.cpp && ./add_block_peak
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdint>
#include <cstring>
constexpr int CH = 8; // vectors per pair row (128 cols)
template <int T, int V, int MODE>
__attribute__((noinline)) void add_block(float* s, long s_stride, const __m512i* block, long np, const uint32_t* words, long w_stride) {
  __m512 acc[T][V];
  for (int t = 0; t < T; ++t) for (int v = 0; v < V; ++v) acc[t][v] = _mm512_loadu_ps(s + t * s_stride + 16 * v);
  for (long j = 0; j < np; ++j) {
    __m512bh w[V];
    for (int v = 0; v < V; ++v) w[v] = (__m512bh)(block[j * CH + v]);
    for (int t = 0; t < T; ++t) {
      if (MODE == 0) {
        const __m512bh x = (__m512bh)(_mm512_set1_epi32((int)words[j * w_stride + t]));
        for (int v = 0; v < V; ++v) acc[t][v] = _mm512_dpbf16_ps(acc[t][v], x, w[v]);
      } else {
        const uint32_t* p = words + j * w_stride + t;
        for (int v = 0; v < V; ++v) asm("vdpbf16ps %1%{1to16%}, %2, %0" : "+v"(acc[t][v]) : "m"(*p), "v"(w[v]));
      }
    }
  }
  for (int t = 0; t < T; ++t) for (int v = 0; v < V; ++v) _mm512_storeu_ps(s + t * s_stride + 16 * v, acc[t][v]);
}
template <int T, int V, int MODE> double run(int reps) {
  alignas(64) static __m512i block[32 * CH];
  static float sums[64 * 2048]; static uint32_t words[32 * 64];
  memset(block, 1, sizeof block); memset(words, 0, sizeof words);
  auto t0 = std::chrono::steady_clock::now();
  for (int r = 0; r < reps; ++r)
    for (int v0 = 0; v0 < CH; v0 += V)
      for (int g = 0; g < 5; ++g) add_block<T, V, MODE>(sums + g * T * 2048 + 16 * v0, 2048, block + v0, 32, words + g * T, 32);
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  double dp = double(reps) * (CH / V) * 5 * 32 * T * V;
  return s / dp * 1e9;  // ns per dpbf16
}
int main() {
  for (int i = 0; i < 3; ++i) {
    printf("6x4 bcast-reg %.3f ns/dp  embedded %.3f  | 4x4 reg %.3f emb %.3f | 6x4 reg again %.3f\n", run<6,4,0>(20000), run<6,4,1>(20000), run<4,4,0>(20000), run<4,4,1>(20000), run<6,4,0>(20000));
  }
}
