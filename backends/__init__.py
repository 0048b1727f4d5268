"""Code generators. Each target turns a Compilation into files; `TARGETS` is the registry."""

from __future__ import annotations

import os
import shutil
import tempfile


class BackendError(Exception):
    """A model the chosen target cannot generate (a user-facing error, not a bug)."""


def write_tree(out_dir: str, files: dict[str, str | bytes]) -> list[str]:
    """Write `files` (relative path -> content) into `out_dir` completely or not at all.

    Files are written to a temporary sibling directory, which then replaces `out_dir`'s
    previous contents of the same names; on any error nothing in `out_dir` changes.
    """
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".moec-", dir=parent)
    try:
        for rel, content in files.items():
            path = os.path.join(tmp, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            mode = "wb" if isinstance(content, bytes) else "w"
            with open(path, mode) as fh:
                fh.write(content)
        if not os.path.isdir(out_dir):
            try:
                os.rename(tmp, out_dir)
                return sorted(files)
            except OSError:  # another process created it meanwhile: replace file by file below
                if not os.path.isdir(out_dir):
                    raise
        for rel in files:
            dest = os.path.join(out_dir, rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            os.replace(os.path.join(tmp, rel), dest)
        return sorted(files)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def targets() -> dict:
    """Target name -> emit(compilation, out_dir, options) function."""
    from moec.backends.hls import emit as hls_emit
    from moec.backends.mlir import emit_compilation as mlir_emit
    from moec.backends.pytorch import emit as pytorch_emit
    from moec.backends.triton import emit as triton_emit

    return {"pytorch": pytorch_emit, "mlir": mlir_emit, "triton": triton_emit, "hls": hls_emit}
