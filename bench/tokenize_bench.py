"""Prompt tokenization: HF ``tokenizers`` against Baton's byte-level BPE fast path, same ids.

    python bench/tokenize_bench.py [--model baton-tiny] [--calls 2000] [--repeats 5] [--gap-ms 0 1]

For prompts of several lengths (a line, a paragraph, about 1,000 and 8,000 characters of the
built-in corpus, and a chat conversation with its template's special tokens), each side encodes
the same text ``calls`` times on one thread: HF's ``encode_batch_fast`` (what the frontend used
before, and still uses off the loop and for non-ASCII text) and ``Tokenizer.encode`` with the
fast path (shared/bpe_fast_path.py). ``--gap-ms 1`` sleeps between calls, as a frontend at
concurrency 1 does between prompts (cold caches). Reports the median time per call (and per
token) over the repeats, with min-max, and checks the ids agree.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # as the frontend runs it

from shared.builtin_model import _corpus
from shared.models import resolve_model
from shared.tokenizer import Tokenizer


def texts(tok: Tokenizer) -> dict[str, str]:
    corpus = " ".join(_corpus(n_sentences=400))
    chat = tok.apply_chat_template([
        {"role": "system", "content": "You are a careful assistant. Answer in two sentences."},
        {"role": "user", "content": corpus[:600]},
        {"role": "assistant", "content": corpus[600:900]},
        {"role": "user", "content": "Now say it again, shorter."},
    ])
    return {"line (47 chars)": "Measure the overhead of every hop in the stack.",
            "paragraph": corpus[:300], "1k chars": corpus[:1000], "8k chars": corpus[:8000],
            "chat, 4 turns": chat}


def time_calls(fn, text: str, calls: int, gap_s: float) -> float:
    """Median µs per call over ``calls`` calls."""
    samples = []
    for _ in range(calls):
        t = time.perf_counter_ns()
        fn(text)
        samples.append(time.perf_counter_ns() - t)
        if gap_s:
            time.sleep(gap_s)
    return statistics.median(samples) / 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="baton-tiny")
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--gap-ms", type=float, nargs="+", default=[0.0, 1.0])
    args = ap.parse_args()
    tok = Tokenizer(resolve_model(args.model, None).path)
    if tok._fast is None:
        raise SystemExit(f"{args.model}'s tokenizer has no fast path: nothing to compare")
    special = {"chat, 4 turns": False}
    sides = {
        "hf": lambda s, sp: tok._tok.encode_batch_fast([s], add_special_tokens=sp)[0].ids,
        "fast path": lambda s, sp: tok.encode(s, sp),
    }
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, model {args.model}, {args.calls} calls x "
          f"{args.repeats} repeats, one thread, {os.cpu_count()} CPUs; median (min-max) µs per call\n")
    print("| text | tokens | gap ms | hf µs | fast path µs | hf / fast | fast path µs per token |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, text in texts(tok).items():
        sp = special.get(name, True)
        ids = sides["hf"](text, sp)
        assert sides["fast path"](text, sp) == ids, f"ids differ for {name}"
        calls = max(50, args.calls // max(1, len(text) // 500))
        for gap in args.gap_ms:
            got: dict[str, list[float]] = {side: [] for side in sides}
            for _ in range(args.repeats):
                for side, fn in sides.items():
                    got[side].append(time_calls(lambda s, fn=fn, sp=sp: fn(s, sp), text, calls, gap / 1000))
            hf, fast = statistics.median(got["hf"]), statistics.median(got["fast path"])
            print(f"| {name} | {len(ids)} | {gap:g} | {hf:.1f} ({min(got['hf']):.1f}-{max(got['hf']):.1f}) | "
                  f"{fast:.1f} ({min(got['fast path']):.1f}-{max(got['fast path']):.1f}) | {hf / fast:.1f} | "
                  f"{fast / len(ids):.3f} |", flush=True)


if __name__ == "__main__":
    main()
