"""Where a result came from: the code's git commit, a hash of the resolved config, the package versions.

Every run folder (`eval.json`, transfer `metrics.json`) and every benchmark cell carries these, so a number
can be traced to the code and options that made it, and a runner can tell a stale result from a fresh one.
"""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import platform
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


@lru_cache(maxsize=1)
def git_commit() -> str:
    """The repository's HEAD commit (full hash), with `+dirty` when tracked files differ from it; `unknown`
    outside a git checkout (an installed copy)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty else "")


# Config fields of any command that say where outputs go, how fast they are made, or that a run resumes, not what
# is computed: left out of every config hash (results' headers and benchmark cells alike).
OUTPUT_FIELDS = ("out", "output_dir", "name", "data_cache", "resume", "overwrite", "workers", "device", "threads",
                 "num_predictions", "vis_images", "gallery")


def config_dict(config: Any) -> dict[str, Any]:
    """A dataclass config (or a mapping) as a plain dict."""
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)


def config_hash(config: Any, ignore: tuple[str, ...] = ()) -> str:
    """A short, stable hash of a resolved config (keys sorted; `ignore` leaves out fields such as output paths
    that do not change what is computed)."""
    cfg = {k: v for k, v in config_dict(config).items() if k not in ignore}
    blob = json.dumps(cfg, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def source_hash(*paths: str | Path) -> str:
    """A short hash of the contents of source files (relative to the repository, or absolute): what a result's
    code was, even between commits."""
    digest = hashlib.sha256()
    for p in sorted(str(p) for p in paths):
        path = Path(p) if Path(p).is_absolute() else REPO / p
        digest.update(str(path.relative_to(REPO) if path.is_relative_to(REPO) else path.name).encode())
        digest.update(path.read_bytes() if path.is_file() else b"<missing>")
    return digest.hexdigest()[:16]


PROJECT_PACKAGES = ("pretrain", "transfer")


def project_sources(module_file: str | Path) -> tuple[str, ...]:
    """The project files (repository-relative, sorted) that `module_file` is made of: itself and every module of
    this project it imports, directly or not, imports inside functions and package __init__ files included.
    What a result computed by that module depends on, for `source_hash`."""

    def file_of(name: str) -> Path | None:
        base = REPO.joinpath(*name.split("."))
        return next((p for p in (base / "__init__.py", base.with_suffix(".py")) if p.is_file()), None)

    todo, seen = [Path(module_file).resolve()], set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[0] in PROJECT_PACKAGES:
                    todo += [f for i in range(1, len(parts) + 1) if (f := file_of(".".join(parts[:i])))]
    return tuple(sorted(p.relative_to(REPO).as_posix() for p in seen))


@lru_cache(maxsize=1)
def package_versions() -> dict[str, str]:
    import torch
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__}


def provenance(config: Any, ignore: tuple[str, ...] = ()) -> dict[str, Any]:
    """{"commit", "config_hash", "versions"}: the fields every result file starts with."""
    return {"commit": git_commit(), "config_hash": config_hash(config, ignore), "versions": package_versions()}
