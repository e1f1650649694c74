"""Compiled CPU kernels for the decode hot path, with plain-torch fallbacks (issue 12).

Five small C++ ops, compiled once per machine with ``torch.utils.cpp_extension.load_inline`` (gcc, OpenMP
through ``at::parallel_for``, so they use torch's thread count) into ``<hetmem cache>/ops/<name>``:

    quest_scores(q, kmin, kmax)        Quest upper bound per page, max over the GQA group, in one pass over
                                       the page min/max: no ``[G, N]`` intermediate (Quest, Tang et al. 2024,
                                       arXiv 2406.10774, eq. 1)
    topk_ids(scores, k)                the ``k`` best ids per row under (score desc, id asc), NaN as -inf,
                                       ascending: ``ops.topk.topk_indices``'s exact tie rule
    page_attention(q, k, v, pages, ...) decode attention over the selected pages *in place*: the selected K/V
                                       are read once from the cache buffers, never copied (online softmax,
                                       Milakov & Gimelshein 2018, arXiv 1805.02867; as in FlashDecoding)
    page_partials(q, k, v, pages, ...) attention over each selected page on its own, in place: per page the
                                       output and its log-sum-exp (a memory node's one-round attention layout)
    index_scores(q, w, k)              DSA's lightning indexer sum_h w_h ReLU(q_h . k_t) in one pass over the
                                       index keys: no ``[H_i, L]`` intermediate (DeepSeek-V3.2)
    block_scores(q, k, scale)          seer's gated query . gated block summaries, one pass (a GEMV per KV head,
                                       four blocks per step; torch's matmul read them at about half the speed)

Whether the compiled ops are used is decided once per process (``backend()``): they are when a C++ compiler
and ninja are present and the build succeeds; otherwise, or with ``HETMEM_KERNELS=torch``, every caller takes
its plain torch path. The ops are CPU only (CUDA tensors always take the torch path; CUDA is untested here).
This module knows nothing of methods or devices: callers in ``ops`` ask ``available(tensor)``.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil

import torch

from hetmem.settings import kernel_dir

_CPP = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

template <typename T> static inline float f32(T x) { return static_cast<float>(x); }

// q [R, G, D] float; kmin/kmax [R, N, D] (row stride rs, page stride ps, D contiguous); out [R, N] float
template <typename T>
static void scores_impl(const float* q, const T* kmin, const T* kmax, float* out, int64_t R, int64_t G, int64_t N,
                        int64_t D, int64_t rs, int64_t ps) {
  at::parallel_for(0, R * N, 256, [&](int64_t a, int64_t b) {
    std::vector<float> qp(G * D), qn(G * D);
    int64_t r_cur = -1;
    for (int64_t i = a; i < b; ++i) {
      int64_t r = i / N, n = i % N;
      if (r != r_cur) {
        r_cur = r;
        for (int64_t j = 0; j < G * D; ++j) { float x = q[r * G * D + j]; qp[j] = x > 0 ? x : 0; qn[j] = x < 0 ? x : 0; }
      }
      const T* mx = kmax + r * rs + n * ps;
      const T* mn = kmin + r * rs + n * ps;
      float best = -std::numeric_limits<float>::infinity();
      for (int64_t g = 0; g < G; ++g) {
        const float* a_ = qp.data() + g * D;
        const float* b_ = qn.data() + g * D;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t d = 0; d < D; ++d) acc += a_[d] * f32(mx[d]) + b_[d] * f32(mn[d]);
        best = (g == 0 || acc > best || std::isnan(acc)) ? acc : best;
      }
      out[r * N + n] = best;
    }
  });
}

#if defined(__AVX512F__)
#include <immintrin.h>
// 16 lanes as float32 from float32, bfloat16 (the high half of a float32) or float16 storage.
static inline __m512 ld16(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 ld16(const at::BFloat16* p) {
  __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(x), 16));
}
static inline __m512 ld16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
// exp of 16 floats (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial in r, times 2^n by
// scalef); relative error about 2e-7 over [-87, 88]; below that it underflows to (almost) 0, as expf does.
static inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)), _mm512_set1_ps(-88.3762626647949f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500E-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

// The AVX-512 path (float32, bfloat16 or float16 bounds): one pass over each page's kmax/kmin (16 floats a load), GG query heads'
// bounds accumulated together (2 * GG independent FMA chains), the next pages prefetched.
template <int GG, typename T>
static void scores_avx512(const float* q, const T* kmin, const T* kmax, float* out, int64_t R, int64_t N,
                          int64_t D, int64_t rs, int64_t ps) {
  at::parallel_for(0, R * N, 256, [&](int64_t a, int64_t b) {
    std::vector<float> qp(GG * D), qn(GG * D);
    int64_t r_cur = -1;
    for (int64_t i = a; i < b; ++i) {
      int64_t r = i / N, n = i - (i / N) * N;
      if (r != r_cur) {
        r_cur = r;
        for (int64_t j = 0; j < GG * D; ++j) { float x = q[r * GG * D + j]; qp[j] = x > 0 ? x : 0; qn[j] = x < 0 ? x : 0; }
      }
      const T* mx = kmax + r * rs + n * ps;
      const T* mn = kmin + r * rs + n * ps;
      if (n + 8 < N)
        for (int64_t d = 0; d < D; d += 16) {
          _mm_prefetch(reinterpret_cast<const char*>(mx + 8 * ps + d), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(mn + 8 * ps + d), _MM_HINT_T0);
        }
      __m512 ap[GG], an[GG];
      for (int g = 0; g < GG; ++g) { ap[g] = _mm512_setzero_ps(); an[g] = _mm512_setzero_ps(); }
      for (int64_t d = 0; d < D; d += 16) {
        __m512 vx = ld16(mx + d), vn = ld16(mn + d);
        for (int g = 0; g < GG; ++g) {
          ap[g] = _mm512_fmadd_ps(_mm512_loadu_ps(qp.data() + g * D + d), vx, ap[g]);
          an[g] = _mm512_fmadd_ps(_mm512_loadu_ps(qn.data() + g * D + d), vn, an[g]);
        }
      }
      float best = 0.f;
      for (int g = 0; g < GG; ++g) {
        float acc = _mm512_reduce_add_ps(_mm512_add_ps(ap[g], an[g]));
        best = (g == 0 || acc > best || std::isnan(acc)) ? acc : best;
      }
      out[r * N + n] = best;
    }
  });
}
#endif

torch::Tensor quest_scores(torch::Tensor q, torch::Tensor kmin, torch::Tensor kmax) {
  // q [B, H, G, D]; kmin/kmax [B, H, N, D] (a slice of the memory buffers: any strides but D contiguous)
  TORCH_CHECK(q.dim() == 4 && kmin.dim() == 4 && kmax.sizes() == kmin.sizes(), "quest_scores: q [B, H, G, D], kmin/kmax [B, H, N, D]");
  auto B = kmin.size(0), H = kmin.size(1), N = kmin.size(2), D = kmin.size(3), G = q.size(2);
  TORCH_CHECK(q.size(0) == B && q.size(1) == H && q.size(3) == D, "quest_scores: q [B, H, G, D] must match kmin's B, H, D");
  TORCH_CHECK(kmin.stride(0) == H * kmin.stride(1) && kmax.strides() == kmin.strides() && kmin.stride(3) == 1,
              "quest_scores: kmin/kmax must share strides, heads adjacent, D contiguous");
  auto qf = q.to(torch::kFloat).contiguous();
  auto out = torch::empty({B, H, N}, qf.options());
  if (N == 0) return out;
#if defined(__AVX512F__)
  auto st = kmin.scalar_type();
  if ((st == torch::kFloat || st == torch::kBFloat16 || st == torch::kHalf) && D % 16 == 0 && G >= 1 && G <= 8) {
    auto go = [&](auto* a, auto* b) {
      using T = std::remove_const_t<std::remove_pointer_t<decltype(a)>>;
      const float* qp = qf.data_ptr<float>();
      float* o = out.data_ptr<float>();
      auto rs = kmin.stride(1), ps = kmin.stride(2);
      switch (G) {
        case 1: scores_avx512<1, T>(qp, a, b, o, B * H, N, D, rs, ps); break;
        case 2: scores_avx512<2, T>(qp, a, b, o, B * H, N, D, rs, ps); break;
        case 3: scores_avx512<3, T>(qp, a, b, o, B * H, N, D, rs, ps); break;
        case 4: scores_avx512<4, T>(qp, a, b, o, B * H, N, D, rs, ps); break;
        case 5: scores_avx512<5, T>(qp, a, b, o, B * H, N, D, rs, ps); break;
        case 6: scores_avx512<6, T>(qp, a, b, o, B * H, N, D, rs, ps); break;
        case 7: scores_avx512<7, T>(qp, a, b, o, B * H, N, D, rs, ps); break;
        default: scores_avx512<8, T>(qp, a, b, o, B * H, N, D, rs, ps); break;
      }
    };
    if (st == torch::kFloat) go(kmin.data_ptr<float>(), kmax.data_ptr<float>());
    else if (st == torch::kBFloat16) go(kmin.data_ptr<at::BFloat16>(), kmax.data_ptr<at::BFloat16>());
    else go(kmin.data_ptr<at::Half>(), kmax.data_ptr<at::Half>());
    return out;
  }
#endif
  if (kmin.scalar_type() == torch::kFloat)
    scores_impl<float>(qf.data_ptr<float>(), kmin.data_ptr<float>(), kmax.data_ptr<float>(), out.data_ptr<float>(),
                       B * H, G, N, D, kmin.stride(1), kmin.stride(2));
  else if (kmin.scalar_type() == torch::kBFloat16)
    scores_impl<at::BFloat16>(qf.data_ptr<float>(), kmin.data_ptr<at::BFloat16>(), kmax.data_ptr<at::BFloat16>(),
                              out.data_ptr<float>(), B * H, G, N, D, kmin.stride(1), kmin.stride(2));
  else if (kmin.scalar_type() == torch::kHalf)
    scores_impl<at::Half>(qf.data_ptr<float>(), kmin.data_ptr<at::Half>(), kmax.data_ptr<at::Half>(),
                          out.data_ptr<float>(), B * H, G, N, D, kmin.stride(1), kmin.stride(2));
  else
    TORCH_CHECK(false, "quest_scores: float32, bfloat16 or float16 page bounds");
  return out;
}

torch::Tensor topk_ids(torch::Tensor scores, int64_t k) {
  // scores [R, N] float -> [R, k] int64: the k best under (score desc, id asc), NaN as -inf; ascending ids
  TORCH_CHECK(scores.dim() == 2, "topk_ids: scores [R, N]");
  auto s = scores.to(torch::kFloat).contiguous();
  int64_t R = s.size(0), N = s.size(1);
  TORCH_CHECK(k >= 0 && k <= N, "topk_ids: k must be in [0, N]");
  auto out = torch::empty({R, k}, s.options().dtype(torch::kLong));
  const float* sp = s.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, R, 1, [&](int64_t a, int64_t b) {
    std::vector<int64_t> ids(N);
    for (int64_t r = a; r < b; ++r) {
      const float* row = sp + r * N;
      auto key = [&](int64_t i) { float x = row[i]; return std::isnan(x) ? -std::numeric_limits<float>::infinity() : x; };
      auto better = [&](int64_t x, int64_t y) { float a_ = key(x), b_ = key(y); return a_ > b_ || (a_ == b_ && x < y); };
      if (k == 0) continue;
      // One pass with a heap of the k best so far, its worst on top: ids come in ascending order, so a later
      // id replaces the worst only with a strictly greater score (ties go to the lower id, already kept).
      for (int64_t i = 0; i < k; ++i) ids[i] = i;
      std::make_heap(ids.begin(), ids.begin() + k, better);
      float thr = key(ids[0]);
      for (int64_t i = k; i < N; ++i) {
        float x = key(i);
        if (x > thr) {
          std::pop_heap(ids.begin(), ids.begin() + k, better);
          ids[k - 1] = i;
          std::push_heap(ids.begin(), ids.begin() + k, better);
          thr = key(ids[0]);
        }
      }
      std::sort(ids.begin(), ids.begin() + k);
      std::copy(ids.begin(), ids.begin() + k, op + r * k);
    }
  });
  return out;
}

// The scores of one page's T_ tokens (keys from kp, token stride ks) for the G query heads of qr:
// s[g * P + t] = scale * q_g . k_t, soft-capped (tanh(s / cap) * cap) when softcap > 0.
template <typename T>
static inline void page_scores(const float* qr, const T* kp, float* s, int64_t G, int64_t Dk, int64_t P, int64_t T_,
                               int64_t ks, float scale, float softcap) {
  for (int64_t t = 0; t < T_; ++t) {
    const T* kt = kp + t * ks;
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = qr + g * Dk;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < Dk; ++d) dot += qg[d] * f32(kt[d]);
      dot *= scale;
      if (softcap > 0) dot = std::tanh(dot / softcap) * softcap;
      s[g * P + t] = dot;
    }
  }
}

// Decode attention of q [R, G, Dk] over the tokens of the selected pages, read in place from k [R, cap, Dk]
// and v [R, cap, Dv] (token stride ks / vs, row stride kr / vr). pages [R, n] sorted ids; tokens < start and
// >= length are left out. Optional softcap (tanh(s / cap) * cap) and sinks [R, G] (an extra logit in the
// softmax denominator). out [R, G, Dv] float.
template <typename T>
static void attn_impl(const float* q, const T* k, const T* v, const int64_t* pages, float* out, int64_t R, int64_t G,
                      int64_t Dk, int64_t Dv, int64_t n, int64_t P, int64_t kr, int64_t ks, int64_t vr, int64_t vs,
                      int64_t start, int64_t length, float scale, float softcap, const float* sinks) {
  at::parallel_for(0, R, 1, [&](int64_t a, int64_t b) {
    std::vector<float> m(G), l(G), acc(G * Dv), s(G * P);
    for (int64_t r = a; r < b; ++r) {
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.f);
      std::fill(acc.begin(), acc.end(), 0.f);
      const float* qr = q + r * G * Dk;
      for (int64_t j = 0; j < n; ++j) {
        int64_t t0 = std::max<int64_t>(pages[r * n + j] * P, start), t1 = std::min<int64_t>(pages[r * n + j] * P + P, length);
        int64_t T_ = t1 - t0;
        if (T_ <= 0) continue;
        page_scores(qr, k + r * kr + t0 * ks, s.data(), G, Dk, P, T_, ks, scale, softcap);
        for (int64_t g = 0; g < G; ++g) {
          float mx = m[g];
          for (int64_t t = 0; t < T_; ++t) mx = std::max(mx, s[g * P + t]);
          float corr = std::exp(m[g] - mx);
          l[g] *= corr;
          float* ag = acc.data() + g * Dv;
          if (corr != 1.f)
            for (int64_t d = 0; d < Dv; ++d) ag[d] *= corr;
          for (int64_t t = 0; t < T_; ++t) {
            float p = std::exp(s[g * P + t] - mx);
            l[g] += p;
            const T* vt = v + r * vr + (t0 + t) * vs;
#pragma omp simd
            for (int64_t d = 0; d < Dv; ++d) ag[d] += p * f32(vt[d]);
          }
          m[g] = mx;
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float den = l[g];
        if (sinks) {
          float sk = sinks[r * G + g], mx = std::max(m[g], sk);
          float c = std::exp(m[g] - mx);
          den = l[g] * c + std::exp(sk - mx);
          for (int64_t d = 0; d < Dv; ++d) acc[g * Dv + d] *= c;
        }
        float inv = den > 0 ? 1.f / den : 0.f;
        for (int64_t d = 0; d < Dv; ++d) out[(r * G + g) * Dv + d] = acc[g * Dv + d] * inv;
      }
    }
  });
}

#if defined(__AVX512F__)
// The AVX-512 path (float32, bfloat16 or float16 K/V; Dk, Dv multiples of 16): each key row is loaded once for the GG query heads
// (GG FMA chains), values accumulate in registers per 16-wide slice over a page's tokens, and the
// next selected page's K/V rows are prefetched while this page is read.
template <int GG, typename T>
static void attn_avx512(const float* q, const T* k, const T* v, const int64_t* pages, float* out, int64_t R,
                        int64_t Dk, int64_t Dv, int64_t n, int64_t P, int64_t kr, int64_t ks, int64_t vr, int64_t vs,
                        int64_t start, int64_t length, float scale, float softcap, const float* sinks) {
  at::parallel_for(0, R, 1, [&](int64_t a, int64_t b) {
    std::vector<float> m(GG), l(GG), acc(GG * Dv), s(GG * P);
    for (int64_t r = a; r < b; ++r) {
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.f);
      std::fill(acc.begin(), acc.end(), 0.f);
      const float* qr = q + r * GG * Dk;
      const T* kb = k + r * kr;
      const T* vb = v + r * vr;
      for (int64_t j = 0; j < n; ++j) {
        int64_t p0 = pages[r * n + j] * P;
        int64_t t0 = std::max<int64_t>(p0, start), t1 = std::min<int64_t>(p0 + P, length);
        int64_t T_ = t1 - t0;
        if (T_ <= 0) continue;
        int64_t nxt = j + 1 < n ? pages[r * n + j + 1] * P : -1;
        for (int64_t t = 0; t < T_; ++t) {
          if (nxt >= 0 && nxt + t < length) {
            const char* pk = reinterpret_cast<const char*>(kb + (nxt + t) * ks);
            const char* pv = reinterpret_cast<const char*>(vb + (nxt + t) * vs);
            for (int64_t d = 0; d < Dk * (int64_t)sizeof(T); d += 64) _mm_prefetch(pk + d, _MM_HINT_T0);
            for (int64_t d = 0; d < Dv * (int64_t)sizeof(T); d += 64) _mm_prefetch(pv + d, _MM_HINT_T0);
          }
          const T* kt = kb + (t0 + t) * ks;
          __m512 sa[GG];
          for (int g = 0; g < GG; ++g) sa[g] = _mm512_setzero_ps();
          for (int64_t d = 0; d < Dk; d += 16) {
            __m512 vk = ld16(kt + d);
            for (int g = 0; g < GG; ++g) sa[g] = _mm512_fmadd_ps(_mm512_loadu_ps(qr + g * Dk + d), vk, sa[g]);
          }
          for (int g = 0; g < GG; ++g) {
            float dot = _mm512_reduce_add_ps(sa[g]) * scale;
            if (softcap > 0) dot = std::tanh(dot / softcap) * softcap;
            s[g * P + t] = dot;
          }
        }
        for (int g = 0; g < GG; ++g) {
          // the page's scores 16 at a time: max, then exp (exp16) in place, masked past T_
          float* sg = s.data() + g * P;
          const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
          __m512 vm = ninf;
          for (int64_t t = 0; t < T_; t += 16) {
            __mmask16 k = T_ - t >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (T_ - t)) - 1);
            vm = _mm512_max_ps(vm, _mm512_mask_loadu_ps(ninf, k, sg + t));
          }
          float mx = std::max(m[g], _mm512_reduce_max_ps(vm));
          float corr = std::exp(m[g] - mx);
          __m512 vl = _mm512_setzero_ps(), vmx = _mm512_set1_ps(mx);
          for (int64_t t = 0; t < T_; t += 16) {
            __mmask16 k = T_ - t >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (T_ - t)) - 1);
            __m512 p = _mm512_maskz_mov_ps(k, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, sg + t), vmx)));
            _mm512_mask_storeu_ps(sg + t, k, p);
            vl = _mm512_add_ps(vl, p);
          }
          l[g] = l[g] * corr + _mm512_reduce_add_ps(vl);
          if (corr != 1.f) {
            float* ag = acc.data() + g * Dv;
            for (int64_t d = 0; d < Dv; ++d) ag[d] *= corr;
          }
          m[g] = mx;
        }
        for (int64_t d = 0; d < Dv; d += 16) {
          __m512 av[GG];
          for (int g = 0; g < GG; ++g) av[g] = _mm512_loadu_ps(acc.data() + g * Dv + d);
          for (int64_t t = 0; t < T_; ++t) {
            __m512 vv = ld16(vb + (t0 + t) * vs + d);
            for (int g = 0; g < GG; ++g) av[g] = _mm512_fmadd_ps(_mm512_set1_ps(s[g * P + t]), vv, av[g]);
          }
          for (int g = 0; g < GG; ++g) _mm512_storeu_ps(acc.data() + g * Dv + d, av[g]);
        }
      }
      for (int64_t g = 0; g < GG; ++g) {
        float den = l[g];
        if (sinks) {
          float sk = sinks[r * GG + g], mx = std::max(m[g], sk);
          float c = std::exp(m[g] - mx);
          den = l[g] * c + std::exp(sk - mx);
          for (int64_t d = 0; d < Dv; ++d) acc[g * Dv + d] *= c;
        }
        float inv = den > 0 ? 1.f / den : 0.f;
        for (int64_t d = 0; d < Dv; ++d) out[(r * GG + g) * Dv + d] = acc[g * Dv + d] * inv;
      }
    }
  });
}
#endif

torch::Tensor page_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor pages, int64_t P,
                             int64_t start, int64_t length, double scale, double softcap, c10::optional<torch::Tensor> sinks) {
  // q [B, H, G, Dk]; k [B, H, cap, Dk], v [B, H, cap, Dv] (heads adjacent, last dim contiguous); pages [B, H, n]
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && pages.dim() == 3,
              "page_attention: q [B, H, G, Dk], k [B, H, cap, Dk], v [B, H, cap, Dv], pages [B, H, n]");
  auto B = k.size(0), H = k.size(1), Dk = k.size(3), Dv = v.size(3), G = q.size(2), n = pages.size(2);
  TORCH_CHECK(q.size(0) == B && q.size(1) == H && q.size(3) == Dk && v.size(0) == B && v.size(1) == H &&
              v.size(2) == k.size(2) && pages.size(0) == B && pages.size(1) == H, "page_attention: shapes disagree");
  // Every token read is in [max(start, 0), min(length, cap)): with these, any page id is safe (out-of-range
  // pages contribute no tokens).
  TORCH_CHECK(P >= 1 && start >= 0 && length <= k.size(2), "page_attention: P >= 1, start >= 0, length <= capacity");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1 && k.stride(0) == H * k.stride(1) && v.stride(0) == H * v.stride(1),
              "page_attention: K/V heads adjacent, last dim contiguous");
  TORCH_CHECK(k.scalar_type() == v.scalar_type(), "page_attention: K and V of one dtype");
  auto qf = q.to(torch::kFloat).contiguous();
  auto pg = pages.to(torch::kLong).contiguous();
  auto out = torch::empty({B, H, G, Dv}, qf.options());
  torch::Tensor sk;
  const float* skp = nullptr;
  if (sinks.has_value()) { sk = sinks->to(torch::kFloat).expand({B, H, G}).contiguous(); skp = sk.data_ptr<float>(); }
#if defined(__AVX512F__)
  auto st = k.scalar_type();
  if ((st == torch::kFloat || st == torch::kBFloat16 || st == torch::kHalf) && Dk % 16 == 0 && Dv % 16 == 0 && G >= 1 &&
      G <= 8) {
    auto go = [&](auto* kp, auto* vp) {
      using T = std::remove_const_t<std::remove_pointer_t<decltype(kp)>>;
#define HM_ATTN(GG) attn_avx512<GG, T>(qf.data_ptr<float>(), kp, vp, pg.data_ptr<int64_t>(), out.data_ptr<float>(), \
    B * H, Dk, Dv, n, P, k.stride(1), k.stride(2), v.stride(1), v.stride(2), start, length, (float)scale, \
    (float)softcap, skp)
      switch (G) {
        case 1: HM_ATTN(1); break;
        case 2: HM_ATTN(2); break;
        case 3: HM_ATTN(3); break;
        case 4: HM_ATTN(4); break;
        case 5: HM_ATTN(5); break;
        case 6: HM_ATTN(6); break;
        case 7: HM_ATTN(7); break;
        default: HM_ATTN(8); break;
      }
#undef HM_ATTN
    };
    if (st == torch::kFloat) go(k.data_ptr<float>(), v.data_ptr<float>());
    else if (st == torch::kBFloat16) go(k.data_ptr<at::BFloat16>(), v.data_ptr<at::BFloat16>());
    else go(k.data_ptr<at::Half>(), v.data_ptr<at::Half>());
    return out;
  }
#endif
  if (k.scalar_type() == torch::kFloat)
    attn_impl<float>(qf.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), pg.data_ptr<int64_t>(),
                     out.data_ptr<float>(), B * H, G, Dk, Dv, n, P, k.stride(1), k.stride(2), v.stride(1), v.stride(2),
                     start, length, (float)scale, (float)softcap, skp);
  else if (k.scalar_type() == torch::kBFloat16)
    attn_impl<at::BFloat16>(qf.data_ptr<float>(), k.data_ptr<at::BFloat16>(), v.data_ptr<at::BFloat16>(),
                            pg.data_ptr<int64_t>(), out.data_ptr<float>(), B * H, G, Dk, Dv, n, P, k.stride(1),
                            k.stride(2), v.stride(1), v.stride(2), start, length, (float)scale, (float)softcap, skp);
  else if (k.scalar_type() == torch::kHalf)
    attn_impl<at::Half>(qf.data_ptr<float>(), k.data_ptr<at::Half>(), v.data_ptr<at::Half>(),
                        pg.data_ptr<int64_t>(), out.data_ptr<float>(), B * H, G, Dk, Dv, n, P, k.stride(1),
                        k.stride(2), v.stride(1), v.stride(2), start, length, (float)scale, (float)softcap, skp);
  else
    TORCH_CHECK(false, "page_attention: float32, bfloat16 or float16 K/V");
  return out;
}

// Attention of q [R, G, Dk] over each page of pages [R, n] on its own (ids < 0: none), K/V read in place as in
// page_attention (tokens >= length left out): per page its normalised output out [R, n, G, Dv] and its
// log-sum-exp lse [R, n, G] (-inf, output 0, for a page with no token). What a memory node returns in the
// one-round attention layout (runtime/nodes): the head merges the selected pages' partials.
template <typename T>
static void partials_impl(const float* q, const T* k, const T* v, const int64_t* pages, float* out, float* lse,
                          int64_t R, int64_t G, int64_t Dk, int64_t Dv, int64_t n, int64_t P, int64_t kr, int64_t ks,
                          int64_t vr, int64_t vs, int64_t length, float scale, float softcap) {
  at::parallel_for(0, R * n, 1, [&](int64_t a, int64_t b) {
    std::vector<float> s(G * P);
    for (int64_t rj = a; rj < b; ++rj) {
      int64_t r = rj / n;
      const float* qr = q + r * G * Dk;
      float* o = out + rj * G * Dv;
      float* ls = lse + rj * G;
      int64_t pg = pages[rj];
      int64_t t0 = pg * P, t1 = pg >= 0 ? std::min<int64_t>(t0 + P, length) : t0;
      int64_t T_ = t1 - t0;
      if (pg < 0 || T_ <= 0) {
        std::fill(o, o + G * Dv, 0.f);
        std::fill(ls, ls + G, -std::numeric_limits<float>::infinity());
        continue;
      }
      page_scores(qr, k + r * kr + t0 * ks, s.data(), G, Dk, P, T_, ks, scale, softcap);
      for (int64_t g = 0; g < G; ++g) {
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < T_; ++t) mx = std::max(mx, s[g * P + t]);
        float l = 0.f;
        float* og = o + g * Dv;
        std::fill(og, og + Dv, 0.f);
        for (int64_t t = 0; t < T_; ++t) {
          float p = std::exp(s[g * P + t] - mx);
          l += p;
          const T* vt = v + r * vr + (t0 + t) * vs;
#pragma omp simd
          for (int64_t d = 0; d < Dv; ++d) og[d] += p * f32(vt[d]);
        }
        float inv = 1.f / l;
        for (int64_t d = 0; d < Dv; ++d) og[d] *= inv;
        ls[g] = mx + std::log(l);
      }
    }
  });
}

std::vector<torch::Tensor> page_partials(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor pages,
                                         int64_t P, int64_t length, double scale, double softcap) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && pages.dim() == 3,
              "page_partials: q [B, H, G, Dk], k [B, H, cap, Dk], v [B, H, cap, Dv], pages [B, H, n]");
  auto B = k.size(0), H = k.size(1), Dk = k.size(3), Dv = v.size(3), G = q.size(2), n = pages.size(2);
  TORCH_CHECK(q.size(0) == B && q.size(1) == H && q.size(3) == Dk && v.size(0) == B && v.size(1) == H &&
              v.size(2) == k.size(2) && pages.size(0) == B && pages.size(1) == H, "page_partials: shapes disagree");
  TORCH_CHECK(P >= 1 && length >= 0 && length <= k.size(2), "page_partials: P >= 1, 0 <= length <= capacity");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1 && k.stride(0) == H * k.stride(1) && v.stride(0) == H * v.stride(1),
              "page_partials: K/V heads adjacent, last dim contiguous");
  TORCH_CHECK(k.scalar_type() == v.scalar_type(), "page_partials: K and V of one dtype");
  auto qf = q.to(torch::kFloat).contiguous();
  auto pg = pages.to(torch::kLong).contiguous();
  auto out = torch::empty({B, H, n, G, Dv}, qf.options());
  auto lse = torch::empty({B, H, n, G}, qf.options());
  if (n == 0) return {out, lse};
  auto go = [&](auto* kp, auto* vp) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(kp)>>;
    partials_impl<T>(qf.data_ptr<float>(), kp, vp, pg.data_ptr<int64_t>(), out.data_ptr<float>(), lse.data_ptr<float>(),
                     B * H, G, Dk, Dv, n, P, k.stride(1), k.stride(2), v.stride(1), v.stride(2), length, (float)scale,
                     (float)softcap);
  };
  auto st = k.scalar_type();
  if (st == torch::kFloat) go(k.data_ptr<float>(), v.data_ptr<float>());
  else if (st == torch::kBFloat16) go(k.data_ptr<at::BFloat16>(), v.data_ptr<at::BFloat16>());
  else if (st == torch::kHalf) go(k.data_ptr<at::Half>(), v.data_ptr<at::Half>());
  else TORCH_CHECK(false, "page_partials: float32, bfloat16 or float16 K/V");
  return {out, lse};
}

// DSA lightning indexer, one pass over the index keys: out[b, t] = sum_h w[b, h] * ReLU(q[b, h] . k[b, t]) for
// q [B, Hi, D] float, w [B, Hi] float, k [B, L, D] (row stride kb, token stride kt, D contiguous); out [B, L]
// float. No [Hi, L] intermediate: each key row is read once for every index head.
template <typename T>
static void index_impl(const float* q, const float* w, const T* k, float* out, int64_t B, int64_t Hi, int64_t L,
                       int64_t D, int64_t kb, int64_t kt) {
  at::parallel_for(0, B * L, 512, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) {
      int64_t r = i / L, t = i - (i / L) * L;
      const T* kr = k + r * kb + t * kt;
      float acc = 0.f;
      for (int64_t h = 0; h < Hi; ++h) {
        const float* qh = q + (r * Hi + h) * D;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < D; ++d) dot += qh[d] * f32(kr[d]);
        acc += w[r * Hi + h] * (dot > 0.f ? dot : 0.f);
      }
      out[i] = acc;
    }
  });
}

#if defined(__AVX512F__)
// AVX-512 (D a multiple of 16): per key row, the index heads four at a time (four FMA chains over D), the
// row eight ahead prefetched.
template <typename T>
static void index_avx512(const float* q, const float* w, const T* k, float* out, int64_t B, int64_t Hi, int64_t L,
                         int64_t D, int64_t kb, int64_t kt) {
  at::parallel_for(0, B * L, 512, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) {
      int64_t r = i / L, t = i - (i / L) * L;
      const T* kr = k + r * kb + t * kt;
      if (t + 8 < L)
        for (int64_t d = 0; d < D * (int64_t)sizeof(T); d += 64)
          _mm_prefetch(reinterpret_cast<const char*>(kr + 8 * kt) + d, _MM_HINT_T0);
      const float* qr = q + r * Hi * D;
      const float* wr = w + r * Hi;
      float acc = 0.f;
      int64_t h = 0;
      for (; h + 4 <= Hi; h += 4) {
        __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps(), s2 = _mm512_setzero_ps(), s3 = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; d += 16) {
          __m512 vk = ld16(kr + d);
          s0 = _mm512_fmadd_ps(_mm512_loadu_ps(qr + h * D + d), vk, s0);
          s1 = _mm512_fmadd_ps(_mm512_loadu_ps(qr + (h + 1) * D + d), vk, s1);
          s2 = _mm512_fmadd_ps(_mm512_loadu_ps(qr + (h + 2) * D + d), vk, s2);
          s3 = _mm512_fmadd_ps(_mm512_loadu_ps(qr + (h + 3) * D + d), vk, s3);
        }
        float d0 = _mm512_reduce_add_ps(s0), d1 = _mm512_reduce_add_ps(s1), d2 = _mm512_reduce_add_ps(s2),
              d3 = _mm512_reduce_add_ps(s3);
        acc += wr[h] * (d0 > 0.f ? d0 : 0.f);
        acc += wr[h + 1] * (d1 > 0.f ? d1 : 0.f);
        acc += wr[h + 2] * (d2 > 0.f ? d2 : 0.f);
        acc += wr[h + 3] * (d3 > 0.f ? d3 : 0.f);
      }
      for (; h < Hi; ++h) {
        __m512 s0 = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; d += 16) s0 = _mm512_fmadd_ps(_mm512_loadu_ps(qr + h * D + d), ld16(kr + d), s0);
        float d0 = _mm512_reduce_add_ps(s0);
        acc += wr[h] * (d0 > 0.f ? d0 : 0.f);
      }
      out[i] = acc;
    }
  });
}
#endif

torch::Tensor index_scores(torch::Tensor q, torch::Tensor w, torch::Tensor k) {
  // q [B, Hi, D]; w [B, Hi]; k [B, L, D] (a slice of the index keys: any strides but D contiguous) -> [B, L]
  TORCH_CHECK(q.dim() == 3 && w.dim() == 2 && k.dim() == 3, "index_scores: q [B, Hi, D], w [B, Hi], k [B, L, D]");
  auto B = k.size(0), L = k.size(1), D = k.size(2), Hi = q.size(1);
  TORCH_CHECK(q.size(0) == B && q.size(2) == D && w.size(0) == B && w.size(1) == Hi && k.stride(2) == 1,
              "index_scores: shapes disagree, or k's last dim is not contiguous");
  auto qf = q.to(torch::kFloat).contiguous();
  auto wf = w.to(torch::kFloat).contiguous();
  auto out = torch::empty({B, L}, qf.options());
  if (L == 0) return out;
  auto st = k.scalar_type();
  auto go = [&](auto* kp) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(kp)>>;
#if defined(__AVX512F__)
    if (D % 16 == 0) {
      index_avx512<T>(qf.data_ptr<float>(), wf.data_ptr<float>(), kp, out.data_ptr<float>(), B, Hi, L, D, k.stride(0),
                      k.stride(1));
      return;
    }
#endif
    index_impl<T>(qf.data_ptr<float>(), wf.data_ptr<float>(), kp, out.data_ptr<float>(), B, Hi, L, D, k.stride(0),
                  k.stride(1));
  };
  if (st == torch::kFloat) go(k.data_ptr<float>());
  else if (st == torch::kBFloat16) go(k.data_ptr<at::BFloat16>());
  else if (st == torch::kHalf) go(k.data_ptr<at::Half>());
  else TORCH_CHECK(false, "index_scores: float32, bfloat16 or float16 index keys");
  return out;
}

// Seer's gated block scores, one pass: out[r, n] = scale * q[r] . k[r, n] for q [R, E] float, k [R, N, E] (row
// stride rs, block stride ps, E contiguous); out [R, N] float (one GEMV per KV head).
template <typename T>
static void dot_impl(const float* q, const T* k, float* out, int64_t R, int64_t N, int64_t E, int64_t rs, int64_t ps,
                     float scale) {
  at::parallel_for(0, R * N, 512, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) {
      int64_t r = i / N, n = i - (i / N) * N;
      const T* kr = k + r * rs + n * ps;
      const float* qr = q + r * E;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t e = 0; e < E; ++e) dot += qr[e] * f32(kr[e]);
      out[i] = dot * scale;
    }
  });
}

#if defined(__AVX512F__)
// AVX-512 (E a multiple of 16): four blocks at a time (four independent FMA chains), blocks eight ahead prefetched.
template <typename T>
static void dot_avx512(const float* q, const T* k, float* out, int64_t R, int64_t N, int64_t E, int64_t rs,
                       int64_t ps, float scale) {
  int64_t C = (N + 3) / 4;  // chunks of four blocks per row
  at::parallel_for(0, R * C, 128, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) {
      int64_t r = i / C, n0 = (i - r * C) * 4, m = std::min<int64_t>(4, N - n0);
      const T* kr = k + r * rs + n0 * ps;
      const float* qr = q + r * E;
      if (n0 + 12 <= N)
        for (int64_t j = 8; j < 12; ++j)
          for (int64_t e = 0; e < E * (int64_t)sizeof(T); e += 64)
            _mm_prefetch(reinterpret_cast<const char*>(kr + j * ps) + e, _MM_HINT_T0);
      if (m == 4) {
        __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps(), s2 = _mm512_setzero_ps(), s3 = _mm512_setzero_ps();
        for (int64_t e = 0; e < E; e += 16) {
          __m512 vq = _mm512_loadu_ps(qr + e);
          s0 = _mm512_fmadd_ps(vq, ld16(kr + e), s0);
          s1 = _mm512_fmadd_ps(vq, ld16(kr + ps + e), s1);
          s2 = _mm512_fmadd_ps(vq, ld16(kr + 2 * ps + e), s2);
          s3 = _mm512_fmadd_ps(vq, ld16(kr + 3 * ps + e), s3);
        }
        float* o = out + r * N + n0;
        o[0] = _mm512_reduce_add_ps(s0) * scale;
        o[1] = _mm512_reduce_add_ps(s1) * scale;
        o[2] = _mm512_reduce_add_ps(s2) * scale;
        o[3] = _mm512_reduce_add_ps(s3) * scale;
      } else {
        for (int64_t j = 0; j < m; ++j) {
          __m512 s0 = _mm512_setzero_ps();
          for (int64_t e = 0; e < E; e += 16) s0 = _mm512_fmadd_ps(_mm512_loadu_ps(qr + e), ld16(kr + j * ps + e), s0);
          out[r * N + n0 + j] = _mm512_reduce_add_ps(s0) * scale;
        }
      }
    }
  });
}
#endif

torch::Tensor block_scores(torch::Tensor q, torch::Tensor k, double scale) {
  // q [B, H, E]; k [B, H, N, E] (a slice of the block summaries: any strides but E contiguous) -> [B, H, N]
  TORCH_CHECK(q.dim() == 3 && k.dim() == 4, "block_scores: q [B, H, E], k [B, H, N, E]");
  auto B = k.size(0), H = k.size(1), N = k.size(2), E = k.size(3);
  TORCH_CHECK(q.size(0) == B && q.size(1) == H && q.size(2) == E, "block_scores: q [B, H, E] must match k's B, H, E");
  TORCH_CHECK(k.stride(0) == H * k.stride(1) && k.stride(3) == 1, "block_scores: k's heads adjacent, E contiguous");
  auto qf = q.to(torch::kFloat).contiguous();
  auto out = torch::empty({B, H, N}, qf.options());
  if (N == 0) return out;
  auto st = k.scalar_type();
  auto go = [&](auto* kp) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(kp)>>;
#if defined(__AVX512F__)
    if (E % 16 == 0) {
      dot_avx512<T>(qf.data_ptr<float>(), kp, out.data_ptr<float>(), B * H, N, E, k.stride(1), k.stride(2), (float)scale);
      return;
    }
#endif
    dot_impl<T>(qf.data_ptr<float>(), kp, out.data_ptr<float>(), B * H, N, E, k.stride(1), k.stride(2), (float)scale);
  };
  if (st == torch::kFloat) go(k.data_ptr<float>());
  else if (st == torch::kBFloat16) go(k.data_ptr<at::BFloat16>());
  else if (st == torch::kHalf) go(k.data_ptr<at::Half>());
  else TORCH_CHECK(false, "block_scores: float32, bfloat16 or float16 block summaries");
  return out;
}
"""

