// One decoding step of grouped-query attention on CPU, as an XLA FFI custom call
// (`prime_jax.kernels.cpu_attention`): writes each row's new key/value column into its cache block
// (in place: the blocks are aliased to the outputs) and attends over the row's live columns,
// after the shared prompt prefix of its group when there is one.
//
// XLA:CPU runs these attention products as batched dots of 3 query rows (a row's query heads of one
// kv head) against each row's own cache block; they read the cache at about a third of the memory
// bandwidth. Here one task per (prefix group, kv head) streams each block once for all its query
// rows (a prompt shared by n samples once for the n x G rows), with the running max, sum and
// weighted values of an online softmax in float32, block by block up to `num_columns` as the XLA
// path reads them. Results match the XLA path to float rounding; columns `valid` does not mark
// contribute exactly nothing, so a row's result does not depend on the other rows' lengths.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kMaxQueries = 64;   // query rows of one task (n samples x heads per kv head)
constexpr int kMaxColumns = 512;  // columns of one block or prefix
constexpr int kMaxHead = 256;
constexpr int kPrefetchRows = 8;  // software prefetch distance, in rows of keys or values

// exp(x) for x <= 0 in float32 (2^n * p(r); relative error below 1e-7 on [-87, 0], checked against
// double exp), written so the compiler vectorizes the loop around it. Below -87 it returns exp(-87)
// (1.6e-38, nothing beside the row's largest term, 1); masked columns never reach it.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float t = x * 1.44269504088896341f;
  const float n = (t + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23), vectorizable
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187045e-06f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &p, 4);
  bits += static_cast<int32_t>(n) << 23;
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

struct Stats {  // online softmax of `queries` query rows
  float max[kMaxQueries];
  float sum[kMaxQueries];
  float acc[kMaxQueries][kMaxHead];
};

// acc[i][h0, h0 + HT) += sum_c p[i][c] v[c, h0, h0 + HT) for QT query rows: the QT x HT sums stay
// in registers while the values stream past (whole rows when HT = H: read in memory order).
template <int QT, int HT>
inline void values_tile(const float* p, int ld_p, const float* v, int head, int columns, int h0, float* const* acc) {
  float sum[QT][HT] = {};
  for (int c = 0; c < columns; ++c) {
    const float* vc = v + static_cast<int64_t>(c) * head + h0;
    for (int j = 0; j < HT; j += 16) __builtin_prefetch(vc + kPrefetchRows * head + j);
    for (int i = 0; i < QT; ++i) {
      const float pc = p[i * ld_p + c];
      for (int j = 0; j < HT; ++j) sum[i][j] += pc * vc[j];
    }
  }
  for (int i = 0; i < QT; ++i)
    for (int j = 0; j < HT; ++j) acc[i][h0 + j] += sum[i][j];
}

template <int QT>
void products(const float* const* q, int queries, const float* k, int64_t ld_k, int head, int padded, float* scores,
              int ld_s) {
  for (int i = 0; i < queries; i += QT) {
    float* rows = scores + i * ld_s;
    for (int t = 0; t < QT; ++t) std::fill(rows + t * ld_s, rows + t * ld_s + padded, 0.0f);
    for (int h = 0; h < head; ++h) {
      const float* kh = k + h * ld_k;
      float qh[QT];
      for (int t = 0; t < QT; ++t) qh[t] = q[i + t][h];
      // Streams of 32 KB (a row's block) start cold for the hardware prefetcher: ask a few rows ahead.
      for (int c = 0; c < padded; c += 16) __builtin_prefetch(kh + kPrefetchRows * ld_k + c);
      for (int c = 0; c < padded; ++c) {
        const float kc = kh[c];
        for (int t = 0; t < QT; ++t) rows[t * ld_s + c] += qh[t] * kc;
      }
    }
  }
}

