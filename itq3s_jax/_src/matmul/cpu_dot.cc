// Quantized weights x rotated activations on the CPU, decoded inside the product (XLA FFI
// handlers, one per byte layout: itq3_t, and IQ3_S for iq3_s and itq3_s).
//
// y[m, r] = sum over the row's blocks c and values i of zhat[r, c, i] * xr[m, coded_start + c n + i]
// where zhat is the coding-domain value of docs/FORMAT.md (itq3_t: Delta_b * q_i, section 3;
// IQ3_S: (fp32(d) * (1 + 2 s)) * grid * sign) and xr the activations already rotated by the
// format's forward transform (matmul/native.py does that in XLA). The decoded values are the same
// float32 numbers the XLA decoders produce, rounded in the same order; only the order of the
// float32 sums differs.
//
// Why a native kernel: XLA:CPU cannot fuse the trit decode into a dot, so the XLA path writes
// every decoded weight to memory and reads it back (benchmarks/layer_profile.py); here each
// 256-block is decoded into an L1-resident buffer and consumed at once.
//
// Built at first use by matmul/native.py with the machine's C++ compiler (-O3 -march=native)
// against the installed jaxlib's FFI headers; AVX2 + FMA code where the compiler targets them,
// portable scalar code otherwise.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define ITQ3S_AVX2 1
#endif

namespace ffi = xla::ffi;

namespace {

// u_k = t_k + 1 of the five trits of a TQ1_0 byte b: ((b * 3^k mod 256) * 3) >> 8. Eight bytes
// per entry so the expansion copies whole words (the last three are zero).
struct TritTable {
  alignas(64) uint8_t u[256][8];
  TritTable() {
    static const int kPow3[5] = {1, 3, 9, 27, 81};
    for (int b = 0; b < 256; ++b) {
      for (int k = 0; k < 8; ++k) u[b][k] = 0;
      for (int k = 0; k < 5; ++k) u[b][k] = static_cast<uint8_t>((((b * kPow3[k]) & 255) * 3) >> 8);
    }
  }
};
const TritTable kTrits;

// One row of the plan: a run of `count` blocks of `n` values (docs/FORMAT.md section 1).
struct Segment {
  int32_t n, count, nbytes, byte_start, coded_start;
};

struct Problem {
  const float* xr;       // (m, kp)
  const uint8_t* data;   // (rows, row_nbytes)
  const Segment* segs;
  int n_segs;
  const float* table;    // the decoder's constants
  float* y;              // (m, rows)
  int64_t m, kp, rows, row_nbytes;
};

constexpr int kMaxN = 256;
constexpr int kSub = 16;  // values per step code

// itq3_t: the block's coding-domain values zhat (n floats) from its bytes. Table: the 256
// super-scales D(e), then the 8 step multipliers.
struct Itq3t {
  static constexpr int kTable = 256 + 8;
  static void Decode(const uint8_t* blk, int n, const float* table, float* zhat) {
    const float* mult = table + 256;
    const int subs = n / kSub;
    const int step_bytes = (3 * subs + 7) / 8;
    const int trit_bytes = (2 * n + 4) / 5;
    const float d = table[blk[0]];
    uint64_t step_bits = 0;
    std::memcpy(&step_bits, blk + 1, step_bytes);  // little-endian hosts (x86-64, aarch64)
    alignas(32) uint8_t u[5 * (2 * kMaxN + 4) / 5 + 8];
    const uint8_t* tb = blk + 1 + step_bytes;
    for (int j = 0; j < trit_bytes; ++j) std::memcpy(u + 5 * j, kTrits.u[tb[j]], 8);
    for (int b = 0; b < subs; ++b) {
      const float delta = d * mult[(step_bits >> (3 * b)) & 7];
      const uint8_t* ub = u + 2 * kSub * b;  // t0, t1 of 16 digits, interleaved
      float* out = zhat + kSub * b;
#ifdef ITQ3S_AVX2
      const __m256i pairs = _mm256_maddubs_epi16(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ub)), _mm256_set1_epi16(0x0301));
      const __m256i q = _mm256_sub_epi16(pairs, _mm256_set1_epi16(4));  // 3 t1 + t0 in -4..4
      const __m256 dv = _mm256_set1_ps(delta);
      _mm256_storeu_ps(out, _mm256_mul_ps(
          dv, _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(q)))));
      _mm256_storeu_ps(out + 8, _mm256_mul_ps(
          dv, _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(q, 1)))));
