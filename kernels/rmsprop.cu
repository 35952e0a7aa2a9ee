// Fused multi-tensor RMSprop step in CUDA C, loaded by the CuPy backend with cupy.RawModule.
//
// Same contract as kernels/rmsprop.py (rmsprop_gpu/abi.py; tables filled by rmsprop_gpu/backends/_tables.py):
//   tensors: int64 [T, ROW]   = p, g, square_avg, momentum_buffer, grad_avg, step (addresses; 0 = absent), numel,
//                               slot (bits 0-30) | step counter is float64 (bit 31) | random stream id (high 32)
//   blocks:  int64 [B]        = (tensor << 32) | chunk; CUDA block b updates chunk * RMSPROP_BLOCK .. + RMSPROP_BLOCK
//   hyper:   int64 [S, HYPER_ROW] = per slot (param group): lr address (LR_ON_DEVICE), then as float32 columns
//                               H_LR..H_SIGN: lr, alpha, 1 - alpha, eps, weight_decay, momentum, sign (-1: maximize);
//                               as uint32 column H_SEED: the stochastic-rounding seed
// Launch with 128 threads per block (16 elements each per chunk: the per-chunk set-up, table lookups and
// hyperparameters, is spread over twice as many elements as with 8), 64 with 8-bit state (32 each: two
// quantization blocks; rmsprop_gpu/abi.py: threads). Dtypes, momentum/centered and the option flags are template parameters:
// the loader instantiates one entry point per (layout, flags) with RMSPROP_KERNEL, so the hot loop tests no
// flag (as Triton's constexprs). FLAGS = RUNTIME_FLAGS reads them from the `flags` argument instead: the CPU
// test build (tests/cuda_cpu) uses that to cover every combination with one compilation of the same code.
// Hyperparameter values come from the hyper table, so one launch serves many param groups.
// Math is float32 with IEEE sqrt and division; 16-bit stores round to nearest even. State of type q8 (uint8
// tensors: state_bits=8) is decoded and encoded per block of 16 elements, one block per thread (q8_chunk).
//
// No #include: NVRTC wheels ship no CUDA headers, and the same text compiles on the CPU with g++ and the
// shim in tests/cuda_cpu/shim.h (which defines the CUDA built-ins this file uses).

typedef long long i64;
typedef unsigned int u32;
typedef unsigned short u16;

// RMSPROP_BLOCK, RMSPROP_THREADS, the flag bits (MAXIMIZE ... STOCHASTIC_ROUNDING, RUNTIME_FLAGS), the tensor
// table's columns (COL_*, ROW), the hyper table's (HYPER_ROW, H_*), SLOT_MASK and STEP_F64_BIT are generated from
// rmsprop_gpu/abi.py and put before this text by the loader (cupy_backend.kernel_source) and the CPU test build.

struct f16 { u16 bits; };
struct bf16 { u16 bits; };

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(bf16 x) { return __uint_as_float(((u32)x.bits) << 16); }
__device__ __forceinline__ float to_float(f16 x) {
#ifdef __CUDA_ARCH__
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
  return f;
#else
  return rmsprop_host_f16_to_f32(x.bits);
#endif
}

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ f16 from_float<f16>(float x) {
  f16 r;
#ifdef __CUDA_ARCH__
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(x));
#else
  r.bits = rmsprop_host_f32_to_f16(x);
#endif
  return r;
}
template <> __device__ __forceinline__ bf16 from_float<bf16>(float x) {
  bf16 r;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r.bits) : "f"(x));
#else
  u32 bits = __float_as_uint(x);
  r.bits = (x != x) ? (u16)0x7FC0 : (u16)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
#endif
  return r;
}

// 16-byte packets: every fast-path load and store is 128 bits wide.
template <typename T> struct Packet { static constexpr int N = 16 / sizeof(T); };

__device__ __forceinline__ void unpack(const uint4& r, float* out, float*) {
  out[0] = __uint_as_float(r.x); out[1] = __uint_as_float(r.y);
  out[2] = __uint_as_float(r.z); out[3] = __uint_as_float(r.w);
}
template <typename T> __device__ __forceinline__ void unpack(const uint4& r, float* out, T*) {
  const u32 w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    T lo, hi;
    lo.bits = (u16)(w[k] & 0xFFFFu);
    hi.bits = (u16)(w[k] >> 16);
    out[2 * k] = to_float(lo);
    out[2 * k + 1] = to_float(hi);
  }
}
__device__ __forceinline__ uint4 pack(const float* in, float*) {
  uint4 r;
  r.x = __float_as_uint(in[0]); r.y = __float_as_uint(in[1]);
  r.z = __float_as_uint(in[2]); r.w = __float_as_uint(in[3]);
  return r;
}
template <typename T> __device__ __forceinline__ uint4 pack(const float* in, T*) {
  u32 w[4];
#pragma unroll
  for (int k = 0; k < 4; ++k)
    w[k] = (u32)from_float<T>(in[2 * k]).bits | ((u32)from_float<T>(in[2 * k + 1]).bits << 16);
  uint4 r;
  r.x = w[0]; r.y = w[1]; r.z = w[2]; r.w = w[3];
  return r;
}

// Addresses come from the tensor table, so the compiler cannot tell they are global: say it explicitly
// (ld.global/st.global instead of generic ld/st).
__device__ __forceinline__ uint4 load_global_128(const void* ptr) {
#ifdef __CUDA_ARCH__
  uint4 r;
  asm volatile("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(ptr));
  return r;
#else
  return *reinterpret_cast<const uint4*>(ptr);
#endif
}
__device__ __forceinline__ void store_global_128(void* ptr, const uint4& r) {
#ifdef __CUDA_ARCH__
  asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};"
               :: "l"(ptr), "r"(r.x), "r"(r.y), "r"(r.z), "r"(r.w) : "memory");
#else
  *reinterpret_cast<uint4*>(ptr) = r;
#endif
}

template <typename T, int N> __device__ __forceinline__ void load_vec(const T* ptr, float (&out)[N]) {
#pragma unroll
  for (int k = 0; k < N / Packet<T>::N; ++k)
    unpack(load_global_128(ptr + k * Packet<T>::N), out + k * Packet<T>::N, (T*)0);
}
template <typename T, int N> __device__ __forceinline__ void store_vec(T* ptr, const float (&in)[N]) {
#pragma unroll
  for (int k = 0; k < N / Packet<T>::N; ++k)
    store_global_128(ptr + k * Packet<T>::N, pack(in + k * Packet<T>::N, (T*)0));
}

// PTX prmt, default mode: byte k of the result is byte (s >> 4k) & 7 of the 8 bytes y:x, or that byte's sign bit
// copied into all 8 bits when bit 3 of the nibble is set
__device__ __forceinline__ u32 prmt(u32 x, u32 y, u32 s) {
#ifdef __CUDA_ARCH__
  u32 r;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(x), "r"(y), "r"(s));
  return r;
#else
  const unsigned long long xy = ((unsigned long long)y << 32) | x;
  u32 r = 0;
  for (int k = 0; k < 4; ++k) {
    const u32 n = (s >> (4 * k)) & 15u, b = (u32)(xy >> (8 * (n & 7u))) & 0xFFu;
    r |= ((n & 8u) ? ((b & 0x80u) ? 0xFFu : 0u) : b) << (8 * k);
  }
  return r;
