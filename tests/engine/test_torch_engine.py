"""Torch engine against transformers: greedy outputs must match token for token.

Small random Llama/Qwen2/Mistral models are built offline by transformers and saved to a temp
directory; references come from ``generate(do_sample=False)`` one prompt at a time.
"""

from __future__ import annotations

import random
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import msgspec
import pytest

from tests.require import require_module

torch = require_module("torch", "pip install 'baton[torch]'")
transformers = require_module("transformers", "pip install 'baton[test]'")

from shared.engines.base import EngineConfig, EngineOutput  # noqa: E402
from shared.engines.cpu_kernels import load_cpu_kernels  # noqa: E402
from shared.engines.torch_engine import TorchEngine  # noqa: E402
from shared.messages import SamplingParams  # noqa: E402
from shared.models import resolve_model  # noqa: E402

pytestmark = pytest.mark.anyio

MAX_NEW = 12
SMALL = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
}
ARCHS = {
    "llama": lambda: transformers.LlamaConfig(**SMALL),
    # llama3 rope scaling with a short original context, so the scaling changes the outputs
    "llama3-rope": lambda: transformers.LlamaConfig(
        **SMALL,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
    "qwen2-tied": lambda: transformers.Qwen2Config(**SMALL, tie_word_embeddings=True),
    # a window shorter than the prompts, so the sliding-window mask matters
    "mistral-window": lambda: transformers.MistralConfig(**SMALL, sliding_window=12),
}
_rng = random.Random(0)
PREFIX = [_rng.randrange(256) for _ in range(20)]
PROMPTS = [
    [_rng.randrange(256) for _ in range(3)],
    PREFIX + [_rng.randrange(256) for _ in range(9)],
    PREFIX + [_rng.randrange(256) for _ in range(17)],
    [_rng.randrange(256) for _ in range(41)],
    PREFIX[:8],
]


def hf_greedy(model_dir: Path, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    outs = []
    with torch.inference_mode():
        for p in prompts:
            seq = model.generate(torch.tensor([p]), max_new_tokens=max_new, do_sample=False)[0]
            outs.append(seq[len(p) :].tolist())
    return outs


@pytest.fixture(scope="module", params=list(ARCHS))
def arch_model(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, list[list[int]]]:
    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_config(ARCHS[request.param]())
    with torch.no_grad():  # init leaves biases 0 and norms 1, which would hide mistakes with them
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.5)
            elif "norm" in name:
                param.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return path, hf_greedy(path, PROMPTS, MAX_NEW)


async def collect(stream: AsyncIterator[EngineOutput]) -> tuple[list[int], EngineOutput]:
    tokens: list[int] = []
    last = None
    async for out in stream:
        tokens += out.token_ids
        last = out
    assert last is not None
    return tokens, last


def greedy(max_tokens: int = MAX_NEW, ignore_eos: bool = True) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos)


class Running:
    """An engine whose step loop runs for the duration of an ``async with``."""

    def __init__(self, **config: object) -> None:
        self.engine = TorchEngine(EngineConfig(**{"block_size": 4, "max_batched_tokens": 32, **config}))  # type: ignore[arg-type]

    async def __aenter__(self) -> TorchEngine:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self.engine.run)
        await self.engine.wait_ready()
        return self.engine

    async def __aexit__(self, *exc: object) -> None:
        self._tg.cancel_scope.cancel()
        await self._tg.__aexit__(None, None, None)


async def run_batch(
    engine: TorchEngine, prompts: list[list[int]], params: SamplingParams, tag: str = ""
) -> list[list[int]]:
    results: dict[int, list[int]] = {}

    async def one(i: int) -> None:
        results[i], fin = await collect(engine.generate(f"{tag}{i}", prompts[i], params))
        assert fin.finish_reason in ("length", "stop"), fin

    async with anyio.create_task_group() as tg:
        for i in range(len(prompts)):
            tg.start_soon(one, i)
    return [results[i] for i in range(len(prompts))]


