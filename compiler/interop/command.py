"""`moec import hf CONFIG -o model.moe [--weights FILE... --state out.pt]`."""

from __future__ import annotations

import glob
import json
import os
import sys
from collections.abc import Callable

from moec.backends import nearest_existing


def _read_config(path: str) -> dict:
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    with open(path) as fh:
        try:
            return json.load(fh)
        except ValueError as exc:
            raise ValueError(f"`{path}` is not JSON: {exc}") from None


def _weight_files(paths: list[str]) -> list[str]:
    """Files named, or every `*.safetensors` file of a named directory (sharded checkpoints)."""
    out = []
    for p in paths:
        found = sorted(glob.glob(os.path.join(p, "*.safetensors"))) if os.path.isdir(p) else [p]
        if not found:
            raise ValueError(f"no .safetensors files in `{p}`")
        out += found
    return out


def _load_weights(paths: list[str]) -> dict:
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:
        raise ValueError("--weights needs the `safetensors` package: pip install 'moec[hf]'") from None
    state: dict = {}
    for path in _weight_files(paths):
        try:
            state.update(load_file(path))
        except SafetensorError as exc:
            raise ValueError(f"--weights `{path}` is not a safetensors file ({exc})") from None
        except OSError as exc:
            raise ValueError(f"cannot read --weights `{path}`: {exc.strerror or exc}") from None
    return state


def _check_output(path: str, flag: str) -> str:
    """The absolute path of output `path`, or ValueError (naming it) when no file can be written
    there: an empty name, a directory, or a parent that is not a directory. Checked before any
    work, so that a bad output path fails before the other output is written."""
    if not path.strip():
        raise ValueError(f"{flag}: empty file name")
    full = os.path.abspath(path)
    if path.endswith(("/", os.sep)) or os.path.isdir(full):
        raise ValueError(f"{flag} `{path}` is a directory; name the file to write")
    ancestor = nearest_existing(os.path.dirname(full))
    if not os.path.isdir(ancestor):
        raise ValueError(f"cannot write {flag} `{path}`: `{ancestor}` is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write {flag} `{path}`: no permission to create files in `{ancestor}`")
    return full


def _write_all(outputs: list[tuple[str, str, Callable]]) -> None:
    """Write every output (user's path, absolute path, write(binary file)) completely or none:
    each is written to a temporary file beside its destination (creating missing directories),
    and all are renamed into place only when every one was written. On failure the temporary
    files and the directories made for them are removed, and ValueError names the user's path."""
    temps: dict[str, str] = {}
    made: list[str] = []
    done = False
    shown = ""
    try:
        for shown, full, write in outputs:
            parent, missing = os.path.dirname(full), []
            while not os.path.lexists(parent):
                missing.append(parent)
                parent = os.path.dirname(parent)
            for d in reversed(missing):
                os.mkdir(d)
                made.append(d)
            tmp = os.path.join(os.path.dirname(full), f".moec-{os.path.basename(full)}.{os.getpid()}.tmp")
            temps[full] = tmp
            with open(tmp, "wb") as fh:
                write(fh)
        for full, tmp in list(temps.items()):
            shown = next(s for s, f, _ in outputs if f == full)
            os.replace(tmp, full)
            del temps[full]
        done = True
    except OSError as exc:
        where = exc.filename if isinstance(exc.filename, str) else None
        reason = exc.strerror or str(exc)
        if where is not None and os.path.basename(where).startswith(".moec-"):  # never name a temporary file
            reason = f"cannot create a file in `{os.path.dirname(where)}` ({reason})"
        elif where is not None:  # a directory it needed
            reason = f"{reason}: `{where}`"
        raise ValueError(f"cannot write `{shown}`: {reason}; nothing written") from None
    finally:
        for tmp in temps.values():
            try:
                os.unlink(tmp)
            except OSError:
                pass
        if not done:
            for d in reversed(made):
                try:
                    os.rmdir(d)
                except OSError:
                    pass


def run(args) -> int:
    from moec.diagnostics import CompileError
    from moec.driver import frontend

    from .transformers import config_to_moe, from_hf, meta_state_dict

    if args.weights and not args.state:
        print("moec: error: --weights needs --state OUT.pt (where to write the converted weights)", file=sys.stderr)
        return 1
    if args.state and not args.weights:
        print("moec: error: --state needs --weights CKPT... (the checkpoint to convert)", file=sys.stderr)
        return 1
    try:
        out = _check_output(args.out, "-o")
        state_path = _check_output(args.state, "--state") if args.weights else None
        if state_path == out:
            raise ValueError(f"-o and --state name the same file `{args.out}`")
        config = _read_config(args.config)
        text = config_to_moe(config)
    except ValueError as exc:  # UnsupportedConfig is a ValueError
        print(f"moec: error: {exc}", file=sys.stderr)
        return 1
    try:
        frontend(args.out, text)  # what we write must check
    except CompileError as exc:
        print(exc.diagnostics.render(), file=sys.stderr)
        print(f"moec: error: `{args.config}` describes a model moec rejects (errors above, in the text it would "
              "give; nothing written)", file=sys.stderr)
        return 1
    outputs = [(args.out, out, lambda fh: fh.write(text.encode()))]
    try:
        if args.weights:
            import torch

            # every tensor is checked against the shape the generated module gives it (built on
            # the meta device: no memory), so a checkpoint that disagrees with the config stops here
            state = from_hf(_load_weights(args.weights), config, expected=meta_state_dict(text, args.out))
            outputs.insert(0, (args.state, state_path, lambda fh: torch.save(state, fh)))
        _write_all(outputs)
    except (KeyError, ValueError) as exc:
        print(f"moec: error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 1
    for shown, _, _ in outputs:
        print(shown)
    return 0


def add_parser(sub) -> None:
    c = sub.add_parser("import", help="write a .moe file (and converted weights) from another library's model")
    c.add_argument("source", choices=["hf"], help="hf: a Hugging Face transformers config.json")
    c.add_argument("config", help="config.json, or a directory holding one")
    c.add_argument("-o", "--out", required=True, help="the .moe file to write")
    c.add_argument("--weights", nargs="+", metavar="FILE", help="safetensors checkpoint files (or their directory)")
    c.add_argument("--state", metavar="OUT.pt", help="where to write the converted state dict (torch.save)")
    c.set_defaults(func=run)
