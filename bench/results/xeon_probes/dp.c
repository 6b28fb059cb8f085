// 12 independent chains of vdpbf16ps, then of vfmadd231ps, on zmm registers: gcc -O2 -march=native dp.c && ./a.out
#include <immintrin.h>
#include <stdio.h>
#include <time.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
#define R12(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
int main(){
#define D(k) __m512 a##k=_mm512_setzero_ps();
  R12(D)
  __m512bh a=(__m512bh)_mm512_set1_epi32(0x3f803f80), b=(__m512bh)_mm512_set1_epi32(0x3f803f80);
  long n=200000000; double t=now();
  for(long i=0;i<n;i++){
#define S(k) a##k=_mm512_dpbf16_ps(a##k,a,b);
    R12(S) __asm__ volatile("" : "+v"(a)); }
  double dt=now()-t;
#define P(k) s+=_mm512_reduce_add_ps(a##k);
  float s=0; R12(P)
  printf("dpbf16: %.2f per ns (%.1f GMAC/s) %f\n", n*12/dt/1e9, n*12*32/dt/1e9, s);
  __m512 x=_mm512_set1_ps(1.0f);
#define Z(k) a##k=_mm512_setzero_ps();
  R12(Z)
  t=now();
  for(long i=0;i<n;i++){
#define F(k) a##k=_mm512_fmadd_ps(a##k,x,x);
    R12(F) __asm__ volatile("" : "+v"(x)); }
  dt=now()-t; s=0; R12(P)
  printf("fma512: %.2f per ns (%.1f GMAC/s) %f\n", n*12/dt/1e9, n*12*16/dt/1e9, s);
}
