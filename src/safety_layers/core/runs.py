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
    out = check_out_dir(out, overwrite=overwrite, whole=True)
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


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_writable(where: Path, target: Path, flag: str) -> None:
    """One line unless ``target`` can be written in the folder ``where`` (or, if that does not
    exist yet, in its nearest existing ancestor): not a file, not read-only, ours."""
    anchor = _nearest_existing(where)
    if not anchor.is_dir():
        raise SafetyLayersError(f"cannot create {target}: {anchor} is a file, not a folder: choose another {flag}")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise SafetyLayersError(f"cannot write {target}: {anchor} is read-only for this user: choose another {flag} "
                                "or make the folder writable")


def check_out_dir(path: str | Path, *, overwrite: bool = False, resume: bool = False, whole: bool = False,
                  flag: str = "--out") -> Path:
    """Check, before any work, that ``path`` can be a run folder: not a file, creatable or
    writable, and (unless ``overwrite``, or ``resume`` for commands that continue the run
    they find) empty if it exists. ``whole``: a folder written in one piece
    (:func:`atomic_dir`, a saved model), which must not exist at all unless ``overwrite``
    (it is written beside, then renamed). Returns the path."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise SafetyLayersError(f"{flag} {path} is a file: give a folder (it is created if missing)")
    _check_writable(path.parent if whole else path, path, flag)
    if whole and path.exists() and not overwrite:
        raise SafetyLayersError(f"{path} exists: choose another output folder or pass --overwrite")
    if path.is_dir() and not (overwrite or resume) and any(p.name != LOCK_NAME for p in path.iterdir()):
        raise SafetyLayersError(f"output folder {path} exists and is not empty: pass --overwrite or choose "
                                f"another {flag}")
    return path


def check_out_file(path: str | Path, *, overwrite: bool = False, flag: str = "--out") -> Path:
    """Check, before any work, that the file ``path`` can be written: not a folder, not there
    yet (unless ``overwrite``), its folder creatable or writable. Returns the path."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise SafetyLayersError(f"{flag} {path} is a folder: give a file name (e.g. {path / 'train.jsonl'})")
    if path.exists() and not overwrite:
        raise SafetyLayersError(f"{path} exists: choose another {flag} or pass --overwrite")
    _check_writable(path.parent, path, flag)        # written beside, then renamed into place
    return path


# --------------------------------------------------------------------------- the run-folder lock

LOCK_NAME = ".lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # someone else's process
        return True
    return True


class RunLock:
    """``FOLDER/.lock`` holding the pid and host of the run writing the folder.

    A second writer is refused with one line; the lock of a process that no longer runs (a
    run killed with -9) is taken over. A lock written on another host is never taken over,
    since its pid cannot be checked from here.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.held = False

    def _owner(self) -> dict:
        try:
            owner = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}                # torn or vanished: nobody holds it
        return owner if isinstance(owner, dict) else {}

    def _busy(self, owner: dict) -> bool:
        pid = owner.get("pid")
        if not isinstance(pid, int) or pid == os.getpid():
            return False
        return owner.get("host") != platform.node() or _alive(pid)

    def acquire(self) -> "RunLock":
        me = json.dumps({"pid": os.getpid(), "host": platform.node(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if self._busy(owner):
                    raise SafetyLayersError(
                        f"{self.folder} is being written by another run (process {owner['pid']} on {owner.get('host')}, "
                        f"since {owner.get('started', '?')}): wait for it, choose another --out, or delete "
                        f"{self.path} if that run is gone") from None
                self.path.unlink(missing_ok=True)     # stale: its process is gone
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(me)
            self.held = True
            return self
        raise SafetyLayersError(f"cannot lock {self.folder}: another run keeps taking {self.path}; retry")

    def release(self) -> None:
        if self.held and self._owner().get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextmanager
def run_folder(verb: str, model: str, out: str | Path | None = None, *, overwrite: bool = False,
               resume: bool = False, root: str | Path = "runs", flag: str = "--out"):
    """The run folder (``out`` or ``runs/<verb>-<model>-<time>``): checked (:func:`check_out_dir`),
    created and locked (:class:`RunLock`) for the block. If the block fails, a folder this
    call created is removed again when nothing was written into it, so a bad input never
    leaves an empty run folder behind; what a failed run did write (a journal to resume
    from) stays."""
    path = check_out_dir(Path(out) if out else default_run_dir(verb, model, root=root),
                         overwrite=overwrite, resume=resume, flag=flag)
    made = [p for p in [path, *path.parents] if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    ok = False
    try:
        with RunLock(path):
            yield path
        ok = True
    finally:
        if not ok:
            for folder in made:                       # deepest first
                try:
                    folder.rmdir()
                except OSError:
                    break


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
