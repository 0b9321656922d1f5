// Mamba-1 on a CPU: the selective scan, and the causal depthwise convolution with its SiLU, as
// fused loops with their backward passes. Built by l2m.models.compiled with the system C++ compiler
// and called via ctypes.
//
// The parallel scan in selective_scan.py materialises (t, b, d, n) tensors several times over and
// is memory-bound; here a block of W channels steps through time together, one SIMD lane per
// channel, its state (n x W) in cache, and every decay exp(dt A) is computed where it is used. The
// math is selective_scan.py's:
//
//   h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t,    y_t = <C_t, h_t> + D u_t
//
// with dt already through its bias and softplus, and the gate silu(z) applied after: those are
// elementwise, and torch's vectorised ops do them as fast.
//
// Layouts (row-major, contiguous), channels last as the mixer's linear layers give them:
// u, dt, y: (b, l, d); B, C: (b, l, n); A: (d, n); D: (d); h0 and the last state: (b, d, n).
// Optional inputs (D, h0, dlast) and gradients not wanted (dD, dh0) are null pointers.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

namespace {

constexpr int64_t W = 16;        // channels per block: one 512-bit vector of floats
constexpr int64_t SEGMENT = 128;  // the backward recomputes states a segment at a time (memory O(SEGMENT))

// exp that vectorises inside `omp simd` loops (std::exp is a library call per element): range
// reduction x = k ln2 + r, |r| <= ln2/2, then a degree-7 Taylor polynomial (relative error < 1e-8,
// below float32 rounding). Arguments under -87 return 0 (decays exp(dt A) that small carry nothing),
// over 88 e^88 (in a sigmoid, 1 / (1 + e^88) is 0 to float precision).
inline float exp_vec(float x) {
  const float log2e = 1.44269504f, ln2_hi = 0.693145752f, ln2_lo = 1.42860677e-6f;
  const float round_magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float clamped = std::min(std::max(x, -87.0f), 88.0f);  // e^88 is still finite
  const float k = (clamped * log2e + round_magic) - round_magic;
  const float r = (clamped - k * ln2_hi) - k * ln2_lo;
  float p = 1.0f / 5040;
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < -87.0f ? 0.0f : p * scale;
}

inline double exp_vec(double x) { return std::exp(x); }  // float64 is for tests: exact beats fast

// Lane copies between a row of `width` <= W channels and W lanes (zero past width). Full blocks take
// fixed-length loops, which compile to vector moves; a library copy per step cost more than the math.
template <typename T>
inline void to_lanes(const T* from, int64_t width, T* lanes) {
  if (width == W) {
#pragma omp simd
    for (int64_t w = 0; w < W; ++w) lanes[w] = from[w];
  } else {
    for (int64_t w = 0; w < W; ++w) lanes[w] = w < width ? from[w] : T(0);
  }
}

template <typename T>
inline void from_lanes(const T* lanes, int64_t width, T* to) {
  if (width == W) {
#pragma omp simd
    for (int64_t w = 0; w < W; ++w) to[w] = lanes[w];
  } else {
    for (int64_t w = 0; w < width; ++w) to[w] = lanes[w];
  }
}

template <typename T>
struct Scan {
  const T *u, *dt, *A, *B, *C, *D, *h0;
  int64_t b, d, l, n;
};

// One block: batch `batch`, channels [c0, c0 + width). Lanes past width are zero and stay zero.
template <typename T>
struct Block {
  const Scan<T>& s;
  int64_t batch, c0, width;
  std::vector<T> A, D;  // A transposed to (n, W)

  Block(const Scan<T>& scan, int64_t batch_, int64_t c0_)
      : s(scan), batch(batch_), c0(c0_), width(std::min(W, scan.d - c0_)), A(scan.n * W, T(0)), D(W, T(0)) {
    for (int64_t w = 0; w < width; ++w) {
      for (int64_t i = 0; i < s.n; ++i) A[i * W + w] = s.A[(c0 + w) * s.n + i];
      if (s.D) D[w] = s.D[c0 + w];
    }
  }

  // Reads (b, l, d) row t into a W-lane array, zero past width.
  void load(const T* x, int64_t t, T* lanes) const { to_lanes(x + (batch * s.l + t) * s.d + c0, width, lanes); }

  void store(T* x, int64_t t, const T* lanes) const { from_lanes(lanes, width, x + (batch * s.l + t) * s.d + c0); }

  void initial_state(T* h) const {
    std::fill(h, h + s.n * W, T(0));
    if (s.h0)
      for (int64_t w = 0; w < width; ++w)
        for (int64_t i = 0; i < s.n; ++i) h[i * W + w] = s.h0[((batch * s.d) + c0 + w) * s.n + i];
  }

