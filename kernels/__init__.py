"""kernels: Numba INT8 kernels (see the tracker's INT8 runtime issue). Not built yet."""
