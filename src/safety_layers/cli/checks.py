"""Checks a command runs before it creates anything, and the one line for a failed write.

A bad prompt file or model name should fail in a second, before a run folder exists, not
after minutes of work; :func:`check_inputs` reads what a config names (cheap: prompt files
are small, models are only located, never loaded). What it cannot know (the layer count
of a model) the step checks itself, and the run folder it left empty is removed
(:func:`~safety_layers.core.runs.run_folder`).
"""

from __future__ import annotations

import errno


def check_inputs(cfg, *, prompts=(), files=(), models=()) -> None:
    """Read the prompt sets and data files named by the fields ``prompts`` and ``files`` of
    ``cfg`` and locate its ``models``; each problem is one SafetyLayersError. Hugging Face
    datasets (``hf:``) are left to the step, which downloads them once."""
    from ..core.data import load_prompts, read_rows
    from ..core.models import check_model

    limit = getattr(cfg, "limit", None)
    for name in prompts:
        spec = getattr(cfg, name, None)
        if spec and not str(spec).startswith("hf:"):
            load_prompts(spec, limit)
    for name in files:
        path = getattr(cfg, name, None)
        if path:
            read_rows(path)
    for name in models:
        model = getattr(cfg, name, None)
        if model is not None:
            check_model(str(model))


#: errno -> what to do about it; other OS errors are bugs and keep their traceback.
_FIXES = {
    errno.EACCES: "choose another --out or fix the permissions",
    errno.EPERM: "choose another --out or fix the permissions",
    errno.EROFS: "the file system is read-only: choose another --out",
    errno.ENOSPC: "the disk is full: free space or choose another --out",
    errno.EDQUOT: "the disk quota is used up: free space or choose another --out",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another --out",
    errno.EISDIR: "the path is a folder where a file was expected: choose another --out",
    errno.ENAMETOOLONG: "the name is too long: choose a shorter --out",
}


def os_error_line(e: OSError) -> str | None:
    """``cannot write PATH: Permission denied: FIX`` for an OSError a user can fix, else None."""
    fix = _FIXES.get(e.errno)
    if fix is None:
        return None
    path = e.filename if e.filename is not None else "a file"
    return f"cannot write {path}: {e.strerror or type(e).__name__}: {fix}"

