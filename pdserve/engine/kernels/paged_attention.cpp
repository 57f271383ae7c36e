// Decode attention that reads the KV pool's pages in place (pdserve/engine/kernels/__init__.py
// tells why and how it is built). fp32, CPU, any head counts with Hq % Hkv == 0.
//
//   k_cache [slots, Hkv, D]: slot = page * page_size + offset; a token's Hkv*D floats are one
//   contiguous row, so a work item that takes every head of a token streams whole rows.
//
//   work items: (row b, token range [t0, t1)), t0/t1 multiples of page_size
//     seq 0 (len 40, part 32): [0,32) [32,40)      seq 1 (len 9): [0,9)
//   each item: scores s[h][t] = q[h].k[t] * scale, m = max, p = exp(s - m), l = sum p,
//              acc[h] = sum p * v[t]                 -> partial (m, l, acc) per head
//   reduce per row: M = max m_i, out = sum e^(m_i - M) acc_i / sum e^(m_i - M) l_i
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

// e^x for x <= 0 (softmax arguments after the max is subtracted): 2^(x log2 e) split into an
// integer power (exponent bits) and a degree-6 polynomial of the fraction; relative error
// ~2e-7. Plain C so that the loops calling it vectorise (std::exp would not).
inline float exp_nonpos(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float t = x * 1.44269504088896341f;
  const float fi = std::floor(t);
  const float f = t - fi;
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(fi) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

struct Item {
  int64_t row, t0, t1;
};

// q.k over D floats; 16 lanes of partial sums keep two vector FMA chains in flight.
template <int64_t D>
inline float dot(const float* a, const float* b, int64_t d) {
  const int64_t n = D ? D : d;
  float acc[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int64_t j = 0; j < 16; ++j) acc[j] += a[i + j] * b[i + j];
  float s = 0.0f;
  for (; i < n; ++i) s += a[i] * b[i];
  for (int64_t j = 0; j < 16; ++j) s += acc[j];
  return s;
}

// One item: the partial softmax state of every query head over tokens [t0, t1) of its row,
// walking its page table (t0 is a multiple of page_size). D = 0: head dim known at run time.
template <int64_t D>
void attend_range(const float* q, int64_t hq, int64_t hkv, int64_t dd, const float* kc, const float* vc,
                  const int32_t* table, int64_t page_size, int64_t t0, int64_t t1, float scale,
                  float* m_out, float* l_out, float* acc_out, std::vector<float>& s) {
  const int64_t d = D ? D : dd, group = hq / hkv, n = t1 - t0, row_stride = hkv * d;
  s.resize(static_cast<size_t>(hq * (n + d)));
  float* qs = s.data() + hq * n;  // the scaled queries after the scores
  for (int64_t i = 0; i < hq * d; ++i) qs[i] = q[i] * scale;
  for (int64_t t = t0; t < t1; t += page_size) {
    const float* page = kc + static_cast<int64_t>(table[t / page_size]) * page_size * row_stride;
    for (int64_t j = 0, e = std::min(page_size, t1 - t); j < e; ++j) {
      const float* krow = page + j * row_stride;
      for (int64_t h = 0; h < hq; ++h) s[h * n + (t - t0) + j] = dot<D>(qs + h * d, krow + (h / group) * d, d);
    }
  }
  for (int64_t h = 0; h < hq; ++h) {
    float* sh = s.data() + h * n;
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < n; ++i) m = std::max(m, sh[i]);
    float l = 0.0f;
#pragma omp simd reduction(+ : l)
    for (int64_t i = 0; i < n; ++i) {
      sh[i] = exp_nonpos(sh[i] - m);
      l += sh[i];
    }
    m_out[h] = m;
    l_out[h] = l;
  }
  for (int64_t h = 0; h < hq; ++h) {  // one head at a time: its D accumulators stay in registers
    float acc[D ? D : 1024] = {};
    const float* sh = s.data() + h * n;
    for (int64_t t = t0; t < t1; t += page_size) {
      const float* page = vc + static_cast<int64_t>(table[t / page_size]) * page_size * row_stride + (h / group) * d;
      for (int64_t j = 0, e = std::min(page_size, t1 - t); j < e; ++j) {
        const float p = sh[(t - t0) + j];
        const float* vh = page + j * row_stride;
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) acc[i] += p * vh[i];
      }
    }
    std::copy(acc, acc + d, acc_out + h * d);
  }
}

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& page_table, const at::Tensor& seq_lens, int64_t page_size,
                        double scale, int64_t part_tokens) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 3 && v_cache.sizes() == k_cache.sizes(), "q [B,Hq,D], cache [S,Hkv,D]");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kFloat &&
                  v_cache.scalar_type() == at::kFloat, "paged_decode: float32 only");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "paged_decode: contiguous caches");
  TORCH_CHECK(page_table.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt, "int32 tables");
  const int64_t b = q.size(0), hq = q.size(1), d = q.size(2), hkv = k_cache.size(1);
  TORCH_CHECK(d <= 1024, "paged_decode: head dim ", d, " above 1024");
  TORCH_CHECK(k_cache.size(2) == d && hq % hkv == 0 && page_table.size(0) == b && seq_lens.size(0) == b);
  const at::Tensor qc = q.contiguous(), table = page_table.contiguous(), lens = seq_lens.contiguous();
  const int64_t width = table.size(1), part = std::max<int64_t>(1, part_tokens / page_size) * page_size;
  const int32_t* lp = lens.data_ptr<int32_t>();
  std::vector<Item> items;
  std::vector<int64_t> first(static_cast<size_t>(b + 1), 0);  // row r's items: [first[r], first[r+1])
  for (int64_t r = 0; r < b; ++r) {
    const int64_t len = lp[r];
    TORCH_CHECK(len >= 1 && len <= width * page_size, "paged_decode: seq_len ", len, " outside its page table");
    for (int64_t t0 = 0; t0 < len; t0 += part) items.push_back({r, t0, std::min(len, t0 + part)});
    first[r + 1] = static_cast<int64_t>(items.size());
  }
  const int64_t ni = static_cast<int64_t>(items.size());
  at::Tensor out = at::empty({b, hq, d}, q.options());
  at::Tensor part_m = at::empty({ni, hq}, q.options()), part_l = at::empty({ni, hq}, q.options());
  at::Tensor part_acc = at::empty({ni, hq, d}, q.options());
  const float *qp = qc.data_ptr<float>(), *kp = k_cache.data_ptr<float>(), *vp = v_cache.data_ptr<float>();
  const int32_t* tp = table.data_ptr<int32_t>();
  float *mp = part_m.data_ptr<float>(), *lsum = part_l.data_ptr<float>(), *ap = part_acc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, ni, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> s;
    for (int64_t i = lo; i < hi; ++i) {
      const Item& it = items[static_cast<size_t>(i)];
      auto* fn = d == 64 ? &attend_range<64> : d == 128 ? &attend_range<128> : &attend_range<0>;
      fn(qp + it.row * hq * d, hq, hkv, d, kp, vp, tp + it.row * width, page_size, it.t0, it.t1,
         static_cast<float>(scale), mp + i * hq, lsum + i * hq, ap + i * hq * d, s);
    }
  });
  at::parallel_for(0, b, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      for (int64_t h = 0; h < hq; ++h) {
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t i = first[r]; i < first[r + 1]; ++i) mx = std::max(mx, mp[i * hq + h]);
        float denom = 0.0f;
        float* o = op + (r * hq + h) * d;
        std::fill(o, o + d, 0.0f);
        for (int64_t i = first[r]; i < first[r + 1]; ++i) {
          const float w = std::exp(mp[i * hq + h] - mx);
          denom += w * lsum[i * hq + h];
          const float* a = ap + (i * hq + h) * d;
#pragma omp simd
          for (int64_t j = 0; j < d; ++j) o[j] += w * a[j];
        }
        const float inv = 1.0f / denom;
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) o[j] *= inv;
      }
    }
  });
  return out;
}

