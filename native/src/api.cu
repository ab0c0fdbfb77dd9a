// The C entry points and the machinery both copy paths share: argument checks, host pointer
// translation, cutting a plan into kernel launches. The mapped path lives here; the staged
// (copy-engine) path in staged.cu.
#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include <cuda.h>  // types only: the driver is reached through cudaGetDriverEntryPointByVersion

#include "plan.h"

namespace lmt {

namespace {

thread_local std::string g_last_error;

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
        case cudaErrorMemoryAllocation:
            return LMT_ERR_OUT_OF_MEMORY;
        default:
            return LMT_ERR_CUDA;
    }
}

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
            LaunchShape shape = p.shape;
            shape.ctas = int(std::min<uint64_t>(uint64_t(shape.ctas), units));
            const cudaError_t e = launch_copy(p.to_host, *b, shape, p.stream);
            if (e != cudaSuccess) return fail_cuda(e, "launching the page copy kernel");
        }
    }
    return LMT_OK;
}

}  // namespace

int fail(int status, const char* fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    g_last_error = buf;
    return status;
}

int fail_cuda(cudaError_t e, const char* what) {
    cudaGetLastError();  // our runtime's error state only; torch's runtime keeps its own
    return fail(status_of(e), "%s: %s (%s)", what, cudaGetErrorName(e), cudaGetErrorString(e));
}

DeviceGuard::DeviceGuard(int device) {
    err_ = cudaGetDevice(&prev_);
    if (err_ == cudaSuccess && prev_ != device) {
        err_ = cudaSetDevice(device);
        switched_ = err_ == cudaSuccess;
    }
}

DeviceGuard::~DeviceGuard() {
    if (switched_) cudaSetDevice(prev_);
}

// Host -> device address translation for one call. Pointer queries cost tens of microseconds
// each on a large pinned allocation, so one query per allocation serves every chunk inside it
// (an engine's chunks come from one pinned pool). Nothing outlives the call: an allocation
// freed and reused later is looked up afresh.
int HostMapper::map(int chunk, uint64_t host, uint64_t bytes, int device, uint64_t* out,
                    uint64_t* alloc) {
    if (alloc) *alloc = host;
    for (const Range& r : ranges_) {
        if (host >= r.host && host - r.host + bytes <= r.size) {
            *out = r.dev + (host - r.host);
            if (alloc) *alloc = r.host;
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
        ranges_.push_back(Range{r.host, r.dev, r.size});
        if (alloc) *alloc = r.host;
    } else if (bytes > 1 && device_address(host + bytes - 1) != dev + bytes - 1) {
        return fail(LMT_ERR_HOST_NOT_MAPPED,
                    "host chunk %d (0x%llx, %llu bytes) extends past its pinned allocation",
                    chunk, (unsigned long long)host, (unsigned long long)bytes);
    }
    *out = dev;
    return LMT_OK;
}

int prepare_call(int direction, const lmt_layout* layout, const uint64_t* layer_ptrs,
                 int32_t num_layers, const int32_t* layers, int32_t num_selected,
                 const int32_t* block_ids, const int32_t* chunk_pages, const uint64_t* host_ptrs,
                 int32_t num_chunks, int32_t device, void* stream, const lmt_launch_opts* opts,
                 Call* out) {
    Call& c = *out;
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

    c.to_host = direction == LMT_DEVICE_TO_HOST;
    c.layout = layout;
    c.layer_ptrs = layer_ptrs;
    c.num_layers = num_layers;
    c.block_ids = block_ids;
    c.chunk_pages = chunk_pages;
    c.host_ptrs = host_ptrs;
    c.num_chunks = num_chunks;
    c.page_bytes = uint64_t(L.num_runs) * L.run_bytes;
    c.device = device;
    c.stream = static_cast<cudaStream_t>(stream);
    c.layers.clear();
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
            c.layers.push_back(l);
        }
    } else {
        for (int32_t l = 0; l < num_layers; ++l) c.layers.push_back(l);
    }
    for (int32_t l : c.layers) {
        if (!layer_ptrs[l]) return fail(LMT_ERR_INVALID_ARGUMENT, "layer_ptrs[%d] is NULL", l);
    }

    uint64_t total = 0;
    for (int32_t i = 0; i < num_chunks; ++i) {
        if (chunk_pages[i] < 0) {
            return fail(LMT_ERR_INVALID_ARGUMENT, "chunk_pages[%d] = %d < 0", i, chunk_pages[i]);
        }
        total += uint64_t(chunk_pages[i]);
    }
    if (total > 0x7fffffffull) return fail(LMT_ERR_INVALID_ARGUMENT, "too many pages");
    if (total && !block_ids) return fail(LMT_ERR_INVALID_ARGUMENT, "block_ids is NULL");
    for (uint64_t i = 0; i < total; ++i) {
        if (block_ids[i] < 0 || uint64_t(block_ids[i]) >= L.num_blocks) {
            return fail(LMT_ERR_INVALID_ARGUMENT, "block id %d (entry %llu) is out of [0, %llu)",
                        block_ids[i], (unsigned long long)i, (unsigned long long)L.num_blocks);
        }
    }
    if (!c.to_host && total > 1) {
        // Two writers of one block would race; an onload must name each block once.
        std::vector<int32_t> sorted(block_ids, block_ids + total);
        std::sort(sorted.begin(), sorted.end());
        const auto dup = std::adjacent_find(sorted.begin(), sorted.end());
        if (dup != sorted.end()) {
            return fail(LMT_ERR_INVALID_ARGUMENT, "block id %d repeats in a host->device copy",
                        *dup);
        }
    }
    c.total_pages = total;

    lmt_launch_opts o{};
    if (opts) o = *opts;
    c.threads = o.threads ? int(o.threads) : 512;
    c.unroll = o.unroll ? int(o.unroll) : 4;
    c.max_ctas = int(o.max_ctas);
    c.flags = o.flags;
    if (c.threads < 32 || c.threads > 1024 || c.threads % 32) {
        return fail(LMT_ERR_INVALID_ARGUMENT, "threads %d: use a multiple of 32 in 32..1024",
                    c.threads);
    }
    if (c.unroll != 2 && c.unroll != 4 && c.unroll != 8) {
        return fail(LMT_ERR_INVALID_ARGUMENT, "unroll %d: use 2, 4 or 8", c.unroll);
    }

    // Widest access every device address and size allows (16 bytes in every real KV layout).
    uint64_t align = L.run_bytes | (L.num_blocks > 1 ? L.block_stride : 0);
    if (L.num_runs == 2) {
        align |= L.run_offsets[1] > L.run_offsets[0] ? L.run_offsets[1] - L.run_offsets[0]
                                                       : L.run_offsets[0] - L.run_offsets[1];
    }
    for (int32_t l : c.layers) align |= layer_ptrs[l] + L.run_offsets[0];
    c.align = align;
    return LMT_OK;
}

