// add_block's loop shape: per pair, 4 weight vectors loaded and 2 tokens' words (8 chains of sums). XEXPR / YEXPR (the
// words: broadcast from words[], or a constant) and PEXPR (j * stride) are filled in with -D, as output.txt names the
// two variants; run as ./a.out 8 32 (pairs 8 vectors apart, words 32 apart, as in the kernel).
#include <immintrin.h>
#include <stdio.h>
#include <time.h>
#include <stdint.h>
#include <stdlib.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
int main(int argc,char**argv){
  int stride=atoi(argv[1]), wstride=atoi(argv[2]);
  static __m512i blk[32*16] __attribute__((aligned(64))); for(int i=0;i<32*16;i++) blk[i]=_mm512_set1_epi32(0x3f803f80);
  static uint32_t words[32*64]; for(int i=0;i<32*64;i++) words[i]=0x3f803f80;
  __m512 a0=_mm512_setzero_ps(),a1=a0,a2=a0,a3=a0,c0=a0,c1=a0,c2=a0,c3=a0;
  long n=20000000; double t=now();
  for(long i=0;i<n;i++){
    for(int j=0;j<32;j++){
      const __m512i* p=blk+PEXPR;
      __m512bh w0=(__m512bh)p[0],w1=(__m512bh)p[1],w2=(__m512bh)p[2],w3=(__m512bh)p[3];
      __m512bh x=XEXPR;
      a0=_mm512_dpbf16_ps(a0,x,w0);a1=_mm512_dpbf16_ps(a1,x,w1);a2=_mm512_dpbf16_ps(a2,x,w2);a3=_mm512_dpbf16_ps(a3,x,w3);
      __m512bh y=YEXPR;
      c0=_mm512_dpbf16_ps(c0,y,w0);c1=_mm512_dpbf16_ps(c1,y,w1);c2=_mm512_dpbf16_ps(c2,y,w2);c3=_mm512_dpbf16_ps(c3,y,w3);
    }
  }
  double dt=now()-t;
  float s=_mm512_reduce_add_ps(a0+a1+a2+a3+c0+c1+c2+c3);
  printf("stride %d wstride %d: %.2f dp/ns  %g\n", stride, wstride, n*32.0*8/dt/1e9, s);
}
