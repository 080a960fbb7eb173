"""LoRA adapters end to end: real nats-server, torch decode workers of two base models (two of
baton-tiny, one of baton-tiny-b), one frontend, real HTTP and NATS.

Greedy outputs of base + adapter through the HTTP API equal transformers + peft on the same
weights, each alone and in a batch of concurrent requests mixing adapters of both bases and the
bare models;
adapters loaded and unloaded at run time over HTTP and over NATS; a bad adapter is a 400 and the
workers keep serving; an unknown adapter is OpenAI's 404; a path outside the adapter root is refused.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anyio
import httpx
import msgspec
import nats
import pytest

from shared import subjects
from shared.messages import LoraLoad, LoraUnload
from tests.procs import Stack, running, wait_until
from tests.require import require_module

torch = require_module("torch", "pip install 'baton[torch]'")
transformers = require_module("transformers", "pip install 'baton[test]'")
peft = require_module("peft", "pip install 'baton[test]'")

pytestmark = pytest.mark.timeout(300)

MAX_NEW = 6
PROMPTS = [[7, 300, 41, 999, 12], [1500, 3, 77, 250, 61, 9, 18, 400, 33, 5, 1200, 64, 80], [42] * 20,
           [int(x) for x in range(100, 117)]]


def peft_greedy(adapter_dirs: dict[str, Path], base: str = "baton-tiny") -> dict[str | None, list[list[int]]]:
    """Greedy tokens of each prompt under each adapter (None: the bare base), full forwards, fp32."""
    from shared.builtin_model import ensure_builtin

    model = transformers.AutoModelForCausalLM.from_pretrained(ensure_builtin(base), dtype=torch.float32)
    names = list(adapter_dirs)
    model = peft.PeftModel.from_pretrained(model, adapter_dirs[names[0]], adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(adapter_dirs[n], adapter_name=n)
    model.eval()

    def run(prompt: list[int]) -> list[int]:
        seq = list(prompt)
        while len(seq) < len(prompt) + MAX_NEW:
            seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
        return seq[len(prompt):]

    out: dict[str | None, list[list[int]]] = {}
    with torch.inference_mode():
        with model.disable_adapter():
            out[None] = [run(p) for p in PROMPTS]
        for n in names:
            model.set_adapter(n)
            out[n] = [run(p) for p in PROMPTS]
    return out


@pytest.fixture(scope="module")
def lora_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from shared.builtin_model import build_lora

    root = tmp_path_factory.mktemp("lora-root")
    build_lora("baton-tiny", root / "demo-a", rank=8, targets=["q_proj", "v_proj"])
    build_lora("baton-tiny", root / "demo-b", rank=4, alpha=6, use_rslora=True,
               targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    build_lora("baton-tiny", root / "demo-c", rank=8, targets=["q_proj", "v_proj"])
    build_lora("baton-tiny-b", root / "demo-tb", rank=8, targets=["q_proj", "k_proj", "o_proj", "down_proj"])
    # Does not fit: the config says rank 16, the tensors are rank 8.
    build_lora("baton-tiny", root / "bad-rank", rank=8)
    cfg = json.loads((root / "bad-rank" / "adapter_config.json").read_text())
    (root / "bad-rank" / "adapter_config.json").write_text(json.dumps({**cfg, "r": 16}))
    # A corrupt weights file.
    build_lora("baton-tiny", root / "corrupt", rank=8)
    (root / "corrupt" / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    # A directory outside the root, and a symlink inside it pointing there.
    outside = tmp_path_factory.mktemp("elsewhere")
    build_lora("baton-tiny", outside / "demo-x", rank=8)
    os.symlink(outside / "demo-x", root / "sneaky")
    return root


@pytest.fixture(scope="module")
def reference(lora_root: Path) -> dict[str, list[str]]:
    """peft's greedy tokens as the text the HTTP API returns for them."""
    from shared.builtin_model import ensure_builtin
    from shared.tokenizer import Tokenizer

    ref = peft_greedy({"demo-a": lora_root / "demo-a", "demo-b": lora_root / "demo-b"})
    tok = Tokenizer(ensure_builtin("baton-tiny"))
    texts = {name or "baton-tiny": [tok.decode(ids, skip_special_tokens=True) for ids in runs]
             for name, runs in ref.items()}
    ref_b = peft_greedy({"demo-tb": lora_root / "demo-tb"}, "baton-tiny-b")
    tok_b = Tokenizer(ensure_builtin("baton-tiny-b"))
    texts.update({name or "baton-tiny-b": [tok_b.decode(ids, skip_special_tokens=True) for ids in runs]
                  for name, runs in ref_b.items()})
    for name, base in (("demo-a", "baton-tiny"), ("demo-b", "baton-tiny"), ("demo-tb", "baton-tiny-b")):
        assert texts[name] != texts[base], f"{name} does not change greedy outputs"  # else parity proves little
    assert texts["baton-tiny"] != texts["baton-tiny-b"]
    return texts


@pytest.fixture(scope="module")
def lora_stack(tmp_path_factory: pytest.TempPathFactory, lora_root: Path):
    s = Stack(tmp_path_factory.mktemp("lora-stack"), "torch", decode_workers=2, routers=0,
              extra_decode_args=["--max-loras", "2", "--lora-modules", f"demo-a={lora_root / 'demo-a'}"],
              decode_models=["baton-tiny", "baton-tiny", "baton-tiny-b"])
    s.frontend_extra = ["--router", "embedded", "--router-mode", "kv", "--lora-root", str(lora_root)]
    with running(s):
        # The second base model's worker, with its own adapter (the last --lora-modules wins).
        s.add_decode(["--lora-modules", f"demo-tb={lora_root / 'demo-tb'}"])
        wait_until(lambda: {"baton-tiny-b", "demo-tb"} <= set(models(s)), 90, what="the second base and its adapter")
        yield s
    assert s.nats.violations() == []