#endif
}
// two halves (bits 0..15, 16..31) to floats: one conversion each, the high half read in place
__device__ __forceinline__ void half2_to_float2(u32 h2, float& lo, float& hi) {
#ifdef __CUDA_ARCH__
  asm("{.reg .b16 l, h;\n\tmov.b32 {l, h}, %2;\n\tcvt.f32.f16 %0, l;\n\tcvt.f32.f16 %1, h;\n\t}"
      : "=f"(lo), "=f"(hi) : "r"(h2));
#else
  lo = rmsprop_host_f16_to_f32((u16)h2);
  hi = rmsprop_host_f16_to_f32((u16)(h2 >> 16));
#endif
}

// Stochastic rounding of 16-bit stores (STOCHASTIC_ROUNDING): x rounds up with probability equal to its distance
// from the value below, in units of the 16-bit spacing, so E[round(x)] = x. Each store takes 16 random bits from
// a counter-based hash: h = mix32(key ^ (element * 2 + pair)), key = stream_key(seed, step, the tensor's stream
// id: its position in the optimizer, from the table, so the same whatever launch it is in); pair 0 feeds p (low
// half) and square_avg (high half), pair 1 momentum_buffer and grad_avg. The same in kernels/rmsprop.py and the
// torch path (rmsprop_gpu/backends/torch_backend.py).
__device__ __forceinline__ u32 mix32(u32 x) {  // "lowbias32" integer hash
  x ^= x >> 16; x *= 0x7FEB352Du; x ^= x >> 15; x *= 0x846CA68Bu; x ^= x >> 16;
  return x;
}
// Out of line on the GPU: a branch around a call, where inlined ptxas predicates the rare path's instructions and
// every launch issues them.
#ifdef __CUDA_ARCH__
__device__ __noinline__ u32 mix32_rare(u32 x) { return mix32(x); }
#else
inline u32 mix32_rare(u32 x) { return mix32(x); }
#endif
__device__ __forceinline__ u32 stream_key(u32 seed, long long step, u32 stream) {
  const u32 key = mix32(seed ^ mix32((u32)step + 0x9E3779B9u * (stream + 1u)));
  const u32 hi = (u32)(step >> 32);  // past 2**32 steps (float64 counters): other streams, never a repeat
  return hi ? mix32_rare(key ^ hi) : key;
}
__device__ __forceinline__ u32 pair_bits(u32 key, i64 index, u32 pair) { return mix32(key ^ ((u32)index * 2u + pair)); }
// The hashes of an aligned group, elements i .. i + n - 1 with i a multiple of n (n = 16 or a packet): for
// low = 2k + pair < 2n, 2i has zeros where low has ones, so key ^ (2(i + k) + pair) = (key ^ 2i) ^ low, and
// low < 2^16 passes mix32's first xorshift untouched: that part is computed once per group. pre(low) is mix32
// without its last xorshift, which changes only the low half: the hash's high 16 bits are pre >> 16, its low 16
// bits (pre ^ pre >> 16) & 0xFFFF (hi16 / lo16).
struct HashGroup {
  u32 base;
  __device__ __forceinline__ HashGroup(u32 key, i64 i) {
    const u32 x = key ^ ((u32)i * 2u);
    base = x ^ (x >> 16);
  }
  __device__ __forceinline__ u32 pre(u32 low) const { return finish((base ^ low) * 0x7FEB352Du); }
  __device__ __forceinline__ u32 hash(u32 low) const { const u32 x = pre(low); return x ^ (x >> 16); }
  // pre(2k) and (PAIR1) pre(2k + 1) for k < 16 with one add each where pre takes an xor and a multiply: flipping
  // distinct bits of base adds +-2^bit for each (mod 2^32), so (base ^ low) * M = base * M + flip(bit) summed over
  // low's bits; y[k] from y[k without its lowest bit] (the same bits as pre)
  template <bool PAIR1> __device__ __forceinline__ void pre16(u32 (&p0)[16], u32 (&p1)[16]) const {
    u32 y[16];
    y[0] = base * 0x7FEB352Du;
#pragma unroll
    for (int k = 0; k < 16; ++k) {
      if (k) y[k] = y[k & (k - 1)] + flip((k & 1) ? 1 : (k & 2) ? 2 : (k & 4) ? 3 : 4);  // 2k's lowest bit
      p0[k] = finish(y[k]);
      p1[k] = PAIR1 ? finish(y[k] + flip(0)) : 0u;
    }
  }
  __device__ __forceinline__ u32 flip(int bit) const {  // ((base ^ 2^bit) - base) * M
    return ((1u << bit) - 2u * (base & (1u << bit))) * 0x7FEB352Du;
  }
  __device__ __forceinline__ static u32 finish(u32 y) {  // the rest of pre, from y = (base ^ low) * M
    const u32 x = y ^ (y >> 15);
    return x * 0x846CA68Bu;
  }
};
__device__ __forceinline__ u32 hi16(u32 pre) { return pre >> 16; }
__device__ __forceinline__ u32 lo16(u32 pre) { return (pre ^ (pre >> 16)) & 0xFFFFu; }

