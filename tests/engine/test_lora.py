"""LoRA: PEFT parity of the batched application, adapter validation, and the resident-adapter LRU."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from tests.require import missing, require_module

torch = require_module("torch", "pip install 'baton[torch]'")
transformers = require_module("transformers", "pip install 'baton[test]'")
peft = require_module("peft", "pip install 'baton[test]'")

from shared.builtin_model import BUILTIN_MODELS, build_lora, directory_digest, ensure_builtin  # noqa: E402
from shared.engines.lora import (  # noqa: E402
    AdapterBusyError,
    LoraError,
    LoraRegistry,
    UnknownAdapterError,
    load_adapter,
    row_slots,
)
from shared.engines.torch_model import LlamaModel, StepInputs, load_model  # noqa: E402

BLOCK = 16
MAX_NEW = 6
_rng = random.Random(20)
PROMPTS = [[_rng.randrange(5, 2000) for _ in range(n)] for n in (5, 12, 23, 9, 17, 30)]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two adapters on baton-tiny (attention only; every linear with rsLoRA) and one on baton-tiny-b."""
    d = tmp_path_factory.mktemp("loras")
    return {
        "a": build_lora("baton-tiny", d / "demo-a", rank=8, targets=["q_proj", "v_proj"]),
        "b": build_lora(
            "baton-tiny", d / "demo-b", rank=4, alpha=6, targets=list(load_targets_all()), use_rslora=True
        ),
        "tb": build_lora("baton-tiny-b", d / "demo-tb", rank=8, targets=["q_proj", "k_proj", "o_proj", "down_proj"]),
    }


