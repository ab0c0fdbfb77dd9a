// Internal: the kernel's parameter block and the launcher the C API calls.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace lmt {

// Everything a launch needs travels as one kernel parameter (captured at launch time), so a call
// allocates nothing on the device, copies no metadata and never waits. Kernel parameters may be
// up to 32764 bytes (CUDA >= 12.1, sm_70+); two sizes keep small launches cheap.
//
// Work unit u (grid-stride) = (page t, selected layer i, run r, tile k), k fastest:
//   device: layer_base[i] + block_id[t] * block_stride + r * run_delta + k * tile_bytes
//   host:   host_base[c] + layer_slot[i] * host_layer_stride[c]
//           + (t - chunk_start[c]) * page_bytes + r * run_bytes + k * tile_bytes
// where c is the piece holding page t (chunk_start[c] <= t < chunk_start[c + 1]).
template <int kLayers, int kChunks, int kPages>
struct Batch {
    static constexpr int max_layers = kLayers;
    static constexpr int max_chunks = kChunks;
    static constexpr int max_pages = kPages;

    uint64_t block_stride;
    int64_t run_delta;  // run 1 start minus run 0 start
    uint64_t run_bytes;
    uint64_t page_bytes;
    uint32_t num_runs;
    uint32_t num_layers;  // selected layers in this launch
    uint32_t num_chunks;  // pieces (a chunk, or a slice of one) in this launch
    uint32_t num_pages;
    uint32_t tiles_per_run;
    uint32_t tile_bytes;
    uint64_t layer_base[kLayers];  // device address of run 0 of block 0
    uint64_t host_base[kChunks];   // device-visible address of the piece's first page, layer 0
    uint64_t host_layer_stride[kChunks];
    uint32_t layer_slot[kLayers];  // layer index in the host chunk format
    uint32_t chunk_start[kChunks + 1];
    uint32_t block_id[kPages];
};

using SmallBatch = Batch<128, 16, 256>;   // one chunk of a typical model: ~3 KB of parameters
using LargeBatch = Batch<256, 448, 4096>; // up to 448 chunks / 4096 pages per launch

static_assert(sizeof(SmallBatch) <= 4096, "small batch must fit the classic 4 KB limit");
static_assert(sizeof(LargeBatch) <= 32764, "large batch must fit the kernel parameter limit");

struct LaunchShape {
    int width;    // bytes per access: 16, 8, 4, 2 or 1
    int unroll;   // accesses in flight per thread
    int threads;  // per CTA
    int ctas;
    bool plain;   // ordinary instead of streaming cache hints (16-byte, unroll 4 only)
};

// Enqueue one copy kernel; returns the launch error (cudaSuccess when enqueued).
template <class B>
cudaError_t launch_copy(bool to_host, const B& batch, const LaunchShape& shape, cudaStream_t stream);

}  // namespace lmt
