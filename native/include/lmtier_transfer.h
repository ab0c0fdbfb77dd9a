/*
 * lmtier_transfer.h - move whole KV-cache pages between paged GPU caches and pinned host chunks.
 *
 * A flat C ABI (no C++ types, no torch) so any language can call it (lmtier uses ctypes).
 *
 * Model
 *   - A KV cache has `num_layers` layer tensors on one GPU, all paged alike (one lmt_layout).
 *   - A page is one block of one layer: `num_runs` (1 or 2) contiguous byte runs of `run_bytes`.
 *     Run r of block b of layer l starts at layer_ptrs[l] + run_offsets[r] + b * block_stride.
 *   - A host chunk is pinned host memory laid out [num_layers x pages x page_bytes], where
 *     page_bytes = num_runs * run_bytes and a page holds its runs back to back. `num_layers` is
 *     always the full layer count, also when `layers` selects a subset (layer-wise pipelining).
 *   - Chunk c moves pages block_ids[start_c .. start_c + chunk_pages[c]), start_c being the sum
 *     of the previous chunk_pages.
 *
 * Behaviour
 *   - One kernel launch moves every page of every chunk and selected layer (batches too large for
 *     the kernel's parameter space are split into a few launches). The kernel reads or writes the
 *     host chunks directly through their mapped device addresses: no device staging memory, no
 *     allocation, no synchronisation. Work is enqueued on `stream`; the caller synchronises.
 *   - Accesses are 16 bytes wide when every address and size is 16-byte aligned, else the widest
 *     width (8, 4, 2, 1) that all of them allow.
 *   - Host→device block ids must be distinct (the library checks).
 *   - Thread-safe; the device of the calling thread is restored on return.
 *
 * Errors: every function returns an lmt_status; lmt_last_error() gives a message for the last
 * failure on the calling thread.
 */
#ifndef LMTIER_TRANSFER_H
#define LMTIER_TRANSFER_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define LMT_API __declspec(dllexport)
#else
#define LMT_API __attribute__((visibility("default")))
#endif

/* Bumped on any incompatible change of the functions or structs below. */
#define LMT_ABI_VERSION 3

typedef enum lmt_status {
    LMT_OK = 0,
    LMT_ERR_INVALID_ARGUMENT = 1,   /* null pointer, bad count, layout or block id */
    LMT_ERR_HOST_NOT_MAPPED = 2,    /* a host chunk is not pinned memory the device can map */
    LMT_ERR_NO_DEVICE = 3,          /* no CUDA driver or device */
    LMT_ERR_UNSUPPORTED_DEVICE = 4, /* no kernel image for this GPU, or the driver is too old */
    LMT_ERR_CUDA = 5,               /* any other CUDA error (see lmt_last_error) */
    LMT_ERR_NOT_SUPPORTED = 6,      /* layout outside what the kernel handles (e.g. > 2 runs) */
    LMT_ERR_OUT_OF_MEMORY = 7       /* the device staging buffer could not be allocated */
} lmt_status;

typedef enum lmt_direction {
    LMT_DEVICE_TO_HOST = 0, /* offload: cache pages -> host chunks */
    LMT_HOST_TO_DEVICE = 1  /* onload:  host chunks -> cache pages */
} lmt_direction;

/* One layer's paging, in bytes (identical for every layer of a call). */
typedef struct lmt_layout {
    uint64_t num_blocks;     /* block ids must be < num_blocks */
    uint64_t block_stride;   /* bytes between consecutive blocks of a run */
    uint64_t run_offsets[2]; /* byte offset of each run in the layer (run_offsets[1] unused if 1 run) */
    uint64_t run_bytes;      /* bytes of one run of one block */
    uint32_t num_runs;       /* 1 or 2 */
    uint32_t reserved;       /* must be 0 */
} lmt_layout;

/* Kernel tuning; zero fields take the defaults. Pass NULL for all defaults. */
typedef struct lmt_launch_opts {
    uint32_t threads;  /* threads per CTA: 128..1024, multiple of 32 (default 512) */
    uint32_t max_ctas; /* most CTAs of one launch (default: one per SM) */
    uint32_t unroll;   /* 16-byte loads in flight per thread: 2, 4 or 8 (default 4) */
    uint32_t flags;    /* LMT_FLAG_* */
} lmt_launch_opts;

/* Use host pointers as device addresses without asking the driver (UVA systems only). */
#define LMT_FLAG_TRUST_UVA 1u
/* Ordinary loads/stores instead of streaming (evict-first) ones; for comparison only. */
#define LMT_FLAG_PLAIN_ACCESS 2u
/* Staged copies: one cudaMemcpyAsync per contiguous range instead of one cudaMemcpyBatchAsync
 * per slot fill; for comparison only. */
#define LMT_FLAG_SINGLE_COPIES 4u

LMT_API int lmt_abi_version(void);
LMT_API const char* lmt_version_string(void);
LMT_API const char* lmt_status_string(int status);
/* Message of the last failure on this thread ("" if none). Valid until the next call. */
LMT_API const char* lmt_last_error(void);
/* Number of CUDA devices (initialises the driver, creates no context). */
LMT_API int lmt_device_count(int* count);

/*
 * The general entry point.
 *   layer_ptrs[num_layers]   device address of each layer tensor (host array)
 *   layers[num_selected]     layers to move (host array), or NULL for all num_layers layers
 *   block_ids[sum pages]     block ids of all chunks, concatenated (host array)
 *   chunk_pages[num_chunks]  pages of each chunk (0 allowed)
 *   host_ptrs[num_chunks]    pinned host chunk addresses (host pointers)
 *   device                   CUDA device of the cache; stream a cudaStream_t on it (NULL: legacy)
 */
