// The C entry points: validate, translate host pointers, cut the batch into launches.
#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include <cuda.h>  // types only: the driver is reached through cudaGetDriverEntryPointByVersion

#include "batch.h"
#include "lmtier_transfer.h"

namespace {

thread_local std::string g_last_error;

int fail(int status, const char* fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    g_last_error = buf;
    return status;
}

int status_of(cudaError_t e) {
    switch (e) {
        case cudaErrorNoDevice:
        case cudaErrorInsufficientDriver:
        case cudaErrorInitializationError:
        case cudaErrorDevicesUnavailable:
            return LMT_ERR_NO_DEVICE;
        case cudaErrorNoKernelImageForDevice:
        case cudaErrorInvalidDeviceFunction:
        case cudaErrorUnsupportedPtxVersion:
        case cudaErrorInvalidPtx:
        case cudaErrorInvalidKernelImage:
            return LMT_ERR_UNSUPPORTED_DEVICE;
        default:
            return LMT_ERR_CUDA;
    }
}

int fail_cuda(cudaError_t e, const char* what) {
    cudaGetLastError();  // our runtime's error state only; torch's runtime keeps its own
    return fail(status_of(e), "%s: %s (%s)", what, cudaGetErrorName(e), cudaGetErrorString(e));
}

// Switches to the cache's device for the call and back afterwards (the caller's thread state).
class DeviceGuard {
   public:
    explicit DeviceGuard(int device) {
        err_ = cudaGetDevice(&prev_);
        if (err_ == cudaSuccess && prev_ != device) {
            err_ = cudaSetDevice(device);
            switched_ = err_ == cudaSuccess;
        }
    }
    ~DeviceGuard() {
        if (switched_) cudaSetDevice(prev_);
    }
    cudaError_t error() const { return err_; }

   private:
    int prev_ = 0;
    bool switched_ = false;
    cudaError_t err_ = cudaSuccess;
};

// A chunk, or a slice of one too long for a launch: where its layer-0 pages start on the host,
// how far apart its layers are, and which block ids it takes.
struct Piece {
    uint64_t host;
    uint64_t layer_stride;
    uint32_t first;
    uint32_t pages;
};

template <class F>
F driver_entry(const char* name) {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion(name, &f, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess) {
        cudaGetLastError();
        return nullptr;
    }
    return reinterpret_cast<F>(f);
}

using PointerAttrsFn = CUresult (*)(unsigned, CUpointer_attribute*, void**, CUdeviceptr);

// cuPointerGetAttributes for three attributes instead of cudaPointerGetAttributes (which asks for
// every one). Looked up once (thread-safe static init); no -lcuda link, so the library still
// loads on machines without a driver.
PointerAttrsFn pointer_attrs() {
    static const PointerAttrsFn fn = driver_entry<PointerAttrsFn>("cuPointerGetAttributes");
    return fn;
}

struct HostRange {
    uint64_t host, dev, size;
};

// Device address of `host`, and the pinned allocation around it (size 0 when unknown).
HostRange query_host(uint64_t host) {
    if (PointerAttrsFn fn = pointer_attrs()) {
        CUdeviceptr dev = 0, start = 0;
        size_t size = 0;
        CUpointer_attribute attrs[3] = {CU_POINTER_ATTRIBUTE_DEVICE_POINTER,
                                        CU_POINTER_ATTRIBUTE_RANGE_START_ADDR,
                                        CU_POINTER_ATTRIBUTE_RANGE_SIZE};
        void* data[3] = {&dev, &start, &size};
        if (fn(3, attrs, data, CUdeviceptr(host)) != CUDA_SUCCESS || !dev) return {0, 0, 0};
        if (start > host || host - start >= size) return {host, uint64_t(dev), 0};
        return {uint64_t(start), uint64_t(dev) - (host - uint64_t(start)), uint64_t(size)};
    }
    cudaPointerAttributes a{};
    if (cudaPointerGetAttributes(&a, reinterpret_cast<void*>(host)) != cudaSuccess) {
        cudaGetLastError();
        return {0, 0, 0};
    }
    if (a.type != cudaMemoryTypeHost && a.type != cudaMemoryTypeManaged) return {0, 0, 0};
    return {host, reinterpret_cast<uint64_t>(a.devicePointer), 0};
}

uint64_t device_address(uint64_t host) {
    const HostRange r = query_host(host);
    return r.dev ? r.dev + (host - r.host) : 0;
}

// Host -> device address translation for one call. Pointer queries cost tens of microseconds
// each on a large pinned allocation, so one query per allocation serves every chunk inside it
// (an engine's chunks come from one pinned pool). Nothing outlives the call: an allocation
// freed and reused later is looked up afresh.
class HostMapper {
   public:
    int map(int chunk, uint64_t host, uint64_t bytes, int device, uint64_t* out) {
        for (const HostRange& r : ranges_) {
            if (host >= r.host && host - r.host + bytes <= r.size) {
                *out = r.dev + (host - r.host);
                return LMT_OK;
            }
        }
        const HostRange r = query_host(host);
        if (!r.dev) {
            return fail(LMT_ERR_HOST_NOT_MAPPED,
                        "host chunk %d at 0x%llx is not pinned host memory mapped for device %d "
                        "(allocate it with cudaHostAlloc / torch pin_memory=True)",
                        chunk, (unsigned long long)host, device);
        }
        const uint64_t dev = r.dev + (host - r.host);
        // Trust the allocation's range only if its last byte maps linearly too.
        if (r.size && host - r.host + bytes <= r.size &&
            device_address(r.host + r.size - 1) == r.dev + r.size - 1) {
            ranges_.push_back(r);
        } else if (bytes > 1 && device_address(host + bytes - 1) != dev + bytes - 1) {
            return fail(LMT_ERR_HOST_NOT_MAPPED,
                        "host chunk %d (0x%llx, %llu bytes) extends past its pinned allocation",
                        chunk, (unsigned long long)host, (unsigned long long)bytes);
        }
        *out = dev;
        return LMT_OK;
    }