  void final_state(const T* h, T* out) const {
    for (int64_t w = 0; w < width; ++w)
      for (int64_t i = 0; i < s.n; ++i) out[((batch * s.d) + c0 + w) * s.n + i] = h[i * W + w];
  }

  // Steps t0..t1-1 from state h (n x W, updated in place). Writes either y (the forward pass) or,
  // for the backward's recomputation, each step's state and decays (n x W per step, from t0): with
  // decays given, y is not computed.
  void run(int64_t t0, int64_t t1, T* h, T* y, T* states, T* decays) const {
    const int64_t n = s.n;
    alignas(64) T u[W], dt[W], out[W];
    for (int64_t t = t0; t < t1; ++t) {
      load(s.u, t, u);
      load(s.dt, t, dt);
      const T* Bt = s.B + (batch * s.l + t) * n;
      const T* Ct = s.C + (batch * s.l + t) * n;
#pragma omp simd
      for (int64_t w = 0; w < W; ++w) out[w] = D[w] * u[w];
      for (int64_t i = 0; i < n; ++i) {
        T* hi = h + i * W;
        const T* Ai = A.data() + i * W;
        const T b_ti = Bt[i], c_ti = Ct[i];
        if (decays) {
          T* decay = decays + ((t - t0) * n + i) * W;
#pragma omp simd
          for (int64_t w = 0; w < W; ++w) {
            decay[w] = exp_vec(dt[w] * Ai[w]);
            hi[w] = decay[w] * hi[w] + dt[w] * u[w] * b_ti;
          }
        } else {
#pragma omp simd
          for (int64_t w = 0; w < W; ++w) {
            hi[w] = exp_vec(dt[w] * Ai[w]) * hi[w] + dt[w] * u[w] * b_ti;
            out[w] += c_ti * hi[w];
          }
        }
      }
      if (states) std::copy(h, h + n * W, states + (t - t0) * n * W);
      if (y) store(y, t, out);
    }
  }
};

template <typename T>
int64_t blocks_per_batch(const Scan<T>& s) {
  return (s.d + W - 1) / W;
}

// Splits work items (batch x channel block) into contiguous ranges, one per worker. With OpenMP the
// workers are the threads of the runtime torch loaded (the same libgomp.so.1 soname binds to it):
// threads of a second pool would compete with torch's for the cores while those spin-wait.
template <typename Body>
void parallel_items(int64_t items, int threads, Body body) {
  if (threads == 1) return body(0, int64_t(0), items);
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static, 1)
  for (int worker = 0; worker < threads; ++worker)
    body(worker, items * worker / threads, items * (worker + 1) / threads);
#else
  std::vector<std::thread> pool;
  for (int worker = 0; worker < threads; ++worker)
    pool.emplace_back(body, worker, items * worker / threads, items * (worker + 1) / threads);
  for (auto& thread : pool) thread.join();
#endif
}

int clamp_threads(int threads, int64_t items) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, items)));
}

template <typename T>
int64_t segments(const Scan<T>& s) {
  return (s.l + SEGMENT - 1) / SEGMENT;
}

// The forward pass. Where `starts` is given (l2m_scan_saved_states scalars), it keeps the state
// before each segment for the backward pass.
template <typename T>
void forward(const Scan<T>& s, T* y, T* last, T* starts, int threads) {
  const int64_t per_batch = blocks_per_batch(s), items = s.b * per_batch, stride = s.n * W;
  parallel_items(items, clamp_threads(threads, items), [&](int, int64_t begin, int64_t end) {
    std::vector<T> h(stride);
    for (int64_t item = begin; item < end; ++item) {
      const Block<T> block(s, item / per_batch, (item % per_batch) * W);
      block.initial_state(h.data());
      for (int64_t k = 0; k < segments(s); ++k) {
        if (starts) std::copy(h.begin(), h.end(), starts + (item * segments(s) + k) * stride);
        block.run(k * SEGMENT, std::min(s.l, (k + 1) * SEGMENT), h.data(), y, nullptr, nullptr);
      }
      if (last) block.final_state(h.data(), last);
    }
  });
}

// A thread's gradients of what many work items share: dA, dD (over the batch) and dB, dC (over
// channel blocks). dB and dC are kept per lane and summed over lanes once per batch element.
template <typename T>
struct Sums {
  std::vector<T> dA, dD, dB, dC, dB_lanes, dC_lanes;
  int64_t batch = -1;
  explicit Sums(const Scan<T>& s)
      : dA(s.d * s.n), dD(s.d), dB(s.b * s.l * s.n), dC(s.b * s.l * s.n), dB_lanes(s.l * s.n * W), dC_lanes(s.l * s.n * W) {}

