"""Backend registrations for fused NeRF kernels (Triton, tiny-cuda-nn, nerfacc). Filled in by the kernel work."""
