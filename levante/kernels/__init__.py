"""Native code: the CPU kernels, one variant per ISA behind one header (cpu/levante.h; native.py
binds the one this CPU runs, isa.py picks it, build.py compiles them), and the Triton attention
kernel for CUDA (triton_attention.py)."""