  void flush(const Scan<T>& s) {  // lanes of the current batch element into dB, dC
    if (batch < 0) return;
    for (int64_t k = 0; k < s.l * s.n; ++k) {
      T b_sum = 0, c_sum = 0;
      for (int64_t w = 0; w < W; ++w) {
        b_sum += dB_lanes[k * W + w];
        c_sum += dC_lanes[k * W + w];
      }
      dB[batch * s.l * s.n + k] += b_sum;
      dC[batch * s.l * s.n + k] += c_sum;
    }
    std::fill(dB_lanes.begin(), dB_lanes.end(), T(0));
    std::fill(dC_lanes.begin(), dC_lanes.end(), T(0));
  }
};

template <typename T>
void add_into(T* out, const std::vector<T>& part) {
  if (out)
    for (size_t k = 0; k < part.size(); ++k) out[k] += part[k];
}

template <typename T>
void backward(const Scan<T>& s, const T* starts, const T* dy, const T* dlast, T* du, T* ddt, T* dA, T* dB, T* dC,
              T* dD, T* dh0, int threads) {
  const int64_t n = s.n, per_batch = blocks_per_batch(s), items = s.b * per_batch, stride = n * W;
  threads = clamp_threads(threads, items);
  std::vector<Sums<T>> sums;
  sums.reserve(threads);
  for (int worker = 0; worker < threads; ++worker) sums.emplace_back(s);
  parallel_items(items, threads, [&](int worker, int64_t begin, int64_t end) {
    Sums<T>& sum = sums[worker];
    std::vector<T> h(stride), states(SEGMENT * stride), decays(SEGMENT * stride);
    std::vector<T> gh(stride), dA_lanes(stride), dD_lanes(W);
    alignas(64) T u[W], dt[W], g[W], du_t[W], ddt_t[W];
    for (int64_t item = begin; item < end; ++item) {
      const Block<T> block(s, item / per_batch, (item % per_batch) * W);
      if (block.batch != sum.batch) {
        sum.flush(s);
        sum.batch = block.batch;
      }
      const T* item_starts = starts + item * segments(s) * stride;
      std::fill(gh.begin(), gh.end(), T(0));  // dL/dh after the last step
      if (dlast) {
        for (int64_t w = 0; w < block.width; ++w)
          for (int64_t i = 0; i < n; ++i) gh[i * W + w] = dlast[((block.batch * s.d) + block.c0 + w) * n + i];
      }
      std::fill(dA_lanes.begin(), dA_lanes.end(), T(0));
      std::fill(dD_lanes.begin(), dD_lanes.end(), T(0));
      for (int64_t k = segments(s) - 1; k >= 0; --k) {
        const int64_t t0 = k * SEGMENT, t1 = std::min(s.l, t0 + SEGMENT);
        std::copy(item_starts + k * stride, item_starts + (k + 1) * stride, h.begin());
        block.run(t0, t1, h.data(), nullptr, states.data(), decays.data());
        for (int64_t t = t1 - 1; t >= t0; --t) {  // gh: dL/dh_t from the steps after t, then a_t dL/dh_t
          block.load(s.u, t, u);
          block.load(s.dt, t, dt);
          block.load(dy, t, g);
          const T* Bt = s.B + (block.batch * s.l + t) * n;
          const T* Ct = s.C + (block.batch * s.l + t) * n;
          const T* before = t > t0 ? states.data() + (t - 1 - t0) * stride : item_starts + k * stride;
          const T* now = states.data() + (t - t0) * stride;
#pragma omp simd
          for (int64_t w = 0; w < W; ++w) {
            du_t[w] = g[w] * block.D[w];
            dD_lanes[w] += g[w] * u[w];
            ddt_t[w] = 0;
          }
          for (int64_t i = 0; i < n; ++i) {
            const int64_t iw = i * W;
            const T* decay = decays.data() + ((t - t0) * n + i) * W;
            const T* Ai = block.A.data() + iw;
            const T b_ti = Bt[i], c_ti = Ct[i];
            T* dB_lane = sum.dB_lanes.data() + (t * n + i) * W;
            T* dC_lane = sum.dC_lanes.data() + (t * n + i) * W;
#pragma omp simd
            for (int64_t w = 0; w < W; ++w) {
              const T grad_h = gh[iw + w] + g[w] * c_ti;
              const T grad_exponent = grad_h * before[iw + w] * decay[w];  // dL/d(dt_t A)
              dC_lane[w] += g[w] * now[iw + w];
              dB_lane[w] += grad_h * dt[w] * u[w];
              dA_lanes[iw + w] += grad_exponent * dt[w];
              ddt_t[w] += grad_exponent * Ai[w] + grad_h * u[w] * b_ti;
              du_t[w] += grad_h * dt[w] * b_ti;
              gh[iw + w] = grad_h * decay[w];
            }
          }
          block.store(du, t, du_t);
          block.store(ddt, t, ddt_t);
        }
      }
      for (int64_t w = 0; w < block.width; ++w) {
        const int64_t channel = block.c0 + w;
        sum.dD[channel] += dD_lanes[w];
        for (int64_t i = 0; i < n; ++i) {
          sum.dA[channel * n + i] += dA_lanes[i * W + w];
          if (dh0) dh0[((block.batch * s.d) + channel) * n + i] = gh[i * W + w];
        }
      }
    }
    sum.flush(s);
  });
  for (const auto& part : sums) {
    add_into(dA, part.dA);
    add_into(dD, part.dD);
    add_into(dB, part.dB);
    add_into(dC, part.dC);
  }
}

