// Exact k-nearest-neighbour search: one database chunk merged into running per-query top-k lists.
//
//   knn_merge_f32: a block per query row (grid-stride over rows). The row's candidates are its k
//                  old entries (distances and database indices, best first) followed by the n
//                  columns of the chunk, whose distances come from the inner products and norms:
//                  d = max((qn + dn) - 2 * ip, 0), faiss IndexFlatL2's formula. -2 * ip is exact,
//                  so contracting the subtraction into an FMA rounds the same way.
//
// Every candidate gets a 32-bit key that orders as its distance does (the usual float-to-unsigned
// transform; -0 is +0, every NaN one key above +inf, an empty old slot (a negative index) one key
// above that), and the sort key of a candidate is (key << 32) | position, position = 0..k-1 for
// the old entries and k + column for the chunk. Old indices are below every chunk index and the old list
// is ordered by (distance, index), so ordering positions orders database indices: the k smallest
// sort keys are the k best (distance, index) pairs, exact ties going to the lower index.
//
// The k-th smallest key is found by radix select, four passes of 8-bit digits, most significant
// first, each a 256-bin shared-memory histogram of the candidates that match the digits chosen so
// far (a thread adds runs of candidates in one bin, not each candidate: the high digits of
// distances bunch up). The k winners are then gathered into shared memory: every key below that
// threshold, and the first `need` keys equal to it. When the threshold's bin holds exactly `need`
// candidates (no tie straddles the cut, the usual case) every candidate up to the threshold is
// taken with a shared atomic counter; otherwise the candidates are walked in tiles of blockDim in
// order, and a block-wide count of the equal keys in earlier tiles and lanes takes the lowest
// positions. A bitonic sort of the k (<= 1024) sort keys in shared memory orders them; the output
// is written from the sorted keys (distance from the key, index from the position).
//
// The inner products are read five times per row (four histogram passes and the gather), and so
// are the norms and the old lists.
#include "common.cuh"

#define KNN_MAX_K 1024
#define KNN_NAN_KEY 0xfffffffeu
#define KNN_EMPTY_KEY 0xffffffffu
#define KNN_POS_INF __uint_as_float(0x7f800000u)

// faiss's distance: the norms' sum first, then the exact -2 * ip; clamped at 0 (NaN stays, -0 is 0).
__device__ __forceinline__ float knn_distance(float qn, float dn, float ip) {
  const float d = (qn + dn) - 2.f * ip;
  return d <= 0.f ? 0.f : d;
}

// Unsigned keys in the order of the distances: NaN after +inf.
__device__ __forceinline__ unsigned knn_key(float d) {
  if (d != d) return KNN_NAN_KEY;
  if (d == 0.f) return 0x80000000u;
  const unsigned u = __float_as_uint(d);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The distance a key stands for (KNN_NAN_KEY gives a NaN).
__device__ __forceinline__ float knn_distance_of(unsigned key) {
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

// One query row's inputs.
struct KnnRow {
  const float* old_dist;
  const long long* old_idx;
  const float* ip;
  const float* dn;
  float qn;
  unsigned k;
};

// The key of candidate `i`: an old entry for i < k, chunk column i - k after that.
__device__ __forceinline__ unsigned candidate_key(const KnnRow& r, unsigned i) {
  if (i < r.k) return r.old_idx[i] < 0 ? KNN_EMPTY_KEY : knn_key(r.old_dist[i]);
  const unsigned c = i - r.k;
  return knn_key(knn_distance(r.qn, r.dn[c], r.ip[c]));
}

__device__ __forceinline__ unsigned long long sort_key(unsigned key, unsigned pos) {
  return ((unsigned long long)key << 32) | pos;
}

// The k-th smallest key of a row and how many of the candidates with that key belong to the k
// best (`need`, >= 1) out of the `count` that have it. The same in every thread.
struct Threshold {
  unsigned key, need, count;
};

// `hist`: 256 bins; `found`: 3 words where warp 0 leaves the chosen bin, rank and count.
__device__ Threshold radix_select(const KnnRow& r, unsigned total, unsigned* hist, unsigned* found) {
  unsigned prefix = 0, mask = 0, rank = r.k, count = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (unsigned b = threadIdx.x; b < 256; b += blockDim.x) hist[b] = 0;
    __syncthreads();
    // distances bunch up in a few bins of the high digits (unit-length descriptors lie 0 to 4
    // apart), and same-address shared atomics serialise; so each thread counts a run of
    // candidates in one bin in a register and adds the run when the bin changes
    unsigned run_bin = 0, run = 0;
    for (unsigned i = threadIdx.x; i < total; i += blockDim.x) {
      const unsigned key = candidate_key(r, i), bin = (key >> shift) & 255u;
      if ((key & mask) != prefix) continue;
      if (bin != run_bin && run > 0) {
        atomicAdd(&hist[run_bin], run);
        run = 0;
      }
      run_bin = bin;
      ++run;
    }
    if (run > 0) atomicAdd(&hist[run_bin], run);
    __syncthreads();
    if (threadIdx.x < 32) {
      // lane l scans bins 8l..8l+7; the lane whose range holds the rank-th key finds its bin
      const unsigned lane = threadIdx.x;
      unsigned bins[8], sum = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        bins[j] = hist[lane * 8 + j];
        sum += bins[j];
      }
      unsigned inclusive = sum;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const unsigned v = __shfl_up_sync(FULL_MASK, inclusive, o);
        if (lane >= (unsigned)o) inclusive += v;
      }
      unsigned before = inclusive - sum;
      if (before < rank && rank <= inclusive) {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          if (before < rank && rank <= before + bins[j]) {
            found[0] = lane * 8 + j;
            found[1] = rank - before;
            found[2] = bins[j];
          }
          before += bins[j];
        }
      }
    }
    __syncthreads();
    // `found` is rewritten only after the next pass's two barriers, so reading it here is safe
    prefix |= found[0] << shift;
    mask |= 255u << shift;
    rank = found[1];
    count = found[2];
  }
  return Threshold{prefix, rank, count};
}

