"""Prompt templates of the causal-LM task: an example becomes (prompt, target) with the target the label's word.

Ready-made templates (by name): ``yesno_qa`` (BoolQ fields passage, question -> " no" / " yes"), ``wic`` (WiC
fields sentence1, sentence2, word -> " no" / " yes"), ``topic`` (text -> " <label name>"). A user template is a
string with ``{column}`` placeholders (``\\n`` in it is a newline), with label words from ``label_words`` or,
if none are given, the label names. A target is the label word after one space.

Example::

    template = resolve_template("Review: {text}\\nSentiment:", ["negative", "positive"])
    template.prompt({"text": "Great film."})   # 'Review: Great film.\\nSentiment:'
    template.targets(["neg", "pos"])           # [' negative', ' positive']
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from decaf_ext.errors import ConfigError


@dataclass(frozen=True)
class Template:
    """text: the prompt with {field} placeholders; words: the target word per label id (None: the label names)."""

    text: str
    words: tuple[str, ...] | None = None

    @property
    def fields(self) -> list[str]:
        """The placeholder names, in order of first appearance."""
        names = [name for _, name, _, _ in string.Formatter().parse(self.text) if name is not None]
        return list(dict.fromkeys(names))

    def prompt(self, values: dict[str, str]) -> str:
        """The prompt with every field replaced by `values[field]`."""
        return self.text.format(**values)

    def targets(self, label_names: list[str]) -> list[str]:
        """The target text of every label id: one space, then its word."""
        words = list(self.words) if self.words is not None else list(label_names)
        if len(words) != len(label_names):
            raise ConfigError(f"label_words: {len(words)} words for {len(label_names)} labels "
                              f"({', '.join(label_names)})")
        return [" " + word.strip() for word in words]


TEMPLATES: dict[str, Template] = {
    "yesno_qa": Template("{passage}\nQuestion: {question}?\nAnswer:", ("no", "yes")),
    "wic": Template("Sentence 1: {sentence1}\nSentence 2: {sentence2}\nQuestion: Is the word '{word}' used with "
                    "the same meaning in both sentences?\nAnswer:", ("no", "yes")),
    "topic": Template("Article: {text}\nTopic:"),
}
DEFAULT_TEMPLATE = "topic"


def resolve_template(spec: str | None, label_words: list[str] | None) -> Template:
    """The template named `spec` (None: the default) or the user template string `spec`; `label_words`
    (one per label id) replace the template's words."""
    spec = DEFAULT_TEMPLATE if spec is None else spec
    if spec in TEMPLATES:
        template = TEMPLATES[spec]
    elif "{" in spec:
        template = Template(spec.replace("\\n", "\n"))
        try:
            template.prompt({name: "" for name in template.fields})
        except (ValueError, IndexError, KeyError):
            raise ConfigError(f"template: {spec!r} is not a valid template string (use {{column}} placeholders)"
                              ) from None
        if not template.fields or "" in template.fields or any(not f.isidentifier() for f in template.fields):
            raise ConfigError(f"template: {spec!r} needs named {{column}} placeholders")
    else:
        raise ConfigError(f"template must be one of {', '.join(TEMPLATES)} or a string with {{column}} "
                          f"placeholders; got {spec!r}")
    if label_words is not None:
        template = Template(template.text, tuple(label_words))
    return template