@pytest.mark.parametrize("prefix_caching", [True, False])
@pytest.mark.parametrize("kernels", ["fused", "plain"])
async def test_greedy_matches_transformers(
    arch_model: tuple[Path, list[list[int]]], prefix_caching: bool, kernels: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both forward paths: fused C kernels with prepacked matmuls, and plain torch ops."""
    if kernels == "plain":
        monkeypatch.setenv("BATON_CPU_KERNELS", "0")
        monkeypatch.setenv("BATON_ONEDNN_LINEAR", "0")
    path, expected = arch_model
    async with Running(model=str(path), num_blocks=128, enable_prefix_caching=prefix_caching) as engine:
        alone = [(await collect(engine.generate(f"a{i}", p, greedy())))[0] for i, p in enumerate(PROMPTS)]
        assert alone == expected
        # all at once: chunked prefills next to decodes, and (with caching) prefix hits
        assert await run_batch(engine, PROMPTS, greedy(), "b") == expected
        stats = engine.stats()
        assert engine.model is not None
        # "fused" without a C compiler on this machine runs the plain path: both still must match
        assert engine.model.kernels is None if kernels == "plain" else engine.model.kernels is load_cpu_kernels()
    assert (stats.prefix_hit_tokens > 0) == prefix_caching
    assert stats.kv_blocks_used == 0 and stats.running == stats.waiting == 0


async def test_builtin_tiny_matches_transformers_with_eos() -> None:
    path = resolve_model("baton-tiny").path
    prompts = [[0, *range(10, 10 + n)] for n in (2, 15, 33)]
    expected = hf_greedy(path, prompts, 20)  # stops at EOS like the engine, if it comes
    async with Running(model="baton-tiny", num_blocks=64) as engine:
        assert engine.eos_token_ids and engine.model_name == "baton-tiny"
        got = await run_batch(engine, prompts, greedy(20, ignore_eos=False))
    assert got == expected


async def test_cached_prefix_computes_only_new_blocks(arch_model: tuple[Path, list[list[int]]]) -> None:
    path, expected = arch_model
    first, second = PROMPTS[2], PROMPTS[1]  # share 20 tokens: 5 full blocks of 4
    async with Running(model=str(path), num_blocks=64) as engine:
        await collect(engine.generate("first", first, greedy()))
        before = engine.num_computed_tokens
        tokens, fin = await collect(engine.generate("second", second, greedy()))
        computed = engine.num_computed_tokens - before
    assert fin.num_cached_tokens == 20
    # the 9 new prompt tokens, then one decode per generated token after the first
    assert computed == (len(second) - 20) + (MAX_NEW - 1)
    assert tokens == expected[1]


async def test_kv_pressure_preempts_and_loses_nothing(arch_model: tuple[Path, list[list[int]]]) -> None:
    path, expected = arch_model
    # 14 blocks of 4 = 56 slots: the longest request alone needs 53, all five need ~120
    async with Running(model=str(path), num_blocks=14, max_num_seqs=8) as engine:
        got = await run_batch(engine, PROMPTS, greedy())
        stats = engine.stats()
        assert engine.scheduler is not None
        free = engine.scheduler.kv.num_free_blocks
    assert got == expected
    assert stats.preemptions > 0
    assert stats.kv_blocks_used == 0 and free == 14 and stats.kv_blocks_total == 14


async def test_seeded_sampling_ignores_batch_mates() -> None:
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    other = SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True)
    prompt = list(range(20, 40))
    async with Running(model="baton-tiny", num_blocks=128) as engine:
        alone, _ = await collect(engine.generate("alone", prompt, params))
        crowd = await run_batch(engine, [[7, 8, 9], prompt, list(range(50, 90)), prompt], other, "noise")
        mixed = await run_batch(engine, [[5] * 30, prompt, [6] * 9], params, "mixed")
        reseeded, _ = await collect(
            engine.generate("reseeded", prompt, msgspec.structs.replace(params, seed=99))
        )
    assert mixed[1] == alone
    assert crowd[1] != alone or crowd[3] != alone  # unseeded requests do vary
    assert reseeded != alone


async def test_abort_and_hangup_free_blocks() -> None:
    async with Running(model="baton-tiny", num_blocks=64) as engine:
        stream = engine.generate("hangup", list(range(30)), greedy(500))
        async for _ in stream:
            break
        await stream.aclose()  # type: ignore[attr-defined]
        outs: list[EngineOutput] = []
        async for out in engine.generate("aborted", list(range(30)), greedy(500)):
            outs.append(out)
            if len(outs) == 2:
                engine.abort("aborted")
        assert outs[-1].finish_reason == "abort"
        # the inbox is FIFO: once a later request is done, both aborts have been applied
        await collect(engine.generate("after", [1, 2, 3], greedy(2)))
        stats = engine.stats()
    assert stats.kv_blocks_used == 0 and stats.running == 0 and stats.waiting == 0


async def test_bad_requests_error_without_hurting_others() -> None:
    async with Running(model="baton-tiny", num_blocks=8) as engine:
        _, bad_token = await collect(engine.generate("bad", [1, 10**6], greedy()))
        _, too_long = await collect(engine.generate("long", list(range(33)), greedy()))
        good, fin = await collect(engine.generate("good", [1, 2, 3], greedy(5)))
    assert bad_token.finish_reason == "error" and too_long.finish_reason == "error"
    assert len(good) == 5 and fin.finish_reason == "length"


async def test_stopping_the_engine_ends_open_streams() -> None:
    engine = TorchEngine(EngineConfig(model="baton-tiny", num_blocks=64))
    outs: list[EngineOutput] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(engine.run)
        await engine.wait_ready()
        stream = engine.generate("r", [1, 2, 3], greedy(10_000))
        outs.append(await stream.__anext__())  # type: ignore[attr-defined]
        tg.cancel_scope.cancel()
    async for out in stream:
        outs.append(out)
    assert outs[-1].finish_reason == "abort"


async def test_load_failure_fails_requests_and_wait_ready(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        '{"architectures": ["LlamaForCausalLM"], "vocab_size": 8}'
    )  # no weights
    engine = TorchEngine(EngineConfig(model=str(tmp_path)))
    outs: list[EngineOutput] = []

    async def client() -> None:
        outs.extend([o async for o in engine.generate("early", [1, 2], greedy())])

    async def run_engine() -> None:
        with pytest.raises(Exception):  # noqa: B017 - whatever the loader raises, run() must not swallow it
            await engine.run()

    async with anyio.create_task_group() as tg:
        tg.start_soon(client)
        await anyio.wait_all_tasks_blocked()  # the request is queued before the engine starts
        tg.start_soon(run_engine)
    with pytest.raises(RuntimeError):
        await engine.wait_ready()
    assert outs and outs[-1].finish_reason == "error"
    late = [o async for o in engine.generate("late", [1, 2], greedy())]
    assert late[-1].finish_reason == "error"


async def test_one_thread_loads_and_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenMP keeps a thread team per calling thread; a second team slowed steps ~30%."""
    threads: dict[str, int] = {}
    load, step = TorchEngine._load, TorchEngine._step_once

    def spy_load(self: TorchEngine) -> None:
        threads["load"] = threading.get_ident()
        load(self)

    def spy_step(self: TorchEngine) -> None:
        threads.setdefault("step", threading.get_ident())
        step(self)

    monkeypatch.setattr(TorchEngine, "_load", spy_load)
    monkeypatch.setattr(TorchEngine, "_step_once", spy_step)
    async with Running(model="baton-tiny", num_blocks=32) as engine:
        tokens, _ = await collect(engine.generate("r", [1, 2, 3], greedy(3)))
    assert len(tokens) == 3
    assert threads["load"] == threads["step"] != threading.get_ident()


async def test_bfloat16_engine_is_deterministic_and_close_to_fp32() -> None:
    """bf16 runs the fused kernels and prepacked matmuls in bf16; greedy stays reproducible."""
    prompts = [[0, *range(10, 10 + n)] for n in (2, 15, 33)]
    async with Running(model="baton-tiny", num_blocks=64, dtype="bfloat16") as engine:
        assert engine.model is not None and engine.model.dtype == torch.bfloat16
        first = await run_batch(engine, prompts, greedy(8), "a")
        again = await run_batch(engine, prompts, greedy(8), "b")
    async with Running(model="baton-tiny", num_blocks=64) as engine:
        fp32 = await run_batch(engine, prompts, greedy(8), "c")
    assert first == again
    # bf16 rounding may flip a near-tie late in a sequence, not the whole output
    agree = sum(a == b for x, y in zip(first, fp32, strict=True) for a, b in zip(x, y, strict=True))
    assert agree >= 0.75 * sum(len(x) for x in fp32)
