// llama's own CPU matmuls for AVX2 + FMA, y = x @ W.T for a weight W (out, in) kept as
//   llama_cpu::int8_matmul(x, q, scales): int8 q with one bfloat16 scale per output channel, W = q * scales[:, None];
//   llama_cpu::bf16_matmul(x, w): bfloat16 w;
// and llama_cpu::int8_int8_matmul(xq, q), w8a8's integer products: torch._int_mm(xq, q.T), exact in int32.
// llama/native.py builds and loads them (see there for when they are used).
//
// In the first two, each weight is widened to float32 and multiplied with the float32 input (bfloat16 inputs are widened, never
// rounded), so the weight is streamed once, in its own bytes, and the only error is float32 summation. Rows are
// taken eight at a time, each weight widened once for the eight; output channels are split across torch's
// intra-op threads.

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace {

inline float sum_lanes(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

inline float bfloat16_value(uint16_t bits) {
  const uint32_t wide = uint32_t(bits) << 16;
  float value;
  std::memcpy(&value, &wide, sizeof value);
  return value;
}

// Eight consecutive weights as float32, and one weight, for each stored type.
struct Int8Weight {
  using type = int8_t;
  static __m256 widen8(const int8_t* w) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w))));
  }
  static float value(int8_t w) { return float(w); }
};

struct BFloat16Weight {
  using type = uint16_t;
  static __m256 widen8(const uint16_t* w) {  // a bfloat16 is the top half of its float32
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
  static float value(uint16_t w) { return bfloat16_value(w); }
};

// y[m, n] for M rows of x (row stride in) and output channels n0..n1, each times scales[n] when there are scales. A
// row keeps A accumulators (four for one row, two for up to four rows, one beyond): enough independent FMA chains
// to hide their latency, few enough registers.
template <typename W, int M>
void rows_times_weight(const float* x, int64_t in, const typename W::type* weight, const uint16_t* scales,
                       int64_t out, float* y, int64_t n0, int64_t n1) {
  constexpr int A = M == 1 ? 4 : M <= 4 ? 2 : 1;
  for (int64_t n = n0; n < n1; ++n) {
    const typename W::type* weight_row = weight + n * in;
    __m256 acc[M][A];
    for (int m = 0; m < M; ++m)
      for (int a = 0; a < A; ++a) acc[m][a] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= in; k += 32) {
      const __m256 w[4] = {W::widen8(weight_row + k), W::widen8(weight_row + k + 8), W::widen8(weight_row + k + 16),
                           W::widen8(weight_row + k + 24)};
      for (int m = 0; m < M; ++m)
        for (int j = 0; j < 4; ++j)
          acc[m][j % A] = _mm256_fmadd_ps(w[j], _mm256_loadu_ps(x + m * in + k + 8 * j), acc[m][j % A]);
    }
    const float scale = scales ? bfloat16_value(scales[n]) : 1.0f;
    for (int m = 0; m < M; ++m) {
      for (int a = 1; a < A; ++a) acc[m][0] = _mm256_add_ps(acc[m][0], acc[m][a]);
      float dot = sum_lanes(acc[m][0]);
      for (int64_t j = k; j < in; ++j) dot += W::value(weight_row[j]) * x[m * in + j];
      y[m * out + n] = dot * scale;
    }
  }
}

// run.template operator()<M>(r) for each block of at most eight rows from row r, M its row count: one kernel
// instance per count keeps a block's accumulators in registers.
template <typename Run>
void in_blocks_of_eight(int64_t rows, Run&& run) {
  for (int64_t r = 0; r < rows; r += 8) {
    switch (std::min<int64_t>(8, rows - r)) {
      case 1: run.template operator()<1>(r); break;
      case 2: run.template operator()<2>(r); break;
      case 3: run.template operator()<3>(r); break;
      case 4: run.template operator()<4>(r); break;
      case 5: run.template operator()<5>(r); break;
      case 6: run.template operator()<6>(r); break;
      case 7: run.template operator()<7>(r); break;
      default: run.template operator()<8>(r); break;
    }
  }
}

template <typename W>
at::Tensor matmul(const char* op, const at::Tensor& x, const at::Tensor& weight, const uint16_t* scales) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "llama_cpu::", op, " runs on CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "llama_cpu::", op,
              ": x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == weight.size(1), "llama_cpu::", op, ": x has ", x.size(-1),
              " features, the weight takes ", weight.size(1));
  const int64_t in = weight.size(1), out = weight.size(0), rows = in ? x.numel() / in : 0;
  const at::Tensor x32 = x.reshape({rows, in}).to(at::kFloat).contiguous();
  at::Tensor y = at::empty({rows, out}, x32.options());
  const float* xp = x32.data_ptr<float>();
  const auto* wp = reinterpret_cast<const typename W::type*>(weight.data_ptr());
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, out, 16, [&](int64_t n0, int64_t n1) {
    in_blocks_of_eight(rows, [&]<int M>(int64_t r) {
      rows_times_weight<W, M>(xp + r * in, in, wp, scales, out, yp + r * out, n0, n1);
    });
  });
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out;
  return y.view(shape).to(x.scalar_type());
}

