"""Optimize a tiny random LLaMA, print the report and compare outputs (runs in a few seconds)."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import neuronmm_fx

torch.manual_seed(0)
config = LlamaConfig(
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=1000,
)
model = LlamaForCausalLM(config).eval()
ids = torch.randint(0, 1000, (1, 16))
with torch.no_grad():
    dense_logits = model(ids).logits

model = neuronmm_fx.optimize(model, ratio=0.2, block=32, dump_dir="dumps/tiny_llama")
print(neuronmm_fx.report_of(model))
with torch.no_grad():
    logits = model(ids).logits
print(f"max |logit difference| after compression: {(logits - dense_logits).abs().max():.3f}")
print(model.model.layers[0].mlp)
