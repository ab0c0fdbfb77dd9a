// Staged copies (see lmtier_transfer.h): pages gathered into / scattered from a device staging
// buffer by the page kernel, bytes carried over PCIe by the copy engines.
//
// A call is cut into *fills*: as many (chunk, layer range) or (chunk, layer, page range) *units*
// as fit one slot, each unit a contiguous range of its host chunk and of the slot. Per fill,
// device->host:
//     stream:  wait drained[s]; gather kernel(s) -> slot s; record filled[s]
//     copy:    wait filled[s];  cudaMemcpyAsync slot -> host, one per contiguous range;
//              record drained[s]
// host->device:
//     copy:    wait drained[s]; cudaMemcpyAsync host -> slot; record filled[s]
//     stream:  wait filled[s];  scatter kernel(s) slot -> pages; record drained[s]
// `drained[s]` always follows the last reader of slot s, so the next fill of s (in this call or a
// later one, on any stream) waits for exactly that. Events are captured when a wait is enqueued,
// so re-recording them for the next round is safe.
#include <algorithm>
#include <mutex>
#include <vector>

#include "plan.h"

struct lmt_staging {
    int32_t device = 0;
    char* base = nullptr;
    uint64_t slot_bytes = 0;
    uint32_t slots = 0;
    uint32_t next_slot = 0;  // fills rotate across calls too, so a new call rarely waits
    std::vector<cudaStream_t> streams;
    std::vector<cudaEvent_t> filled, drained;
    cudaEvent_t start = nullptr;          // the caller stream's work before a call
    std::vector<cudaEvent_t> finished;    // per copy stream: its last copy of a call
    bool batch_copies = true;             // cleared if the driver refuses cudaMemcpyBatchAsync
    std::mutex mu;
};

namespace lmt {
namespace {

constexpr uint64_t kSlotAlign = 256;

struct Unit {
    uint32_t chunk;
    uint64_t alloc;     // the pinned allocation holding it: units merge only within one
    int32_t la, lb;     // layers [la, lb)
    uint32_t pa, pb;    // pages [pa, pb) of the chunk (all of them when lb - la > 1)
    uint64_t host;      // host address of the unit's first byte
    uint64_t slot_off;  // its offset in the slot
    uint64_t bytes;
};

#define LMT_CUDA(call, what)                              \
    do {                                                  \
        const cudaError_t e_ = (call);                    \
        if (e_ != cudaSuccess) return fail_cuda(e_, what); \
    } while (0)

class StagedCopy {
   public:
    StagedCopy(lmt_staging& st, const Call& c, const Plan& shape,
               const std::vector<uint32_t>& first_page, const std::vector<uint64_t>& alloc)
        : st_(st), c_(c), shape_(shape), first_page_(first_page), alloc_(alloc) {}

    // Adds the pages of chunk `i`, layers [la, lb), flushing full slots on the way.
    int add_layers(uint32_t i, int32_t la, int32_t lb) {
        const uint32_t pages = uint32_t(c_.chunk_pages[i]);
        const uint64_t stride = uint64_t(pages) * c_.page_bytes;  // one layer of the chunk
        const uint64_t host = c_.host_ptrs[i];
        if (stride <= st_.slot_bytes) {
            while (la < lb) {
                const uint64_t fit = (st_.slot_bytes - used_) / stride;
                const int32_t n = int32_t(std::min<uint64_t>(uint64_t(lb - la), fit));
                if (n == 0) {
                    const int status = flush();
                    if (status != LMT_OK) return status;
                    continue;
                }
                push(Unit{i, alloc_[i], la, la + n, 0, pages, host + uint64_t(la) * stride, used_,
                          uint64_t(n) * stride});
                la += n;
            }
            return LMT_OK;
        }
        // One layer of this chunk exceeds a slot: move it in page ranges.
        for (int32_t l = la; l < lb; ++l) {
            uint32_t pa = 0;
            while (pa < pages) {
                const uint64_t fit = (st_.slot_bytes - used_) / c_.page_bytes;
                const uint32_t n = uint32_t(std::min<uint64_t>(pages - pa, fit));
                if (n == 0) {
                    if (used_ == 0) {
                        return fail(LMT_ERR_NOT_SUPPORTED,
                                    "a page of %llu bytes exceeds the staging slot of %llu bytes",
                                    (unsigned long long)c_.page_bytes,
                                    (unsigned long long)st_.slot_bytes);
                    }
                    const int status = flush();
                    if (status != LMT_OK) return status;
                    continue;
                }
                push(Unit{i, alloc_[i], l, l + 1, pa, pa + n,
                          host + uint64_t(l) * stride + uint64_t(pa) * c_.page_bytes, used_,
                          uint64_t(n) * c_.page_bytes});
                pa += n;
            }
        }
        return LMT_OK;
    }