#else
      for (int i = 0; i < kSub; ++i) {
        out[i] = delta * static_cast<float>(ub[2 * i] + 3 * ub[2 * i + 1] - 4);
      }
#endif
    }
  }
};

inline float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  const uint32_t e = (h >> 10) & 31, m = h & 1023;
  float f;
  if (e == 0) {
    f = static_cast<float>(m) * (1.0f / 16777216.0f);  // subnormal: m * 2^-24, exact
    return sign ? -f : f;
  }
  const uint32_t bits = sign | (e == 31 ? (0xffu << 23) : ((e + 112) << 23)) | (m << 13);
  std::memcpy(&f, &bits, 4);
  return f;
}

// Float sign-bit masks of four values from a nibble of IQ3_S sign bits (bit j: value j).
struct SignMasks {
  alignas(16) float m[16][4];
  SignMasks() {
    for (int v = 0; v < 16; ++v) {
      for (int j = 0; j < 4; ++j) {
        const uint32_t bits = static_cast<uint32_t>((v >> j) & 1) << 31;
        std::memcpy(&m[v][j], &bits, 4);
      }
    }
  }
};
const SignMasks kSignMasks;

// IQ3_S (iq3_s, itq3_s): 256 values from 110 bytes (formats/iq3s.py). Table: the 512 x 4 grid
// magnitudes.
struct Iq3s {
  static constexpr int kTable = 512 * 4;
  static void Decode(const uint8_t* blk, int, const float* grid, float* zhat) {
    uint16_t h;
    std::memcpy(&h, blk, 2);
    const float d = HalfToFloat(h);
    const uint8_t *qs = blk + 2, *qh = blk + 66, *signs = blk + 74, *scales = blk + 106;
    for (int sub = 0; sub < 8; ++sub) {
      const float db = d * static_cast<float>(1 + 2 * ((scales[sub / 2] >> (4 * (sub % 2))) & 15));
      for (int g = 8 * sub; g < 8 * sub + 8; ++g) {
        const float* gv = grid + 4 * (qs[g] | (((qh[sub] >> (g % 8)) & 1) << 8));
        const int nibble = (signs[g / 2] >> (4 * (g % 2))) & 15;  // signs of values 4g..4g+3
#ifdef ITQ3S_AVX2
        _mm_storeu_ps(zhat + 4 * g, _mm_xor_ps(_mm_mul_ps(_mm_set1_ps(db), _mm_loadu_ps(gv)),
                                               _mm_load_ps(kSignMasks.m[nibble])));
#else
        for (int j = 0; j < 4; ++j) {
          float v = db * gv[j];
          uint32_t bits;
          std::memcpy(&bits, &v, 4);
          bits ^= static_cast<uint32_t>((nibble >> j) & 1) << 31;
          std::memcpy(&zhat[4 * g + j], &bits, 4);
        }
#endif
      }
    }
  }
};

