"""Installing next to veRL's GPU stack: our dependencies must stay inside veRL 0.9.1's own ranges,
so that ``pip install "verl-selflock[vllm]"`` (= ``verl[vllm]==0.9.1`` + this package) resolves.

* :func:`test_transformers_range_is_verls` (fast) reads ``pyproject.toml`` and compares our base
  transformers range with the one the installed veRL declares: a veRL upgrade that moves it fails here.
* :func:`test_verl_vllm_resolves_with_this_package` (slow, ~30-40 s, network) asks pip's resolver, in a
  dry run, to install ``verl[vllm]==0.9.1`` together with this repository. It skips, saying why, when
  no package index is reachable. It uses pip's ``fast-deps`` feature (wheel metadata read with HTTP
  range requests, ~110 MB) and skips on a pip without it: an index that does not serve PEP 658
  metadata would otherwise make the dry run download the whole CUDA stack (~4 GB: torch, vllm, nvidia-*).
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

REPO_ROOT = Path(__file__).resolve().parents[1]
VERL_VERSION = "0.9.1"
_NETWORK_ERRORS = (
    "NewConnectionError",
    "ConnectTimeout",
    "ReadTimeout",
    "Max retries exceeded",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "Connection refused",
)


def _pyproject() -> dict:
    with open(REPO_ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _requirement(requirements: list[str], name: str, extra: str | None = None) -> Requirement:
    """The one requirement on ``name`` in ``requirements`` (for ``extra`` where markers say so)."""
    found = []
    for text in requirements:
        req = Requirement(text)
        if req.name.lower() != name:
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": extra or ""}):
            continue
        found.append(req)
    assert len(found) == 1, f"expected one requirement on {name!r}, got {found}"
    return found[0]


def test_transformers_range_is_verls():
    project = _pyproject()["project"]
    ours = _requirement(project["dependencies"], "transformers")
    verl = _requirement(importlib.metadata.requires("verl") or [], "transformers")
    assert ours.specifier == verl.specifier, (
        f"pyproject.toml asks for {ours}, veRL {importlib.metadata.version('verl')} for {verl}: keep the base "
        "range equal to veRL's so that its GPU extras (which pin transformers) install beside this package; "
        "a narrower range needed only on the CPU path belongs in the cpu/test extras"
    )


def test_verl_pin_and_vllm_extra():
    project = _pyproject()["project"]
    assert str(_requirement(project["dependencies"], "verl").specifier) == f"=={VERL_VERSION}"
    vllm = _requirement(project["optional-dependencies"]["vllm"], "verl")
    assert vllm.extras == {"vllm"} and str(vllm.specifier) == f"=={VERL_VERSION}", vllm


def _pip(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
    )


def _skip_without_index() -> None:
    """Skip unless pip's configured index answers for veRL within a few seconds."""
    try:
        probe = _pip("index", "versions", "verl", "--timeout", "5", "--retries", "0", timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        pytest.skip(f"no package index reachable: `pip index versions verl` failed ({error})")
    if probe.returncode != 0 or "Available versions" not in probe.stdout:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"no package index reachable (`pip index versions verl` exited {probe.returncode}: {last})")


@pytest.mark.slow
def test_verl_vllm_resolves_with_this_package():
    _skip_without_index()
    args = ["install", "--dry-run", "--ignore-installed", "--quiet", "--report", "-", "--timeout", "30"]
    # The repository as a local project (not editable: nothing is written into the tree).
    wanted = [f"verl[vllm]=={VERL_VERSION}", str(REPO_ROOT)]
    result = _pip(*args, "--use-feature=fast-deps", *wanted, timeout=900)
    if result.returncode != 0 and "invalid choice" in result.stderr:
        # Without fast-deps an index lacking PEP 658 metadata makes the dry run download ~4 GB of CUDA
        # wheels: not a thing to do in every CI run.
        pytest.skip("this pip has no --use-feature=fast-deps; a plain dry run would download the CUDA stack")
    if result.returncode != 0 and "ResolutionImpossible" not in result.stderr:
        network = [marker for marker in _NETWORK_ERRORS if marker in result.stderr]
        if network:
            pytest.skip(f"package index became unreachable during the dry run ({network[0]})")
    assert result.returncode == 0, (
        f"pip could not resolve verl[vllm]=={VERL_VERSION} + this package:\n" + (result.stderr[-4000:])
    )
    report = json.loads(result.stdout)
    picked = {
        item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"] for item in report["install"]
    }
    assert picked.get("verl") == VERL_VERSION
    assert picked.get("verl-selflock") == _pyproject()["project"]["version"]
    assert "vllm" in picked
    # The version verl[vllm] pins must also satisfy our own range.
    ours = _requirement(_pyproject()["project"]["dependencies"], "transformers")
    assert ours.specifier.contains(picked["transformers"]), (ours, picked["transformers"])