template <int QT>
void weighted_values(const float* p, int ld_p, int queries, const float* v, int head, int columns, Stats& s) {
  for (int i = 0; i < queries; i += QT) {
    float* acc[QT];
    for (int t = 0; t < QT; ++t) acc[t] = s.acc[i + t];
    if (head % 64 == 0 && QT <= 3) {
      for (int h0 = 0; h0 < head; h0 += 64) values_tile<QT, 64>(p + i * ld_p, ld_p, v, head, columns, h0, acc);
    } else if (head % 32 == 0) {
      for (int h0 = 0; h0 < head; h0 += 32) values_tile<QT, 32>(p + i * ld_p, ld_p, v, head, columns, h0, acc);
    } else {
      for (int h0 = 0; h0 < head; h0 += 16) values_tile<QT, 16>(p + i * ld_p, ld_p, v, head, columns, h0, acc);
    }
  }
}

// Folds `columns` columns of one kv head into the stats of `queries` query rows q[i][0..H):
// keys [H, ld_k] (column c at k[h * ld_k + c]; columns up to 16-aligned `padded` <= ld_k are read),
// values [columns, H], live[c] marks readable columns. H is a multiple of 16.
void attend_chunk(const float* const* q, int queries, const float* k, int64_t ld_k, const float* v,
                  const bool* live, int columns, int head, Stats& s) {
  alignas(64) static thread_local float scores[kMaxQueries * kMaxColumns];  // off the (pool thread's) stack
  const int padded = std::min<int>(static_cast<int>(ld_k), (columns + 15) / 16 * 16);
  const int ld_s = kMaxColumns;
  const int qt = queries % 4 == 0 ? 4 : queries % 3 == 0 ? 3 : queries % 2 == 0 ? 2 : 1;
  if (padded % 16 != 0) {  // a chunk narrower than 16 columns: plain loops
    for (int i = 0; i < queries; ++i)
      for (int c = 0; c < columns; ++c) {
        float dot = 0.0f;
        for (int h = 0; h < head; ++h) dot += q[i][h] * k[h * ld_k + c];
        scores[i * ld_s + c] = dot;
      }
  } else if (qt == 4) products<4>(q, queries, k, ld_k, head, padded, scores, ld_s);
  else if (qt == 3) products<3>(q, queries, k, ld_k, head, padded, scores, ld_s);
  else if (qt == 2) products<2>(q, queries, k, ld_k, head, padded, scores, ld_s);
  else products<1>(q, queries, k, ld_k, head, padded, scores, ld_s);
  // live[] as floats (1 or 0): loops that test a bool per column do not vectorize (GCC has no vector
  // type for it beside floats), and the softmax below ran scalar.
  alignas(64) static thread_local float keep[kMaxColumns];
  const unsigned char* live_bytes = reinterpret_cast<const unsigned char*>(live);
  for (int c = 0; c < columns; ++c) keep[c] = static_cast<float>(live_bytes[c] != 0);
  bool any = false;
  for (int i = 0; i < queries; ++i) {
    float* row = scores + i * ld_s;
    float chunk_max = -INFINITY;
#pragma omp simd reduction(max : chunk_max)
    for (int c = 0; c < columns; ++c) chunk_max = std::max(chunk_max, keep[c] != 0.0f ? row[c] : -INFINITY);
    if (chunk_max == -INFINITY) {  // nothing live here: the stats stay as they are
      for (int c = 0; c < columns; ++c) row[c] = 0.0f;
      continue;
    }
    any = true;
    const float new_max = std::max(s.max[i], chunk_max);
    float total = 0.0f;
#pragma omp simd reduction(+ : total)
    for (int c = 0; c < columns; ++c) {
      const float p = keep[c] != 0.0f ? exp_nonpositive(row[c] - new_max) : 0.0f;
      row[c] = p;
      total += p;
    }
    const float correction = s.max[i] == -INFINITY ? 0.0f : exp_nonpositive(s.max[i] - new_max);
    s.sum[i] = s.sum[i] * correction + total;
    s.max[i] = new_max;
    float* acc = s.acc[i];
    for (int h = 0; h < head; ++h) acc[h] *= correction;
  }
  if (!any) return;
  if (qt == 4) weighted_values<4>(scores, ld_s, queries, v, head, columns, s);
  else if (qt == 3) weighted_values<3>(scores, ld_s, queries, v, head, columns, s);
  else if (qt == 2) weighted_values<2>(scores, ld_s, queries, v, head, columns, s);
  else weighted_values<1>(scores, ld_s, queries, v, head, columns, s);
}

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k_new,
                           ffi::Buffer<ffi::F32> v_new, ffi::Buffer<ffi::S32> columns,
                           ffi::Buffer<ffi::PRED> valid, ffi::Buffer<ffi::S32> num_columns,
                           ffi::Buffer<ffi::F32> prefix_k, ffi::Buffer<ffi::F32> prefix_v,
                           ffi::Buffer<ffi::PRED> prefix_valid, ffi::RemainingArgs blocks,
                           ffi::Result<ffi::Buffer<ffi::F32>> out, ffi::RemainingRets block_outs) {
  const auto qd = q.dimensions();  // [B, K, G, H]
  const int64_t batch = qd[0], kv_heads = qd[1], group = qd[2], head = qd[3];
  const int64_t capacity = valid.dimensions()[1];
  const int64_t num_blocks = blocks.size() / 2;
  const int64_t num_prefixes = prefix_k.dimensions()[0];
  const int64_t prefix_len = prefix_k.dimensions()[3];
  if (num_blocks < 1 || blocks.size() != 2 * num_blocks || block_outs.size() != blocks.size())
    return ffi::Error::InvalidArgument("decode_attention_cpu: expected matching key and value blocks");
  std::vector<float*> k_blocks(num_blocks), v_blocks(num_blocks);
  int64_t block = 0;
  for (int64_t j = 0; j < num_blocks; ++j) {
    auto k_in = blocks.get<ffi::AnyBuffer>(j), v_in = blocks.get<ffi::AnyBuffer>(num_blocks + j);
    auto k_out = block_outs.get<ffi::AnyBuffer>(j), v_out = block_outs.get<ffi::AnyBuffer>(num_blocks + j);
    if (!k_in.has_value() || !v_in.has_value() || !k_out.has_value() || !v_out.has_value())
      return ffi::Error::InvalidArgument("decode_attention_cpu: bad block buffers");
    block = k_in->dimensions()[3];
    k_blocks[j] = static_cast<float*>((*k_out)->untyped_data());
    v_blocks[j] = static_cast<float*>((*v_out)->untyped_data());
    if (k_blocks[j] != k_in->untyped_data())  // not aliased: start from the input's contents
      std::memcpy(k_blocks[j], k_in->untyped_data(), k_in->size_bytes());
    if (v_blocks[j] != v_in->untyped_data())
      std::memcpy(v_blocks[j], v_in->untyped_data(), v_in->size_bytes());
  }
  const int64_t rows_per_group = num_prefixes > 0 ? batch / num_prefixes : 1;
  if (group * rows_per_group > kMaxQueries || block > kMaxColumns || prefix_len > kMaxColumns || head > kMaxHead ||
      head % 16 != 0 || num_blocks * block != capacity || (num_prefixes > 0 && batch % num_prefixes != 0))
    return ffi::Error::InvalidArgument("decode_attention_cpu: shapes out of the kernel's range");
  const int64_t live_columns = std::min<int64_t>(num_columns.typed_data()[0], capacity);
  const float* q_data = q.typed_data();
  const int32_t* column_data = columns.typed_data();
  const bool* valid_data = valid.typed_data();
  float* out_data = out->typed_data();
  const int64_t groups = batch / rows_per_group;

  auto task = [&](int64_t index) {  // one (group of rows, kv head)
    const int64_t g0 = index / kv_heads, kv = index % kv_heads;
    const int queries = static_cast<int>(rows_per_group * group);
    const float* q_rows[kMaxQueries];
    for (int64_t r = 0; r < rows_per_group; ++r)
      for (int64_t g = 0; g < group; ++g)
        q_rows[r * group + g] = q_data + (((g0 * rows_per_group + r) * kv_heads + kv) * group + g) * head;
    static thread_local Stats stats;
    for (int i = 0; i < queries; ++i) {
      stats.max[i] = -INFINITY;
      stats.sum[i] = 0.0f;
      std::fill(stats.acc[i], stats.acc[i] + head, 0.0f);
    }
    if (num_prefixes > 0) {
      const int64_t p = g0;
      attend_chunk(q_rows, queries, prefix_k.typed_data() + (p * kv_heads + kv) * head * prefix_len, prefix_len,
                   prefix_v.typed_data() + (p * kv_heads + kv) * prefix_len * head,
                   prefix_valid.typed_data() + p * prefix_len, static_cast<int>(prefix_len), static_cast<int>(head),
                   stats);
    }
    for (int64_t r = 0; r < rows_per_group; ++r) {
      const int64_t b = g0 * rows_per_group + r;
      const int64_t column = column_data[b];
      if (column >= 0 && column < capacity) {  // the new key and value, in place
        const int64_t j = column / block, local = column % block;
        float* kb = k_blocks[j] + (b * kv_heads + kv) * head * block;
        float* vb = v_blocks[j] + ((b * kv_heads + kv) * block + local) * head;
        const float* kn = k_new.typed_data() + (b * kv_heads + kv) * head;
        const float* vn = v_new.typed_data() + (b * kv_heads + kv) * head;
        for (int64_t h = 0; h < head; ++h) kb[h * block + local] = kn[h];
        std::memcpy(vb, vn, head * sizeof(float));
      }
      // The row's own columns, block by block up to `num_columns` (columns past the row's own are masked
      // by `valid`, as in XLA's path), on its G query rows of the stats.
      static thread_local Stats local_stats;
      for (int g = 0; g < group; ++g) {
        local_stats.max[g] = stats.max[r * group + g];
        local_stats.sum[g] = stats.sum[r * group + g];
        std::copy(stats.acc[r * group + g], stats.acc[r * group + g] + head, local_stats.acc[g]);
      }
      for (int64_t j = 0; j * block < live_columns; ++j) {
        const int width = static_cast<int>(std::min<int64_t>(block, live_columns - j * block));
        attend_chunk(q_rows + r * group, static_cast<int>(group), k_blocks[j] + (b * kv_heads + kv) * head * block,
                     block, v_blocks[j] + (b * kv_heads + kv) * block * head,
                     valid_data + b * capacity + j * block, width, static_cast<int>(head), local_stats);
      }
      for (int64_t g = 0; g < group; ++g) {
        float* o = out_data + ((b * kv_heads + kv) * group + g) * head;
        // A row with no live column (a free decode slot) gets zeros, not 0 / 0.
        const float inv = local_stats.sum[g] > 0.0f ? 1.0f / local_stats.sum[g] : 0.0f;
        for (int64_t h = 0; h < head; ++h) o[h] = local_stats.acc[g][h] * inv;
      }
    }
  };

  // Tasks are claimed from a shared counter by this thread and by pool workers. A worker that
  // starts after all tasks are claimed touches only the shared counters (this frame may be gone),
  // and this thread waits for the claimed tasks, not for the workers: no deadlock when the pool is
  // busy or is the thread running this call.
  struct Shared {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  const int64_t tasks = groups * kv_heads;
  auto shared = std::make_shared<Shared>();
  auto run_tasks = [shared, tasks, &task]() {
    for (int64_t t = shared->next.fetch_add(1); t < tasks; t = shared->next.fetch_add(1)) {
      task(t);
      shared->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), tasks) - 1;
  for (int64_t w = 0; w < helpers; ++w) pool.Schedule(std::function<void()>(run_tasks));
  run_tasks();
  while (shared->done.load(std::memory_order_acquire) < tasks) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PrimeDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .RemainingRets());