// Mamba's causal depthwise convolution and its SiLU, channels last, in the same blocks of W lanes:
//   y_t = silu(bias + sum_k weight_k x_{t-K+1+k})     (x_s = 0 before the sequence)
// x: (b, l, d) with `row` elements between time steps (a view of in_proj's output needs no copy);
// weight: (d, K); bias: (d) or null; y, dx: (b, l, d) contiguous; dweight: (d, K); dbias: (d).
template <typename T>
struct Conv {
  const T *x, *weight, *bias;
  int64_t b, l, d, row, K;

  struct Lanes {  // one block's weights (K x W) and bias (W), zero past its width
    int64_t batch, c0, width;
    std::vector<T> weight, bias;
  };

  Lanes lanes(int64_t item) const {
    const int64_t per_batch = (d + W - 1) / W, c0 = (item % per_batch) * W;
    Lanes out{item / per_batch, c0, std::min(W, d - c0), std::vector<T>(K * W, T(0)), std::vector<T>(W, T(0))};
    for (int64_t w = 0; w < out.width; ++w) {
      for (int64_t k = 0; k < K; ++k) out.weight[k * W + w] = weight[(c0 + w) * K + k];
      if (bias) out.bias[w] = bias[c0 + w];
    }
    return out;
  }

  // x at step s of the block into lanes, zero before the sequence and past the width
  void load(const Lanes& block, int64_t s, T* into) const {
    if (s >= 0) {
      to_lanes(x + (block.batch * l + s) * row + block.c0, block.width, into);
    } else {
#pragma omp simd
      for (int64_t w = 0; w < W; ++w) into[w] = T(0);
    }
  }

  void pre_activation(const Lanes& block, int64_t t, T* acc, T* window) const {  // window: K x W inputs
    for (int64_t k = 0; k < K; ++k) load(block, t - K + 1 + k, window + k * W);
#pragma omp simd
    for (int64_t w = 0; w < W; ++w) acc[w] = block.bias[w];
    for (int64_t k = 0; k < K; ++k) {
      const T* wk = block.weight.data() + k * W;
      const T* xk = window + k * W;
#pragma omp simd
      for (int64_t w = 0; w < W; ++w) acc[w] += wk[w] * xk[w];
    }
  }
};

template <typename T>
inline T sigmoid(T v) {
  return T(1) / (T(1) + exp_vec(-v));
}

template <typename T>
void conv_forward(const Conv<T>& c, T* y, int threads) {
  const int64_t items = c.b * ((c.d + W - 1) / W);
  parallel_items(items, clamp_threads(threads, items), [&](int, int64_t begin, int64_t end) {
    std::vector<T> window(c.K * W);
    alignas(64) T acc[W];
    for (int64_t item = begin; item < end; ++item) {
      const auto block = c.lanes(item);
      for (int64_t t = 0; t < c.l; ++t) {
        c.pre_activation(block, t, acc, window.data());
#pragma omp simd
        for (int64_t w = 0; w < W; ++w) acc[w] *= sigmoid(acc[w]);
        from_lanes(acc, block.width, y + (block.batch * c.l + t) * c.d + block.c0);
      }
    }
  });
}

