"""Code generators. Each target turns a Compilation into files; `TARGETS` is the registry."""

from __future__ import annotations

import os
import shutil
import tempfile


class BackendError(Exception):
    """A model the chosen target cannot generate (a user-facing error, not a bug)."""


class OutputError(BackendError, OSError):
    """The output location cannot be written; the message names the user's path (never a temporary
    one). An OSError too, so callers that handle file errors handle it."""


TEMP_PREFIX = ".moec-"


def check_output_dir(out_dir: str) -> str:
    """Raise OutputError when `out_dir` (or the nearest of its parents that exists) is not a
    directory, so that a command fails before its work rather than when it writes; return the
    absolute path."""
    if not out_dir.strip():
        raise OutputError("empty output directory name")
    path = os.path.abspath(out_dir)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise OutputError(f"output path `{out_dir}` exists and is not a directory")
    ancestor = nearest_existing(os.path.dirname(path))
    if not os.path.isdir(ancestor):
        raise OutputError(f"cannot write the output directory `{out_dir}`: `{ancestor}` is not a directory")
    return path


def nearest_existing(path: str) -> str:
    """`path` itself or its nearest ancestor that exists (where a write would create the rest)."""
    while not os.path.lexists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def write_tree(out_dir: str, files: dict[str, str | bytes]) -> list[str]:
    """Write `files` (relative path -> content) into `out_dir` completely or not at all.

    Files are written to a temporary directory on the same file system as `out_dir` (a sibling
    when `out_dir` does not exist yet, which is then renamed into place; else a hidden directory
    inside it, so a mount point works), then replace `out_dir`'s previous files of the same names;
    on any error nothing in `out_dir` changes. Raises OutputError when `out_dir` cannot be written.
    """
    shown = out_dir
    out_dir = check_output_dir(out_dir)
    existed = os.path.isdir(out_dir)
    tmp = None
    try:
        parent = out_dir if existed else os.path.dirname(out_dir)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=parent)
        for rel, content in files.items():
            path = os.path.join(tmp, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            mode = "wb" if isinstance(content, bytes) else "w"
            with open(path, mode) as fh:
                fh.write(content)
        if not existed:
            try:
                os.rename(tmp, out_dir)
                tmp = None
                return sorted(files)
            except OSError:  # another process created it meanwhile: replace file by file below
                if not os.path.isdir(out_dir):
                    raise
        for rel in files:
            dest = os.path.join(out_dir, rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            os.replace(os.path.join(tmp, rel), dest)
        return sorted(files)
    except OutputError:
        raise
    except OSError as exc:
        raise _output_error(shown, out_dir, tmp, exc) from exc
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _output_error(shown: str, out_dir: str, tmp: str | None, exc: OSError) -> OutputError:
    """`exc` (raised while writing `out_dir`) in the user's terms: the path it concerns is the
    destination of a file, or the directory a temporary one was to be made in, never the
    temporary name itself."""
    where = exc.filename if isinstance(exc.filename, str) else None
    making_temp = False
    if where is not None:
        where = os.path.abspath(where)
        if tmp is not None and (where == tmp or where.startswith(tmp + os.sep)):
            where = out_dir + where[len(tmp):]
        elif os.path.basename(where).startswith(TEMP_PREFIX):
            where, making_temp = os.path.dirname(where), True
    reason = exc.strerror or str(exc)
    if where is not None and os.path.lexists(where) and not os.path.isdir(where) and where != out_dir:
        reason = f"`{where}` is not a directory"
    elif making_temp:
        reason = f"cannot create files in {'it' if where == out_dir else f'`{where}`'} ({reason})"
    elif where is not None and where != out_dir:
        reason = f"{reason}: `{where}`"
    return OutputError(f"cannot write the output directory `{shown}`: {reason}")


def targets() -> dict:
    """Target name -> emit(compilation, out_dir, options) function."""
    from moec.backends.hls import emit as hls_emit
    from moec.backends.mlir import emit_compilation as mlir_emit
    from moec.backends.pytorch import emit as pytorch_emit
    from moec.backends.triton import emit as triton_emit

    return {"pytorch": pytorch_emit, "mlir": mlir_emit, "triton": triton_emit, "hls": hls_emit}
