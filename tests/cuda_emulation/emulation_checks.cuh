/* Small kernels that check the emulation of CUDA itself (tests/test_cuda_emulation.py), each
 * against what CUDA's programming guide specifies. Launch with 1-D blocks. */
#ifndef EMULATION_CHECKS_CUH_
#define EMULATION_CHECKS_CUH_

/* out[i] = in[i + delta] within the warp, in[i] where i + delta leaves it */
extern "C" __global__ void check_shuffle_down(const float* in, int delta, float* out) {
  const long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
  out[i] = __shfl_down_sync(0xffffffffu, in[i], delta);
}

/* every thread of a block gets the AND of the block's predicates */
extern "C" __global__ void check_syncthreads_and(const int* in, int* out) {
  const long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
  out[i] = __syncthreads_and(in[i]);
}

/* reverses each block's part of `in` through shared memory; without the barrier, a thread
 * reads a slot that another one has not written yet */
extern "C" __global__ void check_shared_reverse(const float* in, int barrier, float* out) {
  __shared__ float tile[1024];
  const long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
  tile[threadIdx.x] = in[i];
  if (barrier) __syncthreads();
  out[i] = tile[blockDim.x - 1 - threadIdx.x];
}

/* the indices of every thread: out[4 i + k] = blockIdx.x, blockIdx.y, gridDim.x, blockDim.x */
extern "C" __global__ void check_indices(long* out) {
  const long block = blockIdx.y * (long)gridDim.x + blockIdx.x;
  const long i = block * blockDim.x + threadIdx.x;
  out[4 * i] = blockIdx.x;
  out[4 * i + 1] = blockIdx.y;
  out[4 * i + 2] = gridDim.x;
  out[4 * i + 3] = blockDim.x;
}

/* half a warp at a barrier, the other half at a shuffle: a deadlock on a GPU */
extern "C" __global__ void check_divergent(float* out) {
  float v = threadIdx.x;
  if (threadIdx.x % 32 < 16) {
    __syncthreads();
  } else {
    v = __shfl_down_sync(0xffffffffu, v, 1);
  }
  out[threadIdx.x] = v;
}

#endif /* EMULATION_CHECKS_CUH_ */