def complete(s: Stack, model: str, prompt: list[int]) -> httpx.Response:
    return httpx.post(f"{s.url}/v1/completions", timeout=120, json={
        "model": model, "prompt": prompt, "max_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True})


def greedy(s: Stack, model: str, prompt: list[int]) -> str:
    """The greedy completion's text through the HTTP API."""
    r = complete(s, model, prompt)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def load(s: Stack, name: str, path: str) -> httpx.Response:
    return httpx.post(f"{s.url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path}, timeout=60)


def unload(s: Stack, name: str) -> httpx.Response:
    return httpx.post(f"{s.url}/v1/unload_lora_adapter", json={"lora_name": name}, timeout=60)


def models(s: Stack) -> dict[str, dict]:
    return {m["id"]: m for m in httpx.get(f"{s.url}/v1/models", timeout=10).json()["data"]}


def test_greedy_equals_peft_alone_and_mixed(lora_stack: Stack, reference: dict) -> None:
    s = lora_stack
    assert "demo-a" in models(s)  # preloaded with --lora-modules
    r = load(s, "demo-b", "demo-b")  # relative to --lora-root
    assert r.status_code == 200, r.text
    assert r.json()["workers"] == 2
    listed = models(s)
    assert listed["demo-a"]["parent"] == listed["demo-b"]["parent"] == "baton-tiny"
    assert listed["demo-tb"]["parent"] == "baton-tiny-b" and listed["baton-tiny-b"]["parent"] is None
    # Alone: one request at a time, the same 20-token prompt (a full KV block): were prefix-cache
    # hashes blind to the adapter, the later requests would reuse the bare model's block.
    for name in ("baton-tiny", "demo-a", "demo-b", "baton-tiny-b", "demo-tb"):
        assert greedy(s, name, PROMPTS[2]) == reference[name][2], name
    # Mixed: every prompt under every adapter and bare, both bases, all at once (batched on the workers).
    jobs = [(name, i) for i in range(len(PROMPTS))
            for name in ("baton-tiny", "demo-a", "demo-b", "baton-tiny-b", "demo-tb")]
    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(lambda j: greedy(s, j[0], PROMPTS[j[1]]), jobs))
    for (name, i), toks in zip(jobs, got, strict=True):
        assert toks == reference[name][i], (name, i)


def test_unknown_adapter_is_404(lora_stack: Stack) -> None:
    r = complete(lora_stack, "no-such-adapter", PROMPTS[0])
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found" and r.json()["error"]["param"] == "model"
    r = unload(lora_stack, "no-such-adapter")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("path", ["../elsewhere", "/etc", "sneaky", "demo-a/../.."])
def test_paths_outside_the_root_are_refused(lora_stack: Stack, path: str) -> None:
    r = load(lora_stack, "evil", path)
    assert r.status_code == 403, r.text
    assert r.json()["error"]["code"] == "lora_path_not_allowed"
    assert "evil" not in models(lora_stack)


@pytest.mark.parametrize(("path", "says"), [("bad-rank", "rank 16"), ("corrupt", "corrupt"),
                                            ("no-such-dir", "not a directory")])
def test_bad_adapter_is_400_and_workers_keep_serving(lora_stack: Stack, path: str, says: str) -> None:
    r = load(lora_stack, "broken", path)
    assert r.status_code == 400, r.text
    assert says in r.json()["error"]["message"]
    assert "broken" not in models(lora_stack)
    assert complete(lora_stack, "broken", PROMPTS[0]).status_code == 404
    assert complete(lora_stack, "demo-a", PROMPTS[0]).status_code == 200  # still serving
    assert all(p.alive() for p in lora_stack.decoders)


def test_load_and_unload_over_nats_then_404(lora_stack: Stack, lora_root: Path) -> None:
    s = lora_stack

    async def command(cmd: LoraLoad | LoraUnload) -> tuple[int, str]:
        nc = await nats.connect(s.nats.service_url, **s.nats.connect_options("client"))
        try:
            msg = await nc.request(subjects.API_LORA, msgspec.json.encode(cmd), timeout=60)
        finally:
            await nc.close()
        reply = msgspec.json.decode(msg.data)
        return reply.get("code", 200), reply.get("message", "")

    code, message = anyio.run(command, LoraLoad(lora_name="demo-c", lora_path=str(lora_root / "demo-c")))
    assert code == 200, message
    assert "demo-c" in models(s)
    assert complete(s, "demo-c", PROMPTS[1]).status_code == 200
    code, message = anyio.run(command, LoraUnload(lora_name="demo-c"))
    assert code == 200, message
    assert "demo-c" not in models(s)
    # Unloaded: the next request for it is OpenAI's 404 (not a silent fallback to the base model).
    r = complete(s, "demo-c", PROMPTS[1])
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    code, _ = anyio.run(command, LoraUnload(lora_name="demo-c"))
    assert code == 404
    # Over HTTP too, and loading it again serves it again.
    assert load(s, "demo-c", "demo-c").status_code == 200
    assert complete(s, "demo-c", PROMPTS[1]).status_code == 200
    assert unload(s, "demo-c").status_code == 200
    assert complete(s, "demo-c", PROMPTS[1]).status_code == 404
