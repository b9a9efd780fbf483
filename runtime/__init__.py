"""runtime: lowering QDQ graphs to kernels and the Session API (see the INT8 runtime issue). Not built yet."""