template <typename T> __device__ __forceinline__ T from_float_sr(float x, u32 r16);
template <> __device__ __forceinline__ bf16 from_float_sr<bf16>(float x, u32 r16) {
  const u32 bits = __float_as_uint(x);
  bf16 out;  // bf16 keeps the top 16 bits; a NaN stays a NaN (adding to its payload could carry into the sign)
  out.bits = (bits & 0x7FFFFFFFu) > 0x7F800000u ? (u16)0x7FC0 : (u16)((bits + r16) >> 16);
  return out;
}
// Without branches: every path is computed and selected (a branch per element would diverge within warps).
template <> __device__ __forceinline__ f16 from_float_sr<f16>(float x, u32 r16) {
  const u32 bits = __float_as_uint(x), mag = bits & 0x7FFFFFFFu, e = mag >> 23;
  // |x| >= 2^-24: drop the bits below the f16 spacing (13; up to 23 in f16's subnormal range), the random bits at
  // the top of the dropped field; a finite x never carries into the sign
  const int d = 126 - (int)e;
  const u32 drop = d < 13 ? 13u : (d > 23 ? 23u : (u32)d);
  const u32 big = ((bits + ((r16 << 16) >> (32u - drop))) >> drop) << drop;
  // below: 0 or 2^-24 (bits 0x33800000), up with probability |x| / 2^-24 (|x| * 2^40 and r16 are exact in float)
  const u32 tiny = (bits & 0x80000000u) | (__uint_as_float(mag) * 1099511627776.0f > (float)r16 ? 0x33800000u : 0u);
  const u32 y = mag >= 0x7F800000u ? bits : (e >= 103u ? big : tiny);  // inf, NaN as they are (cvt keeps them)
  return from_float<f16>(__uint_as_float(y));
}
// The short paths, for the values that need nothing else (whole 128-bit stores take them when all their values
// do; from_float_sr otherwise), two values to a packed word (lo in bits 0-15):
// - bf16, for all but NaN: the top 16 bits of bits + r16 (prmt takes both in one instruction).
// - f16, for 2^-14 <= |x| < 65504 (its normal range below the largest finite value; NaN is not): the 13 dropped
//   bits take the top 13 random bits (r16 >> 3) and are truncated, which cvt.rz does for two values in one
//   instruction (below 65504 nothing rounds up to inf).
template <typename T> __device__ __forceinline__ bool sr_short(float x);
template <> __device__ __forceinline__ bool sr_short<bf16>(float x) { return x == x; }
template <> __device__ __forceinline__ bool sr_short<f16>(float x) { return fabsf(x) >= 0x1p-14f && fabsf(x) < 65504.0f; }
template <typename T> __device__ __forceinline__ u32 sr_short_pair(float lo, float hi, u32 r16_lo, u32 r16_hi);
template <> __device__ __forceinline__ u32 sr_short_pair<bf16>(float lo, float hi, u32 r16_lo, u32 r16_hi) {
  return prmt(__float_as_uint(lo) + r16_lo, __float_as_uint(hi) + r16_hi, 0x7632u);
}
template <> __device__ __forceinline__ u32 sr_short_pair<f16>(float lo, float hi, u32 r16_lo, u32 r16_hi) {
  const float a = __uint_as_float(__float_as_uint(lo) + (r16_lo >> 3));
  const float b = __uint_as_float(__float_as_uint(hi) + (r16_hi >> 3));
#ifdef __CUDA_ARCH__
  u32 w;
  asm("cvt.rz.f16x2.f32 %0, %1, %2;" : "=r"(w) : "f"(b), "f"(a));  // the first source goes to the high half
  return w;
#else  // cvt.rz by hand: truncated, then exact, and past the largest finite value that value
  const auto rz = [](float y) {
    const float t = __uint_as_float((__float_as_uint(y) >> 13) << 13);
    return from_float<f16>(fabsf(t) > 65504.0f ? copysignf(65504.0f, t) : t).bits;
  };
  return (u32)rz(a) | ((u32)rz(b) << 16);
#endif
}
template <typename T>
__device__ __forceinline__ T store_value(float x, bool sr, u32 r16) {
  return sr ? from_float_sr<T>(x, r16) : from_float<T>(x);
}
template <> __device__ __forceinline__ float store_value<float>(float x, bool, u32) { return x; }
// N values in 128-bit stores; with sr, 16-bit ones rounded with random bits r16(e) for element e (16 bits each)
template <int N, typename Bits>
__device__ __forceinline__ void store_out(float* ptr, const float (&in)[N], bool, Bits) {
  store_vec(ptr, in);  // float32 stores are exact: nothing to round
}
// word(e): elements e and e + 1 packed
template <typename T, int N, typename Word>
__device__ __forceinline__ void store_words(T* ptr, Word word) {
#pragma unroll
  for (int k = 0; k < N / Packet<T>::N; ++k) {
    uint4 r;
    const int e = k * Packet<T>::N;
    r.x = word(e); r.y = word(e + 2); r.z = word(e + 4); r.w = word(e + 6);
    store_global_128(ptr + k * Packet<T>::N, r);
  }
}
template <typename T, int N, typename Bits>  // 16-bit T
__device__ __forceinline__ void store_out(T* ptr, const float (&in)[N], bool sr, Bits r16) {
  if (!sr) {
    store_vec(ptr, in);
    return;
  }
  bool short_path = true;  // one test and branch for the thread's N values
#pragma unroll
  for (int e = 0; e < N; ++e) short_path &= sr_short<T>(in[e]);
  if (short_path) {
    store_words<T, N>(ptr, [&](int e) { return sr_short_pair<T>(in[e], in[e + 1], r16(e), r16(e + 1)); });
    return;
  }
  store_words<T, N>(ptr, [&](int e) {
    return (u32)from_float_sr<T>(in[e], r16(e)).bits | ((u32)from_float_sr<T>(in[e + 1], r16(e + 1)).bits << 16);
  });
}

// 8-bit blockwise state (rmsprop_gpu/quantize.py has the format and the same codec in torch): one uint8 tensor
// per state = codes (numel rounded up to 16) then one scale exponent byte per block of 16 elements, the 16
// elements one thread owns here. square_avg stores sqrt(v) as unsigned E4M4 codes, momentum_buffer and grad_avg
// signed E4M3; a block's values are code * 2^(s - 127) (s = 255: the block held inf/NaN, it decodes to NaN).
struct q8 { unsigned char bits; };
template <typename T> struct is_f16 { static constexpr bool value = false; };
template <> struct is_f16<f16> { static constexpr bool value = true; };
template <typename T> struct is_q8 { static constexpr bool value = false; };
template <> struct is_q8<q8> { static constexpr bool value = true; };

#define Q8_TWO_M112 1.925929944387236e-34f  // 2^-112

__device__ __forceinline__ float q8_scale(u32 s) { return __uint_as_float(s << 23); }  // 2^(s-127); 0; inf
// Codes to float: a code's bits placed as a half's (E4M4 unsigned: exponent and mantissa at bits 13..6; E4M3
// signed: sign at 15, the rest at 13..7) are the code's value * 2^112 exactly, subnormal codes included, and the
// half -> float conversion is one instruction. Two codes per 32-bit operation: codes 0 and 2 of a word (bytes 0
// and 2) move into the halves of one register, codes 1 and 3 into another (7 operations per signed word, 4
// unsigned; the same in kernels/rmsprop.py: _q8_decode).
template <bool SIGNED> __device__ __forceinline__ void q8_decode_word(u32 w, float scale, float* out) {  // out[0..3]
  const u32 even = SIGNED ? ((w << 8) & 0x80008000u) | ((w << 7) & 0x3F803F80u) : (w << 6) & 0x3FC03FC0u;
  const u32 odd = SIGNED ? (w & 0x80008000u) | ((w >> 1) & 0x3F803F80u) : (w >> 2) & 0x3FC03FC0u;
  half2_to_float2(even, out[0], out[2]);
  half2_to_float2(odd, out[1], out[3]);
#pragma unroll
  for (int k = 0; k < 4; ++k) out[k] *= scale;
}
// |a| vs |b|, the larger; NaN if either is NaN (so a block holding NaN gets the NaN scale)
__device__ __forceinline__ float absmax_nan(float a, float b) {
#ifdef __CUDA_ARCH__
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(fabsf(a)), "f"(fabsf(b)));
  return r;
#else
  return (a != a || b != b) ? __uint_as_float(0x7FFFFFFFu) : fmaxf(fabsf(a), fabsf(b));
