"""Tokenizer files through the model-files object store, with the roles' real NATS permissions: a
decode worker publishes them once per digest, a frontend (read-only) fetches and checks them."""

from __future__ import annotations

import shutil
from pathlib import Path

import anyio
import pytest

from shared.builtin_model import ensure_builtin
from shared.bus import Bus, NatsSecurity
from shared.model_files import describe_model, fetch_model_files, matches, publish_model_files
from shared.tokenizer import Tokenizer
from tests.procs import StackNats

pytestmark = pytest.mark.timeout(60)


def test_publish_once_fetch_and_check(tmp_path: Path) -> None:
    tiny = ensure_builtin("baton-tiny")
    model = tmp_path / "model"
    shutil.copytree(tiny, model)
    desc = describe_model(model, 2048)
    assert desc.context_length == 2048 and desc.template_digest and len(desc.tokenizer_digest) == 64
    nats = StackNats(tmp_path, auth=True).start()

    async def connect(role: str) -> Bus:
        assert nats.identities is not None
        return await Bus.connect(nats.service_url, f"test-{role}",
                                 security=NatsSecurity(creds_file=str(nats.identities.creds[role])))

    async def main() -> None:
        frontend = await connect("frontend")
        decode = await connect("decode")
        try:
            # Nothing published yet: the frontend (which may not create the bucket) gets an error.
            with pytest.raises(Exception):  # noqa: B017 (nats-py raises several kinds)
                await fetch_model_files(frontend, desc.tokenizer_digest, desc.template_digest, tmp_path / "f0")
            assert await publish_model_files(decode, model, desc) is True
            assert await publish_model_files(decode, model, desc) is False  # once per digest
            got = await fetch_model_files(frontend, desc.tokenizer_digest, desc.template_digest, tmp_path / "f1")
            assert matches(got, desc.tokenizer_digest, desc.template_digest)
            assert not (got / "model.safetensors").exists()  # tokenizer and template only, never weights
            tok = Tokenizer(got)
            assert tok.encode("hello world") == Tokenizer(model).encode("hello world")
            assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == \
                Tokenizer(model).apply_chat_template([{"role": "user", "content": "hi"}])
            # Another template under the same tokenizer is another object: not found, not mixed up.
            with pytest.raises(Exception):  # noqa: B017 (nats-py raises several kinds)
                await fetch_model_files(frontend, desc.tokenizer_digest, "0" * 64, tmp_path / "f2")
        finally:
            await frontend.close()
            await decode.close()

    try:
        anyio.run(main)
        assert not nats.violations()  # every role did all of this within its own permissions
    finally:
        nats.stop()
        nats.cleanup()


def test_a_frontend_that_cannot_read_the_path_serves_the_model_from_the_store(tmp_path: Path) -> None:
    """The registry's fallback: the advertised directory does not exist here, the published files do."""
    from services.frontend.models import ModelRegistry, ServedModel
    from services.frontend.request import RequestLimits
    from shared.messages import WorkerInfo

    tiny = ensure_builtin("baton-tiny-b")
    desc = describe_model(tiny, 0)
    info = WorkerInfo(worker_id="w1", role="decode", model="remote-b", context_length=desc.context_length,
                      tokenizer_digest=desc.tokenizer_digest, template_digest=desc.template_digest,
                      model_path="/nonexistent/on/this/host", files_published=True)

    class OneWorker:
        def workers(self, role: str | None = None, model: str | None = None) -> list[WorkerInfo]:
            return [info] if (role in (None, "decode") and model in (None, "", "remote-b")) else []

    def factory(name: str, model_dir: Path, context_length: int) -> ServedModel:
        return ServedModel(name=name, tokenizer=Tokenizer(model_dir), max_model_len=context_length,
                           limits=RequestLimits(name, context_length), generation=None,  # type: ignore[arg-type]
                           root=str(model_dir))

    nats = StackNats(tmp_path, auth=True).start()

    async def main() -> None:
        assert nats.identities is not None
        decode = await Bus.connect(nats.service_url, "test-decode",
                                   security=NatsSecurity(creds_file=str(nats.identities.creds["decode"])))
        frontend = await Bus.connect(nats.service_url, "test-frontend",
                                     security=NatsSecurity(creds_file=str(nats.identities.creds["frontend"])))
        try:
            await publish_model_files(decode, tiny, desc)
            reg = ModelRegistry(factory, OneWorker(), frontend, files_dir=tmp_path / "fetched")  # type: ignore[arg-type]
            await reg._load("remote-b", info)
            served = reg.resolve("remote-b")
            assert Path(served.root).is_relative_to(tmp_path / "fetched")
            assert served.max_model_len == desc.context_length
            assert served.tokenizer.encode("hello") == Tokenizer(tiny).encode("hello")
        finally:
            await decode.close()
            await frontend.close()

    try:
        anyio.run(main)
        assert not nats.violations()
    finally:
        nats.stop()
        nats.cleanup()