template <typename T>
void conv_backward(const Conv<T>& c, const T* dy, T* dx, T* dweight, T* dbias, int threads) {
  const int64_t K = c.K, items = c.b * ((c.d + W - 1) / W);
  threads = clamp_threads(threads, items);
  std::vector<std::vector<T>> dweights(threads, std::vector<T>(c.d * K)), dbiases(threads, std::vector<T>(c.d));
  parallel_items(items, threads, [&](int worker, int64_t begin, int64_t end) {
    std::vector<T> window(K * W), grads(K * W);  // grads: dL/d(pre-activation) of the last K steps, by t mod K
    std::vector<T> dw_storage(K * W);
    T* __restrict dw_lanes = dw_storage.data();  // not aliased: the compiler keeps its sums out of the other buffers' way
    alignas(64) T acc[W], g[W], gate[W], grad[W], db_lanes[W];
    for (int64_t item = begin; item < end; ++item) {
      const auto block = c.lanes(item);
      std::fill(grads.begin(), grads.end(), T(0));
      std::fill(dw_lanes, dw_lanes + K * W, T(0));
      std::fill(db_lanes, db_lanes + W, T(0));
      int64_t slot = (c.l - 1) % K;  // step t + j sits in slot (slot + j) mod K (no division per step)
      for (int64_t t = c.l - 1; t >= 0; --t, slot = slot == 0 ? K - 1 : slot - 1) {
        c.pre_activation(block, t, acc, window.data());
        to_lanes(dy + (block.batch * c.l + t) * c.d + block.c0, block.width, g);
#pragma omp simd
        for (int64_t w = 0; w < W; ++w) gate[w] = sigmoid(acc[w]);
#pragma omp simd
        for (int64_t w = 0; w < W; ++w) {
          grad[w] = g[w] * gate[w] * (T(1) + acc[w] * (T(1) - gate[w]));  // silu'(pre) = s (1 + pre (1 - s))
          db_lanes[w] += grad[w];
        }
        std::copy(grad, grad + W, grads.data() + slot * W);
        for (int64_t k = 0; k < K; ++k) {
          const T* xk = window.data() + k * W;
          T* dwk = dw_lanes + k * W;
#pragma omp simd
          for (int64_t w = 0; w < W; ++w) dwk[w] += grad[w] * xk[w];
        }
        // dx_t = sum_k weight_k dL/d(pre_{t+K-1-k}), over the steps that exist
#pragma omp simd
        for (int64_t w = 0; w < W; ++w) acc[w] = 0;
        for (int64_t k = std::max<int64_t>(0, t + K - c.l); k < K; ++k) {
          const T* wk = block.weight.data() + k * W;
          const int64_t later = slot + K - 1 - k;
          const T* gk = grads.data() + (later >= K ? later - K : later) * W;
#pragma omp simd
          for (int64_t w = 0; w < W; ++w) acc[w] += wk[w] * gk[w];
        }
        from_lanes(acc, block.width, dx + (block.batch * c.l + t) * c.d + block.c0);
      }
      for (int64_t w = 0; w < block.width; ++w) {
        dbiases[worker][block.c0 + w] += db_lanes[w];
        for (int64_t k = 0; k < K; ++k) dweights[worker][(block.c0 + w) * K + k] += dw_lanes[k * W + w];
      }
    }
  });
  for (int worker = 0; worker < threads; ++worker) {
    add_into(dweight, dweights[worker]);
    add_into(dbias, dbiases[worker]);
  }
}


// Linear attention and the delta rule (linear_attention.py, deltanet.py) as one recurrence per
// (batch, head), W value channels at a time: the columns of the state S (dk x dv) evolve independently
// given the keys, so a block's state (dk x W) stays in cache, one SIMD lane per value channel:
//
//   S' = diag(a_t) S_{t-1},  a_t = exp(log_decay_t)        (a_t = 1 where log_decay is null)
//   d_t = v_t                                               (linear attention: beta null)
//   d_t = beta_t (v_t - S'^T k_t)                           (the delta rule)
//   S_t = S' + k_t d_t^T,    o_t = S_t^T q_t
//
// Layouts (row-major, contiguous): q, k: (b, l, h, dk); log_decay: (b, l, h, decay_dim), decay_dim dk
// (a decay per key channel) or 1 (one per head); v, o: (b, l, h, dv); beta: (b, l, h); h0, last and
// their gradients: (b, h, dk, dv). The gradients of q, k, log_decay and beta are sums over
// value channels: the caller zeroes them and each (batch, head), one work item, adds its blocks' parts.
template <typename T>
struct Recurrence {
  const T *q, *k, *v, *beta, *log_decay, *h0;
  int64_t b, l, h, dk, dv, decay_dim;

  int64_t blocks() const { return (dv + W - 1) / W; }
  int64_t segments() const { return (l + SEGMENT - 1) / SEGMENT; }
  int64_t row(int64_t item, int64_t t) const { return (item / h * l + t) * h + item % h; }  // item = batch * h + head
  int64_t width(int64_t c0) const { return std::min(W, dv - c0); }