#endif
}
// max(x, 0) with NaN kept, one instruction (FSETP + FSEL as `x < 0 ? 0 : x`). -0 may come out +0 or -0: every
// use (a root, a denominator root + eps or var + eps, a code) gives the same bits for either.
__device__ __forceinline__ float clamp0_nan(float x) {
#ifdef __CUDA_ARCH__
  float r;
  asm("max.NaN.f32 %0, %1, 0f00000000;" : "=f"(r) : "f"(x));
  return r;
#else
  return x < 0.0f ? 0.0f : x;
#endif
}
// The block's scale exponent from its values: the largest magnitude (for floats >= 0, the order of their bits;
// inf and NaN are largest).
__device__ __forceinline__ u32 q8_block_scale(const float (&x)[16]) {
  float m8[8], m4[4];
#pragma unroll
  for (int k = 0; k < 8; ++k) m8[k] = absmax_nan(x[2 * k], x[2 * k + 1]);
#pragma unroll
  for (int k = 0; k < 4; ++k) m4[k] = absmax_nan(m8[2 * k], m8[2 * k + 1]);
  const u32 m = __float_as_uint(absmax_nan(absmax_nan(m4[0], m4[1]), absmax_nan(m4[2], m4[3])));
  if (m >= 0x7F800000u) return 255u;
  const u32 s = m >> 23;  // the maximum scales into [1, 2): the top binade of codes is used, re-encoding is exact
  return s < 1u ? 1u : (s > 253u ? 253u : s);
}
// Codes round stochastically: 16 random bits r added at the top of the dropped field (unsigned: 19 bits, signed:
// 20), an average that moves by less than half a code per step (v decaying by alpha) still moves in expectation;
// round to nearest would freeze it. (|y|'s bits + (r << SH)) >> (16 + SH) is ((|y|'s bits >> SH) + r) >> 16 (SH =
// 3 unsigned, 4 signed; nothing carries out of the dropped SH bits): the code is the high half of that sum, whose
// byte 2 a prmt packs, once saturated (3 or 4 mantissa bits).
// ONE_MUL: f = 2^(15 - s), else f = 2^(127 - s) and a second multiply by 2^-112 (see q8_store).
template <bool SIGNED, bool ONE_MUL>
__device__ __forceinline__ u32 q8_sum(float x, float f, u32 r) {
  const float y = ONE_MUL ? fabsf(x) * f : (fabsf(x) * f) * Q8_TWO_M112;  // |x * f|: the multiply's |.| is free
  return r + (__float_as_uint(y) >> (SIGNED ? 4 : 3));
}
// sm_90 saturates two codes with one min.u16x2; the CPU build takes that path too with -DRMSPROP_Q8_PAIR_MIN
// (tests/test_state_bits.py), else the other
#if defined(__CUDA_ARCH__) ? __CUDA_ARCH__ >= 900 : defined(RMSPROP_Q8_PAIR_MIN)
#define Q8_PAIR_MIN 1
#else
#define Q8_PAIR_MIN 0
#endif
__device__ __forceinline__ u32 min_u16x2(u32 a, u32 b) {
#ifdef __CUDA_ARCH__
  u32 r;
  asm("min.u16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  return r;
#else
  const u32 lo = (a & 0xFFFFu) < (b & 0xFFFFu) ? a & 0xFFFFu : b & 0xFFFFu;
  return (a >> 16 < b >> 16 ? a >> 16 : b >> 16) << 16 | lo;
#endif
}
// Four codes in a word (byte k: element k); signed: the sign of each value on top (bit 7 of its byte). keep: 0 for
// a block that held inf/NaN, whose codes are 0: its sums saturate at 0 and its signs are masked (no instruction of
// their own).
template <bool SIGNED, bool ONE_MUL>
__device__ __forceinline__ u32 q8_encode4(const float* x, float f, const u32* r, u32 keep) {
  constexpr u32 MAX = SIGNED ? 127u : 255u;
  u32 s[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) s[k] = q8_sum<SIGNED, ONE_MUL>(x[k], f, r[k]);
  u32 w;
  if (Q8_PAIR_MIN) {  // the high halves of two sums in one register, saturated together
    const u32 lo = min_u16x2(prmt(s[0], s[1], 0x7632u), MAX * 0x10001u & keep);
    const u32 hi = min_u16x2(prmt(s[2], s[3], 0x7632u), MAX * 0x10001u & keep);
    w = prmt(lo, hi, 0x6420u);
  } else {  // each sum saturated, then byte 2 of each
    const u32 limit = (MAX << 16 | 0xFFFFu) & keep;
#pragma unroll
    for (int k = 0; k < 4; ++k) s[k] = s[k] < limit ? s[k] : limit;  // a min
    w = prmt(prmt(s[0], s[1], 0x0062u), prmt(s[2], s[3], 0x0062u), 0x5410u);
  }
  if (!SIGNED) return w;
  const u32 b[4] = {__float_as_uint(x[0]), __float_as_uint(x[1]), __float_as_uint(x[2]), __float_as_uint(x[3])};
  const u32 signs = prmt(prmt(b[0], b[1], 0x00FBu), prmt(b[2], b[3], 0x00FBu), 0x5410u);  // 0xFF or 0 per byte
  return w | (signs & (0x80808080u & keep));
}
// One thread's block of 16 as loaded: its codes (one 128-bit access on the full path) and its scale byte. Loaded
// raw, decoded later, so that every load of the chunk is issued before the first wait.
struct Q8Raw { u32 w[4]; u32 s; };
template <bool FULL> __device__ __forceinline__ Q8Raw q8_load(const unsigned char* q, i64 n16, i64 i) {
  Q8Raw r;
  if (FULL) {
    const uint4 x = load_global_128(q + i);
    r.w[0] = x.x; r.w[1] = x.y; r.w[2] = x.z; r.w[3] = x.w;
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j)
      r.w[j] = (u32)q[i + 4 * j] | ((u32)q[i + 4 * j + 1] << 8) | ((u32)q[i + 4 * j + 2] << 16) |
               ((u32)q[i + 4 * j + 3] << 24);
  }
  r.s = q[n16 + (i >> 4)];
  return r;
}
template <bool SIGNED> __device__ __forceinline__ void q8_decode_block(const Q8Raw& r, float (&out)[16]) {
  const float scale = q8_scale(r.s);
#pragma unroll
  for (int j = 0; j < 4; ++j) q8_decode_word<SIGNED>(r.w[j], scale, out + 4 * j);
}
// A code is read from y = x * 2^(15 - s) rounded once (|x| * 2^(127 - s) < 2 is exact unless it underflows, and
// then y rounds to 0 either way). For s <= 164 2^(15 - s) is a float (subnormal from s = 142): one multiply
// (ONE_MUL). Larger s, values of 2^37 and more in the block (rare: the caller tests its blocks together), takes two.
__device__ __forceinline__ bool q8_one_mul(u32 s) { return s - 165u > 89u; }  // s <= 164 or 255 (codes masked)
template <bool SIGNED, bool FULL, bool ONE_MUL>
__device__ __forceinline__ void q8_store(unsigned char* q, i64 n16, i64 i, const float (&x)[16], u32 s,
                                         const u32 (&r)[16]) {
  // a block that held inf/NaN: codes 0 (scale 255). Masked, not tested: every path through the code encodes
  const u32 keep = ((s + 1u) >> 8) - 1u;  // 0 for s = 255, else all ones (q8_encode4)
  const float inv = __uint_as_float((254u - s) << 23);  // 2^(127 - s)
  const float f = ONE_MUL ? inv * Q8_TWO_M112 : inv;   // 2^(15 - s), exact while s <= 164
  u32 w[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) w[j] = q8_encode4<SIGNED, ONE_MUL>(x + 4 * j, f, r + 4 * j, keep);
  if (FULL) {
    uint4 out;  // (r: the random bits)
    out.x = w[0]; out.y = w[1]; out.z = w[2]; out.w = w[3];
    store_global_128(q + i, out);
  } else {
#pragma unroll
    for (int k = 0; k < 16; ++k) q[i + k] = (unsigned char)(w[k >> 2] >> (8 * (k & 3)));
  }
  q[n16 + (i >> 4)] = (unsigned char)s;
}