    // Enqueues the last fill and joins the copy streams back into the caller's stream.
    int finish() {
        const int status = flush();
        if (status != LMT_OK) return status;
        if (c_.to_host) {
            for (size_t k = 0; k < st_.streams.size(); ++k) {
                if (!stream_used_[k]) continue;
                LMT_CUDA(cudaEventRecord(st_.finished[k], st_.streams[k]), "recording a copy's end");
                LMT_CUDA(cudaStreamWaitEvent(c_.stream, st_.finished[k], 0), "joining a copy stream");
            }
        }
        return LMT_OK;
    }

    int begin() {
        stream_used_.assign(st_.streams.size(), 0);
        if (!c_.to_host) {
            // The copy engine reads the host chunks: not before the caller's earlier work (which
            // may be what fills them).
            LMT_CUDA(cudaEventRecord(st_.start, c_.stream), "recording the call's start");
            for (cudaStream_t s : st_.streams) {
                LMT_CUDA(cudaStreamWaitEvent(s, st_.start, 0), "ordering a copy stream");
            }
        }
        return LMT_OK;
    }

   private:
    void push(const Unit& u) {
        units_.push_back(u);
        used_ += (u.bytes + kSlotAlign - 1) / kSlotAlign * kSlotAlign;
        if (used_ > st_.slot_bytes) used_ = st_.slot_bytes;
    }

    // Kernel launches for the fill's units, one per distinct layer range.
    int launch(char* slot) {
        std::vector<bool> done(units_.size(), false);
        for (size_t a = 0; a < units_.size(); ++a) {
            if (done[a]) continue;
            Plan p = shape_;
            p.pieces.clear();
            p.layers.clear();
            for (int32_t l = units_[a].la; l < units_[a].lb; ++l) p.layers.push_back(l);
            for (size_t b = a; b < units_.size(); ++b) {
                const Unit& u = units_[b];
                if (done[b] || u.la != units_[a].la || u.lb != units_[a].lb) continue;
                done[b] = true;
                const uint64_t stride = uint64_t(c_.chunk_pages[u.chunk]) * c_.page_bytes;
                // The piece's base names layer 0, page pa of the chunk in slot coordinates.
                const uint64_t base = reinterpret_cast<uint64_t>(slot) + u.slot_off -
                                      uint64_t(u.la) * stride;
                add_pieces(&p, base, stride, first_page_[u.chunk] + u.pa, u.pb - u.pa);
            }
            const int status = run_plan(p);
            if (status != LMT_OK) return status;
        }
        return LMT_OK;
    }

    // The fill's copies: each run of units contiguous on both sides (and inside one pinned
    // allocation: neighbouring allocations are separate to the driver) is one copy; all of them
    // go in one cudaMemcpyBatchAsync, whose per-copy cost is a fraction of a cudaMemcpyAsync's.
    int copy(char* slot, cudaStream_t s) {
        dsts_.clear();
        srcs_.clear();
        sizes_.clear();
        size_t a = 0;
        while (a < units_.size()) {
            uint64_t bytes = units_[a].bytes;
            size_t b = a + 1;
            while (b < units_.size() && units_[b].alloc == units_[a].alloc &&
                   units_[b].host == units_[a].host + bytes &&
                   units_[b].slot_off == units_[a].slot_off + bytes) {
                bytes += units_[b].bytes;
                ++b;
            }
            void* host = reinterpret_cast<void*>(units_[a].host);
            void* dev = slot + units_[a].slot_off;
            dsts_.push_back(c_.to_host ? host : dev);
            srcs_.push_back(c_.to_host ? dev : host);
            sizes_.push_back(size_t(bytes));
            a = b;
        }
        if (dsts_.size() > 1 && !(c_.flags & LMT_FLAG_SINGLE_COPIES) && st_.batch_copies) {
            cudaMemcpyAttributes attr{};
            attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
            size_t idx = 0;
            const cudaError_t e = cudaMemcpyBatchAsync(dsts_.data(), srcs_.data(), sizes_.data(),
                                                       dsts_.size(), &attr, &idx, 1, s);
            if (e == cudaSuccess) return LMT_OK;
            if (e != cudaErrorNotSupported && e != cudaErrorInvalidValue) {
                return fail_cuda(e, "cudaMemcpyBatchAsync (staged copy)");
            }
            // An older driver or a platform without batches: single copies from now on.
            cudaGetLastError();
            st_.batch_copies = false;
        }
        const cudaMemcpyKind kind = c_.to_host ? cudaMemcpyDeviceToHost : cudaMemcpyHostToDevice;
        for (size_t i = 0; i < dsts_.size(); ++i) {
            const cudaError_t e = cudaMemcpyAsync(dsts_[i], srcs_[i], sizes_[i], kind, s);
            if (e != cudaSuccess) return fail_cuda(e, "cudaMemcpyAsync (staged copy)");
        }
        return LMT_OK;
    }