int shape_plan(const Call& c, uint64_t align, Plan* p) {
    int ctas = c.max_ctas;
    if (!ctas) {
        const cudaError_t e = cudaDeviceGetAttribute(&ctas, cudaDevAttrMultiProcessorCount, c.device);
        if (e != cudaSuccess) return fail_cuda(e, "cudaDeviceGetAttribute(SM count)");
    }
    int width = 16;
    while (width > 1 && (align & uint64_t(width - 1))) width >>= 1;
    const int eff_unroll = width == 16 ? c.unroll : 4;  // narrower kernels exist with unroll 4
    p->to_host = c.to_host;
    p->layout = c.layout;
    p->layer_ptrs = c.layer_ptrs;
    p->block_ids = c.block_ids;
    p->page_bytes = c.page_bytes;
    p->stream = c.stream;
    p->tile_bytes = uint32_t(c.threads) * uint32_t(eff_unroll) * uint32_t(width);
    const uint64_t tiles = (c.layout->run_bytes + p->tile_bytes - 1) / p->tile_bytes;
    if (tiles > 0x7fffffffull) return fail(LMT_ERR_NOT_SUPPORTED, "run_bytes too large");
    p->tiles_per_run = uint32_t(tiles);
    p->shape = LaunchShape{width, eff_unroll, c.threads, ctas, (c.flags & LMT_FLAG_PLAIN_ACCESS) != 0};
    return LMT_OK;
}

void add_pieces(Plan* p, uint64_t host, uint64_t layer_stride, uint32_t first, uint32_t pages) {
    for (uint32_t p0 = 0; p0 < pages; p0 += LargeBatch::max_pages) {
        const uint32_t n = std::min<uint32_t>(pages - p0, LargeBatch::max_pages);
        p->pieces.push_back(Piece{host + uint64_t(p0) * p->page_bytes, layer_stride, first + p0, n});
    }
}