// k/v rows [T, Hkv, D] into slots [T] of the caches [S, Hkv, D] (the per-layer pool write).
void kv_write(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slots, const at::Tensor& k,
              const at::Tensor& v) {
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && slots.scalar_type() == at::kLong);
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == v_cache.scalar_type());
  const int64_t n = slots.size(0), row = k_cache.size(1) * k_cache.size(2), rows = k_cache.size(0);
  const at::Tensor kc = k.contiguous(), vc = v.contiguous(), sc = slots.contiguous();
  TORCH_CHECK(kc.numel() == n * row && vc.numel() == n * row, "kv_write: rows do not match the slots");
  const int64_t* sp = sc.data_ptr<int64_t>();
  const size_t bytes = static_cast<size_t>(row) * k_cache.element_size();
  char *kd = static_cast<char*>(k_cache.data_ptr()), *vd = static_cast<char*>(v_cache.data_ptr());
  const char *ks = static_cast<const char*>(kc.data_ptr()), *vs = static_cast<const char*>(vc.data_ptr());
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(sp[i] >= 0 && sp[i] < rows, "kv_write: slot ", sp[i], " out of range");
    std::memcpy(kd + sp[i] * bytes, ks + i * bytes, bytes);
    std::memcpy(vd + sp[i] * bytes, vs + i * bytes, bytes);
  }
}

}  // namespace

TORCH_LIBRARY(pdserve, m) {
  m.def("paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor page_table, Tensor seq_lens, "
        "int page_size, float scale, int part_tokens) -> Tensor");
  m.def("kv_write(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slots, Tensor k, Tensor v) -> ()");
}

TORCH_LIBRARY_IMPL(pdserve, CPU, m) {
  m.impl("paged_decode", &paged_decode);
  m.impl("kv_write", &kv_write);
}