LMT_API int lmt_copy_pages(int direction, const lmt_layout* layout, const uint64_t* layer_ptrs,
                           int32_t num_layers, const int32_t* layers, int32_t num_selected,
                           const int32_t* block_ids, const int32_t* chunk_pages,
                           const uint64_t* host_ptrs, int32_t num_chunks, int32_t device,
                           void* stream, const lmt_launch_opts* opts);

/* All layers, default tuning. */
LMT_API int lmt_offload(const lmt_layout* layout, const uint64_t* layer_ptrs, int32_t num_layers,
                        const int32_t* block_ids, const int32_t* chunk_pages,
                        const uint64_t* host_ptrs, int32_t num_chunks, int32_t device,
                        void* stream);
LMT_API int lmt_onload(const lmt_layout* layout, const uint64_t* layer_ptrs, int32_t num_layers,
                       const int32_t* block_ids, const int32_t* chunk_pages,
                       const uint64_t* host_ptrs, int32_t num_chunks, int32_t device,
                       void* stream);

/* One layer (layer-wise pipelining); host chunks keep the full [num_layers x pages] format. */
LMT_API int lmt_offload_layer(const lmt_layout* layout, const uint64_t* layer_ptrs,
                              int32_t num_layers, int32_t layer, const int32_t* block_ids,
                              const int32_t* chunk_pages, const uint64_t* host_ptrs,
                              int32_t num_chunks, int32_t device, void* stream);
LMT_API int lmt_onload_layer(const lmt_layout* layout, const uint64_t* layer_ptrs,
                             int32_t num_layers, int32_t layer, const int32_t* block_ids,
                             const int32_t* chunk_pages, const uint64_t* host_ptrs,
                             int32_t num_chunks, int32_t device, void* stream);

/*
 * Staged copies: the copy engines carry the bytes, a small device buffer gathers the pages.
 *
 * The mapped kernel above is bounded by the 128-byte packets SM accesses make on PCIe (~94% of
 * cudaMemcpy device->host, ~91% host->device, ~77% both ways on an H100). The copy engines send
 * 256-byte packets and reach cudaMemcpy's speed, but only on long contiguous copies, and pages
 * are scattered. A staged copy therefore cuts the batch into slot fills of a device staging
 * buffer: device->host, a gather kernel packs a fill's pages into a slot (HBM speed, microseconds)
 * and one cudaMemcpyAsync per contiguous host range sends it; host->device, the copy engine fills
 * a slot and a scatter kernel places its pages. Fills rotate over the slots, so the link stays
 * busy while the next slot is gathered or scattered.
 *
 *   - The staging object owns its device buffer, `copy_streams` internal non-blocking streams and
 *     the events that order slot reuse. Calls on one object are serialised (a mutex); use one
 *     object per direction to run both directions at once.
 *   - Work is ordered after everything enqueued on `stream` before the call, and everything
 *     enqueued on `stream` after the call sees it finished (the internal streams are joined back
 *     into `stream`): the contract of lmt_copy_pages.
 *   - Host chunks must be pinned (checked as for lmt_copy_pages: LMT_ERR_HOST_NOT_MAPPED).
 *   - A page larger than one slot is LMT_ERR_NOT_SUPPORTED (use lmt_copy_pages).
 *   - Destroying the object waits for its work to finish.
 */
typedef struct lmt_staging lmt_staging;

/* Allocates `bytes` of device memory on `device` split into `slots` slots (2..64), with
 * `copy_streams` (1..8) internal streams; slot s uses stream s % copy_streams. */
LMT_API int lmt_staging_create(int32_t device, uint64_t bytes, uint32_t slots,
                               uint32_t copy_streams, lmt_staging** out);
LMT_API int lmt_staging_destroy(lmt_staging* staging);
/* Bytes of one slot (the largest contiguous fill), or 0 for NULL. */
LMT_API uint64_t lmt_staging_slot_bytes(const lmt_staging* staging);

/* lmt_copy_pages through `staging` (which must belong to `device`). */
LMT_API int lmt_copy_pages_staged(int direction, const lmt_layout* layout,
                                  const uint64_t* layer_ptrs, int32_t num_layers,
                                  const int32_t* layers, int32_t num_selected,
                                  const int32_t* block_ids, const int32_t* chunk_pages,
                                  const uint64_t* host_ptrs, int32_t num_chunks, int32_t device,
                                  void* stream, const lmt_launch_opts* opts,
                                  lmt_staging* staging);

/*
 * The lossy value codecs on the device (lmtier/codecs/quant.py, `scales: vector`), so a chunk is
 * quantized before its device->host copy and dequantized after its host->device copy in one
 * kernel each. `runs` runs of `run_elems` contiguous elements (a head vector each): one float32
 * scale per run and one code byte per element, exactly the bytes the codec's torch ops write.
 * Device pointers; enqueued on `stream` of `device`.
 */
#define LMT_CODE_FP8_E4M3 0
#define LMT_CODE_INT8 1
#define LMT_DTYPE_BF16 1
#define LMT_DTYPE_F16 2
#define LMT_DTYPE_F32 3
LMT_API int lmt_quantize_runs(int format, int dtype, const void* x, int64_t runs, int32_t run_elems,
                              float* scales, uint8_t* codes, int32_t device, void* stream);
LMT_API int lmt_dequantize_runs(int format, int dtype, const uint8_t* codes, const float* scales,
                                int64_t runs, int32_t run_elems, void* y, int32_t device,
                                void* stream);

#ifdef __cplusplus
}
#endif

#endif /* LMTIER_TRANSFER_H */
