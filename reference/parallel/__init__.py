"""Tensor parallelism: one model split across several processes (ranks) that each hold a slice of every large
matrix, as Megatron-LM, vLLM and nano-vllm do, on torch.distributed (NCCL on GPUs, gloo on the CPU).

    group.py    the ranks of one model: who am I, how many are we, and the two collectives we need
    layers.py   the four parallel layers: column- and row-parallel linear, vocab-parallel embedding and LM head
    plan.py     which layer of the Llama-family model becomes which (the model code itself is unchanged), and
                loading a checkpoint so that each rank reads only its slices
    launch.py   starting one process per rank and collecting what rank 0 returns
    worker.py   the engine's ranks 1..N-1: load their slices, then run each step rank 0 sends them
    ranks.py    the engine's rank 0: start the workers, send them every step, stop them (also on errors)
    cost.py     the bytes that enter collectives per token (what lab 0.4 measures and prices)

Per decoder layer only two all-reduces are needed: after the attention's output projection and after the MLP's
down projection. Everything between them (q/k/v, the attention itself over a rank's heads, gate/up and SiLU)
needs no communication, because a column-parallel layer feeds a row-parallel one directly.
"""
