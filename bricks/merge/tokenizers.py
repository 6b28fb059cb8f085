"""The merged model's tokenizer: `tokenizer_source` and `chat_template`, as mergekit configs write them.

- `tokenizer_source`: a model (its tokenizer is copied), `base` (the base
  model's), or `union`. When every input already has the chosen vocabulary,
  its files are copied; otherwise `bricks.merge.vocabulary` re-indexes the
  embeddings and writes the merged tokenizer.
- `chat_template`: `auto` (the template most of the input models use), one of
  the built-in names below, or a Jinja template given inline.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from ..errors import BricksError

# Written for this package from each format's published message layout.
BUILTIN_TEMPLATES = {
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
    "alpaca": (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
        "{% elif m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}\n\n"
        "{% else %}### Response:\n{{ m['content'] }}{{ eos_token }}\n\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}### Response:\n{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    ),
}


def tokenizer_dir(source: str | None, base_model: str | None, first: str) -> str:
    """Which model's tokenizer files the merged model gets, when no input needs its embeddings re-indexed
    (`bricks.merge.vocabulary` handles the others)."""
    if source in (None, "", "union"):  # a union of equal vocabularies is the first one
        return first
    if source == "base":
        if base_model is None:
            raise BricksError("tokenizer_source: base needs a base_model")
        return base_model
    return source


def chat_template(value: str, models: list[str]) -> str | None:
    """The Jinja template a `chat_template:` setting names (None: `auto` found no template among the models)."""
    if value == "auto":
        found = [t for m in models if (t := _template_of(Path(m.split("+")[0])))]
        return Counter(found).most_common(1)[0][0] if found else None
    if value in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[value]
    if "{" in value and len(value) >= 20:
        return value  # a template given inline
    raise BricksError(f"chat_template {value!r} is neither auto, a built-in ({', '.join(BUILTIN_TEMPLATES)}) nor a "
                      "Jinja template")


def _template_of(path: Path) -> str | None:
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text().strip()
    f = path / "tokenizer_config.json"
    if f.is_file():
        template = json.loads(f.read_text()).get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return template.strip() if template else None
    return None


def write_chat_template(out: Path, template: str) -> None:
    """Give the tokenizer in `out` this chat template (the file transformers reads, replacing any other)."""
    (out / "chat_template.jinja").write_text(template)
    f = out / "tokenizer_config.json"
    if f.is_file():
        cfg = json.loads(f.read_text())
        if "chat_template" in cfg:
            del cfg["chat_template"]  # the .jinja file is the one template
            f.write_text(json.dumps(cfg, indent=2))
