"""`python -m levante.engine.tp_worker DEVICE`: a tensor-parallel worker rank (engine/tp.py).

Started by rank 0 with torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...)."""
import sys

if __name__ == "__main__":
    from levante.engine.tp import worker_main

    worker_main(sys.argv[1] if len(sys.argv) > 1 else "cpu")
