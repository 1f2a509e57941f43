"""FloDial flowcharts: read the official knowledge sources and analyse their trees.

Input: the 12 flowcharts of FloDial (github dair-iitd/FloDial, ``knowledge-sources/*.json``; no
licence is published, so the project never ships them: point ``--input`` at your copy, or at the
folder that holds ``knowledge-sources``). Each file has ``name``, ``problem_description``,
``nodes`` (id -> ``label``, ``utterance``, ``terminal``) and ``edges`` (id -> ``{"yes": id, "no": id}``,
some nodes have a single branch); the root is node ``"1"``. Every file must be a tree reachable from
the root (checked; the 12 official charts are).

A terminal's *root path* is the list of (question node, branch taken) from the root down to it; two
terminals' paths part at exactly one node (:func:`split_node`), which is what
:mod:`verl_selflock.data.flodial` counts to grade an episode's difficulty.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from verl_selflock.errors import InvalidInput, MissingInput

__all__ = [
    "ROOT",
    "Flowchart",
    "load_flowchart",
    "load_flowcharts",
    "knowledge_sources_dir",
    "split_node",
    "separating_questions",
    "node_order",
]

ROOT = "1"
MAX_NODES = 2000

Path_ = tuple[tuple[str, str], ...]
"""A root path: ((node id, branch taken), ...) from the root down to (not including) a terminal."""


@dataclass(frozen=True, eq=False)  # hashed by identity: the distractor-set cache keys on it
class Flowchart:
    """One troubleshooting flowchart, reduced to what episodes need."""

    name: str
    problem_description: str
    questions: dict[str, str]
    """Non-terminal node id -> its question (``utterance``)."""
    faults: dict[str, str]
    """Terminal node id -> its resolution text (``utterance``)."""
    paths: dict[str, Path_]
    """Terminal node id -> its root path."""

    def table(self, fault: str) -> list[dict[str, str]]:
        """The reference table of ``fault``: its root path's questions with the answers toward it."""
        return [
            {"node": node, "question": self.questions[node], "answer": branch} for node, branch in self.paths[fault]
        ]


def load_flowchart(data: Mapping[str, Any], name: str | None = None) -> Flowchart:
    """Validate one FloDial knowledge-source dict and extract the root path of every terminal.

    Raises:
        ValueError: naming the chart and the problem (no root, dangling edge, cycle, a terminal with
            edges, a question without edges, an unreachable node, an empty utterance).
    """
    if not isinstance(data, Mapping):
        raise InvalidInput(f"flowchart {name or '?'!r}: expected a JSON object, got {type(data).__name__}")
    name = str(data.get("name") or name or "?")

    def fail(why: str) -> InvalidInput:  # a ValueError too, as before
        return InvalidInput(f"flowchart {name!r}: {why}")

    nodes, edges = data.get("nodes"), data.get("edges")
    if not isinstance(nodes, Mapping) or not isinstance(edges, Mapping):
        raise fail("needs 'nodes' and 'edges' objects")
    if len(nodes) > MAX_NODES:  # root paths are copied per node: a huge chain would take quadratic time
        raise fail(f"has {len(nodes)} nodes (at most {MAX_NODES}; the official charts have 24-37)")
    if ROOT not in nodes:
        raise fail(f"has no root node {ROOT!r}")
    for node_id, node in nodes.items():
        if not isinstance(node, Mapping) or not str(node.get("utterance", "")).strip():
            raise fail(f"node {node_id!r} has no utterance")
        terminal = bool(node.get("terminal"))
        out = edges.get(node_id) or {}
        if not isinstance(out, Mapping):
            raise fail(f"the edges of node {node_id!r} are not an object of 'yes'/'no' branches")
        if terminal and out:
            raise fail(f"terminal node {node_id!r} has outgoing edges")
        if not terminal and not out:
            raise fail(f"question node {node_id!r} has no outgoing edge")
        if set(out) - {"yes", "no"}:
            raise fail(f"node {node_id!r} has branches {sorted(out)}; only 'yes'/'no' are allowed")
        for target in out.values():
            if str(target) not in nodes:
                raise fail(f"edge {node_id!r} -> {target!r} points to no node")
    paths: dict[str, Path_] = {}
    visited: set[str] = set()
    stack: list[tuple[str, Path_]] = [(ROOT, ())]
    while stack:
        node_id, path = stack.pop()
        if node_id in visited:
            raise fail(f"node {node_id!r} is reached twice (the chart must be a tree)")
        visited.add(node_id)
        if nodes[node_id].get("terminal"):
            paths[node_id] = path
            continue
        for branch, target in sorted((edges.get(node_id) or {}).items()):
            stack.append((str(target), (*path, (node_id, branch))))
    unreachable = sorted(set(nodes) - visited)
    if unreachable:
        raise fail(f"nodes {unreachable[:5]} are not reachable from the root")
    if len(paths) < 2:
        raise fail("needs at least two terminal nodes")
    return Flowchart(
        name=name,
        problem_description=str(data.get("problem_description", "")).strip(),
        questions={k: str(v["utterance"]).strip() for k, v in nodes.items() if not v.get("terminal")},
        faults={k: str(v["utterance"]).strip() for k, v in nodes.items() if v.get("terminal")},
        paths=paths,
    )