    int flush() {
        if (units_.empty()) return LMT_OK;
        const uint32_t s = st_.next_slot;
        st_.next_slot = (s + 1) % st_.slots;
        const size_t k = s % st_.streams.size();
        cudaStream_t cs = st_.streams[k];
        stream_used_[k] = 1;
        char* slot = st_.base + uint64_t(s) * st_.slot_bytes;
        if (c_.to_host) {
            LMT_CUDA(cudaStreamWaitEvent(c_.stream, st_.drained[s], 0), "waiting for a slot");
            int status = launch(slot);
            if (status != LMT_OK) return status;
            LMT_CUDA(cudaEventRecord(st_.filled[s], c_.stream), "recording a gather");
            LMT_CUDA(cudaStreamWaitEvent(cs, st_.filled[s], 0), "waiting for a gather");
            status = copy(slot, cs);
            if (status != LMT_OK) return status;
            LMT_CUDA(cudaEventRecord(st_.drained[s], cs), "recording a copy");
        } else {
            LMT_CUDA(cudaStreamWaitEvent(cs, st_.drained[s], 0), "waiting for a slot");
            int status = copy(slot, cs);
            if (status != LMT_OK) return status;
            LMT_CUDA(cudaEventRecord(st_.filled[s], cs), "recording a copy");
            LMT_CUDA(cudaStreamWaitEvent(c_.stream, st_.filled[s], 0), "waiting for a copy");
            status = launch(slot);
            if (status != LMT_OK) return status;
            LMT_CUDA(cudaEventRecord(st_.drained[s], c_.stream), "recording a scatter");
        }
        units_.clear();
        used_ = 0;
        return LMT_OK;
    }

    lmt_staging& st_;
    const Call& c_;
    const Plan& shape_;
    const std::vector<uint32_t>& first_page_;
    const std::vector<uint64_t>& alloc_;
    std::vector<Unit> units_;
    std::vector<void*> dsts_;
    std::vector<const void*> srcs_;
    std::vector<size_t> sizes_;
    uint64_t used_ = 0;
    std::vector<char> stream_used_;
};

void destroy(lmt_staging* st) {
    for (cudaStream_t s : st->streams) {
        if (s) {
            cudaStreamSynchronize(s);
            cudaStreamDestroy(s);
        }
    }
    for (auto* events : {&st->filled, &st->drained, &st->finished}) {
        for (cudaEvent_t e : *events) {
            if (e) cudaEventDestroy(e);
        }
    }
    if (st->start) cudaEventDestroy(st->start);
    if (st->base) cudaFree(st->base);
    cudaGetLastError();
    delete st;
}

}  // namespace

int copy_staged(const Call& c, lmt_staging* staging) {
    if (staging->device != c.device) {
        return fail(LMT_ERR_INVALID_ARGUMENT, "the staging buffer is on device %d, the cache on %d",
                    staging->device, c.device);
    }
    // Host chunks: pinned (the copies are asynchronous), each inside its allocation.
    HostMapper mapper;
    std::vector<uint32_t> first_page(size_t(c.num_chunks), 0);
    std::vector<uint64_t> alloc(size_t(c.num_chunks), 0);
    uint32_t first = 0;
    for (int32_t i = 0; i < c.num_chunks; ++i) {
        first_page[size_t(i)] = first;
        const uint32_t pages = uint32_t(c.chunk_pages[i]);
        first += pages;
        if (!pages) continue;
        if (!c.host_ptrs[i]) return fail(LMT_ERR_INVALID_ARGUMENT, "host_ptrs[%d] is NULL", i);
        uint64_t mapped = 0;
        const int st = mapper.map(i, c.host_ptrs[i],
                                  uint64_t(pages) * c.page_bytes * uint64_t(c.num_layers),
                                  c.device, &mapped, &alloc[size_t(i)]);
        if (st != LMT_OK) return st;
    }

    // Consecutive selected layers form one contiguous range of every host chunk.
    std::vector<int32_t> sorted = c.layers;
    std::sort(sorted.begin(), sorted.end());
    std::vector<std::pair<int32_t, int32_t>> ranges;
    for (int32_t l : sorted) {
        if (!ranges.empty() && ranges.back().second == l) {
            ranges.back().second = l + 1;
        } else {
            ranges.emplace_back(l, l + 1);
        }
    }

    Plan shape;
    shape.page_bytes = c.page_bytes;
    int st = shape_plan(c, c.align | reinterpret_cast<uint64_t>(staging->base) |
                               staging->slot_bytes | kSlotAlign | c.page_bytes,
                        &shape);
    if (st != LMT_OK) return st;

    std::lock_guard<std::mutex> lock(staging->mu);
    StagedCopy copy(*staging, c, shape, first_page, alloc);
    st = copy.begin();
    for (int32_t i = 0; st == LMT_OK && i < c.num_chunks; ++i) {
        if (!c.chunk_pages[i]) continue;
        for (const auto& r : ranges) {
            st = copy.add_layers(uint32_t(i), r.first, r.second);
            if (st != LMT_OK) break;
        }
    }
    return st == LMT_OK ? copy.finish() : st;
}

}  // namespace lmt

