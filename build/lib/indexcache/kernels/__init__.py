"""Sparse attention that reads only each query row's top-k keys, beside its exact PyTorch reference.

`sparse_attention` (output and per-head LSE, differentiable) and `sparse_attention_probs` (the head-averaged
probabilities on the top-k set, the sparse stage's teacher) take the keys in MQA/GQA form: the MLA families pass
their shared latent key (kv_lora + rope) as one KV head, llama its own KV heads. `visible_slots` turns a top-k
index tensor into the form both read: -1 for every slot that names no key the row may attend to.
"""

from indexcache.kernels.sparse_attention import (
    sparse_attention,
    sparse_attention_probs,
    visible_slots,
)

__all__ = ["sparse_attention", "sparse_attention_probs", "visible_slots"]
