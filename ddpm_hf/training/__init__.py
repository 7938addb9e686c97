"""The training run: the loop and its steps, the batch feed, what it holds, what watches it, the CUDA-graph step,
checkpoints, the precision probe and the guard on its folder."""