at::Tensor int8_matmul(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar && weight.is_contiguous(),
              "llama_cpu::int8_matmul: weight must be a contiguous int8 matrix (out, in)");
  TORCH_CHECK(scales.device().is_cpu() && scales.dim() == 1 && scales.scalar_type() == at::kBFloat16 &&
                  scales.is_contiguous() && scales.size(0) == weight.size(0),
              "llama_cpu::int8_matmul: scales must be a contiguous bfloat16 vector of weight.size(0) values");
  return matmul<Int8Weight>("int8_matmul", x, weight, reinterpret_cast<const uint16_t*>(scales.data_ptr()));
}

at::Tensor bf16_matmul(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16 && weight.is_contiguous(),
              "llama_cpu::bf16_matmul: weight must be a contiguous bfloat16 matrix (out, in)");
  return matmul<BFloat16Weight>("bf16_matmul", x, weight, nullptr);
}


// The int32 sums of xq[m] * q[n] for M rows of xq and output channels n0..n1, 32 products a step: AVX2 multiplies
// unsigned by signed bytes (pairs summed to int16), so x's sign moves onto the weight, which is exact while no
// weight is -128 (int8 quantization makes them in [-127, 127]): a pair is at most 2 * 128 * 127 = 32512 < 2^15.
template <int M>
void int8_rows_times_int8(const int8_t* xq, int64_t in, const int8_t* q, int64_t out, int32_t* y, int64_t n0, int64_t n1) {
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* weight_row = q + n * in;
    __m256i acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_si256();
    int64_t k = 0;
    for (; k + 32 <= in; k += 32) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(weight_row + k));
      for (int m = 0; m < M; ++m) {
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * in + k));
        const __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(x, x), _mm256_sign_epi8(w, x));
        acc[m] = _mm256_add_epi32(acc[m], _mm256_madd_epi16(pairs, ones));
      }
    }
    for (int m = 0; m < M; ++m) {
      __m128i s = _mm_add_epi32(_mm256_castsi256_si128(acc[m]), _mm256_extracti128_si256(acc[m], 1));
      s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
      s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
      int32_t dot = _mm_cvtsi128_si32(s);
      for (int64_t j = k; j < in; ++j) dot += int32_t(weight_row[j]) * int32_t(xq[m * in + j]);
      y[m * out + n] = dot;
    }
  }
}

at::Tensor int8_int8_matmul(const at::Tensor& xq, const at::Tensor& q) {
  TORCH_CHECK(xq.device().is_cpu() && q.device().is_cpu(), "llama_cpu::int8_int8_matmul runs on CPU tensors only");
  TORCH_CHECK(xq.dim() == 2 && xq.scalar_type() == at::kChar && q.dim() == 2 && q.scalar_type() == at::kChar &&
                  q.is_contiguous(),
              "llama_cpu::int8_int8_matmul: xq must be an int8 matrix (rows, in) and q a contiguous int8 matrix (out, in)");
  TORCH_CHECK(xq.size(1) == q.size(1), "llama_cpu::int8_int8_matmul: xq has ", xq.size(1), " features, q takes ",
              q.size(1));
  const at::Tensor x = xq.contiguous();
  const int64_t in = q.size(1), out = q.size(0), rows = x.size(0);
  at::Tensor y = at::empty({rows, out}, x.options().dtype(at::kInt));
  const int8_t* xp = x.data_ptr<int8_t>();
  const int8_t* qp = q.data_ptr<int8_t>();
  int32_t* yp = y.data_ptr<int32_t>();
  at::parallel_for(0, out, 16, [&](int64_t n0, int64_t n1) {
    in_blocks_of_eight(rows, [&]<int M>(int64_t r) {
      int8_rows_times_int8<M>(xp + r * in, in, qp, out, yp + r * out, n0, n1);
    });
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(llama_cpu, m) {
  m.def("int8_matmul(Tensor x, Tensor weight, Tensor scales) -> Tensor");
  m.def("bf16_matmul(Tensor x, Tensor weight) -> Tensor");
  m.def("int8_int8_matmul(Tensor xq, Tensor q) -> Tensor");
}

TORCH_LIBRARY_IMPL(llama_cpu, CPU, m) {
  m.impl("int8_matmul", &int8_matmul);
  m.impl("bf16_matmul", &bf16_matmul);
  m.impl("int8_int8_matmul", &int8_int8_matmul);
}
