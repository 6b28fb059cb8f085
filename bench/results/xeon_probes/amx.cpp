// tdpbf16ps on tiles in registers; with its B tile loaded (rows 512 bytes apart, from L2); and as amx_block runs it
// (4 tiles of sums loaded and stored once per 8 products). g++ -O2 -march=native amx.cpp && ./a.out
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <cstdio>
#include <cstdint>
#include <ctime>
#include <vector>
#include <cstring>
static double now(){timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
struct alignas(64) Cfg { uint8_t palette=1, start_row=0, r[14]={}; uint16_t colsb[16]={}; uint8_t rows[16]={}; };
int main(){
  if (syscall(SYS_arch_prctl, 0x1023, 18)) { puts("no amx"); return 1; }
  Cfg c; for(int i=0;i<8;i++){c.colsb[i]=64;c.rows[i]=16;} _tile_loadconfig(&c);
  static char A[16*512] __attribute__((aligned(64))), B[600*1024] __attribute__((aligned(64))), C[16*4160] __attribute__((aligned(64)));
  memset(A,0,sizeof A); memset(B,0,sizeof B); memset(C,0,sizeof C);
  long n=2000000; double t=now();
  for(long i=0;i<n;i++){ _tile_dpbf16ps(0,4,5); _tile_dpbf16ps(1,4,6); _tile_dpbf16ps(2,4,5); _tile_dpbf16ps(3,4,6);}
  double dt=now()-t; printf("tdp regs only: %.1f cycles@3GHz per tdp, %.0f GMAC/s\n", dt/(4*n)*3e9, 4.0*n*16*16*32/dt/1e9);
  t=now();
  for(long i=0;i<n;i++){ const char* b=B+(i%64)*16*512; _tile_loadd(5,b,512); _tile_dpbf16ps(0,4,5); _tile_loadd(6,b+64,512); _tile_dpbf16ps(1,4,6); _tile_loadd(5,b+128,512); _tile_dpbf16ps(2,4,5); _tile_loadd(6,b+192,512); _tile_dpbf16ps(3,4,6);}
  dt=now()-t; printf("tdp + B load (L2): %.1f cycles per tdp, %.0f GMAC/s\n", dt/(4*n)*3e9, 4.0*n*16*16*32/dt/1e9);
  t=now();
  for(long i=0;i<n/8;i++){ char* cc=C+(i%16)*256; _tile_loadd(0,cc,4160); _tile_loadd(1,cc+64,4160); _tile_loadd(2,cc+128,4160); _tile_loadd(3,cc+192,4160);
    for(int k=0;k<8;k++){ const char* b=B+((i*8+k)%64)*16*512; _tile_loadd(4,A+k*64,512); _tile_loadd(5,b,512); _tile_dpbf16ps(0,4,5); _tile_loadd(6,b+64,512); _tile_dpbf16ps(1,4,6); _tile_loadd(5,b+128,512); _tile_dpbf16ps(2,4,5); _tile_loadd(6,b+192,512); _tile_dpbf16ps(3,4,6);}
    _tile_stored(0,cc,4160); _tile_stored(1,cc+64,4160); _tile_stored(2,cc+128,4160); _tile_stored(3,cc+192,4160);}
  dt=now()-t; printf("amx_block-like: %.1f cycles per tdp, %.0f GMAC/s\n", dt/(4*n)*3e9, 4.0*n*16*16*32/dt/1e9);
  _tile_release();
}