// Writes the sort keys of the row's k best candidates to `sel` (in no particular order).
// `taken`: the shared slot counter; `warp_eq`: a word per warp.
__device__ void gather(const KnnRow& r, unsigned total, Threshold t, unsigned long long* sel, unsigned* taken,
                       unsigned* warp_eq) {
  if (threadIdx.x == 0) *taken = 0;
  __syncthreads();
  if (t.count == t.need) {
    for (unsigned i = threadIdx.x; i < total; i += blockDim.x) {
      const unsigned key = candidate_key(r, i);
      if (key <= t.key) sel[atomicAdd(taken, 1u)] = sort_key(key, i);
    }
  } else {
    const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    unsigned eq_before = 0;  // candidates equal to the threshold in earlier tiles; the same in every thread
    for (unsigned base = 0; base < total; base += blockDim.x) {
      const unsigned i = base + threadIdx.x;
      bool eq = false;
      unsigned key = 0;
      if (i < total) {
        key = candidate_key(r, i);
        if (key < t.key) sel[atomicAdd(taken, 1u)] = sort_key(key, i);
        eq = key == t.key;
      }
      if (eq_before < t.need) {
        const unsigned ballot = __ballot_sync(FULL_MASK, eq);
        if (lane == 0) warp_eq[warp] = __popc(ballot);
        __syncthreads();
        unsigned rank = eq_before + __popc(ballot & ((1u << lane) - 1u)), tile = 0;
        for (unsigned w = 0; w < warps; ++w) {
          if (w < warp) rank += warp_eq[w];
          tile += warp_eq[w];
        }
        if (eq && rank < t.need) sel[atomicAdd(taken, 1u)] = sort_key(key, i);
        eq_before += tile;
        __syncthreads();  // warp_eq is rewritten by the next tile
      }
    }
  }
  __syncthreads();
}

// Ascending bitonic sort of v[0..p), p a power of two.
__device__ void bitonic_sort(unsigned long long* v, unsigned p) {
  for (unsigned size = 2; size <= p; size <<= 1) {
    for (unsigned stride = size >> 1; stride > 0; stride >>= 1) {
      for (unsigned t = threadIdx.x; t < p / 2; t += blockDim.x) {
        const unsigned lo = ((t & ~(stride - 1)) << 1) | (t & (stride - 1)), hi = lo + stride;
        const bool ascending = (lo & size) == 0;
        const unsigned long long a = v[lo], b = v[hi];
        if ((a > b) == ascending) {
          v[lo] = b;
          v[hi] = a;
        }
      }
      __syncthreads();
    }
  }
}

// old_dist/old_idx and out_dist/out_idx: [queries, k]; ip: [queries, n]; qn: [queries]; dn: [n].
// k in 1..=KNN_MAX_K, n <= 2^30 (the host checks), blockDim 256.
extern "C" __global__ void __launch_bounds__(256) knn_merge_f32(const float* __restrict__ old_dist,
                                                                const long long* __restrict__ old_idx,
                                                                const float* __restrict__ ip,
                                                                const float* __restrict__ qn,
                                                                const float* __restrict__ dn,
                                                                float* __restrict__ out_dist,
                                                                long long* __restrict__ out_idx, long long queries,
                                                                int k, long long n, long long merged) {
  EMU_SHARED(unsigned long long, sel, [KNN_MAX_K]);
  EMU_SHARED(unsigned, hist, [256]);
  EMU_SHARED(unsigned, found, [3]);
  EMU_SHARED(unsigned, taken, [1]);
  EMU_SHARED(unsigned, warp_eq, [32]);
  const unsigned uk = (unsigned)k, total = uk + (unsigned)n;
  unsigned p = 1;
  while (p < uk) p <<= 1;
  for (long long row = blockIdx.x; row < queries; row += gridDim.x) {
    const KnnRow r{old_dist + row * k, old_idx + row * k, ip + row * n, dn, qn[row], uk};
    const Threshold t = radix_select(r, total, hist, found);
    gather(r, total, t, sel, taken, warp_eq);
    for (unsigned j = uk + threadIdx.x; j < p; j += blockDim.x) sel[j] = ~0ull;
    __syncthreads();
    bitonic_sort(sel, p);
    for (unsigned j = threadIdx.x; j < uk; j += blockDim.x) {
      const unsigned long long e = sel[j];
      const unsigned key = (unsigned)(e >> 32), pos = (unsigned)e;
      const bool empty = key == KNN_EMPTY_KEY;
      out_dist[row * k + j] = empty ? KNN_POS_INF : knn_distance_of(key);
      out_idx[row * k + j] = empty ? -1 : (pos < uk ? r.old_idx[pos] : merged + (long long)(pos - uk));
    }
    // No barrier here: the next row writes `hist` (last read before this row's gather) first, and
    // `sel` only after barriers every thread must reach once it has written this row out.
  }
}
