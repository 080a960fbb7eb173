"""Policy check of the Baton Helm chart: render it offline for every value set the tests render
(tests/test_deploy.py VALUE_SETS), then run checkov's Kubernetes checks on the manifests.

    make policy-check                              # a checkov venv of its own, then this script
    python deploy/helm/policy_check.py --checkov /path/to/checkov

checkov is not in the `test` extra: it pins older packaging/networkx than the project's environment
uses, so it lives in its own virtualenv. Exit status: checkov's (0 = no failed check beyond the
skips in deploy/helm/checkov.yaml, each explained in docs/operations.md).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "deploy" / "helm" / "checkov.yaml"


def render_all(out: Path) -> list[Path]:
    """One file of manifests per value set, rendered by Helm's own engine (helm-python-sdk)."""
    import yaml

    sys.path.insert(0, str(ROOT))
    from tests.test_deploy import VALUE_SETS, render

    files = []
    for name, values in VALUE_SETS.items():
        path = out / f"{name}.yaml"
        path.write_text(yaml.safe_dump_all(render(values), sort_keys=False))
        files.append(path)
    return files


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkov", default=shutil.which("checkov") or "checkov", help="the checkov executable")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="baton-chart-") as tmp:
        files = render_all(Path(tmp))
        print(f"rendered {len(files)} value sets into {tmp}; running checkov", flush=True)
        return subprocess.run([args.checkov, "--config-file", str(CONFIG), "-d", tmp], timeout=900).returncode


if __name__ == "__main__":
    raise SystemExit(main())
