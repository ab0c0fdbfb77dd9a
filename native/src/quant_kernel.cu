// Quantize and dequantize KV on the GPU in the lossy codecs' format (lmtier/codecs/quant.py,
// `scales: vector`): one float32 scale per run of `run_elems` elements, one byte per element.
//
// The bytes must be exactly those of the codec's torch ops (a CPU engine decodes what a GPU
// engine encoded and back; tests/native/test_coded_gpu.py compares them), so every step is the
// float32 operation torch performs, with the same rounding:
//   amax  = the largest magnitude bits of the run (sign cleared), read back as the float
//   scale = amax > 0 ? max(amax * (1 / qmax), FLT_MIN) : 1          (one float32 product)
//   code  = e4m3(x * (1 / scale)), or int8(rint(x * (1 / scale)))   (float32 product, RNE)
//   x'    = half(e4m3 bits moved into fp16's) * (scale * 256), or int8 * scale, rounded to the dtype
// torch runs these as 6-10 separate kernels with float32 temporaries and ~0.4 ms of host launch
// time per chunk; one launch here reads the values once and writes the codes once.
#include <cfloat>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include "plan.h"

namespace lmt {
namespace {

template <class T> struct Elem;
template <> struct Elem<__nv_bfloat16> {
    using Bits = uint16_t;
    static constexpr uint32_t mask = 0x7FFFu;
    __device__ static uint32_t magnitude(__nv_bfloat16 v) { return __bfloat16_as_ushort(v) & mask; }
    __device__ static float from_bits(uint32_t b) { return __bfloat162float(__ushort_as_bfloat16(uint16_t(b))); }
    __device__ static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
    __device__ static __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};
template <> struct Elem<__half> {
    using Bits = uint16_t;
    static constexpr uint32_t mask = 0x7FFFu;
    __device__ static uint32_t magnitude(__half v) { return __half_as_ushort(v) & mask; }
    __device__ static float from_bits(uint32_t b) { return __half2float(__ushort_as_half(uint16_t(b))); }
    __device__ static float to_float(__half v) { return __half2float(v); }
    __device__ static __half from_float(float v) { return __float2half_rn(v); }
};
template <> struct Elem<float> {
    using Bits = uint32_t;
    static constexpr uint32_t mask = 0x7FFFFFFFu;
    __device__ static uint32_t magnitude(float v) { return __float_as_uint(v) & mask; }
    __device__ static float from_bits(uint32_t b) { return __uint_as_float(b); }
    __device__ static float to_float(float v) { return v; }
    __device__ static float from_float(float v) { return v; }
};

constexpr int kThreads = 256;  // 8 warps, one run per warp at a time

// One warp per run (head vectors are 64-256 elements): lanes stride the run, a shuffle reduces.
template <class T, int kFp8>
__global__ void quantize_runs(const T* __restrict__ x, float* __restrict__ scales,
                              uint8_t* __restrict__ codes, int64_t runs, int32_t n, float inv_qmax) {
    const int lane = threadIdx.x & 31;
    const int64_t warps = int64_t(gridDim.x) * (kThreads / 32);
    for (int64_t r = (int64_t(blockIdx.x) * kThreads + threadIdx.x) >> 5; r < runs; r += warps) {
        const T* xr = x + r * n;
        uint32_t m = 0;
        for (int i = lane; i < n; i += 32) m = max(m, Elem<T>::magnitude(xr[i]));
        for (int o = 16; o; o >>= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, o));
        const float amax = Elem<T>::from_bits(m);
        float scale = 1.0f;  // also for a NaN amax, as torch.where(amax > 0, ..., 1) gives
        if (amax > 0.0f) {
            scale = __fmul_rn(amax, inv_qmax);
            if (scale < FLT_MIN) scale = FLT_MIN;
        }
        const float inverse = __frcp_rn(scale);
        if (lane == 0) scales[r] = scale;
        uint8_t* cr = codes + r * n;
        for (int i = lane; i < n; i += 32) {
            const float v = __fmul_rn(Elem<T>::to_float(xr[i]), inverse);
            cr[i] = kFp8 ? uint8_t(__nv_cvt_float_to_fp8(v, __NV_NOSAT, __NV_E4M3))
                         : uint8_t(int8_t(__float2int_rn(v)));
        }
    }
}

template <class T, int kFp8>
__global__ void dequantize_runs(const uint8_t* __restrict__ codes, const float* __restrict__ scales,
                                T* __restrict__ y, int64_t runs, int32_t n) {
    const int lane = threadIdx.x & 31;
    const int64_t warps = int64_t(gridDim.x) * (kThreads / 32);
    for (int64_t r = (int64_t(blockIdx.x) * kThreads + threadIdx.x) >> 5; r < runs; r += warps) {
        // the codec's decode: e4m3 bits placed in fp16's give the value / 256, the scale carries 256
        const float scale = kFp8 ? __fmul_rn(scales[r], 256.0f) : scales[r];
        const uint8_t* cr = codes + r * n;
        T* yr = y + r * n;
        for (int i = lane; i < n; i += 32) {
            const int16_t t = int16_t(int8_t(cr[i]));
            float v;
            if (kFp8) {
                const uint16_t bits = uint16_t(((t << 7) & 0x3F80) | (t & 0x8000));
                v = __half2float(__ushort_as_half(bits));
            } else {
                v = float(t);
            }
            yr[i] = Elem<T>::from_float(__fmul_rn(v, scale));
        }
    }
}

int blocks_for(int64_t runs, int device) {
    int sms = 0;
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0) {
        cudaGetLastError();
        sms = 132;
    }
    const int64_t want = (runs + kThreads / 32 - 1) / (kThreads / 32);
    return int(want < int64_t(sms) * 16 ? want : int64_t(sms) * 16);
}