def knowledge_sources_dir(path: str | os.PathLike) -> Path:
    """``path`` itself, or its ``knowledge-sources`` subfolder when it has one."""
    folder = Path(path).expanduser()
    if (folder / "knowledge-sources").is_dir():
        folder = folder / "knowledge-sources"
    if not folder.is_dir():
        raise MissingInput(f"--input {folder}: not a folder (give FloDial's knowledge-sources folder)")
    return folder


def load_flowcharts(path: str | os.PathLike) -> dict[str, Flowchart]:
    """Every ``*.json`` flowchart in the folder, keyed by chart name (sorted, so seeds are stable)."""
    folder = knowledge_sources_dir(path)
    charts: dict[str, Flowchart] = {}
    for file in sorted(folder.glob("*.json")):
        try:
            chart = load_flowchart(_read_json(file), name=file.stem)
        except InvalidInput as err:
            raise InvalidInput(f"{file}: {err}") from err
        if chart.name in charts:
            raise InvalidInput(f"{file}: a second flowchart named {chart.name!r}")
        charts[chart.name] = chart
    if not charts:
        raise MissingInput(f"--input {folder}: no FloDial flowcharts (*.json) in this folder")
    return charts


def _read_json(file: Path) -> Any:
    """A chart file's JSON; a file that is not readable, not UTF-8 or not JSON is an error naming it (and
    the line, for JSON)."""
    try:
        raw = file.read_bytes()
    except OSError as err:
        raise InvalidInput(f"cannot read it ({err.strerror or err})") from err
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise InvalidInput(f"line {line}: not UTF-8 text (is this a FloDial knowledge-source file?)") from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise InvalidInput(f"line {err.lineno}: not valid JSON ({err.msg}, column {err.colno})") from err
    except RecursionError as err:
        raise InvalidInput("not usable JSON (nested too deeply)") from err


def split_node(a: Path_, b: Path_) -> str:
    """The node where two terminals' root paths part (same node, different branch)."""
    for (node_a, branch_a), (node_b, branch_b) in zip(a, b, strict=False):
        if branch_a != branch_b:
            assert node_a == node_b, "paths in a tree share every node before they split"
            return node_a
    raise ValueError("one terminal's path is a prefix of the other's: not a tree of terminals")


def separating_questions(chart: Flowchart, fault: str, distractors: Sequence[str]) -> int:
    """How many of ``fault``'s table questions it takes to rule out every distractor (see :mod:`verl_selflock.data.flodial`)."""
    return len({split_node(chart.paths[fault], chart.paths[c]) for c in distractors})


def node_order(node_id: str) -> tuple[int, str]:
    """Sort key of node ids: numeric ids in numeric order, then the others."""
    return (int(node_id), node_id) if node_id.isdigit() else (1 << 30, node_id)
