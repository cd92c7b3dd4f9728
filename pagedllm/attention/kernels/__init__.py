"""Triton kernels of the CUDA attention backend, one kernel a file; triton_backend launches them."""