_FUNCTIONS = ["quest_scores", "topk_ids", "page_attention", "page_partials", "index_scores", "block_scores"]
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_why: str = ""


def _cpu_flags() -> str:
    """The instruction sets this CPU has: the build uses -march=native, so a cache shared between machines (a home
    directory on NFS) must not hand one CPU's binary to another (that would be SIGILL, not a fallback)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return platform.machine() + platform.processor()


def _avx512() -> bool:
    """The AVX-512 paths (where gcc's ``-march=native`` has them) are the default; ``HETMEM_AVX512=0`` builds
    the portable loops only (``-mno-avx512f``). They were opt-in for a while after two fresh-clone test runs
    crashed with SIGSEGV; the crashes went on with them off and stopped when a FAISS call was removed, and a
    stress run found nothing (tests/test_ops_fast.py, 1,000 hypothesis examples per op with AVX-512 under
    ``-D_GLIBCXX_ASSERTIONS`` and again under AddressSanitizer, and the method tests over these ops)."""
    return os.environ.get("HETMEM_AVX512", "") != "0"


def _cflags() -> list[str]:
    """``HETMEM_KERNEL_CFLAGS`` adds flags (a checking build: ``-D_GLIBCXX_ASSERTIONS``, ``-fsanitize=address``);
    they are part of the build's cache key."""
    extra = os.environ.get("HETMEM_KERNEL_CFLAGS", "").split()
    return ["-O3", "-march=native", "-fopenmp-simd"] + ([] if _avx512() else ["-mno-avx512f"]) + extra


def _build_dir() -> str:
    tag = hashlib.sha1((_CPP + torch.__version__ + _cpu_flags() + " ".join(_cflags())).encode()).hexdigest()[:12]
    d = kernel_dir() / f"hetmem_fast_{tag}"
    d.mkdir(parents=True, exist_ok=True)
    return str(d)


@functools.lru_cache(maxsize=1)
def _lib():
    """The compiled module, or None (decided once per process; the reason is kept for ``backend()``)."""
    global _why
    if os.environ.get("HETMEM_KERNELS", "").lower() == "torch":
        _why = "HETMEM_KERNELS=torch"
        return None
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        _why = "no C++ compiler"
        return None
    try:
        from torch.utils.cpp_extension import load_inline

        d = _build_dir()
        return load_inline(name=os.path.basename(d), cpp_sources=_CPP, functions=_FUNCTIONS, build_directory=d,
                           extra_cflags=_cflags(), verbose=False)
    except Exception as exc:  # no ninja, a compiler error, a read-only cache: fall back to torch
        _why = f"build failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        return None


def available(*tensors: torch.Tensor) -> bool:
    """Whether the compiled ops can take these tensors (CPU, float32/bfloat16/float16) in this process."""
    for t in tensors:
        if t.device.type != "cpu" or (t.is_floating_point() and t.dtype not in _DTYPES):
            return False
    return _lib() is not None


def backend() -> dict:
    """What the decode hot path runs on in this process (said in run records)."""
    lib = _lib()
    name = "c++ (load_inline, at::parallel_for)" if lib is not None else "torch"
    simd = "avx-512" if _avx512() and "avx512f" in _cpu_flags().split() else "portable loops"
    return {"relevancy": name, "retrieval_topk": name, "sparse_attention": name + (" in place" if lib else " gather"),
            **({"simd": simd} if lib is not None else {"fallback_reason": _why})}


def quest_scores(q, kmin, kmax):
    return _lib().quest_scores(q, kmin, kmax)


def topk_ids(scores, k: int):
    return _lib().topk_ids(scores, k)


def index_scores(q, w, k):
    return _lib().index_scores(q, w, k)


def block_scores(q, k, scale: float):
    return _lib().block_scores(q, k, float(scale))


def page_attention(q, k, v, pages, page_size: int, start: int, length: int, scale: float, softcap=None, sinks=None):
    return _lib().page_attention(q, k, v, pages, page_size, start, length, scale, float(softcap or 0.0), sinks)


def page_partials(q, k, v, pages, page_size: int, length: int, scale: float, softcap=None):
    """Attention over each page of ``pages [B, H, n]`` (ids < 0: none) on its own, in place: per page the
    normalised output ``[B, H, n, G, Dv]`` and its log-sum-exp ``[B, H, n, G]`` (-inf for an empty page)."""
    out, lse = _lib().page_partials(q, k, v, pages, page_size, length, scale, float(softcap or 0.0))
    return out, lse
