"""From a scheduled step to logits: input tensors, the paged KV cache, the forward pass."""
