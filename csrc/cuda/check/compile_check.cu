// Torch-free translation unit: instantiates every token_stats kernel and launcher for every logit
// dtype, so that `nvcc -c` / `--cubin` checks all device code (and the ptxas resource report
// covers every kernel) on a machine with no GPU and no CUDA build of torch.
// Lives under csrc/cuda/check/ so that setup.py (which globs csrc/cuda/*.cu) never builds it
// into the extension. Built by .ci/check_cuda.sh.
#include "../token_stats.cuh"

namespace pg_kernels {
namespace gpu {

template cudaError_t launch_token_stats_forward<BF16>(const ForwardParams<float>&, bool, int,
                                                      cudaStream_t);
template cudaError_t launch_token_stats_forward<F16>(const ForwardParams<float>&, bool, int,
                                                     cudaStream_t);
template cudaError_t launch_token_stats_forward<F32>(const ForwardParams<float>&, bool, int,
                                                     cudaStream_t);
template cudaError_t launch_token_stats_forward<F64>(const ForwardParams<double>&, bool, int,
                                                     cudaStream_t);
template cudaError_t launch_token_stats_backward<BF16>(const BackwardParams<float>&, bool, int,
                                                       cudaStream_t);
template cudaError_t launch_token_stats_backward<F16>(const BackwardParams<float>&, bool, int,
                                                      cudaStream_t);
template cudaError_t launch_token_stats_backward<F32>(const BackwardParams<float>&, bool, int,
                                                      cudaStream_t);
template cudaError_t launch_token_stats_backward<F64>(const BackwardParams<double>&, bool, int,
                                                      cudaStream_t);

}  // namespace gpu
}  // namespace pg_kernels