template <class T>
void launch_quantize(int format, const void* x, float* scales, uint8_t* codes, int64_t runs, int32_t n,
                     int blocks, cudaStream_t s) {
    const T* xs = static_cast<const T*>(x);
    if (format == LMT_CODE_FP8_E4M3)
        quantize_runs<T, 1><<<blocks, kThreads, 0, s>>>(xs, scales, codes, runs, n, 1.0f / 448.0f);
    else
        quantize_runs<T, 0><<<blocks, kThreads, 0, s>>>(xs, scales, codes, runs, n, 1.0f / 127.0f);
}

template <class T>
void launch_dequantize(int format, const uint8_t* codes, const float* scales, void* y, int64_t runs, int32_t n,
                       int blocks, cudaStream_t s) {
    T* ys = static_cast<T*>(y);
    if (format == LMT_CODE_FP8_E4M3)
        dequantize_runs<T, 1><<<blocks, kThreads, 0, s>>>(codes, scales, ys, runs, n);
    else
        dequantize_runs<T, 0><<<blocks, kThreads, 0, s>>>(codes, scales, ys, runs, n);
}

int check_args(int format, int dtype, const void* a, const void* b, const void* c, int64_t runs, int32_t n) {
    if (format != LMT_CODE_FP8_E4M3 && format != LMT_CODE_INT8)
        return fail(LMT_ERR_INVALID_ARGUMENT, "format %d (use LMT_CODE_FP8_E4M3 or LMT_CODE_INT8)", format);
    if (dtype != LMT_DTYPE_BF16 && dtype != LMT_DTYPE_F16 && dtype != LMT_DTYPE_F32)
        return fail(LMT_ERR_INVALID_ARGUMENT, "dtype %d (use LMT_DTYPE_BF16, _F16 or _F32)", dtype);
    if (runs < 0 || n <= 0 || n > 65536)
        return fail(LMT_ERR_INVALID_ARGUMENT, "%lld runs of %d elements (1..65536 per run)", (long long)runs, n);
    if (runs && (!a || !b || !c)) return fail(LMT_ERR_INVALID_ARGUMENT, "a NULL pointer");
    return LMT_OK;
}

}  // namespace
}  // namespace lmt

extern "C" {

LMT_API int lmt_quantize_runs(int format, int dtype, const void* x, int64_t runs, int32_t run_elems,
                              float* scales, uint8_t* codes, int32_t device, void* stream) {
    lmt::clear_error();
    int st = lmt::check_args(format, dtype, x, scales, codes, runs, run_elems);
    if (st != LMT_OK || runs == 0) return st;
    lmt::DeviceGuard guard(device);
    if (guard.error() != cudaSuccess) return lmt::fail_cuda(guard.error(), "selecting the device");
    const int blocks = lmt::blocks_for(runs, device);
    const auto s = static_cast<cudaStream_t>(stream);
    if (dtype == LMT_DTYPE_BF16)
        lmt::launch_quantize<__nv_bfloat16>(format, x, scales, codes, runs, run_elems, blocks, s);
    else if (dtype == LMT_DTYPE_F16)
        lmt::launch_quantize<__half>(format, x, scales, codes, runs, run_elems, blocks, s);
    else
        lmt::launch_quantize<float>(format, x, scales, codes, runs, run_elems, blocks, s);
    const cudaError_t e = cudaGetLastError();
    return e == cudaSuccess ? LMT_OK : lmt::fail_cuda(e, "launching the quantize kernel");
}

LMT_API int lmt_dequantize_runs(int format, int dtype, const uint8_t* codes, const float* scales, int64_t runs,
                                int32_t run_elems, void* y, int32_t device, void* stream) {
    lmt::clear_error();
    int st = lmt::check_args(format, dtype, codes, scales, y, runs, run_elems);
    if (st != LMT_OK || runs == 0) return st;
    lmt::DeviceGuard guard(device);
    if (guard.error() != cudaSuccess) return lmt::fail_cuda(guard.error(), "selecting the device");
    const int blocks = lmt::blocks_for(runs, device);
    const auto s = static_cast<cudaStream_t>(stream);
    if (dtype == LMT_DTYPE_BF16)
        lmt::launch_dequantize<__nv_bfloat16>(format, codes, scales, y, runs, run_elems, blocks, s);
    else if (dtype == LMT_DTYPE_F16)
        lmt::launch_dequantize<__half>(format, codes, scales, y, runs, run_elems, blocks, s);
    else
        lmt::launch_dequantize<float>(format, codes, scales, y, runs, run_elems, blocks, s);
    const cudaError_t e = cudaGetLastError();
    return e == cudaSuccess ? LMT_OK : lmt::fail_cuda(e, "launching the dequantize kernel");
}

}  // extern "C"