   private:
    std::vector<HostRange> ranges_;
};

struct Plan {
    bool to_host;
    const lmt_layout* layout;
    const uint64_t* layer_ptrs;
    std::vector<int32_t> layers;
    std::vector<Piece> pieces;
    const int32_t* block_ids;
    uint64_t page_bytes;
    lmt::LaunchShape shape;
    uint32_t tiles_per_run;
    uint32_t tile_bytes;
    cudaStream_t stream;
};

template <class B>
int run_batches(const Plan& p) {
    // The parameter block is up to ~30 KB: build it on the heap, reuse it for every launch.
    auto b = std::make_unique<B>();
    const lmt_layout& L = *p.layout;
    b->block_stride = L.block_stride;
    b->run_delta = L.num_runs == 2 ? int64_t(L.run_offsets[1]) - int64_t(L.run_offsets[0]) : 0;
    b->run_bytes = L.run_bytes;
    b->page_bytes = p.page_bytes;
    b->num_runs = L.num_runs;
    b->tiles_per_run = p.tiles_per_run;
    b->tile_bytes = p.tile_bytes;
    const size_t nsel = p.layers.size();
    for (size_t l0 = 0; l0 < nsel; l0 += B::max_layers) {
        const uint32_t nl = uint32_t(std::min<size_t>(B::max_layers, nsel - l0));
        for (uint32_t i = 0; i < nl; ++i) {
            const int32_t layer = p.layers[l0 + i];
            b->layer_base[i] = p.layer_ptrs[layer] + L.run_offsets[0];
            b->layer_slot[i] = uint32_t(layer);
        }
        b->num_layers = nl;
        size_t next = 0;
        while (next < p.pieces.size()) {
            uint32_t nc = 0, np = 0;
            while (next < p.pieces.size() && nc < uint32_t(B::max_chunks) &&
                   np + p.pieces[next].pages <= uint32_t(B::max_pages)) {
                const Piece& pc = p.pieces[next++];
                b->host_base[nc] = pc.host;
                b->host_layer_stride[nc] = pc.layer_stride;
                b->chunk_start[nc] = np;
                std::copy(p.block_ids + pc.first, p.block_ids + pc.first + pc.pages,
                          b->block_id + np);  // validated non-negative
                np += pc.pages;
                ++nc;
            }
            b->chunk_start[nc] = np;
            b->num_chunks = nc;
            b->num_pages = np;
            const uint64_t units = uint64_t(np) * nl * L.num_runs * p.tiles_per_run;
            if (units > 0x7fffffffull) {
                return fail(LMT_ERR_NOT_SUPPORTED, "too many work units (%llu) in one launch",
                            (unsigned long long)units);
            }
            lmt::LaunchShape shape = p.shape;
            shape.ctas = int(std::min<uint64_t>(uint64_t(shape.ctas), units));
            const cudaError_t e = lmt::launch_copy(p.to_host, *b, shape, p.stream);
            if (e != cudaSuccess) return fail_cuda(e, "launching the page copy kernel");
        }
    }
    return LMT_OK;
}

}  // namespace