  void decays(int64_t item, int64_t t, T* decay) const {  // a_t (dk)
    if (!log_decay) return std::fill(decay, decay + dk, T(1));
    const T* g = log_decay + row(item, t) * decay_dim;
    if (decay_dim == 1) return std::fill(decay, decay + dk, exp_vec(g[0]));
#pragma omp simd
    for (int64_t i = 0; i < dk; ++i) decay[i] = exp_vec(g[i]);
  }

  void initial_state(int64_t item, int64_t c0, T* S) const {
    std::fill(S, S + dk * W, T(0));
    if (h0)
      for (int64_t i = 0; i < dk; ++i) to_lanes(h0 + (item * dk + i) * dv + c0, width(c0), S + i * W);
  }

  void final_state(int64_t item, int64_t c0, const T* S, T* out) const {
    for (int64_t i = 0; i < dk; ++i) from_lanes(S + i * W, width(c0), out + (item * dk + i) * dv + c0);
  }

  // Steps t0..t1-1 of block c0 from S (dk x W, in place), writing o where given; for the backward's
  // recomputation, each step's S_t (dk x W) into `states` and, for the delta rule, v_t - S'^T k_t (W)
  // into `residuals`. decay: dk scalars of scratch.
  void run(int64_t item, int64_t c0, int64_t t0, int64_t t1, T* S, T* o, T* states, T* residuals, T* decay) const {
    alignas(64) T d[W], u[W], out[W];
    for (int64_t t = t0; t < t1; ++t) {
      const T *qt = q + row(item, t) * dk, *kt = k + row(item, t) * dk;
      decays(item, t, decay);
      to_lanes(v + row(item, t) * dv + c0, width(c0), d);
      if (beta) {
#pragma omp simd
        for (int64_t w = 0; w < W; ++w) u[w] = 0;
        for (int64_t i = 0; i < dk; ++i) {
          T* Si = S + i * W;
#pragma omp simd
          for (int64_t w = 0; w < W; ++w) {
            Si[w] *= decay[i];
            u[w] += kt[i] * Si[w];
          }
        }
        const T beta_t = beta[row(item, t)];
        T* residual = residuals ? residuals + (t - t0) * W : u;
#pragma omp simd
        for (int64_t w = 0; w < W; ++w) {
          residual[w] = d[w] - u[w];
          d[w] = beta_t * residual[w];
        }
      } else if (log_decay) {
        for (int64_t i = 0; i < dk; ++i) {
          T* Si = S + i * W;
#pragma omp simd
          for (int64_t w = 0; w < W; ++w) Si[w] *= decay[i];
        }
      }
#pragma omp simd
      for (int64_t w = 0; w < W; ++w) out[w] = 0;
      for (int64_t i = 0; i < dk; ++i) {
        T* Si = S + i * W;
#pragma omp simd
        for (int64_t w = 0; w < W; ++w) {
          Si[w] += kt[i] * d[w];
          out[w] += qt[i] * Si[w];
        }
      }
      if (states) std::copy(S, S + dk * W, states + (t - t0) * dk * W);
      if (o) from_lanes(out, width(c0), o + row(item, t) * dv + c0);
    }
  }

  int64_t start_offset(int64_t item, int64_t block, int64_t segment) const {
    return ((item * blocks() + block) * segments() + segment) * dk * W;
  }
};

template <typename T>
void recurrence_forward(const Recurrence<T>& r, T* o, T* last, T* starts, int threads) {
  const int64_t items = r.b * r.h;
  parallel_items(items, clamp_threads(threads, items), [&](int, int64_t begin, int64_t end) {
    std::vector<T> S(r.dk * W), decay(r.dk);
    for (int64_t item = begin; item < end; ++item) {
      for (int64_t block = 0; block < r.blocks(); ++block) {
        r.initial_state(item, block * W, S.data());
        for (int64_t k = 0; k < r.segments(); ++k) {
          if (starts) std::copy(S.begin(), S.end(), starts + r.start_offset(item, block, k));
          r.run(item, block * W, k * SEGMENT, std::min(r.l, (k + 1) * SEGMENT), S.data(), o, nullptr, nullptr, decay.data());
        }
        if (last) r.final_state(item, block * W, S.data(), last);
      }
    }
  });
}

template <typename T>
inline T lane_sum(const T* x) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t w = 0; w < W; ++w) sum += x[w];
  return sum;
}