struct Hyper {
  float lr, alpha, one_minus_alpha, eps, weight_decay, momentum, sign, grad_scale, inv_bc;
  int flags;  // FLAGS, or the `flags` argument when FLAGS == RUNTIME_FLAGS
};

// One element of the update in two halves around the square root (the 8-bit chunk takes the roots and quotients
// of several elements together, sqrt_rn_all and div_rn_all); p, v, buf, ga are read and written in registers. h.flags is a compile-time
// constant unless the kernel reads its flags at run time, so each flag test below folds away.
// First half: g as the update uses it, the averages, and the value whose root the denominator takes.
// 8-bit state, centered: the clamp of var at 0 waits for sqrt_rn_all's slow path (which any negative var takes)
// when the root is of var itself, not of var + eps
__device__ __forceinline__ bool q8_clamp_at_root(const Hyper& h) { return !(h.flags & EPS_IN_SQRT); }
// Q8: 8-bit state, whose v and ga can cross: var clamped at 0 (NaN kept), here or by q8_clamp_at_root.
template <bool CENTERED, bool Q8 = false>
__device__ __forceinline__ float update_var(float& p, float& g, float& v, float& ga, const Hyper& h) {
  if (h.flags & GRAD_SCALE) g = __fdiv_rn(g, h.grad_scale);
  if (h.flags & MAXIMIZE) g = g * h.sign;  // per slot: -1 maximizes, +1 keeps g (exact either way)
  if ((h.flags & DECOUPLED_WD) && h.weight_decay != 0.0f) {
    p = p - (p * h.weight_decay) * h.lr;  // Keras: decoupled, before the update (per slot)
  } else if ((h.flags & WEIGHT_DECAY) && h.weight_decay != 0.0f) {
    g = g + h.weight_decay * p;  // per slot
  }
  v = h.alpha * v + (h.one_minus_alpha * g) * g;  // torch's addcmul order: g * g overflows above 1.8e19
  const bool bias = h.flags & BIAS_CORRECTION;  // optax: the averages / (1 - alpha^t)
  float var = bias ? v * h.inv_bc : v;
  if (CENTERED) {
    ga = ga + h.one_minus_alpha * (g - ga);
    const float avg = bias ? ga * h.inv_bc : ga;
    // torch's addcmul(value=-1) is an FMA: v = inf stays inf though avg^2 overflows. optax subtracts (clamped
    // below); 8-bit: an infinite average is a NaN block anyway
    var = (bias || Q8) ? var - avg * avg : fmaf(-avg, avg, var);
    // rounding at step 1 (optax then gives NaN), or 8-bit v and grad_avg crossing; NaN stays NaN
    if (Q8 ? !q8_clamp_at_root(h) : bias) var = clamp0_nan(var);
  }
  return (h.flags & EPS_IN_SQRT) ? var + h.eps : var;
}
// Second half, given root = sqrt.rn(what update_var returned): the denominator, the quotient's numerator (g, or
// fastai's buffer of raw grads, updated first), the quotient, and what it updates (update_quotient). The 8-bit
// chunk takes several elements' roots and quotients together (sqrt_rn_all, div_rn_all).
__device__ __forceinline__ float update_denom(float root, const Hyper& h) {
  return (h.flags & EPS_IN_SQRT) ? root : root + h.eps;
}
template <bool MOMENTUM> __device__ __forceinline__ float update_numerator(float g, float& buf, const Hyper& h) {
  if (MOMENTUM && (h.flags & RAW_GRAD_MOMENTUM)) {  // fastai: a momentum of raw grads, divided after
    buf = h.momentum * buf + g;
    return buf;
  }
  return g;
}
template <bool MOMENTUM> __device__ __forceinline__ void update_quotient(float& p, float& buf, float q, const Hyper& h) {
  if (MOMENTUM && (h.flags & RAW_GRAD_MOMENTUM)) {
    p = p - h.lr * q;
  } else if (MOMENTUM && (h.flags & LR_IN_MOMENTUM)) {  // TF1 / Keras / optax: the buffer accumulates lr * g / d
    const float step = h.lr * q;
    buf = h.momentum * buf + step;
    p = p - ((h.flags & NESTEROV) ? step + h.momentum * buf : buf);
  } else if (MOMENTUM) {
    buf = h.momentum * buf + q;
    p = p - h.lr * buf;
  } else {
    p = p - h.lr * q;
  }
}
template <bool MOMENTUM>
__device__ __forceinline__ void update_apply(float& p, float g, float& buf, float root, const Hyper& h) {
  const float n = update_numerator<MOMENTUM>(g, buf, h);
  update_quotient<MOMENTUM>(p, buf, __fdiv_rn(n, update_denom(root, h)), h);
}
template <bool MOMENTUM, bool CENTERED>
__device__ __forceinline__ void update(float& p, float g, float& v, float& buf, float& ga, const Hyper& h) {
  const float x = update_var<CENTERED>(p, g, v, ga, h);
  update_apply<MOMENTUM>(p, g, buf, __fsqrt_rn(x), h);
}

// sqrt.rn of N values with one range test for all: for x in [2^-101, the largest float] sqrt_rn_fast is the fast
// path ptxas emits for each sqrt.rn.f32 (MUFU.RSQ, then one correction with FMAs: correctly rounded there; rsqrt's
// ftz never applies, its input and every value after are normal), to which ptxas adds a test and a branch per
// value. The test admits [2^-96, 2^32) (bits 0x0F800000 .. 0x4F7FFFFF: a window of 2^30 bit patterns, so the
// offset bits of all N are ORed, one instruction per value where a max takes two); outside (0, subnormal, tiny,
// huge, inf, NaN, negative) any of the N takes sqrt.rn for all, of max(x, 0) with `clamp` (NaN stays NaN: the
// fast path's x is positive, so a caller's clamp of what it takes the root of can wait until here).
__device__ __forceinline__ float sqrt_rn_fast(float x) {
#ifdef __CUDA_ARCH__
  float y;
  asm("{\n\t.reg .f32 r, s, h, e;\n\t"
      "rsqrt.approx.ftz.f32 r, %1;\n\t"
      "mul.f32 s, %1, r;\n\t"
      "mul.f32 h, r, 0f3F000000;\n\t"
      "neg.f32 e, s;\n\t"
      "fma.rn.f32 e, e, s, %1;\n\t"
      "fma.rn.f32 %0, e, h, s;\n\t}"
      : "=f"(y) : "f"(x));
  return y;
#else
  return __fsqrt_rn(x);
#endif
}
// Returns whether any took the slow path (else every root is in [2^-48, 2^16)).
template <int N> __device__ __forceinline__ bool sqrt_rn_all(const float* x, float* root, bool clamp = false) {
  u32 out = 0u;  // x's bits - 2^-96's, ORed: below 2^30 while every x is in the window
#pragma unroll
  for (int k = 0; k < N; ++k) {
    out |= __float_as_uint(x[k]) - 0x0F800000u;
    root[k] = sqrt_rn_fast(x[k]);
  }
  const bool slow = out >= 0x40000000u;
  if (slow) {
#pragma unroll
    for (int k = 0; k < N; ++k) root[k] = __fsqrt_rn(clamp ? clamp0_nan(x[k]) : x[k]);
  }
  return slow;
}

