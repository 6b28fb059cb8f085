// add_block below is a copy of bricks/routing/cpu_kernels.cpp's at 6ccabb5, timed alone (output.txt); kept as run.
#include <immintrin.h>
#include <cstdio>
#include <cstdint>
#include <ctime>
#include <vector>
static double now(){timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
constexpr int64_t CHUNK=128;
template <int T, int V>
__attribute__((noinline)) void add_block(float* s, int64_t s_stride, const __m512i* block, int64_t np,
                                         const uint32_t* words, int64_t w_stride) {
  __m512 acc[T][V];
  for (int t = 0; t < T; ++t)
    for (int v = 0; v < V; ++v) acc[t][v] = _mm512_loadu_ps(s + t * s_stride + 16 * v);
  for (int64_t j = 0; j < np; ++j) {
    __m512bh w[V];
    for (int v = 0; v < V; ++v) w[v] = reinterpret_cast<__m512bh>(block[j * (CHUNK / 16) + v]);
    for (int t = 0; t < T; ++t) {
      const __m512bh x = reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int>(words[j * w_stride + t])));
      for (int v = 0; v < V; ++v) acc[t][v] = _mm512_dpbf16_ps(acc[t][v], x, w[v]);
    }
  }
  for (int t = 0; t < T; ++t)
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(s + t * s_stride + 16 * v, acc[t][v]);
}
int main(int argc, char**argv){
  alignas(64) static __m512i block[32*8];
  for(int i=0;i<32*8;i++) block[i]=_mm512_set1_epi32(0x3f803f80 ^ (i*2654435761u & 0x007f007f));
  std::vector<uint32_t> words(32*32); for(int i=0;i<32*32;i++) words[i]=0x3c003c00u ^ (i*40503u & 0x007f007f);
  std::vector<float> sums(32*2048, 0.f);
  auto run=[&](auto f, const char* name, int T, int V){ long calls=1000000; double t=now();
    for(long i=0;i<calls;i++) f(sums.data()+ (i%8)*64, 2048, block+(i%2)*4, 32, words.data()+(i%5), 32);
    double dt=now()-t; printf("%s: %.1f ns/call, %.2f dp/ns\n", name, dt/calls*1e9, calls*32.0*T*V/dt/1e9);};
  run(add_block<6,4>, "6x4", 6, 4); run(add_block<3,4>, "3x4", 3, 4); run(add_block<2,4>, "2x4", 2, 4);
  run(add_block<1,8>, "1x8", 1, 8); run(add_block<4,6>, "4x6", 4, 6); run(add_block<6,4>, "6x4", 6, 4);
}
