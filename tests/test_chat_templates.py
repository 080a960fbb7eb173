"""Chat templates render exactly as transformers' ``apply_chat_template`` renders them.

The templates under tests/chat_templates/ are written for these tests in the style of the main
model families (Llama 3.x, Qwen 3, Gemma, Mistral) and use what those templates need: loop
controls, ``strftime_now``, transformers' ``tojson`` (non-ASCII kept, indent), ``raise_exception``.
No hub access: the tokenizer is the built-in model's, the templates are local files.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from shared.builtin_model import ensure_builtin
from shared.tokenizer import Tokenizer

if os.environ.get("CI") != "true":
    pytest.importorskip("transformers")
from transformers import PreTrainedTokenizerFast

TEMPLATES = Path(__file__).parent / "chat_templates"

TOOLS = [{"type": "function", "function": {"name": "météo", "description": "Wetter für eine Stadt",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]

CONVERSATIONS = {
    "plain": [{"role": "user", "content": "Hello there"}],
    "system": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Why is the sky blue?"},
               {"role": "assistant", "content": "Rayleigh scattering."}, {"role": "user", "content": "  And red?  "}],
    "thinking": [{"role": "user", "content": "2+2?"},
                 {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
                 {"role": "user", "content": "times 3?"}],
}


def model_dir_with(tmp_path: Path, template: str) -> Path:
    d = tmp_path / "model"
    shutil.copytree(ensure_builtin("baton-tiny"), d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    cfg.setdefault("bos_token", "<s>")
    cfg.setdefault("eos_token", "</s>")
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


def reference(d: Path) -> PreTrainedTokenizerFast:
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    return PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"), bos_token=cfg["bos_token"],
                                   eos_token=cfg["eos_token"], chat_template=cfg["chat_template"])


@pytest.mark.parametrize("family", ["llama3", "qwen3", "gemma", "mistral"])
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("tools", [None, TOOLS], ids=["no-tools", "tools"])
def test_renders_like_transformers(tmp_path, family: str, conversation: str, tools) -> None:
    d = model_dir_with(tmp_path, (TEMPLATES / f"{family}.jinja").read_text())
    messages = CONVERSATIONS[conversation]
    ours, theirs = Tokenizer(d), reference(d)
    for gen_prompt in (True, False):
        try:
            want = theirs.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=gen_prompt)
        except Exception as e:  # the template refuses this conversation: we must refuse it too
            with pytest.raises(ValueError, match="chat template error"):
                ours.apply_chat_template(messages, add_generation_prompt=gen_prompt, tools=tools)
            assert "alternate" in str(e) or "roles" in str(e) or "role" in str(e)
            continue
        assert ours.apply_chat_template(messages, add_generation_prompt=gen_prompt, tools=tools) == want


def test_features_the_families_need(tmp_path) -> None:
    """Each feature on its own, so a regression names itself."""
    src = ("{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}{% if m.role == 'system' %}"
           "{% continue %}{% endif %}{{ m.content }};{% endfor %}{{ strftime_now('%Y') }}|{{ {'k': 'é'} | tojson }}")
    d = model_dir_with(tmp_path, src)
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "user", "content": "x"}]
    out = Tokenizer(d).apply_chat_template(msgs)
    assert out == reference(d).apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert out.startswith("u;") and '"é"' in out


def test_raise_exception_is_a_clear_error(tmp_path) -> None:
    d = model_dir_with(tmp_path, (TEMPLATES / "gemma.jinja").read_text())
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ValueError, match="roles must alternate"):
        Tokenizer(d).apply_chat_template(bad)