// n / d rounded to nearest (div.rn) by the fast path ptxas emits for each div.rn.f32 after its check (FCHK) that
// every intermediate stays a normal float, where the path is correctly rounded: MUFU.RCP, one Newton step for the
// reciprocal, the quotient, its exact remainder, one correction (tests/test_fast_paths.py runs this text with
// exact arithmetic). The remainder is taken negated, d * y - n, so that n = -0 gives -0 as div.rn does (n - d * y
// is +0 for either zero; for every other n the two are exact negations).
__device__ __forceinline__ float div_rn_fast(float n, float d) {
#ifdef __CUDA_ARCH__
  float q;
  asm("{\n\t.reg .f32 r, e, y, t;\n\t"
      "rcp.approx.ftz.f32 r, %2;\n\t"
      "neg.f32 t, %2;\n\t"
      "fma.rn.f32 e, t, r, 0f3F800000;\n\t"
      "fma.rn.f32 r, r, e, r;\n\t"
      "mul.rn.f32 y, %1, r;\n\t"
      "neg.f32 t, %1;\n\t"
      "fma.rn.f32 e, %2, y, t;\n\t"
      "neg.f32 e, e;\n\t"
      "fma.rn.f32 %0, e, r, y;\n\t}"
      : "=f"(q) : "f"(n), "f"(d));
  return q;
#else
  return __fdiv_rn(n, d);
#endif
}
// div.rn of N values with one range test and branch for all (ptxas: a check and a branch per value), as
// sqrt_rn_all. The range that keeps div_rn_fast's intermediates normal: d in [2^-51, 1.5 * 2^64] (the caller's:
// roots from sqrt_rn_all's fast path plus an eps in [0, 2^63]; else it passes slow) and n 0 or in +-[2^-60, 2^68),
// tested here as a window of 2^31 patterns of 2|n|'s bits (as sqrt_rn_all's) unless the caller knows: test_n
// false for an fp16 grad as loaded (times +-1), whose magnitude is 0 or in [2^-24, 65504] but inf/NaN, and then
// the variance is inf/NaN too (v holds ((1 - alpha) * g) * g) and sqrt_rn_all passed slow. The quotient is then 0 or
// in [2^-124, 2^116], the remainder 0 or above 2^-84. Anything else (0, tiny, huge, inf or NaN n) takes div.rn
// for all N.
template <int N>
__device__ __forceinline__ void div_rn_all(const float* n, const float* d, float* q, bool slow, bool test_n) {
  u32 out = 0u;  // 2|n|'s bits - 2^-60's, ORed: below 2^31 while every |n| is in the window (0 wraps around)
#pragma unroll
  for (int k = 0; k < N; ++k) {
    out |= __float_as_uint(n[k]) * 2u - 0x43000000u;
    q[k] = div_rn_fast(n[k], d[k]);
  }
  if (slow || (test_n && out >= 0x80000000u)) {
#pragma unroll
    for (int k = 0; k < N; ++k) q[k] = __fdiv_rn(n[k], d[k]);
  }
}
// The 8-bit chunk's roots and quotients, 8 at a time: 16 at once costs ptxas more registers (fewer warps, or loads
// after the first use), one at a time a branch each.
constexpr int SQRT_GROUP = 8;

// The three states' codes: square_avg from the high half of pair 0, momentum_buffer the low and grad_avg the high
// half of pair 1 (pre: the hashes before their last xorshift; a low half reuses its high half's shift).
template <bool MOMENTUM, bool CENTERED, bool FULL, bool ONE_MUL>
__device__ __forceinline__ void q8_store_all(unsigned char* v, unsigned char* b, unsigned char* a, i64 n16, i64 i,
                                             const float (&root)[16], const float (&bv)[16], const float (&av)[16],
                                             u32 sv, u32 sb, u32 sa, const u32 (&pre1)[16], const u32 (&pre0)[16]) {
  u32 r[16];
#pragma unroll
  for (int k = 0; k < 16; ++k) r[k] = hi16(pre0[k]);
  q8_store<false, FULL, ONE_MUL>(v, n16, i, root, sv, r);
  if (MOMENTUM) {
#pragma unroll
    for (int k = 0; k < 16; ++k) r[k] = lo16(pre1[k]);
    q8_store<true, FULL, ONE_MUL>(b, n16, i, bv, sb, r);
  }
  if (CENTERED) {
#pragma unroll
    for (int k = 0; k < 16; ++k) r[k] = hi16(pre1[k]);
    q8_store<true, FULL, ONE_MUL>(a, n16, i, av, sa, r);
  }
}