using lmt::fail;
using lmt::fail_cuda;

extern "C" {

LMT_API int lmt_staging_create(int32_t device, uint64_t bytes, uint32_t slots,
                               uint32_t copy_streams, lmt_staging** out) {
    lmt::clear_error();
    if (!out) return fail(LMT_ERR_INVALID_ARGUMENT, "out is NULL");
    *out = nullptr;
    if (device < 0) return fail(LMT_ERR_INVALID_ARGUMENT, "device %d < 0", device);
    if (slots < 2 || slots > 64) {
        return fail(LMT_ERR_INVALID_ARGUMENT, "slots %u: use 2..64 (fills alternate between slots)",
                    slots);
    }
    if (copy_streams < 1 || copy_streams > 8) {
        return fail(LMT_ERR_INVALID_ARGUMENT, "copy_streams %u: use 1..8", copy_streams);
    }
    const uint64_t slot_bytes = bytes / slots / lmt::kSlotAlign * lmt::kSlotAlign;
    if (slot_bytes == 0) {
        return fail(LMT_ERR_INVALID_ARGUMENT, "%llu bytes cannot make %u slots of 256 bytes",
                    (unsigned long long)bytes, slots);
    }
    lmt::DeviceGuard guard(device);
    if (guard.error() != cudaSuccess) return fail_cuda(guard.error(), "selecting the device");
    auto* st = new lmt_staging();
    st->device = device;
    st->slot_bytes = slot_bytes;
    st->slots = slots;
    cudaError_t e = cudaMalloc(reinterpret_cast<void**>(&st->base), slot_bytes * slots);
    const char* what = "cudaMalloc (staging buffer)";
    for (uint32_t k = 0; e == cudaSuccess && k < copy_streams; ++k) {
        cudaStream_t s = nullptr;
        e = cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
        what = "cudaStreamCreateWithFlags";
        if (e == cudaSuccess) st->streams.push_back(s);
    }
    auto make_events = [&](std::vector<cudaEvent_t>& v, uint32_t n) {
        for (uint32_t k = 0; e == cudaSuccess && k < n; ++k) {
            cudaEvent_t ev = nullptr;
            e = cudaEventCreateWithFlags(&ev, cudaEventDisableTiming);
            what = "cudaEventCreateWithFlags";
            if (e == cudaSuccess) v.push_back(ev);
        }
    };
    make_events(st->filled, slots);
    make_events(st->drained, slots);
    make_events(st->finished, copy_streams);
    if (e == cudaSuccess) {
        e = cudaEventCreateWithFlags(&st->start, cudaEventDisableTiming);
        what = "cudaEventCreateWithFlags";
    }
    if (e != cudaSuccess) {
        const int status = fail_cuda(e, what);
        lmt::destroy(st);
        return status;
    }
    *out = st;
    return LMT_OK;
}

LMT_API int lmt_staging_destroy(lmt_staging* staging) {
    lmt::clear_error();
    if (!staging) return LMT_OK;
    lmt::DeviceGuard guard(staging->device);
    lmt::destroy(staging);
    return LMT_OK;
}

LMT_API uint64_t lmt_staging_slot_bytes(const lmt_staging* staging) {
    return staging ? staging->slot_bytes : 0;
}

}  // extern "C"
