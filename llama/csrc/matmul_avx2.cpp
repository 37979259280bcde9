// llama's own CPU matmuls for AVX2 + FMA, y = x @ W.T for a weight W (out, in) kept as
//   llama_cpu::int8_matmul(x, q, scales): int8 q with one bfloat16 scale per output channel, W = q * scales[:, None];
//   llama_cpu::bf16_matmul(x, w): bfloat16 w.
// llama/native.py builds and loads them (see there for when they are used).
//
// Each weight is widened to float32 and multiplied with the float32 input (bfloat16 inputs are widened, never
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
    for (int64_t r = 0; r < rows; r += 8) {
      const float* xr = xp + r * in;
      float* yr = yp + r * out;
      switch (std::min<int64_t>(8, rows - r)) {
        case 1: rows_times_weight<W, 1>(xr, in, wp, scales, out, yr, n0, n1); break;
        case 2: rows_times_weight<W, 2>(xr, in, wp, scales, out, yr, n0, n1); break;
        case 3: rows_times_weight<W, 3>(xr, in, wp, scales, out, yr, n0, n1); break;
        case 4: rows_times_weight<W, 4>(xr, in, wp, scales, out, yr, n0, n1); break;
        case 5: rows_times_weight<W, 5>(xr, in, wp, scales, out, yr, n0, n1); break;
        case 6: rows_times_weight<W, 6>(xr, in, wp, scales, out, yr, n0, n1); break;
        case 7: rows_times_weight<W, 7>(xr, in, wp, scales, out, yr, n0, n1); break;
        default: rows_times_weight<W, 8>(xr, in, wp, scales, out, yr, n0, n1); break;
      }
    }
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

}  // namespace

TORCH_LIBRARY(llama_cpu, m) {
  m.def("int8_matmul(Tensor x, Tensor weight, Tensor scales) -> Tensor");
  m.def("bf16_matmul(Tensor x, Tensor weight) -> Tensor");
}

TORCH_LIBRARY_IMPL(llama_cpu, CPU, m) {
  m.impl("int8_matmul", &int8_matmul);
  m.impl("bf16_matmul", &bf16_matmul);
}