// Reverse mode through the steps, with gS = dL/dS_t carried back; the states of a segment are
// recomputed from its start, as the scan's backward does.
template <typename T>
void recurrence_backward(const Recurrence<T>& r, const T* starts, const T* dout, const T* dlast, T* dq, T* dk,
                         T* dv, T* dbeta, T* dlog_decay, T* dh0, int threads) {
  const int64_t items = r.b * r.h, n = r.dk, stride = n * W;
  parallel_items(items, clamp_threads(threads, items), [&](int, int64_t begin, int64_t end) {
    std::vector<T> gS(stride), states(SEGMENT * stride), residuals(SEGMENT * W), S(stride), decay(n);
    alignas(64) T g_out[W], d[W], g_d[W], g_u[W], Sp[W], dv_t[W], prod[W], head_decay[W];
    for (int64_t item = begin; item < end; ++item) {
      for (int64_t block = 0; block < r.blocks(); ++block) {
        const int64_t c0 = block * W, width = r.width(c0);
        std::fill(gS.begin(), gS.end(), T(0));
        if (dlast)
          for (int64_t i = 0; i < n; ++i) to_lanes(dlast + (item * n + i) * r.dv + c0, width, gS.data() + i * W);
        for (int64_t k = r.segments() - 1; k >= 0; --k) {
          const int64_t t0 = k * SEGMENT, t1 = std::min(r.l, t0 + SEGMENT);
          const T* start = starts + r.start_offset(item, block, k);
          std::copy(start, start + stride, S.begin());
          r.run(item, c0, t0, t1, S.data(), nullptr, states.data(), residuals.data(), decay.data());
          for (int64_t t = t1 - 1; t >= t0; --t) {
            const int64_t at = r.row(item, t);
            const T *qt = r.q + at * n, *kt = r.k + at * n;
            T *dqt = dq + at * n, *dkt = dk + at * n;
            const T* before = t > t0 ? states.data() + (t - 1 - t0) * stride : start;
            const T* now = states.data() + (t - t0) * stride;
            const T* residual = residuals.data() + (t - t0) * W;
            const T beta_t = r.beta ? r.beta[at] : T(1);
            r.decays(item, t, decay.data());
            to_lanes(dout + at * r.dv + c0, width, g_out);
            if (r.beta) {
#pragma omp simd
              for (int64_t w = 0; w < W; ++w) d[w] = beta_t * residual[w];
            } else {
              to_lanes(r.v + at * r.dv + c0, width, d);
            }
            // 1. o_t = S_t^T q_t
            for (int64_t i = 0; i < n; ++i) {
              T* gi = gS.data() + i * W;
              const T* now_i = now + i * W;
#pragma omp simd
              for (int64_t w = 0; w < W; ++w) {
                prod[w] = g_out[w] * now_i[w];
                gi[w] += qt[i] * g_out[w];
              }
              dqt[i] += lane_sum(prod);
            }
            // 2. S_t = S' + k_t d_t^T: dL/dd_t, then dL/du_t = -beta_t dL/dd_t for the delta rule
#pragma omp simd
            for (int64_t w = 0; w < W; ++w) g_d[w] = 0;
            for (int64_t i = 0; i < n; ++i) {
              const T* gi = gS.data() + i * W;
#pragma omp simd
              for (int64_t w = 0; w < W; ++w) g_d[w] += kt[i] * gi[w];
            }
#pragma omp simd
            for (int64_t w = 0; w < W; ++w) {
              dv_t[w] = beta_t * g_d[w];
              prod[w] = g_d[w] * residual[w];
              g_u[w] = r.beta ? -beta_t * g_d[w] : T(0);
            }
            from_lanes(dv_t, width, dv + at * r.dv + c0);
            if (r.beta) dbeta[at] += lane_sum(prod);
            // 3. k_t's two uses, gS to dL/dS', and S' = diag(a_t) S_{t-1} (a decay per head: its
            //    gradient summed over key channels in lanes, one lane sum a step)
#pragma omp simd
            for (int64_t w = 0; w < W; ++w) head_decay[w] = 0;
            for (int64_t i = 0; i < n; ++i) {
              T* gi = gS.data() + i * W;
              const T* before_i = before + i * W;
#pragma omp simd
              for (int64_t w = 0; w < W; ++w) {
                Sp[w] = decay[i] * before_i[w];
                prod[w] = gi[w] * d[w] + g_u[w] * Sp[w];
                gi[w] += kt[i] * g_u[w];
              }
              dkt[i] += lane_sum(prod);
              if (r.log_decay && r.decay_dim == 1) {
#pragma omp simd
                for (int64_t w = 0; w < W; ++w) {
                  head_decay[w] += gi[w] * Sp[w];
                  gi[w] *= decay[i];
                }
              } else if (r.log_decay) {
#pragma omp simd
                for (int64_t w = 0; w < W; ++w) {
                  prod[w] = gi[w] * Sp[w];
                  gi[w] *= decay[i];
                }
                dlog_decay[at * n + i] += lane_sum(prod);
              }
            }
            if (r.log_decay && r.decay_dim == 1) dlog_decay[at] += lane_sum(head_decay);
          }
        }
        if (dh0)
          for (int64_t i = 0; i < n; ++i) from_lanes(gS.data() + i * W, width, dh0 + (item * n + i) * r.dv + c0);
      }
    }
  });
}

}  // namespace

