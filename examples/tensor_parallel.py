"""Shard a compressed tiny LLaMA over the ranks of a torchrun job and generate with it.

    torchrun --standalone --nproc-per-node 2 examples/tensor_parallel.py   # CPU, gloo; 2 or 4 ranks

Every rank builds and optimizes the same model (same seed), shards its compressed MLPs with the
scheme the cost model picks, checks its logits against the unsharded model and generates.
"""

import copy

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

import neuronmm_fx
from neuronmm_fx import parallel

dist.init_process_group("gloo")
torch.manual_seed(0)
config = LlamaConfig(
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=1000,
)
model = LlamaForCausalLM(config).eval()
model = neuronmm_fx.optimize(model, ratio=0.2, block=32, method="svd", allocation="uniform")
ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(1))

sharded = parallel.shard(copy.deepcopy(model))  # scheme="auto"
with torch.no_grad():
    difference = (sharded(ids).logits - model(ids).logits).abs().max().item()
    tokens = sharded.generate(ids[:, :4], max_new_tokens=8, do_sample=False)
if dist.get_rank() == 0:
    print(parallel.parallel_report(sharded))
    print(f"max |logit difference| against the unsharded model: {difference:.2e}")
    print(f"generated: {tokens[0].tolist()}")
dist.destroy_process_group()
