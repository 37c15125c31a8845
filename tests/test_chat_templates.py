"""Chat templates as users of each family meet them: rendered and tokenized as transformers' apply_chat_template,
but for a special token's text inside a message, which stays text."""
import json

import pytest

from speccompile.compile.presets import tiny_tokenizer_files
from speccompile.runtime.tokenizer import BundleTokenizer


@pytest.fixture
def tokenizer_dir(tmp_path):
    for name, data in tiny_tokenizer_files().items():
        (tmp_path / name).write_bytes(data)
    return tmp_path


def set_template(directory, template: str) -> None:
    cfg = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps(dict(cfg, chat_template=template)))


def test_generation_blocks_render_as_transformers(tokenizer_dir):
    """{% generation %} marks the assistant's text in templates written for TRL's assistant-only loss, which
    fine-tuned models keep: transformers renders its body, and such a template once failed to compile here."""
    transformers = pytest.importorskip("transformers")
    set_template(tokenizer_dir, "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}"
                 "{% generation %}{{ m['content'] }}<|im_end|>\n{% endgeneration %}{% else %}{{ m['content'] }}"
                 "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "fox"}]
    ref = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    expected = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert BundleTokenizer(str(tokenizer_dir)).apply_chat_template(messages) == expected
