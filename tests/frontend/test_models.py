"""The frontend's model registry without NATS: models appear with their workers (tokenizer read
from the path a worker advertises, checked against its digests), leave with them, resolve through
aliases and children, and a name nobody serves is OpenAI's 404."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import anyio
import pytest

from services.frontend.models import ModelRegistry, ServedModel, parse_aliases
from services.frontend.openai_api import RequestError
from services.frontend.request import RequestLimits
from shared.builtin_model import ensure_builtin
from shared.messages import WorkerInfo
from shared.model_files import describe_model
from shared.tokenizer import Tokenizer

pytestmark = pytest.mark.timeout(60)


class FakeView:
    def __init__(self) -> None:
        self.fleet: list[WorkerInfo] = []
        self._changed = anyio.Event()

    def workers(self, role: str | None = None, model: str | None = None) -> list[WorkerInfo]:
        return [w for w in self.fleet if (role is None or w.role == role) and (not model or w.model == model)]

    def set(self, fleet: list[WorkerInfo]) -> None:
        self.fleet = fleet
        self._changed.set()
        self._changed = anyio.Event()

    async def wait_changed(self) -> None:
        await self._changed.wait()


def factory(name: str, model_dir: Path, context_length: int) -> ServedModel:
    tok = Tokenizer(model_dir)
    max_len = context_length or 4096
    return ServedModel(name=name, tokenizer=tok, max_model_len=max_len, limits=RequestLimits(name, max_len),
                       generation=None, root=str(model_dir))  # type: ignore[arg-type]


def worker(worker_id: str, model: str, model_dir: Path | None, context: int = 1024, **over) -> WorkerInfo:
    fields = {}
    if model_dir is not None:
        d = describe_model(model_dir, context)
        fields = {"context_length": d.context_length, "tokenizer_digest": d.tokenizer_digest,
                  "template_digest": d.template_digest, "model_path": d.path}
    return WorkerInfo(worker_id=worker_id, role="decode", model=model, **{**fields, **over})


def test_parse_aliases() -> None:
    assert parse_aliases(["a=m1", "b=m2, c=m1"]) == {"a": "m1", "b": "m2", "c": "m1"}
    for bad in (["a"], ["=m"], ["a="], ["a=a"], ["a=m1", "a=m2"]):
        with pytest.raises(ValueError):
            parse_aliases(bad)


def test_models_follow_the_fleet_with_aliases_and_404s(tmp_path: Path) -> None:
    tiny = ensure_builtin("baton-tiny")
    view = FakeView()
    reg = ModelRegistry(factory, view, aliases={"public": "m-a"})  # type: ignore[arg-type]

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(reg.run)
            await anyio.lowlevel.checkpoint()
            with pytest.raises(RequestError) as e:
                reg.resolve("m-a")
            assert (e.value.status, e.value.code, e.value.param) == (404, "model_not_found", "model")

            with anyio.fail_after(20):
                view.set([worker("w1", "m-a", tiny, context=1024)])
                while not reg.served():
                    await reg.changed.wait()
            assert reg.resolve("m-a").max_model_len == 1024  # the worker's context length
            assert reg.resolve("public") is reg.resolve("m-a")
            served, limits = reg.limits_for("public")
            assert served.name == "m-a" and limits.model == "public"  # checked against the name asked for
            listing = {m["id"]: m for m in reg.listing()}
            assert set(listing) == {"m-a", "public"}
            assert listing["m-a"]["max_model_len"] == 1024 and listing["m-a"]["object"] == "model"
            assert listing["public"]["root"] == "m-a"
            assert reg.default().name == "m-a"  # the only one
            with anyio.fail_after(20):  # a second model: a request naming none must say which
                view.set([worker("w1", "m-a", tiny, context=1024), worker("w2", "m-b", tiny)])
                while len(reg.served()) < 2:
                    await reg.changed.wait()
            with pytest.raises(RequestError) as e:
                reg.default()
            assert e.value.status == 400 and "m-a" in e.value.message and "m-b" in e.value.message
            view.set([worker("w1", "m-a", tiny, context=1024)])
            assert [m.name for m in reg.served()] == ["m-a"]

            # Children (LoRA adapters): listed with their parent, resolving to it.
            reg.add_child("adapter-1", "m-a")
            assert reg.resolve_child("adapter-1") == (served, "adapter-1")
            assert {m["id"]: m["parent"] for m in reg.listing()}["adapter-1"] == "m-a"
            with pytest.raises(ValueError):
                reg.add_child("m-a", "m-a")
            reg.remove_child("adapter-1")
            with pytest.raises(RequestError):
                reg.resolve("adapter-1")

            # The last worker leaves: the model, its alias and its children go; 404 again.
            view.set([])
            assert reg.listing() == [] and reg.served() == []
            for name in ("m-a", "public"):
                with pytest.raises(RequestError) as e:
                    reg.resolve(name)
                assert e.value.status == 404
            with pytest.raises(RequestError) as e:
                reg.default()
            assert e.value.status == 503
            tg.cancel_scope.cancel()

    anyio.run(main)


def test_unreadable_or_undescribed_models_are_503_not_served(tmp_path: Path) -> None:
    tiny = ensure_builtin("baton-tiny")
    other = tmp_path / "copy"
    shutil.copytree(tiny, other)
    (other / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')  # another template
    view = FakeView()
    reg = ModelRegistry(factory, view)  # type: ignore[arg-type]

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(reg.run)
            # A worker whose path holds other files than its digests say (another host's path), and
            # nothing published; and an old worker that describes nothing.
            good = worker("w1", "m-a", tiny)
            view.set([WorkerInfo(**{**{f: getattr(good, f) for f in good.__struct_fields__}, "model_path": str(other)}),
                      WorkerInfo(worker_id="w2", role="decode", model="old")])
            with anyio.fail_after(10):
                while len(reg._failed) < 2:
                    await anyio.sleep(0.01)
            for name in ("m-a", "old"):
                with pytest.raises(RequestError) as e:
                    reg.resolve(name)
                assert (e.value.status, e.value.code) == (503, "model_unavailable")
            assert reg.listing() == []
            tg.cancel_scope.cancel()

    anyio.run(main)


def test_a_preloaded_model_is_served_without_workers_and_is_the_default() -> None:
    tiny = ensure_builtin("baton-tiny")
    reg = ModelRegistry(factory, FakeView())  # type: ignore[arg-type]
    reg.preload(factory("baton-tiny", tiny, 0))
    assert [m["id"] for m in reg.listing()] == ["baton-tiny"]
    assert reg.default().name == "baton-tiny"
    with pytest.raises(RequestError) as e:
        reg.resolve("nope")
    assert e.value.status == 404 and "baton-tiny" in e.value.message


def test_a_new_tokenizer_under_the_same_name_replaces_the_old_once_no_worker_serves_it(tmp_path: Path) -> None:
    tiny = ensure_builtin("baton-tiny")
    v2 = tmp_path / "v2"
    shutil.copytree(tiny, v2)
    cfg = json.loads((v2 / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "v2:{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (v2 / "tokenizer_config.json").write_text(json.dumps(cfg))
    view = FakeView()
    reg = ModelRegistry(factory, view)  # type: ignore[arg-type]
    old, new = worker("w1", "m", tiny), worker("w2", "m", v2)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(reg.run)
            with anyio.fail_after(20):
                view.set([old])
                while not reg.served():
                    await reg.changed.wait()
            assert reg.resolve("m").root == str(tiny.resolve())
            view.set([old, new])  # a rolling upgrade: the old version stays while a worker serves it
            assert reg._to_load() == []  # what the registry's loop decides on this change: nothing to load
            assert reg.resolve("m").root == str(tiny.resolve())
            with anyio.fail_after(20):
                view.set([new])
                while reg.resolve("m").root != str(v2.resolve()):
                    await reg.changed.wait()
            assert reg.resolve("m").tokenizer.apply_chat_template([{"role": "user", "content": "x"}]).startswith("v2:")
            tg.cancel_scope.cancel()

    anyio.run(main)