// Scalars of the state kept by the forward pass for the backward: one n x W state per segment and block.
extern "C" int64_t l2m_scan_saved_states(int64_t b, int64_t d, int64_t l, int64_t n) {
  return b * ((d + W - 1) / W) * ((l + SEGMENT - 1) / SEGMENT) * n * W;
}

#define L2M_SCAN_API(T, SUFFIX)                                                                              \
  extern "C" void l2m_conv_forward_##SUFFIX(const T* x, const T* weight, const T* bias, int64_t b, int64_t l,      \
                                            int64_t d, int64_t row, int64_t K, T* y, int threads) {            \
    conv_forward(Conv<T>{x, weight, bias, b, l, d, row, K}, y, threads);                                        \
  }                                                                                                            \
  extern "C" void l2m_conv_backward_##SUFFIX(const T* x, const T* weight, const T* bias, int64_t b, int64_t l,     \
                                             int64_t d, int64_t row, int64_t K, const T* dy, T* dx, T* dweight, \
                                             T* dbias, int threads) {                                            \
    conv_backward(Conv<T>{x, weight, bias, b, l, d, row, K}, dy, dx, dweight, dbias, threads);                  \
  }                                                                                                            \
  extern "C" void l2m_scan_forward_##SUFFIX(const T* u, const T* dt, const T* A, const T* B, const T* C,       \
                                            const T* D, const T* h0, int64_t b, int64_t d, int64_t l,         \
                                            int64_t n, T* y, T* last, T* starts, int threads) {               \
    forward(Scan<T>{u, dt, A, B, C, D, h0, b, d, l, n}, y, last, starts, threads);                            \
  }                                                                                                            \
  extern "C" void l2m_scan_backward_##SUFFIX(const T* u, const T* dt, const T* A, const T* B, const T* C,      \
                                             const T* D, const T* h0, int64_t b, int64_t d, int64_t l,        \
                                             int64_t n, const T* starts, const T* dy, const T* dlast, T* du,  \
                                             T* ddt, T* dA, T* dB, T* dC, T* dD, T* dh0, int threads) {       \
    backward(Scan<T>{u, dt, A, B, C, D, h0, b, d, l, n}, starts, dy, dlast, du, ddt, dA, dB, dC, dD, dh0,      \
             threads);                                                                                         \
  }

extern "C" int64_t l2m_recurrence_saved_states(int64_t b, int64_t l, int64_t h, int64_t dk, int64_t dv) {
  return b * h * ((dv + W - 1) / W) * ((l + SEGMENT - 1) / SEGMENT) * dk * W;
}

#define L2M_RECURRENCE_API(T, SUFFIX)                                                                          \
  extern "C" void l2m_recurrence_forward_##SUFFIX(const T* q, const T* k, const T* v, const T* beta,           \
                                                  const T* log_decay, const T* h0, int64_t b, int64_t l,      \
                                                  int64_t h, int64_t dk, int64_t dv, int64_t decay_dim, T* o,  \
                                                  T* last, T* starts, int threads) {                           \
    recurrence_forward(Recurrence<T>{q, k, v, beta, log_decay, h0, b, l, h, dk, dv, decay_dim}, o, last, starts, \
                       threads);                                                                               \
  }                                                                                                            \
  extern "C" void l2m_recurrence_backward_##SUFFIX(                                                            \
      const T* q, const T* k, const T* v, const T* beta, const T* log_decay, const T* h0, int64_t b, int64_t l, \
      int64_t h, int64_t dk, int64_t dv, int64_t decay_dim, const T* starts, const T* dout, const T* dlast,     \
      T* dq, T* dk_, T* dv_, T* dbeta, T* dlog_decay, T* dh0, int threads) {                                   \
    recurrence_backward(Recurrence<T>{q, k, v, beta, log_decay, h0, b, l, h, dk, dv, decay_dim}, starts, dout,  \
                        dlast, dq, dk_, dv_, dbeta, dlog_decay, dh0, threads);                                 \
  }

L2M_RECURRENCE_API(float, f32)
L2M_RECURRENCE_API(double, f64)

L2M_SCAN_API(float, f32)
L2M_SCAN_API(double, f64)
