"""`moec import hf CONFIG -o model.moe [--weights FILE... --state out.pt]`."""

from __future__ import annotations

import glob
import json
import os
import sys


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
        from safetensors.torch import load_file
    except ImportError:
        raise ValueError("--weights needs the `safetensors` package: pip install 'moec[hf]'") from None
    state: dict = {}
    for path in _weight_files(paths):
        state.update(load_file(path))
    return state


def run(args) -> int:
    from moec.backends import write_tree
    from moec.diagnostics import CompileError
    from moec.driver import frontend

    from .transformers import config_to_moe, from_hf

    if args.weights and not args.state:
        print("moec: error: --weights needs --state OUT.pt (where to write the converted weights)", file=sys.stderr)
        return 1
    try:
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
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if args.weights:
        import torch

        try:
            state = from_hf(_load_weights(args.weights), config)
        except (KeyError, ValueError) as exc:
            print(f"moec: error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
            return 1
        state_dir = os.path.dirname(os.path.abspath(args.state))
        os.makedirs(state_dir, exist_ok=True)
        tmp = f"{args.state}.{os.getpid()}.tmp"
        torch.save(state, tmp)
        os.replace(tmp, args.state)
        print(args.state)
    write_tree(out_dir, {os.path.basename(args.out): text})
    print(args.out)
    return 0


def add_parser(sub) -> None:
    c = sub.add_parser("import", help="write a .moe file (and converted weights) from another library's model")
    c.add_argument("source", choices=["hf"], help="hf: a Hugging Face transformers config.json")
    c.add_argument("config", help="config.json, or a directory holding one")
    c.add_argument("-o", "--out", required=True, help="the .moe file to write")
    c.add_argument("--weights", nargs="+", metavar="FILE", help="safetensors checkpoint files (or their directory)")
    c.add_argument("--state", metavar="OUT.pt", help="where to write the converted state dict (torch.save)")
    c.set_defaults(func=run)