inline float Dot(const float* a, const float* b, int n) {
#ifdef ITQ3S_AVX2
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (int i = 0; i < n; i += 16) {  // n is a multiple of 32
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  const __m256 s = _mm256_add_ps(acc0, acc1);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
#else
  float acc = 0.f;
  for (int i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
#endif
}

template <typename Decoder>
void Rows(const Problem& p, int64_t r0, int64_t r1) {
  alignas(32) float zhat[kMaxN];
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = p.data + r * p.row_nbytes;
    for (int64_t m = 0; m < p.m; ++m) p.y[m * p.rows + r] = 0.f;
    for (int s = 0; s < p.n_segs; ++s) {
      const Segment& seg = p.segs[s];
      for (int c = 0; c < seg.count; ++c) {
        Decoder::Decode(row + seg.byte_start + static_cast<int64_t>(c) * seg.nbytes, seg.n,
                        p.table, zhat);
        const float* x = p.xr + seg.coded_start + static_cast<int64_t>(c) * seg.n;
        for (int64_t m = 0; m < p.m; ++m) p.y[m * p.rows + r] += Dot(zhat, x + m * p.kp, seg.n);
      }
    }
  }
}

// Rows in chunks claimed from a shared counter by the calling thread and by helpers on XLA's
// intra-op pool. A helper that starts after the caller has finished (the pool was busy, or it
// is the caller's own thread) finds its slot claimed and returns without touching the buffers.
template <typename Decoder>
struct Shared {
  Problem p;
  std::atomic<int64_t> next{0};
  std::atomic<int> finished{0};
  std::unique_ptr<std::atomic<int>[]> claimed;
  int64_t chunk = 0;
  void Work() {
    for (int64_t r0; (r0 = next.fetch_add(chunk)) < p.rows;) Rows<Decoder>(p, r0, std::min(r0 + chunk, p.rows));
  }
};

template <typename Decoder>
ffi::Error Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> xr, ffi::Buffer<ffi::U8> data,
                ffi::Buffer<ffi::S32> plan, ffi::Buffer<ffi::F32> table,
                ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = xr.dimensions(), dd = data.dimensions(), pd = plan.dimensions();
  if (xd.size() != 2 || dd.size() != 2 || pd.size() != 2 || pd[1] != 5 ||
      table.element_count() != static_cast<size_t>(Decoder::kTable)) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "native cpu kernel: bad operand shapes");
  }
  auto shared = std::make_shared<Shared<Decoder>>();
  Problem& p = shared->p;
  p.xr = xr.typed_data();
  p.data = data.typed_data();
  p.segs = reinterpret_cast<const Segment*>(plan.typed_data());
  p.n_segs = static_cast<int>(pd[0]);
  p.table = table.typed_data();
  p.y = y->typed_data();
  p.m = xd[0];
  p.kp = xd[1];
  p.rows = dd[0];
  p.row_nbytes = dd[1];
  for (int s = 0; s < p.n_segs; ++s) {
    const Segment& g = p.segs[s];
    if (g.n < 2 * kSub || g.n > kMaxN || g.n % (2 * kSub) ||
        g.byte_start + static_cast<int64_t>(g.count) * g.nbytes > p.row_nbytes ||
        g.coded_start + static_cast<int64_t>(g.count) * g.n > p.kp) {
      return ffi::Error(ffi::ErrorCode::kInvalidArgument, "native cpu kernel: bad segment plan");
    }
  }
  const int64_t helpers = std::max<int64_t>(0, std::min<int64_t>(pool.num_threads(), 64) - 1);
  // Enough chunks to balance, each long enough (>= 16 rows) that claiming one costs nothing.
  shared->chunk = std::max<int64_t>(16, p.rows / (4 * (helpers + 1)) + 1);
  const int64_t tasks = std::min<int64_t>(helpers, (p.rows - 1) / shared->chunk);
  shared->claimed.reset(new std::atomic<int>[tasks > 0 ? tasks : 1]);
  for (int64_t t = 0; t < tasks; ++t) shared->claimed[t].store(0);
  for (int64_t t = 0; t < tasks; ++t) {
    pool.Schedule([shared, t] {
      if (shared->claimed[t].exchange(1)) return;
      shared->Work();
      shared->finished.fetch_add(1);
    });
  }
  shared->Work();
  for (int64_t t = 0; t < tasks; ++t) {
    if (!shared->claimed[t].exchange(1)) shared->finished.fetch_add(1);
  }
  while (shared->finished.load() < tasks) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

#define ITQ3S_HANDLER(NAME, DECODER)                                  \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(NAME, Impl<DECODER>,                  \
                                ffi::Ffi::Bind()                      \
                                    .Ctx<ffi::ThreadPool>()           \
                                    .Arg<ffi::Buffer<ffi::F32>>()     \
                                    .Arg<ffi::Buffer<ffi::U8>>()      \
                                    .Arg<ffi::Buffer<ffi::S32>>()     \
                                    .Arg<ffi::Buffer<ffi::F32>>()     \
                                    .Ret<ffi::Buffer<ffi::F32>>());

ITQ3S_HANDLER(Itq3tCpuDot, Itq3t)
ITQ3S_HANDLER(Iq3sCpuDot, Iq3s)
