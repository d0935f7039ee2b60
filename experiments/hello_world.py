"""TRL's ``examples/hello_world.py`` on rljax: one query, one generated response, one PPO step.

    python experiments/hello_world.py          # offline: a tiny local GPT-2 (experiments/_offline.py)
    python experiments/hello_world.py gpt2     # a hub id or local HF checkpoint directory

Differences from TRL's file: imports (rljax, AutoTokenizer for the local tokenizer), NumPy/JAX
arrays instead of torch tensors, no ``.to(device)`` (JAX places arrays itself), and the model.
"""
# 0. imports
import os
import sys

import jax.numpy as jnp
from transformers import AutoTokenizer

from rljax import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # rljax: experiments/_offline.py
from _offline import offline_assets  # noqa: E402

# rljax: a tiny local GPT-2 (and tokenizer) in place of the hub's "gpt2", unless one is named
model_name = sys.argv[1] if len(sys.argv) > 1 else offline_assets()["model"]

# 1. load a pretrained model
model = AutoModelForCausalLMWithValueHead.from_pretrained(model_name)
model_ref = AutoModelForCausalLMWithValueHead.from_pretrained(model_name)
tokenizer = AutoTokenizer.from_pretrained(model_name)
tokenizer.pad_token = tokenizer.eos_token

# 2. initialize trainer
ppo_config = {"mini_batch_size": 1, "batch_size": 1}
config = PPOConfig(**ppo_config)
ppo_trainer = PPOTrainer(config, model, model_ref, tokenizer)

# 3. encode a query
query_txt = "This morning I went to the "
query_tensor = tokenizer.encode(query_txt, return_tensors="np")

# 4. generate model response
generation_kwargs = {
    "min_length": -1,
    "top_k": 0.0,
    "top_p": 1.0,
    "do_sample": True,
    "pad_token_id": tokenizer.eos_token_id,
    "max_new_tokens": 20,
}
response_tensor = ppo_trainer.generate(list(query_tensor), return_prompt=False, **generation_kwargs)
response_txt = tokenizer.decode(response_tensor[0])

# 5. define a reward for response
# (this could be any reward such as human feedback or output from another model)
reward = [jnp.array(1.0)]

# 6. train model with ppo
train_stats = ppo_trainer.step([query_tensor[0]], [response_tensor[0]], reward)
