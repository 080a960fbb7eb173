"""Where a request's time to first token goes: the TTFT probe's records, hop by hop.

Run any Baton stack with ``BATON_TTFT_PROBE=<dir>`` (``baton up`` passes it to every service;
shared/probe.py says what each hop is), send load, stop the stack (each process writes what it
holds when it exits), then::

    python bench/ttft_breakdown.py <dir>                     # every request in the files
    python bench/ttft_breakdown.py <dir> --since T0 --until T1   # requests that began in [T0, T1)

(``T0``/``T1``: ``time.monotonic()`` on the same host.) ``bench/overhead.py --ttft-probe DIR``
does this per cell. Per step between consecutive hops a request passed: p50 and p90 in ms over the
requests that passed both, and the whole path (first hop to the first write).
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.probe import HOPS

FRONTEND_HOPS = ("http_headers", "app_start", "routed", "job_published")  # where a request begins
TOTAL = "total (first hop -> first_write)"


def load(directory: str | Path) -> dict[str, dict[str, float]]:
    """Request id -> hop -> the earliest time it passed it, from every process's file in ``directory``."""
    by_request: dict[str, dict[str, float]] = {}
    for path in sorted(Path(directory).glob("probe-*.tsv")):
        for line in path.read_text().splitlines():
            if not line or line.startswith("#"):
                continue
            hop, rid, t = line.split("\t")
            hops = by_request.setdefault(rid, {})
            ts = float(t)
            if ts < hops.get(hop, float("inf")):  # a migrated request passes some hops again: its first
                hops[hop] = ts
    return by_request


class Requests:
    """Loaded probe records, ordered by when each request began (its first frontend hop), so a
    window of them (one bench cell) is found without a scan."""

    def __init__(self, by_request: dict[str, dict[str, float]]) -> None:
        begun = []
        for hops in by_request.values():
            starts = [hops[h] for h in FRONTEND_HOPS if h in hops]
            if starts:
                begun.append((min(starts), hops))
        begun.sort(key=lambda b: b[0])
        self._starts = [t for t, _ in begun]
        self._hops = [h for _, h in begun]

    def between(self, since: float = float("-inf"), until: float = float("inf")) -> list[dict[str, float]]:
        """The requests that began in [since, until)."""
        return self._hops[bisect.bisect_left(self._starts, since):bisect.bisect_left(self._starts, until)]


def step_times(requests: list[dict[str, float]]) -> dict[str, list[float]]:
    """Step name ("a -> b") -> its durations in ms over ``requests``: consecutive hops each
    request passed, in :data:`HOPS` order."""
    steps: dict[str, list[float]] = {}
    for hops in requests:
        passed = [h for h in HOPS if h in hops]
        for a, b in itertools.pairwise(passed):
            steps.setdefault(f"{a} -> {b}", []).append((hops[b] - hops[a]) * 1e3)
        if "first_write" in hops and len(passed) > 1:
            steps.setdefault(TOTAL, []).append((hops["first_write"] - hops[passed[0]]) * 1e3)
    return steps


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


def summarize(source: str | Path | Requests, since: float = float("-inf"),
              until: float = float("inf")) -> dict[str, dict]:
    """Step -> {"n", "p50_ms", "p90_ms"} over the requests that began in [since, until), steps in
    path order, the total last. ``source``: a probe directory, or its records loaded once."""
    requests = source if isinstance(source, Requests) else Requests(load(source))
    steps = step_times(requests.between(since, until))
    order = {f"{a} -> {b}": (HOPS.index(a), HOPS.index(b)) for a in HOPS for b in HOPS}
    names = sorted((s for s in steps if s != TOTAL), key=lambda s: order[s]) + ([TOTAL] if TOTAL in steps else [])
    return {s: {"n": len(steps[s]), "p50_ms": round(pct(steps[s], 0.5), 3), "p90_ms": round(pct(steps[s], 0.9), 3)}
            for s in names}


def table(summary: dict[str, dict]) -> str:
    lines = ["| step | requests | p50 ms | p90 ms |", "|---|---:|---:|---:|"]
    lines += [f"| {s} | {v['n']} | {v['p50_ms']:.3f} | {v['p90_ms']:.3f} |" for s, v in summary.items()]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("directory")
    ap.add_argument("--since", type=float, default=float("-inf"), help="time.monotonic() on this host")
    ap.add_argument("--until", type=float, default=float("inf"))
    args = ap.parse_args()
    summary = summarize(args.directory, args.since, args.until)
    if not summary:
        raise SystemExit(f"no probe records in {args.directory} (was BATON_TTFT_PROBE set when the stack started?)")
    print(table(summary))


if __name__ == "__main__":
    main()
