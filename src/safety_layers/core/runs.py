"""Run folders: resolved config, results and environment, each written atomically.

A run folder is ``runs/<verb>-<model>-<time>/`` unless the user names one. Every file is
written to a temporary name and renamed into place, so an interrupted run never leaves a
half-written JSON that a later step would read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import SafetyLayersError

FORMAT_VERSION = 1


def to_jsonable(obj):
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: to_jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, float) and obj != obj:
        return None
    return obj


def atomic_write(path: str | Path, text: str | bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(text.encode("utf-8") if isinstance(text, str) else text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


@contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False):
    """Yield an empty temporary sibling of ``out`` to fill; it replaces ``out`` only when the
    block ends without an exception, so a crash never leaves a half-written folder that a
    later step would load. An existing ``out`` needs ``overwrite``."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise SafetyLayersError(f"{out} exists: choose another folder or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            if not overwrite:
                raise SafetyLayersError(f"{out} appeared while this run wrote it: choose another folder or pass --overwrite")
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_json(path: str | Path, what: str = "result") -> dict:
    """A JSON object from a file a run wrote, or one line naming the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise SafetyLayersError(f"{what} file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SafetyLayersError(f"{path} is not valid JSON ({getattr(e, 'msg', type(e).__name__)}): "
                                f"rerun the step that writes the {what}") from None
    if not isinstance(data, dict):
        raise SafetyLayersError(f"{path} holds a {type(data).__name__}, not a JSON object: rerun the step that "
                                f"writes the {what}")
    return data


def write_json(path: str | Path, obj) -> Path:
    return atomic_write(path, json.dumps(to_jsonable(obj), indent=2, ensure_ascii=False) + "\n")


def append_jsonl(path: str | Path, record) -> None:
    """Append one line and flush it to disk (journals that let a run resume)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(to_jsonable(record), ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | Path) -> list[dict]:
    """Records of a journal; a torn last line (crash mid-write) is ignored."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(str(text)).name).strip("-")[:60] or "model"


def default_run_dir(verb: str, model: str, *parts: str, root: str | Path = "runs") -> Path:
    """``runs/<verb>-<model>[-<part>...]-<time>``: where a run goes when the user names no folder."""
    name = "-".join([verb, slug(model), *map(str, parts), time.strftime("%Y%m%d-%H%M%S")])
    return Path(root) / name


def new_run_dir(verb: str, model: str, out: str | Path | None = None, overwrite: bool = False,
                root: str | Path = "runs", resume: bool = False) -> Path:
    """Create the run folder; an existing non-empty one needs ``overwrite``, or ``resume``
    for commands that continue the run they find there."""
    path = Path(out) if out else default_run_dir(verb, model, root=root)
    if path.exists() and any(path.iterdir()) and not (overwrite or resume):
        raise SafetyLayersError(f"output folder {path} exists and is not empty: pass --overwrite or choose another --out")
    path.mkdir(parents=True, exist_ok=True)
    return path


def environment(model=None) -> dict:
    """Versions and machine facts that produced a result; with ``model`` (a LoadedModel or a
    module) also where its weights ran: device and dtype as resolved by the loader."""
    import torch
    import transformers

    from . import __version__

    env = {"safety_layers": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
           "transformers": transformers.__version__, "platform": platform.platform(),
           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
           "threads": torch.get_num_threads(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "format_version": FORMAT_VERSION}
    if model is not None:
        from .placement import describe

        env.update(describe(getattr(model, "model", model)))
    try:
        env["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["git"] = None
    return env
