"""The training run: its config and flags, the loop and its steps, what it holds, what watches it, the CUDA-graph
step, checkpoints and the guard on its folder."""