// The chunk with 8-bit state: thread t owns elements i = start + 16t .. i + 15 of it, one quantization block (so
// a block's maximum needs no other thread). Decode, the float32 update, encode with the block's new scale,
// store. FULL: the whole chunk is in bounds and 16-byte aligned (128-bit accesses, no bounds tests).
template <typename P, bool MOMENTUM, bool CENTERED, bool FULL>
__device__ __forceinline__ void q8_chunk(unsigned char* v, unsigned char* b, unsigned char* a, P* p, const P* g,
                                         i64 numel, i64 i, const Hyper& h, bool sr, u32 key) {
  const i64 n16 = (numel + 15) & ~(i64)15;
  float pv[16], gv[16], vv[16], bv[16], av[16];
  // p and g first, then the codes: ptxas then keeps every load ahead of the first use with fewer registers
  if (FULL) {
    load_vec(p + i, pv);
    load_vec(g + i, gv);
  } else {
#pragma unroll
    for (int k = 0; k < 16; ++k) {
      pv[k] = i + k < numel ? to_float(p[i + k]) : 0.0f;
      gv[k] = i + k < numel ? to_float(g[i + k]) : 0.0f;
    }
  }
  const Q8Raw vr = q8_load<FULL>(v, n16, i);
  Q8Raw br = vr, ar = vr;
  if (MOMENTUM) br = q8_load<FULL>(b, n16, i);
  if (CENTERED) ar = q8_load<FULL>(a, n16, i);
  q8_decode_block<false>(vr, vv);
  if (MOMENTUM) q8_decode_block<true>(br, bv);
  if (CENTERED) q8_decode_block<true>(ar, av);
  const HashGroup hg(key, i);
  // without bias correction and eps inside the root, the root the update divides by is the stored one
  const bool same_root = !(h.flags & (BIAS_CORRECTION | EPS_IN_SQRT));
  // denominators from fast-path roots stay in div_rn_all's range (NaN eps fails the test)
  const bool eps_ok = h.eps >= 0.0f && h.eps <= 0x1p63f;
  // the quotients' numerators are fp16 grads as loaded (times +-1): div_rn_all need not test them
  const bool n_f16 = is_f16<P>::value && !(h.flags & (GRAD_SCALE | WEIGHT_DECAY)) &&
                     !(MOMENTUM && (h.flags & RAW_GRAD_MOMENTUM));
  float root[16];
  u32 pre0[16], pre1[16];  // random bits: p (low half, with sr) and square_avg; momentum_buffer and grad_avg
#pragma unroll
  for (int k0 = 0; k0 < 16; k0 += SQRT_GROUP) {  // SQRT_GROUP elements' roots and quotients at a time
    float x[SQRT_GROUP], sx[SQRT_GROUP], kept[SQRT_GROUP];
#pragma unroll
    for (int j = 0; j < SQRT_GROUP; ++j) {
      const int k = k0 + j;
      // square_avg stores sqrt(v), centered sqrt(v - ga^2): the variance itself, so its quantization error is
      // relative to the variance, not to v (v - ga^2 cancels where grads are steady)
      vv[k] = vv[k] * vv[k];
      if (CENTERED) vv[k] = vv[k] + av[k] * av[k];
      x[j] = update_var<CENTERED, true>(pv[k], gv[k], vv[k], av[k], h);
      kept[j] = CENTERED ? clamp0_nan(vv[k] - av[k] * av[k]) : vv[k];
    }
    const bool slow_root = sqrt_rn_all<SQRT_GROUP>(x, sx, CENTERED && q8_clamp_at_root(h));
    if (same_root) {
#pragma unroll
      for (int j = 0; j < SQRT_GROUP; ++j) root[k0 + j] = sx[j];
    } else {
      sqrt_rn_all<SQRT_GROUP>(kept, root + k0);
    }
    // one test for the quotients too (their own branch: merged with the roots', ptxas moved loads after the
    // first use in several variants)
    float n[SQRT_GROUP], d[SQRT_GROUP], q[SQRT_GROUP];
#pragma unroll
    for (int j = 0; j < SQRT_GROUP; ++j) {
      n[j] = update_numerator<MOMENTUM>(gv[k0 + j], bv[k0 + j], h);
      d[j] = update_denom(sx[j], h);
    }
    div_rn_all<SQRT_GROUP>(n, d, q, slow_root || !eps_ok, !n_f16);
#pragma unroll
    for (int j = 0; j < SQRT_GROUP; ++j) update_quotient<MOMENTUM>(pv[k0 + j], bv[k0 + j], q[j], h);
  }
#pragma unroll
  for (int k = 0; k < 16; ++k) {
    if (!FULL && i + k >= numel) root[k] = bv[k] = av[k] = 0.0f;  // padding encodes as 0
  }
  hg.pre16<MOMENTUM || CENTERED>(pre0, pre1);
  const u32 sv = q8_block_scale(root), sb = MOMENTUM ? q8_block_scale(bv) : 1u, sa = CENTERED ? q8_block_scale(av) : 1u;
  if (q8_one_mul(sv) && q8_one_mul(sb) && q8_one_mul(sa))
    q8_store_all<MOMENTUM, CENTERED, FULL, true>(v, b, a, n16, i, root, bv, av, sv, sb, sa, pre1, pre0);
  else
    q8_store_all<MOMENTUM, CENTERED, FULL, false>(v, b, a, n16, i, root, bv, av, sv, sb, sa, pre1, pre0);
  if (FULL) {
    store_out(p + i, pv, sr, [&](int k) { return lo16(pre0[k]); });
  } else {
#pragma unroll
    for (int k = 0; k < 16; ++k)
      if (i + k < numel) p[i + k] = store_value<P>(pv[k], sr, lo16(pre0[k]));
  }
}

#define RMSPROP_PARAMS                                                                                    \
  const i64 *tensors, const i64 *blocks, const i64 *hyper, const float *grad_scale_ptr, const float *found_inf_ptr, \
      int flags
#define RMSPROP_ARGS tensors, blocks, hyper, grad_scale_ptr, found_inf_ptr, flags