extern "C" {

LMT_API int lmt_abi_version(void) { return LMT_ABI_VERSION; }

LMT_API const char* lmt_version_string(void) {
    static const std::string v = "lmtier_transfer 0.1.0 (abi " + std::to_string(LMT_ABI_VERSION) +
                                 ", built with CUDA " + std::to_string(CUDART_VERSION / 1000) +
                                 "." + std::to_string(CUDART_VERSION % 1000 / 10) + ")";
    return v.c_str();
}

LMT_API const char* lmt_status_string(int status) {
    switch (status) {
        case LMT_OK: return "LMT_OK";
        case LMT_ERR_INVALID_ARGUMENT: return "LMT_ERR_INVALID_ARGUMENT";
        case LMT_ERR_HOST_NOT_MAPPED: return "LMT_ERR_HOST_NOT_MAPPED";
        case LMT_ERR_NO_DEVICE: return "LMT_ERR_NO_DEVICE";
        case LMT_ERR_UNSUPPORTED_DEVICE: return "LMT_ERR_UNSUPPORTED_DEVICE";
        case LMT_ERR_CUDA: return "LMT_ERR_CUDA";
        case LMT_ERR_NOT_SUPPORTED: return "LMT_ERR_NOT_SUPPORTED";
        default: return "LMT_ERR_UNKNOWN";
    }
}

LMT_API const char* lmt_last_error(void) { return g_last_error.c_str(); }

LMT_API int lmt_device_count(int* count) {
    g_last_error.clear();
    if (!count) return fail(LMT_ERR_INVALID_ARGUMENT, "count is NULL");
    *count = 0;
    const cudaError_t e = cudaGetDeviceCount(count);
    if (e != cudaSuccess) return fail_cuda(e, "cudaGetDeviceCount");
    return LMT_OK;
}

LMT_API int lmt_copy_pages(int direction, const lmt_layout* layout, const uint64_t* layer_ptrs,
                           int32_t num_layers, const int32_t* layers, int32_t num_selected,
                           const int32_t* block_ids, const int32_t* chunk_pages,
                           const uint64_t* host_ptrs, int32_t num_chunks, int32_t device,
                           void* stream, const lmt_launch_opts* opts) {
    g_last_error.clear();
    if (direction != LMT_DEVICE_TO_HOST && direction != LMT_HOST_TO_DEVICE) {
        return fail(LMT_ERR_INVALID_ARGUMENT, "direction %d is neither 0 (D2H) nor 1 (H2D)",
                    direction);
    }
    if (!layout) return fail(LMT_ERR_INVALID_ARGUMENT, "layout is NULL");
    const lmt_layout& L = *layout;
    if (L.num_runs < 1 || L.num_runs > 2) {
        return fail(L.num_runs ? LMT_ERR_NOT_SUPPORTED : LMT_ERR_INVALID_ARGUMENT,
                    "num_runs is %u; pages have 1 or 2 runs", L.num_runs);
    }
    if (L.reserved || !L.run_bytes || !L.num_blocks) {
        return fail(LMT_ERR_INVALID_ARGUMENT, "layout needs run_bytes > 0, num_blocks > 0, "
                                              "reserved == 0");
    }
    if (num_layers < 1 || !layer_ptrs) {
        return fail(LMT_ERR_INVALID_ARGUMENT, "need num_layers >= 1 and layer_ptrs");
    }
    if (num_chunks < 0 || (num_chunks > 0 && (!chunk_pages || !host_ptrs))) {
        return fail(LMT_ERR_INVALID_ARGUMENT, "need num_chunks >= 0, chunk_pages and host_ptrs");
    }
    if (device < 0) return fail(LMT_ERR_INVALID_ARGUMENT, "device %d < 0", device);

    Plan p{};
    p.to_host = direction == LMT_DEVICE_TO_HOST;
    p.layout = layout;
    p.layer_ptrs = layer_ptrs;
    p.block_ids = block_ids;
    p.page_bytes = uint64_t(L.num_runs) * L.run_bytes;
    p.stream = static_cast<cudaStream_t>(stream);
    if (layers) {
        if (num_selected < 0) return fail(LMT_ERR_INVALID_ARGUMENT, "num_selected < 0");
        std::vector<char> seen(size_t(num_layers), 0);
        for (int32_t i = 0; i < num_selected; ++i) {
            const int32_t l = layers[i];
            if (l < 0 || l >= num_layers || seen[size_t(l)]) {
                return fail(LMT_ERR_INVALID_ARGUMENT,
                            "layers[%d] = %d is out of [0, %d) or repeated", i, l, num_layers);
            }
            seen[size_t(l)] = 1;
            p.layers.push_back(l);
        }
    } else {
        for (int32_t l = 0; l < num_layers; ++l) p.layers.push_back(l);
    }
    for (int32_t l : p.layers) {
        if (!layer_ptrs[l]) return fail(LMT_ERR_INVALID_ARGUMENT, "layer_ptrs[%d] is NULL", l);
    }

    uint64_t total = 0;
    for (int32_t c = 0; c < num_chunks; ++c) {
        if (chunk_pages[c] < 0) {
            return fail(LMT_ERR_INVALID_ARGUMENT, "chunk_pages[%d] = %d < 0", c, chunk_pages[c]);
        }
        total += uint64_t(chunk_pages[c]);
    }
    if (total > 0x7fffffffull) return fail(LMT_ERR_INVALID_ARGUMENT, "too many pages");
    if (total && !block_ids) return fail(LMT_ERR_INVALID_ARGUMENT, "block_ids is NULL");
    for (uint64_t i = 0; i < total; ++i) {
        if (block_ids[i] < 0 || uint64_t(block_ids[i]) >= L.num_blocks) {
            return fail(LMT_ERR_INVALID_ARGUMENT, "block id %d (entry %llu) is out of [0, %llu)",
                        block_ids[i], (unsigned long long)i, (unsigned long long)L.num_blocks);
        }
    }
    if (!p.to_host && total > 1) {
        // Two writers of one block would race; an onload must name each block once.
        std::vector<int32_t> sorted(block_ids, block_ids + total);
        std::sort(sorted.begin(), sorted.end());
        const auto dup = std::adjacent_find(sorted.begin(), sorted.end());
        if (dup != sorted.end()) {
            return fail(LMT_ERR_INVALID_ARGUMENT, "block id %d repeats in a host->device copy",
                        *dup);
        }
    }
    if (total == 0 || p.layers.empty()) return LMT_OK;

    lmt_launch_opts o{};
    if (opts) o = *opts;
    const int threads = o.threads ? int(o.threads) : 512;
    const int unroll = o.unroll ? int(o.unroll) : 4;
    if (threads < 32 || threads > 1024 || threads % 32) {
        return fail(LMT_ERR_INVALID_ARGUMENT, "threads %d: use a multiple of 32 in 32..1024",
                    threads);
    }
    if (unroll != 2 && unroll != 4 && unroll != 8) {
        return fail(LMT_ERR_INVALID_ARGUMENT, "unroll %d: use 2, 4 or 8", unroll);
    }

    DeviceGuard guard(device);
    if (guard.error() != cudaSuccess) return fail_cuda(guard.error(), "selecting the device");
    int ctas = int(o.max_ctas);
    if (!ctas) {
        const cudaError_t e = cudaDeviceGetAttribute(&ctas, cudaDevAttrMultiProcessorCount, device);
        if (e != cudaSuccess) return fail_cuda(e, "cudaDeviceGetAttribute(SM count)");
    }

    // Widest access every address and size allows (16 bytes in every real KV layout).
    uint64_t align = L.run_bytes | (L.num_blocks > 1 ? L.block_stride : 0);
    if (L.num_runs == 2) {
        align |= L.run_offsets[1] > L.run_offsets[0] ? L.run_offsets[1] - L.run_offsets[0]
                                                       : L.run_offsets[0] - L.run_offsets[1];
    }
    for (int32_t l : p.layers) align |= layer_ptrs[l] + L.run_offsets[0];

    uint32_t first = 0;
    HostMapper mapper;
    for (int32_t c = 0; c < num_chunks; ++c) {
        const uint32_t pages = uint32_t(chunk_pages[c]);
        if (!pages) continue;
        const uint64_t layer_stride = uint64_t(pages) * p.page_bytes;
        uint64_t host = host_ptrs[c];
        if (!host) return fail(LMT_ERR_INVALID_ARGUMENT, "host_ptrs[%d] is NULL", c);
        if (!(o.flags & LMT_FLAG_TRUST_UVA)) {
            const int st = mapper.map(c, host, layer_stride * uint64_t(num_layers), device, &host);
            if (st != LMT_OK) return st;
        }
        align |= host;
        for (uint32_t p0 = 0; p0 < pages; p0 += lmt::LargeBatch::max_pages) {
            const uint32_t n = std::min<uint32_t>(pages - p0, lmt::LargeBatch::max_pages);
            p.pieces.push_back(Piece{host + uint64_t(p0) * p.page_bytes, layer_stride,
                                     first + p0, n});
        }
        first += pages;
    }

    int width = 16;
    while (width > 1 && (align & uint64_t(width - 1))) width >>= 1;
    const int eff_unroll = width == 16 ? unroll : 4;  // narrower kernels exist with unroll 4
    p.tile_bytes = uint32_t(threads) * uint32_t(eff_unroll) * uint32_t(width);
    const uint64_t tiles = (L.run_bytes + p.tile_bytes - 1) / p.tile_bytes;
    if (tiles > 0x7fffffffull) return fail(LMT_ERR_NOT_SUPPORTED, "run_bytes too large");
    p.tiles_per_run = uint32_t(tiles);
    p.shape = lmt::LaunchShape{width, eff_unroll, threads, ctas, (o.flags & LMT_FLAG_PLAIN_ACCESS) != 0};

    const bool small = p.layers.size() <= size_t(lmt::SmallBatch::max_layers) &&
                       p.pieces.size() <= size_t(lmt::SmallBatch::max_chunks) &&
                       total <= uint64_t(lmt::SmallBatch::max_pages);
    return small ? run_batches<lmt::SmallBatch>(p) : run_batches<lmt::LargeBatch>(p);
}

LMT_API int lmt_offload(const lmt_layout* layout, const uint64_t* layer_ptrs, int32_t num_layers,
                        const int32_t* block_ids, const int32_t* chunk_pages,
                        const uint64_t* host_ptrs, int32_t num_chunks, int32_t device,
                        void* stream) {
    return lmt_copy_pages(LMT_DEVICE_TO_HOST, layout, layer_ptrs, num_layers, nullptr, 0,
                          block_ids, chunk_pages, host_ptrs, num_chunks, device, stream, nullptr);
}

LMT_API int lmt_onload(const lmt_layout* layout, const uint64_t* layer_ptrs, int32_t num_layers,
                       const int32_t* block_ids, const int32_t* chunk_pages,
                       const uint64_t* host_ptrs, int32_t num_chunks, int32_t device,
                       void* stream) {
    return lmt_copy_pages(LMT_HOST_TO_DEVICE, layout, layer_ptrs, num_layers, nullptr, 0,
                          block_ids, chunk_pages, host_ptrs, num_chunks, device, stream, nullptr);
}

LMT_API int lmt_offload_layer(const lmt_layout* layout, const uint64_t* layer_ptrs,
                              int32_t num_layers, int32_t layer, const int32_t* block_ids,
                              const int32_t* chunk_pages, const uint64_t* host_ptrs,
                              int32_t num_chunks, int32_t device, void* stream) {
    return lmt_copy_pages(LMT_DEVICE_TO_HOST, layout, layer_ptrs, num_layers, &layer, 1,
                          block_ids, chunk_pages, host_ptrs, num_chunks, device, stream, nullptr);
}

LMT_API int lmt_onload_layer(const lmt_layout* layout, const uint64_t* layer_ptrs,
                             int32_t num_layers, int32_t layer, const int32_t* block_ids,
                             const int32_t* chunk_pages, const uint64_t* host_ptrs,
                             int32_t num_chunks, int32_t device, void* stream) {
    return lmt_copy_pages(LMT_HOST_TO_DEVICE, layout, layer_ptrs, num_layers, &layer, 1,
                          block_ids, chunk_pages, host_ptrs, num_chunks, device, stream, nullptr);
}

}  // extern "C"