def load_targets_all() -> tuple[str, ...]:
    return ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def peft_reference(base: str, adapter_dirs: dict[str, Path]) -> dict[str | None, tuple[torch.Tensor, list[list[int]]]]:
    """Per adapter (None: the bare base): last-position logits of each prompt and its greedy tokens."""
    model = transformers.AutoModelForCausalLM.from_pretrained(ensure_builtin(base), dtype=torch.float32)
    names = list(adapter_dirs)
    model = peft.PeftModel.from_pretrained(model, adapter_dirs[names[0]], adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(adapter_dirs[n], adapter_name=n)
    model.eval()
    out: dict[str | None, tuple[torch.Tensor, list[list[int]]]] = {}

    def run(prompt: list[int]) -> tuple[torch.Tensor, list[int]]:
        # full forwards, no generate(): no EOS stop, no cache, nothing between us and the math
        seq = list(prompt)
        first = model(input_ids=torch.tensor([seq])).logits[0, -1]
        seq.append(int(first.argmax()))
        while len(seq) < len(prompt) + MAX_NEW:
            seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
        return first, seq[len(prompt) :]

    with torch.inference_mode():
        for name in [None, *names]:
            if name is None:
                with model.disable_adapter():
                    runs = [run(p) for p in PROMPTS]
            else:
                model.set_adapter(name)
                runs = [run(p) for p in PROMPTS]
            out[name] = (torch.stack([r[0] for r in runs]), [r[1] for r in runs])
    return out


@pytest.fixture(scope="module")
def reference(adapters: dict[str, Path]) -> dict[str | None, tuple[torch.Tensor, list[list[int]]]]:
    ref = peft_reference("baton-tiny", {"a": adapters["a"], "b": adapters["b"]})
    # The adapters must visibly change greedy outputs, or parity below would prove little.
    for name in ("a", "b"):
        assert ref[name][1] != ref[None][1], f"adapter {name} does not change greedy outputs"
    return ref


def baton_greedy(
    model: LlamaModel, registry: LoraRegistry | None, prompts: list[list[int]], assignment: list[str | None]
) -> tuple[torch.Tensor, list[list[int]]]:
    """Prefill every prompt in one step, then decode them together: rows of different adapters mixed."""
    model.allocate_kv(8 * len(prompts), BLOCK)
    slots = [registry.acquire(a) if a and registry else -1 for a in assignment]
    blocks = [torch.arange(i * 8, i * 8 + 8) for i in range(len(prompts))]

    def plan(runs: list[tuple[int, int]]):
        return registry.plan(row_slots(runs)) if registry else None

    ids, pos, slot_map, pre, last_rows, row = [], [], [], [], [], 0
    for s, p in enumerate(prompts):
        at = torch.arange(len(p))
        ids.append(torch.tensor(p))
        pos.append(at)
        slot_map.append(blocks[s][at // BLOCK] * BLOCK + at % BLOCK)
        pre.append((row, len(p), 0, blocks[s][: -(-len(p) // BLOCK)]))
        row += len(p)
        last_rows.append(row - 1)
    step = StepInputs(
        torch.cat(ids), torch.cat(pos), torch.cat(slot_map), torch.tensor(last_rows), 0, None, None, None, pre,
        lora=plan([(s, len(p)) for s, p in zip(slots, prompts, strict=True)]),
    )
    with torch.inference_mode():
        first = model.forward(step)
        outs = [[t] for t in first.argmax(-1).tolist()]
        for k in range(MAX_NEW - 1):
            positions = torch.tensor([len(p) + k for p in prompts])
            nb = int(positions.max()) // BLOCK + 1
            table = torch.stack([b[:nb] for b in blocks]).flatten()
            mask = (torch.arange(nb * BLOCK)[None, :] <= positions[:, None])[:, None, None, :]
            slot_map_d = torch.stack([blocks[i][p // BLOCK] * BLOCK + p % BLOCK for i, p in enumerate(positions)])
            step = StepInputs(
                torch.tensor([o[-1] for o in outs]), positions, slot_map_d, torch.arange(len(prompts)),
                len(prompts), table, mask, None, [], lora=plan([(s, 1) for s in slots]),
            )
            for o, t in zip(outs, model.forward(step).argmax(-1).tolist(), strict=True):
                o.append(t)
    if registry:
        for a in assignment:
            if a:
                registry.release(a)
    return first, outs


def tiny_model(base: str, fused: bool) -> LlamaModel:
    model = load_model(ensure_builtin(base))
    if fused and model.kernels is None:
        if os.environ.get("BATON_CPU_KERNELS", "1").lower() in ("0", "false", "no", "off"):
            pytest.skip("fused kernels disabled by BATON_CPU_KERNELS")
        missing("the fused CPU kernels did not build (a C compiler is needed)")
    if not fused:
        model.kernels = None
    return model


ASSIGNMENTS = {
    "alone-a": ["a"] * 6,
    "alone-b": ["b"] * 6,
    "mixed": ["a", None, "b", "a", None, "b"],  # an adapter's rows apart: gathered and scattered
    "grouped": ["b", "b", "a", "a", None, None],  # an adapter's rows together: slices
}


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
@pytest.mark.parametrize("case", list(ASSIGNMENTS))
def test_matches_peft_alone_and_in_a_mixed_batch(
    case: str, fused: bool, adapters: dict[str, Path], reference: dict
) -> None:
    model = tiny_model("baton-tiny", fused)
    registry = LoraRegistry(model.args, model.dtype, model.device, max_loras=2)
    registry.add("a", adapters["a"])
    registry.add("b", adapters["b"])
    assignment = ASSIGNMENTS[case]
    logits, greedy = baton_greedy(model, registry, PROMPTS, assignment)
    for i, a in enumerate(assignment):
        ref_logits, ref_greedy = reference[a]
        torch.testing.assert_close(logits[i], ref_logits[i], atol=1e-4, rtol=1e-4)
        assert greedy[i] == ref_greedy[i], f"prompt {i} with adapter {a}"
    assert registry.pins("a") == registry.pins("b") == 0


def test_no_adapter_plan_is_the_bare_model(reference: dict) -> None:
    model = tiny_model("baton-tiny", fused=False)
    _, greedy = baton_greedy(model, None, PROMPTS, [None] * len(PROMPTS))
    assert greedy == reference[None][1]


def test_second_base_model_with_its_adapter_matches_peft(adapters: dict[str, Path]) -> None:
    spec_a, spec_b = BUILTIN_MODELS["baton-tiny"], BUILTIN_MODELS["baton-tiny-b"]
    assert (spec_b.hidden_size, spec_b.num_layers, spec_b.seed) != (spec_a.hidden_size, spec_a.num_layers, spec_a.seed)
    assert spec_b.hidden_size // spec_b.num_heads >= 32
    ref = peft_reference("baton-tiny-b", {"tb": adapters["tb"]})
    assert ref["tb"][1] != ref[None][1]
    model = tiny_model("baton-tiny-b", fused=model_has_kernels())
    registry = LoraRegistry(model.args, model.dtype, model.device)
    registry.add("tb", adapters["tb"])
    assignment = ["tb", None, "tb", None, "tb", None]
    logits, greedy = baton_greedy(model, registry, PROMPTS, assignment)
    for i, a in enumerate(assignment):
        torch.testing.assert_close(logits[i], ref[a][0][i], atol=1e-4, rtol=1e-4)
        assert greedy[i] == ref[a][1][i]


def model_has_kernels() -> bool:
    from shared.engines.cpu_kernels import load_cpu_kernels

    return load_cpu_kernels() is not None


# --- building adapters ----------------------------------------------------------------------------


def test_adapters_are_deterministic_and_differ_by_name(tmp_path: Path) -> None:
    one = build_lora("baton-tiny", tmp_path / "x" / "demo", rank=4)
    two = build_lora("baton-tiny", tmp_path / "y" / "demo", rank=4)
    other = build_lora("baton-tiny", tmp_path / "z" / "other", rank=4)
    assert directory_digest(one) == directory_digest(two) != directory_digest(other)
    cfg = json.loads((one / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["target_modules"] == ["q_proj", "v_proj"]
    assert cfg["base_model_name_or_path"] == "baton-tiny"


def test_cli_build_lora(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from baton.cli import app

    out = tmp_path / "cli-a"
    res = CliRunner().invoke(
        app, ["model", "build-lora", "--name", "cli-a", "--base", "baton-tiny", "--rank", "2",
              "--targets", "k_proj,down_proj", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    assert res.output.strip() == str(out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and cfg["target_modules"] == ["k_proj", "down_proj"] and cfg["lora_alpha"] == 4
    bad = CliRunner().invoke(app, ["model", "build-lora", "--name", "x", "--targets", "c_attn", "--out", str(tmp_path / "x")])
    assert bad.exit_code != 0 and "c_attn" in bad.output


# --- validation: one error type, naming what is wrong ---------------------------------------------


@pytest.fixture
def base_model() -> LlamaModel:
    return tiny_model("baton-tiny", fused=False)


def edit_config(path: Path, **changes: object) -> None:
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def load(model: LlamaModel, path: Path, **kw: object):
    return load_adapter(path, model.args, model.dtype, model.device, **kw)


def test_rank_that_does_not_match_the_tensors_is_refused(tmp_path: Path, base_model: LlamaModel) -> None:
    path = build_lora("baton-tiny", tmp_path / "r", rank=4)
    edit_config(path, r=8)
    with pytest.raises(LoraError, match=r"shape \[4, 64\].*rank 8.*\[8, 64\]"):
        load(base_model, path)


def test_adapter_for_another_base_is_refused(adapters: dict[str, Path], base_model: LlamaModel) -> None:
    with pytest.raises(LoraError, match="needs"):  # baton-tiny-b's hidden size is 96, baton-tiny's 64
        load(base_model, adapters["tb"])


@pytest.mark.parametrize(
    ("changes", "pattern"),
    [
        ({"target_modules": ["q_proj", "c_attn"]}, "target module 'c_attn' is not a linear"),
        ({"target_modules": "nothing\\.here"}, "matches none"),
        ({"target_modules": ["q_proj"]}, "v_proj, which is not in target_modules"),
        ({"peft_type": "IA3"}, "peft_type must be 'LORA'"),
        ({"r": 0}, "positive integer"),
        ({"use_dora": True}, "use_dora"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ],
)
def test_bad_configs_are_refused(tmp_path: Path, base_model: LlamaModel, changes: dict, pattern: str) -> None:
    path = build_lora("baton-tiny", tmp_path / "c", rank=4)
    edit_config(path, **changes)
    with pytest.raises(LoraError, match=pattern):
        load(base_model, path)


def test_target_modules_forms_peft_accepts(tmp_path: Path, base_model: LlamaModel) -> None:
    path = build_lora("baton-tiny", tmp_path / "f", rank=4, targets=load_targets_all())
    for spec in ("all-linear", r".*\.(self_attn|mlp)\.\w+_proj", ["self_attn.q_proj", *load_targets_all()]):
        edit_config(path, target_modules=spec)
        assert load(base_model, path).config.targets == frozenset(load_targets_all())


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing", "nan", "bad-json", "max-rank"])
def test_corrupt_or_unfit_files_are_refused(tmp_path: Path, base_model: LlamaModel, damage: str) -> None:
    path = build_lora("baton-tiny", tmp_path / "d", rank=4)
    weights = path / "adapter_model.safetensors"
    kw: dict[str, object] = {}
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
        pattern = "corrupt"
    elif damage == "garbage":
        weights.write_bytes(b"\xff" * 64)
        pattern = "corrupt"
    elif damage == "missing":
        weights.unlink()
        pattern = "not found"
    elif damage == "nan":
        from safetensors.torch import load_file, save_file

        t = load_file(str(weights))
        key = next(iter(t))
        t[key][0, 0] = float("nan")
        save_file(t, str(weights))
        pattern = "not finite"
    elif damage == "bad-json":
        (path / "adapter_config.json").write_text("{not json")
        pattern = "not readable JSON"
    else:
        kw["max_rank"] = 2
        pattern = "exceeds this worker's maximum LoRA rank 2"
    with pytest.raises(LoraError, match=pattern):
        load(base_model, path, **kw)


def test_registry_add_of_a_bad_adapter_changes_nothing(tmp_path: Path, adapters: dict[str, Path], base_model: LlamaModel) -> None:
    reg = LoraRegistry(base_model.args, base_model.dtype, base_model.device, max_loras=2)
    reg.add("a", adapters["a"])
    with pytest.raises(LoraError):
        reg.add("tb", adapters["tb"])
    assert reg.names() == ["a"] and reg.resident() == ["a"]
    with pytest.raises(LoraError, match="already loaded from"):
        reg.add("a", adapters["b"])


# --- the resident-adapter cap: LRU eviction, pinning, deferred unload -----------------------------


@pytest.fixture
def four(tmp_path: Path) -> dict[str, Path]:
    return {n: build_lora("baton-tiny", tmp_path / n, rank=2) for n in ("w", "x", "y", "z")}


def test_lru_eviction_and_reload(four: dict[str, Path], base_model: LlamaModel) -> None:
    reg = LoraRegistry(base_model.args, base_model.dtype, base_model.device, max_loras=2)
    for n in ("w", "x", "y"):
        reg.add(n, four[n])
    assert reg.names() == ["w", "x", "y"] and reg.resident() == ["x", "y"] and reg.evictions == 1
    slot = reg.acquire("w")  # evicted: read again, evicting the least recently used (x)
    assert reg.resident() == ["y", "w"] and reg.loads == 4 and reg.slot("w") == slot
    reg.release("w")
    reg.acquire("y")  # y becomes most recent: the next load evicts w
    reg.release("y")
    reg.acquire("x")
    reg.release("x")
    assert reg.resident() == ["y", "x"]


def test_pinned_adapters_are_never_evicted(four: dict[str, Path], base_model: LlamaModel) -> None:
    reg = LoraRegistry(base_model.args, base_model.dtype, base_model.device, max_loras=2)
    for n in ("w", "x", "y"):
        reg.add(n, four[n])  # y's add evicts w
    reg.acquire("x")
    reg.acquire("y")
    with pytest.raises(AdapterBusyError, match="all 2 resident LoRA slots"):
        reg.acquire("w")
    assert reg.resident() == ["x", "y"]
    reg.add("z", four["z"])  # validated and known, not resident: no slot can be freed now
    assert "z" in reg.names() and "z" not in reg.resident()
    reg.release("x")
    reg.acquire("z")  # x is unpinned now: it goes, z comes
    assert reg.resident() == ["y", "z"]


def test_unload_of_a_running_adapter_waits_for_its_requests(four: dict[str, Path], base_model: LlamaModel) -> None:
    reg = LoraRegistry(base_model.args, base_model.dtype, base_model.device, max_loras=2)
    reg.add("w", four["w"])
    reg.acquire("w")
    reg.acquire("w")
    reg.remove("w")
    assert reg.names() == [] and reg.resident() == ["w"]  # still serving its two requests
    with pytest.raises(UnknownAdapterError, match="'w' is not loaded"):
        reg.acquire("w")
    with pytest.raises(AdapterBusyError):
        reg.add("w", four["w"])
    reg.release("w")
    assert reg.resident() == ["w"]
    reg.release("w")
    assert reg.resident() == [] and reg.resident_bytes() == 0
    with pytest.raises(UnknownAdapterError):
        reg.remove("w")
    with pytest.raises(ValueError, match="released more often"):
        reg.release("w")


def test_plan_segments(four: dict[str, Path], base_model: LlamaModel) -> None:
    reg = LoraRegistry(base_model.args, base_model.dtype, base_model.device, max_loras=2)
    reg.add("w", four["w"])
    reg.add("x", four["x"])
    sw, sx = reg.acquire("w"), reg.acquire("x")
    assert reg.plan(row_slots([(-1, 5)])) is None
    plan = reg.plan(row_slots([(sw, 3), (-1, 2), (sx, 1), (sw, 1)]))
    assert plan is not None
    by_rows = {(r.start, r.stop) if isinstance(r, slice) else tuple(r.tolist()) for _, r in plan.segments}
    assert by_rows == {(0, 1, 2, 6), (5, 6)}
    reg.release("x")
    with pytest.raises(ValueError, match="no acquired adapter"):
        reg.plan(row_slots([(sx, 1)]))


def test_adapter_root_separates_prefix_hashes(adapters: dict[str, Path], base_model: LlamaModel) -> None:
    from shared.kv_hash import ROOT_HASH, adapter_root, block_hashes

    a, b = load(base_model, adapters["a"]), load(base_model, adapters["b"])
    assert len(a.digest) == 16 and a.digest != b.digest
    assert load(base_model, adapters["a"]).digest == a.digest  # the same files, the same digest
    tokens = list(range(40))
    chains = {
        "bare": block_hashes(tokens, 16, adapter_root(None)),
        "a": block_hashes(tokens, 16, adapter_root("a", a.digest)),
        "a-reloaded-other-weights": block_hashes(tokens, 16, adapter_root("a", b.digest)),
        "b": block_hashes(tokens, 16, adapter_root("b", b.digest)),
    }
    assert chains["bare"] == block_hashes(tokens, 16, ROOT_HASH)
    firsts = {c[0] for c in chains.values()}
    assert len(firsts) == len(chains)  # no block is shared between any two of them
