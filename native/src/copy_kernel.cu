// The page copy kernel: one launch moves every (page, layer, run) of a batch.
//
// Each CTA copies one tile (threads x unroll x width bytes of one run) per grid-stride step:
// every thread first issues `unroll` loads, then the matching stores, so a CTA keeps a whole
// tile of reads in flight. That matters most host->device, where each load crosses PCIe
// (~1-2 us): bytes in flight = CTAs x tile must exceed bandwidth x latency. A warp's stores
// cover 32 x width contiguous bytes, i.e. full 128-byte lines for width 16, which keeps
// device->host writes to mapped memory as whole PCIe write packets.
//
// Decoding a unit needs only uniform values (every thread of the CTA reads the same parameter),
// which the constant cache broadcasts; __grid_constant__ keeps the ~30 KB parameter block in the
// constant bank instead of copying it to local memory when indexed dynamically.
#include "batch.h"

namespace lmt {
namespace {

// Streaming (evict-first) accesses: the bytes are touched once, so keep them out of L1/L2.
// kPlain selects ordinary accesses (kept for comparison, LMT_FLAG_PLAIN_ACCESS).
template <typename V, bool kPlain>
__device__ __forceinline__ V load_stream(const V* p) {
    if (kPlain) return *p;
    return __ldcs(p);
}
template <typename V, bool kPlain>
__device__ __forceinline__ void store_stream(V* p, const V& v) {
    if (kPlain) *p = v; else __stcs(p, v);
}

template <typename V, int U, bool kPlain>
__device__ __forceinline__ void copy_tile(const V* __restrict__ src, V* __restrict__ dst,
                                          uint32_t n) {
    const uint32_t step = blockDim.x;
    const uint32_t i = threadIdx.x;
    V v[U];
#pragma unroll
    for (int j = 0; j < U; ++j) {
        if (i + j * step < n) v[j] = load_stream<V, kPlain>(src + i + j * step);
    }
#pragma unroll
    for (int j = 0; j < U; ++j) {
        if (i + j * step < n) store_stream<V, kPlain>(dst + i + j * step, v[j]);
    }
}

template <typename V, int U, bool kToHost, bool kPlain, class B>
__global__ void __launch_bounds__(1024) copy_pages_kernel(const __grid_constant__ B b) {
    const uint32_t units = b.num_pages * b.num_layers * b.num_runs * b.tiles_per_run;
    for (uint32_t u = blockIdx.x; u < units; u += gridDim.x) {
        const uint32_t k = u % b.tiles_per_run;
        uint32_t rest = u / b.tiles_per_run;
        uint32_t r = 0;
        if (b.num_runs == 2) {
            r = rest & 1u;
            rest >>= 1;
        }
        const uint32_t li = rest % b.num_layers;
        const uint32_t t = rest / b.num_layers;
        // The piece holding page t: the last c with chunk_start[c] <= t (pieces are non-empty).
        uint32_t lo = 0, hi = b.num_chunks - 1;
        while (lo < hi) {
            const uint32_t mid = (lo + hi + 1) >> 1;
            if (b.chunk_start[mid] <= t) lo = mid; else hi = mid - 1;
        }
        const uint64_t off = uint64_t(k) * b.tile_bytes;
        const uint64_t left = b.run_bytes - off;
        const uint32_t bytes = left < b.tile_bytes ? uint32_t(left) : b.tile_bytes;
        char* dev = reinterpret_cast<char*>(b.layer_base[li]) +
                    uint64_t(b.block_id[t]) * b.block_stride + (r ? b.run_delta : 0) + off;
        // Integer arithmetic: a staged piece's base lies before its buffer (it names layer 0
        // of a chunk whose first layers live elsewhere); only the sum is an address.
        char* host = reinterpret_cast<char*>(
            b.host_base[lo] + uint64_t(b.layer_slot[li]) * b.host_layer_stride[lo] +
            uint64_t(t - b.chunk_start[lo]) * b.page_bytes + r * b.run_bytes + off);
        const uint32_t n = bytes / sizeof(V);
        if (kToHost) {
            copy_tile<V, U, kPlain>(reinterpret_cast<const V*>(dev), reinterpret_cast<V*>(host), n);
        } else {
            copy_tile<V, U, kPlain>(reinterpret_cast<const V*>(host), reinterpret_cast<V*>(dev), n);
        }
    }
}

template <typename V, int U, class B, bool kPlain = false>
cudaError_t launch_one(bool to_host, const B& b, const LaunchShape& s, cudaStream_t stream) {
    if (to_host) {
        copy_pages_kernel<V, U, true, kPlain, B><<<s.ctas, s.threads, 0, stream>>>(b);
    } else {
        copy_pages_kernel<V, U, false, kPlain, B><<<s.ctas, s.threads, 0, stream>>>(b);
    }
    return cudaGetLastError();
}

}  // namespace

template <class B>
cudaError_t launch_copy(bool to_host, const B& b, const LaunchShape& s, cudaStream_t stream) {
    switch (s.width) {
        case 16:
            if (s.unroll == 2) return launch_one<int4, 2>(to_host, b, s, stream);
            if (s.unroll == 8) return launch_one<int4, 8>(to_host, b, s, stream);
            if (s.plain) return launch_one<int4, 4, B, true>(to_host, b, s, stream);
            return launch_one<int4, 4>(to_host, b, s, stream);
        case 8: return launch_one<int2, 4>(to_host, b, s, stream);
        case 4: return launch_one<int, 4>(to_host, b, s, stream);
        case 2: return launch_one<short, 4>(to_host, b, s, stream);
        default: return launch_one<char, 4>(to_host, b, s, stream);
    }
}

template cudaError_t launch_copy<SmallBatch>(bool, const SmallBatch&, const LaunchShape&,
                                             cudaStream_t);
template cudaError_t launch_copy<LargeBatch>(bool, const LargeBatch&, const LaunchShape&,
                                             cudaStream_t);

}  // namespace lmt
