"""What a frontend needs of a model to validate requests for it, and how it gets it from the fleet.

A worker describes the model it serves (:func:`describe_model`): its context length, a digest of
its tokenizer files and one of its chat template, and the directory it loaded them from. A
frontend that can read that directory with the same digests uses it; otherwise it fetches the
files from a JetStream object store, where every worker publishes them once per digest
(:func:`publish_model_files`, :func:`fetch_model_files`). Only the files a frontend reads are
published (tokenizer, tokenizer config, chat template, the config for the context length),
never weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import anyio
import msgspec

from shared.bus import Bus
from shared.streams import object_store
from shared.subjects import MODEL_FILES_BUCKET

log = logging.getLogger("baton.model_files")

# The files a frontend's Tokenizer reads, plus config.json (max_position_embeddings).
FRONTEND_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
MAX_BUNDLE_BYTES = 64 * 1024 * 1024  # a tokenizer bundle beyond this is refused (a frontend holds it in memory)
STORE_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class ModelDescription:
    path: str  # absolute directory the worker read the model from
    context_length: int
    tokenizer_digest: str  # sha256 over the tokenizer files
    template_digest: str  # sha256 of the chat template source ("" : the model has none)


def _sha256(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()


def chat_template_source(model_dir: Path) -> str:
    """The chat template as the tokenizer reads it: tokenizer_config.json's, else chat_template.jinja."""
    cfg_path = model_dir / "tokenizer_config.json"
    template = None
    if cfg_path.exists():
        template = json.loads(cfg_path.read_text()).get("chat_template")
        if isinstance(template, list):
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if template is None and (model_dir / "chat_template.jinja").exists():
        template = (model_dir / "chat_template.jinja").read_text()
    return template or ""


def tokenizer_digest(model_dir: Path) -> str:
    return _sha256(*((model_dir / name).read_bytes() if (model_dir / name).exists() else b""
                     for name in TOKENIZER_FILES))


def template_digest(model_dir: Path) -> str:
    source = chat_template_source(model_dir)
    return _sha256(source.encode()) if source else ""


def context_length(model_dir: Path, cap: int = 0) -> int:
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        cfg = {}
    own = int(cfg.get("max_position_embeddings", 0) or 0)
    if cap and own:
        return min(cap, own)
    return cap or own or 4096


def describe_model(model_dir: Path, context_cap: int = 0) -> ModelDescription:
    d = model_dir.resolve()
    return ModelDescription(str(d), context_length(d, context_cap), tokenizer_digest(d), template_digest(d))


def matches(model_dir: Path, tok_digest: str, tmpl_digest: str) -> bool:
    """Does ``model_dir`` hold the tokenizer and template with these digests? (False if unreadable.)"""
    try:
        return (model_dir / "tokenizer.json").exists() and tokenizer_digest(model_dir) == tok_digest \
            and template_digest(model_dir) == tmpl_digest
    except (OSError, ValueError):
        return False


# --- the object store ------------------------------------------------------------------------


def _object_name(tok_digest: str, tmpl_digest: str) -> str:
    return f"{tok_digest[:32]}-{(tmpl_digest or 'none')[:32]}"


async def publish_model_files(bus: Bus, model_dir: Path, desc: ModelDescription) -> bool:
    """Put the model's frontend files in the object store unless they are there already.
    Returns True if this call wrote them."""
    name = _object_name(desc.tokenizer_digest, desc.template_digest)
    with anyio.fail_after(STORE_TIMEOUT_S):
        store = await object_store(bus, MODEL_FILES_BUCKET, "Baton tokenizer and chat-template files")
        try:
            await store.get_info(name)
            return False
        except Exception:  # not there yet
            pass
        bundle = {f: (model_dir / f).read_bytes() for f in FRONTEND_FILES if (model_dir / f).exists()}
        data = msgspec.msgpack.encode(bundle)
        if len(data) > MAX_BUNDLE_BYTES:
            log.warning("tokenizer files of %s are %d bytes; not published", model_dir, len(data))
            return False
        await store.put(name, data)
    log.info("published tokenizer files of %s as %s", model_dir, name)
    return True


async def fetch_model_files(bus: Bus, tok_digest: str, tmpl_digest: str, dest_root: Path) -> Path:
    """The model's frontend files from the object store, written under ``dest_root``; checked
    against the digests (a mismatch raises ValueError)."""
    name = _object_name(tok_digest, tmpl_digest)
    with anyio.fail_after(STORE_TIMEOUT_S):
        # Read only: a frontend may not create the bucket (no worker published anything yet, then).
        store = await bus.js.object_store(MODEL_FILES_BUCKET)
        result = await store.get(name)
    data = result.data or b""
    if len(data) > MAX_BUNDLE_BYTES:
        raise ValueError(f"tokenizer bundle {name} is {len(data)} bytes")
    bundle = msgspec.msgpack.decode(data, type=dict[str, bytes])
    dest = dest_root / name
    dest.mkdir(parents=True, exist_ok=True)
    for f, content in bundle.items():
        if f not in FRONTEND_FILES:  # only known names: nothing in a bundle picks a path
            continue
        (dest / f).write_bytes(content)
    if not matches(dest, tok_digest, tmpl_digest):
        raise ValueError(f"tokenizer bundle {name} does not match its digests")
    return dest


# --- the worker's side -----------------------------------------------------------------------


async def advertise_model(bus: Bus, model: str, context_cap: int = 0, publish: bool = True) -> dict[str, object]:
    """WorkerInfo fields describing ``model`` (a built-in name or a directory), after publishing its
    tokenizer files once (``publish``). ``{}`` when the model is not a local directory (a hub id
    the engine resolved itself): the frontend then needs ``--model`` for it."""
    from shared.models import resolve_model

    try:
        ref = resolve_model(model)
        desc = await anyio.to_thread.run_sync(describe_model, ref.path, context_cap)
    except (OSError, ValueError) as e:
        log.info("model %s not described for frontends (%s)", model, e)
        return {}
    published = False
    if publish:
        try:
            await publish_model_files(bus, Path(desc.path), desc)
            published = True
        except Exception as e:  # the path may still do; the frontend says so if not
            log.warning("could not publish the tokenizer files of %s: %r", model, e)
    return {"context_length": desc.context_length, "tokenizer_digest": desc.tokenizer_digest,
            "template_digest": desc.template_digest, "model_path": desc.path, "files_published": published}
