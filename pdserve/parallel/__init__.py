"""Process groups for tensor parallelism on torch.distributed (gloo on CPU, NCCL on CUDA)."""
