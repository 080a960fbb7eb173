"""The models this frontend serves: whatever the fleet serves, plus the one named by ``--model``.

Each decode worker registers the model it serves (:class:`~shared.messages.WorkerInfo`: served
name, context length, tokenizer and chat-template digests, the directory it read them from, and
whether it published the files to the model-files object store). The :class:`ModelRegistry`
watches discovery; the first time a model appears it loads that model's tokenizer and template,
in a thread and under a deadline, from the worker's directory when this frontend can read it with
the same digests, else from the object store (:mod:`shared.model_files`). Each loaded model is a
:class:`ServedModel`: its tokenizer, context length, request limits and its own
:class:`~services.frontend.generation.Generation`.

What is listed and served: a fleet model while at least one decode worker of it is registered
(so a model whose last worker left disappears with its discovery key, within the TTL), and the
``--model`` model always (as before: requests for it get 503 while it has no worker). A request
for anything else is OpenAI's 404 ``model_not_found``; one for a model whose workers are there but
whose tokenizer is still loading gets 503 ``model_loading`` (``model_unavailable`` when loading
failed; it is retried every ``RETRY_AFTER_S``).

Names: ``--model-alias public=served`` maps a public name onto a served model; :meth:`add_child`
lists an entry with a parent model (LoRA adapters) that resolves to its parent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import anyio

from services.frontend.generation import Generation
from services.frontend.openai_api import RequestError
from services.frontend.request import RequestLimits
from services.frontend.tool_parsers import ToolParser
from shared.bus import Bus
from shared.discovery import WorkerView
from shared.messages import WorkerInfo
from shared.model_files import fetch_model_files, matches
from shared.tokenizer import Tokenizer

log = logging.getLogger("baton.frontend.models")

LOAD_TIMEOUT_S = 60.0  # reading (or fetching) one model's tokenizer and template
RETRY_AFTER_S = 15.0  # a model that failed to load is tried again after this


@dataclass(slots=True)
class ServedModel:
    """One model this frontend can validate and route requests for."""

    name: str  # the served name workers register and requests are routed by
    tokenizer: Tokenizer
    max_model_len: int
    limits: RequestLimits
    generation: Generation
    tool_parser: ToolParser | None = None
    root: str = ""  # the directory its tokenizer came from
    tokenizer_digest: str = ""
    created: int = 0
    preloaded: bool = False  # --model: served (listed) even while no worker has it


# Builds a ServedModel from a model directory (name, directory, context length from the worker or
# 0 for the model's own). Runs in a worker thread: it reads and compiles the tokenizer.
ServedModelFactory = Callable[[str, Path, int], ServedModel]


def parse_aliases(items: Iterable[str]) -> dict[str, str]:
    """``public=served`` items (each may hold several, comma-separated) -> ``{public: served}``."""
    aliases: dict[str, str] = {}
    for item in items:
        for part in item.split(","):
            part = part.strip()
            if not part:
                continue
            public, sep, served = (x.strip() for x in part.partition("="))
            if not sep or not public or not served:
                raise ValueError(f"model alias {part!r}: expected public=served")
            if public == served:
                raise ValueError(f"model alias {part!r} maps a name onto itself")
            if aliases.get(public, served) != served:
                raise ValueError(f"model alias {public!r} is given twice with different targets")
            aliases[public] = served
    return aliases


class ModelRegistry:
    def __init__(self, factory: ServedModelFactory | None = None, view: WorkerView | None = None,
                 bus: Bus | None = None, aliases: Mapping[str, str] | None = None,
                 files_dir: Path | None = None, load_timeout: float = LOAD_TIMEOUT_S) -> None:
        self.factory = factory
        self.view = view
        self.bus = bus
        self.aliases = dict(aliases or {})
        self.files_dir = files_dir  # where tokenizer files fetched from the object store go
        self.load_timeout = load_timeout
        self._served: dict[str, ServedModel] = {}
        self._children: dict[str, tuple[str, str]] = {}  # child -> (parent, owned_by)
        self._loading: set[str] = set()
        self._failed: dict[str, float] = {}  # name -> monotonic time of the last failed load
        self.changed = anyio.Event()  # set (and replaced) whenever a model is loaded

    # --- what is served -------------------------------------------------------------------

    def preload(self, served: ServedModel) -> None:
        served.preloaded = True
        self._served[served.name] = served

    def add_child(self, name: str, parent: str, owned_by: str = "baton") -> None:
        """List ``name`` with ``parent`` as its base model (a LoRA adapter); requests for it resolve
        to the parent's :class:`ServedModel` (see :meth:`resolve_child`)."""
        if name in self._served or name in self.aliases:
            raise ValueError(f"{name!r} is already a model name")
        self._children[name] = (parent, owned_by)

    def remove_child(self, name: str) -> None:
        self._children.pop(name, None)

    def _workers(self, name: str) -> list[WorkerInfo]:
        return self.view.workers("decode", name) if self.view is not None else []

    def available(self, name: str) -> bool:
        served = self._served.get(name)
        return served is not None and (served.preloaded or bool(self._workers(name)))

    def served(self) -> list[ServedModel]:
        """Models listed and served now, by name."""
        return [m for name, m in sorted(self._served.items()) if self.available(name)]

    def adapters(self) -> dict[str, tuple[str, str]]:
        """LoRA adapters the decode workers of served models advertise: name -> (base model, digest)."""
        out: dict[str, tuple[str, str]] = {}
        if self.view is None:
            return out
        for w in self.view.workers("decode"):
            if w.model in self._served:
                for lora in w.loras:
                    out.setdefault(lora.name, (w.model, lora.digest))
        return out

    def resolve_child(self, name: str) -> tuple[ServedModel, str | None]:
        """The served model for a requested name, and the child (adapter) name if it is one.
        Raises the request's error: 404 for a name nothing serves, 503 while it loads."""
        target = self.aliases.get(name, name)
        child = None
        if target in self._children and target not in self._served:
            child = target
            target = self._children[target][0]
        elif target not in self._served:
            adapter = self.adapters().get(target)
            if adapter is not None:  # a LoRA adapter some worker of its base has loaded
                child, target = target, adapter[0]
        served = self._served.get(target)
        if served is not None and self.available(target):
            return served, child
        if served is None and self._workers(target):  # its workers are here; its tokenizer is not (yet)
            if target in self._loading:
                raise RequestError(503, f"the model {name!r} is loading; retry shortly", type="service_unavailable",
                                   code="model_loading")
            raise RequestError(503, f"the model {name!r} is served by workers whose tokenizer this frontend cannot "
                               "load (see its log)", type="service_unavailable", code="model_unavailable")
        listed = ", ".join(repr(m.name) for m in self.served()) or "none"
        raise RequestError(404, f"the model {name!r} does not exist; served models: {listed}", param="model",
                           code="model_not_found")

    def resolve(self, name: str) -> ServedModel:
        return self.resolve_child(name)[0]

    def limits_for(self, name: str) -> tuple[ServedModel, RequestLimits]:
        """The served model for ``name`` and the limits a request naming it is checked against."""
        served, child = self.resolve_child(name)
        limits = served.limits if name == served.name else replace(served.limits, model=name)
        if child is not None:  # a LoRA adapter: the request runs under it, its KV hashed from its root
            digest = self.adapters().get(child, (served.name, ""))[1]
            limits = replace(limits, lora=child, lora_digest=digest)
        return served, limits

    def default(self) -> ServedModel:
        """The model of a request that names none (the NATS API allows that): ``--model``'s, else
        the only one served; with several and none preloaded the caller must say."""
        preloaded = [m for m in self._served.values() if m.preloaded]
        if preloaded:
            return preloaded[0]
        served = self.served()
        if len(served) == 1:
            return served[0]
        if not served:
            raise RequestError(503, "no model is served yet", type="service_unavailable", code="no_worker")
        raise RequestError(400, "model is required: this endpoint serves " + ", ".join(m.name for m in served),
                           param="model")

    def listing(self) -> list[dict[str, Any]]:
        """``/v1/models`` entries (OpenAI's shape, plus vLLM's ``root``, ``parent`` and ``max_model_len``)."""
        entries: list[dict[str, Any]] = []
        served = {m.name: m for m in self.served()}
        for m in served.values():
            entries.append({"id": m.name, "object": "model", "created": m.created, "owned_by": "baton",
                            "root": m.name, "parent": None, "max_model_len": m.max_model_len})
        for public, target in sorted(self.aliases.items()):
            base = self._children.get(target, (target, ""))[0]
            if base in served:
                entries.append({"id": public, "object": "model", "created": served[base].created,
                                "owned_by": "baton", "root": target, "parent": None,
                                "max_model_len": served[base].max_model_len})
        children = {name: (parent, "baton") for name, (parent, _) in self.adapters().items()}
        children.update(self._children)
        for name, (parent, owned_by) in sorted(children.items()):
            if parent in served:
                entries.append({"id": name, "object": "model", "created": served[parent].created,
                                "owned_by": owned_by, "root": parent, "parent": parent,
                                "max_model_len": served[parent].max_model_len})
        return entries

    # --- following the fleet ----------------------------------------------------------------

    async def run(self) -> None:
        """Load each model the fleet serves when it first appears (until cancelled)."""
        if self.view is None or self.factory is None:
            await anyio.sleep_forever()
        assert self.view is not None
        async with anyio.create_task_group() as tg:
            while True:
                for name, info in self._to_load():
                    self._loading.add(name)
                    tg.start_soon(self._load, name, info)
                await self.view.wait_changed()

    def _to_load(self) -> list[tuple[str, WorkerInfo]]:
        assert self.view is not None
        now = time.monotonic()
        wanted: dict[str, WorkerInfo] = {}
        for w in self.view.workers("decode"):
            if w.model in self._loading or w.model in wanted:
                continue
            loaded = self._served.get(w.model)
            if loaded is not None and (loaded.preloaded or not w.tokenizer_digest
                                       or loaded.tokenizer_digest == w.tokenizer_digest):
                continue
            if loaded is not None and any(x.tokenizer_digest == loaded.tokenizer_digest
                                          for x in self._workers(w.model)):
                continue  # workers of two versions under one name: keep the loaded one while any serves it
            if now - self._failed.get(w.model, -RETRY_AFTER_S) < RETRY_AFTER_S:
                continue
            wanted[w.model] = w
        return list(wanted.items())

    async def _load(self, name: str, info: WorkerInfo) -> None:
        try:
            with anyio.fail_after(self.load_timeout):
                model_dir = await self._model_dir(info)
                served = await anyio.to_thread.run_sync(self.factory, name, model_dir,  # type: ignore[arg-type]
                                                        info.context_length, abandon_on_cancel=True)
            served.tokenizer_digest = info.tokenizer_digest
            served.created = int(time.time())
            self._served[name] = served
            self._failed.pop(name, None)
            log.info("serving model %s (context %d, tokenizer from %s)", name, served.max_model_len, served.root)
            self.changed.set()
            self.changed = anyio.Event()
        except Exception as e:
            self._failed[name] = time.monotonic()
            log.warning("cannot serve model %s from worker %s: %s; retrying in %.0fs", name, info.worker_id,
                        e if str(e) else type(e).__name__, RETRY_AFTER_S)
        finally:
            self._loading.discard(name)

    async def _model_dir(self, info: WorkerInfo) -> Path:
        if not info.tokenizer_digest:
            raise LookupError("the worker does not describe its tokenizer (an older worker); "
                              "start this frontend with --model for it")
        if info.model_path:
            path = Path(info.model_path)
            if await anyio.to_thread.run_sync(matches, path, info.tokenizer_digest, info.template_digest):
                return path
        if not info.files_published or self.bus is None or self.files_dir is None:
            raise LookupError(f"{info.model_path or 'its model path'} is not readable here with the same digests "
                              "and the worker published no tokenizer files")
        return await fetch_model_files(self.bus, info.tokenizer_digest, info.template_digest, self.files_dir)