int run_plan(const Plan& p) {
    uint64_t pages = 0;
    for (const Piece& pc : p.pieces) pages += pc.pages;
    if (!pages || p.layers.empty()) return LMT_OK;
    const bool small = p.layers.size() <= size_t(SmallBatch::max_layers) &&
                       p.pieces.size() <= size_t(SmallBatch::max_chunks) &&
                       pages <= uint64_t(SmallBatch::max_pages);
    return small ? run_batches<SmallBatch>(p) : run_batches<LargeBatch>(p);
}

int copy_mapped(const Call& c) {
    Plan p;
    p.page_bytes = c.page_bytes;
    p.layers = c.layers;
    uint64_t align = c.align;
    uint32_t first = 0;
    HostMapper mapper;
    for (int32_t i = 0; i < c.num_chunks; ++i) {
        const uint32_t pages = uint32_t(c.chunk_pages[i]);
        if (!pages) continue;
        const uint64_t layer_stride = uint64_t(pages) * c.page_bytes;
        uint64_t host = c.host_ptrs[i];
        if (!host) return fail(LMT_ERR_INVALID_ARGUMENT, "host_ptrs[%d] is NULL", i);
        if (!(c.flags & LMT_FLAG_TRUST_UVA)) {
            const int st = mapper.map(i, host, layer_stride * uint64_t(c.num_layers), c.device, &host);
            if (st != LMT_OK) return st;
        }
        align |= host;
        add_pieces(&p, host, layer_stride, first, pages);
        first += pages;
    }
    const int st = shape_plan(c, align, &p);
    return st != LMT_OK ? st : run_plan(p);
}

const char* last_error() { return g_last_error.c_str(); }
void clear_error() { g_last_error.clear(); }

}  // namespace lmt

using lmt::fail;
using lmt::fail_cuda;

namespace {

// Both copy entry points: validate, select the device, run the mapped path (no staging) or the
// staged one.
int copy_entry(int direction, const lmt_layout* layout, const uint64_t* layer_ptrs,
               int32_t num_layers, const int32_t* layers, int32_t num_selected,
               const int32_t* block_ids, const int32_t* chunk_pages, const uint64_t* host_ptrs,
               int32_t num_chunks, int32_t device, void* stream, const lmt_launch_opts* opts,
               lmt_staging* staging) {
    lmt::Call c;
    const int st = lmt::prepare_call(direction, layout, layer_ptrs, num_layers, layers,
                                     num_selected, block_ids, chunk_pages, host_ptrs, num_chunks,
                                     device, stream, opts, &c);
    if (st != LMT_OK || c.total_pages == 0 || c.layers.empty()) return st;
    lmt::DeviceGuard guard(device);
    if (guard.error() != cudaSuccess) return fail_cuda(guard.error(), "selecting the device");
    return staging ? lmt::copy_staged(c, staging) : lmt::copy_mapped(c);
}

}  // namespace

extern "C" {

LMT_API int lmt_abi_version(void) { return LMT_ABI_VERSION; }

LMT_API const char* lmt_version_string(void) {
    static const std::string v = "lmtier_transfer 0.2.0 (abi " + std::to_string(LMT_ABI_VERSION) +
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
        case LMT_ERR_OUT_OF_MEMORY: return "LMT_ERR_OUT_OF_MEMORY";
        default: return "LMT_ERR_UNKNOWN";
    }
}

LMT_API const char* lmt_last_error(void) { return lmt::last_error(); }

LMT_API int lmt_device_count(int* count) {
    lmt::clear_error();
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
    lmt::clear_error();
    return copy_entry(direction, layout, layer_ptrs, num_layers, layers, num_selected, block_ids,
                      chunk_pages, host_ptrs, num_chunks, device, stream, opts, nullptr);
}

LMT_API int lmt_copy_pages_staged(int direction, const lmt_layout* layout,
                                  const uint64_t* layer_ptrs, int32_t num_layers,
                                  const int32_t* layers, int32_t num_selected,
                                  const int32_t* block_ids, const int32_t* chunk_pages,
                                  const uint64_t* host_ptrs, int32_t num_chunks, int32_t device,
                                  void* stream, const lmt_launch_opts* opts,
                                  lmt_staging* staging) {
    lmt::clear_error();
    if (!staging) return fail(LMT_ERR_INVALID_ARGUMENT, "staging is NULL");
    return copy_entry(direction, layout, layer_ptrs, num_layers, layers, num_selected, block_ids,
                      chunk_pages, host_ptrs, num_chunks, device, stream, opts, staging);
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
