// Internal: a validated call, the launch plan the kernel needs, and the helpers both copy paths
// (mapped in api.cu, staged in staged.cu) share.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include <vector>

#include "batch.h"
#include "lmtier_transfer.h"

namespace lmt {

// Records a failure message for lmt_last_error() and returns `status`.
int fail(int status, const char* fmt, ...);
// Maps a CUDA error to a status, clears our runtime's last error and records a message.
int fail_cuda(cudaError_t e, const char* what);
// lmt_last_error()'s message for this thread, and its reset at the start of every entry point.
const char* last_error();
void clear_error();

// A chunk, or a slice of one, as the kernel sees it: where its layer-0 pages start (a device
// address: mapped host memory or device staging), how far apart its layers are, and which block
// ids (block_ids[first .. first + pages)) it takes.
struct Piece {
    uint64_t host;
    uint64_t layer_stride;
    uint32_t first;
    uint32_t pages;
};

// Everything lmt_copy_pages and lmt_copy_pages_staged check before doing any work.
struct Call {
    bool to_host = false;
    const lmt_layout* layout = nullptr;
    const uint64_t* layer_ptrs = nullptr;
    int32_t num_layers = 0;
    std::vector<int32_t> layers;  // selected layers, in the caller's order
    const int32_t* block_ids = nullptr;
    const int32_t* chunk_pages = nullptr;
    const uint64_t* host_ptrs = nullptr;
    int32_t num_chunks = 0;
    uint64_t total_pages = 0;
    uint64_t page_bytes = 0;
    int32_t device = 0;
    cudaStream_t stream = nullptr;
    int threads = 512;
    int unroll = 4;
    int max_ctas = 0;  // 0: one CTA per SM
    uint32_t flags = 0;
    uint64_t align = 0;  // OR of the device-side addresses and sizes (host side added later)
};

// Validates the arguments common to both paths into `out`. LMT_OK with out->total_pages == 0
// or out->layers empty means there is nothing to copy.
int prepare_call(int direction, const lmt_layout* layout, const uint64_t* layer_ptrs,
                 int32_t num_layers, const int32_t* layers, int32_t num_selected,
                 const int32_t* block_ids, const int32_t* chunk_pages, const uint64_t* host_ptrs,
                 int32_t num_chunks, int32_t device, void* stream, const lmt_launch_opts* opts,
                 Call* out);

// One launch plan: a layer list and the pieces every selected layer moves.
struct Plan {
    bool to_host = false;
    const lmt_layout* layout = nullptr;
    const uint64_t* layer_ptrs = nullptr;
    std::vector<int32_t> layers;
    std::vector<Piece> pieces;
    const int32_t* block_ids = nullptr;
    uint64_t page_bytes = 0;
    LaunchShape shape{};
    uint32_t tiles_per_run = 0;
    uint32_t tile_bytes = 0;
    cudaStream_t stream = nullptr;
};

// Fills the launch shape of `p` from the call and the OR of every address and size involved
// (widest access all of them allow). Needs the CUDA device selected (SM count).
int shape_plan(const Call& c, uint64_t align, Plan* p);

// Appends pages [first, first + pages) of a chunk as pieces of at most a launch's page limit.
void add_pieces(Plan* p, uint64_t host, uint64_t layer_stride, uint32_t first, uint32_t pages);

// Enqueues the plan's kernel launches (a few when it exceeds one parameter block).
int run_plan(const Plan& p);

// The two copy paths, given a validated call with something to copy and its device selected:
// one kernel on mapped host memory (api.cu), or copy engines through `staging` (staged.cu).
int copy_mapped(const Call& c);
int copy_staged(const Call& c, lmt_staging* staging);

// Where a host chunk sits and whether it is pinned and mapped; one driver query per allocation.
class HostMapper {
   public:
    // The device address of [host, host + bytes), or LMT_ERR_HOST_NOT_MAPPED. `alloc` (optional)
    // receives the start of the pinned allocation holding it, or `host` when that is unknown:
    // two ranges with the same `alloc` may be copied as one.
    int map(int chunk, uint64_t host, uint64_t bytes, int device, uint64_t* out,
            uint64_t* alloc = nullptr);

   private:
    struct Range {
        uint64_t host, dev, size;
    };
    std::vector<Range> ranges_;
};

// Switches to the cache's device for the call and back afterwards (the caller's thread state).
class DeviceGuard {
   public:
    explicit DeviceGuard(int device);
    ~DeviceGuard();
    cudaError_t error() const { return err_; }

   private:
    int prev_ = 0;
    bool switched_ = false;
    cudaError_t err_ = cudaSuccess;
};

}  // namespace lmt
