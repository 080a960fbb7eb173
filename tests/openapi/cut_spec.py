"""Cut OpenAI's OpenAPI spec down to the endpoints Baton serves; rerun to refresh the vendored cut.

Usage: python tests/openapi/cut_spec.py path/to/openai-openapi/openapi.json
Source: https://github.com/openai/openai-openapi (openapi.json, MIT licence, see LICENSE-openai-openapi).
Keeps POST /chat/completions, POST /completions, GET /models and every schema they reference;
drops prose (description, examples, x-oaiMeta) so the file stays small. Nothing else is changed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

KEEP = {"/chat/completions": ["post"], "/completions": ["post"], "/models": ["get"]}
DROP_KEYS = {"description", "example", "examples", "x-oaiMeta", "x-oaiExpandable", "title", "summary",
             "deprecated-description", "x-stainless-const", "x-oaiTypeLabel"}


def _strip(node: Any, names: bool = False) -> Any:
    """Drop prose keys; keys of a ``properties`` map are field names and are all kept."""
    if isinstance(node, dict):
        return {k: _strip(v, k == "properties" and not names) for k, v in node.items()
                if names or k not in DROP_KEYS}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def _refs(node: Any, out: set[str]) -> None:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str):
            out.add(ref)
        for v in node.values():
            _refs(v, out)
    elif isinstance(node, list):
        for v in node:
            _refs(v, out)


def cut(spec: dict[str, Any]) -> dict[str, Any]:
    paths = {p: {m: spec["paths"][p][m] for m in methods} for p, methods in KEEP.items()}
    for ops in paths.values():
        for op in ops.values():
            op.pop("x-oaiMeta", None)
    components: dict[str, dict[str, Any]] = {}
    todo: set[str] = set()
    _refs(paths, todo)
    seen: set[str] = set()
    while todo:
        ref = todo.pop()
        if ref in seen:
            continue
        seen.add(ref)
        _, _, kind, name = ref.split("/", 3)
        node = spec["components"][kind][name]
        components.setdefault(kind, {})[name] = node
        _refs(node, todo)
    return _strip({
        "openapi": spec["openapi"],
        "info": {"title": "OpenAI API (cut to the endpoints Baton serves)", "version": spec["info"]["version"],
                 "license": spec["info"].get("license")},
        "servers": [{"url": "/v1"}],
        "paths": paths,
        "components": {k: dict(sorted(v.items())) for k, v in sorted(components.items())},
    })


if __name__ == "__main__":
    src = json.loads(Path(sys.argv[1]).read_text())
    out = Path(__file__).with_name("openai_cut.json")
    out.write_text(json.dumps(cut(src), indent=1, sort_keys=False) + "\n")
    print(out, out.stat().st_size, "bytes")