template <typename P, typename S, bool MOMENTUM, bool CENTERED, int FLAGS>
__device__ __forceinline__ void rmsprop_block(RMSPROP_PARAMS) {
  const int f = FLAGS == RUNTIME_FLAGS ? flags : FLAGS;
  if ((f & FOUND_INF) && *found_inf_ptr != 0.0f) return;  // GradScaler's skip: write nothing
  const i64 info = blocks[blockIdx.x];
  const i64* row = tensors + (info >> 32) * ROW;
  const i64 chunk = info & 0xFFFFFFFFll;
  P* p = (P*)row[COL_P];
  const P* g = (const P*)row[COL_G];
  S* v = (S*)row[COL_V];
  S* b = MOMENTUM ? (S*)row[COL_BUF] : nullptr;
  S* a = CENTERED ? (S*)row[COL_GRAD_AVG] : nullptr;
  float* step = (float*)row[COL_STEP];
  const i64 numel = row[COL_NUMEL];
  // bits 0-30: the slot; bit 31: the step counter is float64 (it counts exactly past 2**24); high 32: the stream id
  const i64* slot = hyper + (row[COL_SLOT] & SLOT_MASK) * HYPER_ROW;
  const float* hv = (const float*)slot;  // the slot's float32 columns
  Hyper h = {(f & LR_ON_DEVICE) ? *(const float*)slot[0] : hv[H_LR], hv[H_ALPHA], hv[H_ONE_MINUS_ALPHA], hv[H_EPS],
             hv[H_WEIGHT_DECAY], hv[H_MOMENTUM], hv[H_SIGN],
             (f & GRAD_SCALE) ? *grad_scale_ptr : 1.0f, 1.0f, f};
  const bool sr = f & STOCHASTIC_ROUNDING;
  // the random stream of this tensor at this step: 16-bit stores with sr, 8-bit codes always (the host advances
  // the counter after the launch)
  const bool reads_step = sr || is_q8<S>::value || (f & BIAS_CORRECTION);
  const long long count = !reads_step ? 0 : ((row[COL_SLOT] >> STEP_F64_BIT) & 1) ? (long long)*(const double*)step
                                                                 : (long long)*step;
  const u32 key = (sr || is_q8<S>::value) ? stream_key(((const u32*)slot)[H_SEED], count, (u32)(row[COL_SLOT] >> 32)) : 0u;
  if (f & BIAS_CORRECTION) {  // 1 / (1 - alpha^t), t = this step's count (the host advances it after)
    // past 2**30, alpha^t < 2**-90 for every float32 alpha < 1: 1 - alpha^t rounds to 1 as for the true t
    int e = (int)(count < (1ll << 30) ? count + 1 : (1ll << 30));
    float base = h.alpha, acc = 1.0f;
    for (; e > 0; e >>= 1, base *= base)  // alpha^t by squaring: log2(t) multiplications
      if (e & 1) acc *= base;
    h.inv_bc = __fdiv_rn(1.0f, 1.0f - acc);
  }
  const i64 start = chunk * RMSPROP_BLOCK;  // int64 offsets: tensors beyond 2**31 elements are fine
  const bool aligned = (((i64)p | (i64)g | (i64)v | (i64)b | (i64)a) & 15) == 0;

  if constexpr (is_q8<S>::value) {
    // RMSPROP_Q8_THREADS threads: each takes Q8_BLOCKS quantization blocks, a warp's 32 blocks side by side
    constexpr int Q8_BLOCKS = RMSPROP_BLOCK / (RMSPROP_Q8_THREADS * 16);
    const bool full = aligned && numel - start >= RMSPROP_BLOCK;
#pragma unroll
    for (int j = 0; j < Q8_BLOCKS; ++j) {
      const i64 i = start + ((i64)j * RMSPROP_Q8_THREADS + threadIdx.x) * 16;
      if (full)
        q8_chunk<P, MOMENTUM, CENTERED, true>((unsigned char*)v, (unsigned char*)b, (unsigned char*)a, p, g, numel,
                                              i, h, sr, key);
      else if (i < numel)
        q8_chunk<P, MOMENTUM, CENTERED, false>((unsigned char*)v, (unsigned char*)b, (unsigned char*)a, p, g, numel,
                                               i, h, sr, key);
    }
  } else {
  // Fast path: every load of the chunk is issued before any math (one memory wave), then all stores.
  constexpr int VEC = Packet<P>::N;  // 4 floats or 8 halves: one 128-bit packet of p and g per step
  constexpr int ITERS = RMSPROP_BLOCK / (RMSPROP_THREADS * VEC);
  if (aligned && numel - start >= RMSPROP_BLOCK) {
    float pv[ITERS][VEC], gv[ITERS][VEC], vv[ITERS][VEC], bv[ITERS][VEC], av[ITERS][VEC];
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const i64 i = start + (i64)(it * RMSPROP_THREADS + (int)threadIdx.x) * VEC;
      load_vec(p + i, pv[it]);
      load_vec(g + i, gv[it]);
      load_vec(v + i, vv[it]);
      if (MOMENTUM) load_vec(b + i, bv[it]);
      if (CENTERED) load_vec(a + i, av[it]);
    }
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) update<MOMENTUM, CENTERED>(pv[it][k], gv[it][k], vv[it][k], bv[it][k], av[it][k], h);
    }
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const i64 i = start + (i64)(it * RMSPROP_THREADS + (int)threadIdx.x) * VEC;
      u32 h0[VEC], h1[VEC];  // random bits (unused ones are never computed)
      const HashGroup hg(key, i);  // i is a multiple of VEC
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        h0[k] = sr ? hg.hash(2u * k) : 0u;
        h1[k] = sr ? hg.hash(2u * k + 1u) : 0u;
      }
      store_out(p + i, pv[it], sr, [&](int k) { return h0[k] & 0xFFFFu; });
      store_out(v + i, vv[it], sr, [&](int k) { return h0[k] >> 16; });
      if (MOMENTUM) store_out(b + i, bv[it], sr, [&](int k) { return h1[k] & 0xFFFFu; });
      if (CENTERED) store_out(a + i, av[it], sr, [&](int k) { return h1[k] >> 16; });
    }
  } else {
    const i64 end = start + RMSPROP_BLOCK < numel ? start + RMSPROP_BLOCK : numel;
    for (i64 i = start + threadIdx.x; i < end; i += RMSPROP_THREADS) {
      float pi = to_float(p[i]), vi = to_float(v[i]);
      float bi = MOMENTUM ? to_float(b[i]) : 0.0f;
      float ai = CENTERED ? to_float(a[i]) : 0.0f;
      update<MOMENTUM, CENTERED>(pi, to_float(g[i]), vi, bi, ai, h);
      const u32 h0 = sr ? pair_bits(key, i, 0u) : 0u, h1 = sr ? pair_bits(key, i, 1u) : 0u;
      p[i] = store_value<P>(pi, sr, h0 & 0xFFFFu);
      v[i] = store_value<S>(vi, sr, h0 >> 16);
      if (MOMENTUM) b[i] = store_value<S>(bi, sr, h1 & 0xFFFFu);
      if (CENTERED) a[i] = store_value<S>(ai, sr, h1 >> 16);
    }
  }
  }
  // with bias correction, stochastic rounding or 8-bit state the kernel reads the counter; the host advances it
  if (chunk == 0 && step != 0 && threadIdx.x == 0 && !(f & (BIAS_CORRECTION | STOCHASTIC_ROUNDING)) &&
      !is_q8<S>::value)
    *step += 1.0f;
}

// The entry point the loader appends for one (layout, flags): RMSPROP_KERNEL(name, P, S, momentum, centered, flags),
// launched with RMSPROP_THREADS threads, or RMSPROP_Q8_THREADS with 8-bit state (rmsprop_gpu/abi.py: threads).
// The minimum of 1 block per SM (.minnctapersm 1) changes nothing the launch needs but ptxas's register choice:
// more registers, fewer instructions (every variant: up to 1.4 points less of an H200's issue slots in the
// static report), and still 12 warps or more per SM.
#define RMSPROP_KERNEL(NAME, P, S, MOM, CEN, FLAGS)                                                                 \
  extern "C" __global__ void __launch_bounds__(is_q8<S>::value ? RMSPROP_Q8_THREADS : RMSPROP_THREADS, 1)        \
      NAME(RMSPROP_PARAMS) {                                                                                        \
    rmsprop_block<P, S, MOM, CEN, FLAGS>(RMSPROP_ARGS);                                                             \
  }

// Every layout: (name, param type, state type, momentum, centered). The CPU test build instantiates each with
// RUNTIME_FLAGS; the static report instantiates each with chosen flags.
#define RMSPROP_LAYOUTS(X, MOM, CEN, SUFFIX)        \
  X(rmsprop_f32_f32##SUFFIX, float, float, MOM, CEN) \
  X(rmsprop_f16_f16##SUFFIX, f16, f16, MOM, CEN)     \
  X(rmsprop_f16_f32##SUFFIX, f16, float, MOM, CEN)   \
  X(rmsprop_bf16_bf16##SUFFIX, bf16, bf16, MOM, CEN) \
  X(rmsprop_bf16_f32##SUFFIX, bf16, float, MOM, CEN)
#define RMSPROP_Q8_LAYOUTS(X, MOM, CEN, SUFFIX) \
  X(rmsprop_f32_q8##SUFFIX, float, q8, MOM, CEN)  \
  X(rmsprop_f16_q8##SUFFIX, f16, q8, MOM, CEN)    \
  X(rmsprop_bf16_q8##SUFFIX, bf16, q8, MOM, CEN)
#define RMSPROP_ALL_LAYOUTS(X, MOM, CEN, SUFFIX) RMSPROP_LAYOUTS(X, MOM, CEN, SUFFIX) RMSPROP_Q8_LAYOUTS(X, MOM, CEN, SUFFIX)
#define RMSPROP_ENTRY_POINTS(X)          \
  RMSPROP_ALL_LAYOUTS(X, false, false, _plain) \
  RMSPROP_ALL_LAYOUTS(X, true, false, _momentum) \
  RMSPROP_ALL_LAYOUTS(X, false, true, _centered) \
  RMSPROP_ALL_LAYOUTS(X, true, true, _centered_momentum)
