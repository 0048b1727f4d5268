"""The `moec` command line: check, ir, report, compile, place, train, import."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from moec import __version__
from moec.diagnostics import CompileError, Diagnostics, did_you_mean


def _fail(diags: Diagnostics) -> int:
    print(diags.render(), file=sys.stderr)
    n = sum(1 for d in diags.items if d.severity == "error")
    print(f"moec: {n} error{'s' if n != 1 else ''}", file=sys.stderr)
    return 1


class UsageError(Exception):
    """A command line argparse refuses: (usage text, message)."""


class _Parser(argparse.ArgumentParser):
    """argparse under moec's convention for user errors: `moec: error: ...` and exit status 1
    (argparse itself exits with 2; `main` prints the usage and the message and returns 1)."""

    def error(self, message: str):
        raise UsageError(self.format_usage(), message)


def _integer(text: str, ok, requirement: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"{requirement}: {value}")
    return value


def _positive(text: str) -> int:
    return _integer(text, lambda v: v > 0, "must be positive")


def _seed(text: str) -> int:
    return _integer(text, lambda v: 0 <= v < 2**63, "must lie in [0, 2**63)")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _path(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("empty path (give a file or directory name)")
    return text


def cmd_check(args) -> int:
    from moec.driver import check

    status = 0
    for path in args.files:
        diags = check(path)
        if diags.has_errors:
            status = _fail(diags)
        elif not args.quiet:
            print(f"{path}: ok")
    return status


def cmd_ir(args) -> int:
    from moec.driver import compile_model

    comp = compile_model(args.file, pipeline=args.pipeline, stop_after=args.after)
    sys.stdout.write(comp.graph.print())
    return 0


def cmd_report(args) -> int:
    from moec.driver import compile_model
    from moec.report import format_report

    if not args.file and not args.plan:
        print("moec: error: give a .moe file, --plan PLAN.json, or both", file=sys.stderr)
        return 1
    plan = None
    if args.plan:
        try:
            with open(args.plan) as fh:
                plan = json.load(fh)
        except (OSError, ValueError) as exc:
            print(f"moec: error: cannot read placement plan `{args.plan}`: {exc}", file=sys.stderr)
            return 1
    comp = compile_model(args.file, pipeline=args.pipeline) if args.file else None
    if plan is not None:
        from moec.passes.place_experts import PlacementError, check_plan, format_plan

        try:
            if comp is not None:
                check_plan(plan, comp.graph)
            text = format_plan(plan)
        except (PlacementError, KeyError, TypeError) as exc:
            print(f"moec: error: placement plan `{args.plan}`: {exc}", file=sys.stderr)
            return 1
        if not args.json:
            print(text)
        if comp is None:
            if args.json:
                print(json.dumps(plan, indent=2))
            return 0
    if args.target == "hls":
        return _report_hls(comp, args.json)
    analysis = comp.results["analysis"]
    if args.json:  # one JSON document: the analysis, with the plan under "placement" when given
        print(json.dumps(analysis if plan is None else {**analysis, "placement": plan}, indent=2))
    else:
        print(format_report(analysis))
    return 0


def _report_hls(comp, as_json: bool) -> int:
    from moec.backends import BackendError
    from moec.backends.hls import estimate, format_estimate, project_for

    try:
        e = estimate(project_for(comp))
    except BackendError as exc:
        print(f"moec: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(e, indent=2) if as_json else format_estimate(e))
    return 0


def cmd_csim(args) -> int:
    from moec.backends import BackendError
    from moec.backends.hls import csim

    arrays = {}
    for name in ("input", "modality", "task"):
        path = getattr(args, name)
        if path is None:
            continue
        try:
            import numpy as np
        except ImportError:
            print("moec: error: reading .npy files needs numpy (pip install numpy)", file=sys.stderr)
            return 1
        try:
            arrays[name] = _read_npy(np, path, name)
        except _BadArray as exc:
            print(f"moec: error: `{path}`: {exc}", file=sys.stderr)
            return 1
        except (OSError, ValueError) as exc:
            print(f"moec: error: cannot read `{path}`: {exc}", file=sys.stderr)
            return 1
    try:
        import torch

        x = torch.as_tensor(arrays["input"]) if "input" in arrays else None
        modality = torch.as_tensor(arrays["modality"]) if "modality" in arrays else None
        task = torch.as_tensor(arrays["task"]) if "task" in arrays else None
        result = csim(args.file, x=x, modality=modality, task=task, seed=args.seed, tokens=args.tokens)
    except (BackendError, TypeError, ValueError, RuntimeError) as exc:
        print(f"moec: error: {exc}", file=sys.stderr)
        return 1
    print(result.summary())
    return 0 if result.ok else 1


_NPY_MAGIC = b"\x93NUMPY"


class _BadArray(ValueError):
    """A readable .npy file whose values csim cannot take."""


def _read_npy(np, path: str, name: str):
    """The array of the .npy file `path` for csim's --input (real numbers, as float32) or
    --modality / --task (integers, as int64); ValueError says what is wrong with it."""
    with open(path, "rb") as fh:
        if fh.read(len(_NPY_MAGIC)) != _NPY_MAGIC:
            raise ValueError("not a .npy file (write one with numpy.save)")
    array = np.load(path, allow_pickle=False)
    if name == "input":
        if array.dtype.kind == "c":
            raise _BadArray(f"the input is complex ({array.dtype}); csim takes real numbers")
        if array.dtype.kind not in "fiu":
            raise _BadArray(f"the input must hold numbers, got {array.dtype}")
        if array.dtype.kind == "f" and np.isfinite(array).all():
            too_big = np.abs(array) > np.finfo(np.float32).max
            if too_big.any():
                raise _BadArray(f"the input reaches |{float(np.abs(array).max()):.4g}|, beyond float32's range "
                                 f"(+-{float(np.finfo(np.float32).max):.4g}); the C simulation reads float32")
        return array.astype(np.float32)
    if array.dtype.kind not in "iu":
        raise _BadArray(f"{name} ids must be integers, got {array.dtype} values")
    if array.size and array.dtype.kind == "u" and int(array.max()) > np.iinfo(np.int64).max:
        raise _BadArray(f"{name} ids must lie in the int64 range, got {int(array.max())}")
    return array.astype(np.int64)


# the compile options that only some targets take (--static: mlir always exports the static form;
# the triton target has neither a static-shape nor an expert-parallel form)
_COMPILE_OPTIONS = {"static": ("pytorch", "mlir"), "plan": ("pytorch",), "dialect": ("mlir",),
                    "tokens": ("mlir",), "batch": ("mlir",), "seed": ("hls",)}


def cmd_compile(args) -> int:
    from moec.backends import BackendError, check_output_dir, targets
    from moec.driver import compile_model

    available = targets()
    if args.target not in available:
        diags = Diagnostics()
        diags.error("E0401", f"unknown target `{args.target}`", None,
                    did_you_mean(args.target, available) or f"targets: {', '.join(sorted(available))}")
        return _fail(diags)
    misplaced = [name for name, targets_of in _COMPILE_OPTIONS.items()
                 if getattr(args, name) is not None and getattr(args, name) is not False
                 and args.target not in targets_of]
    if misplaced:
        uses = "; ".join(f"--{name} is for {' / '.join(_COMPILE_OPTIONS[name])}" for name in misplaced)
        print(f"moec: error: {', '.join('--' + name for name in misplaced)} "
              f"{'does' if len(misplaced) == 1 else 'do'} not apply to --target {args.target} ({uses})",
              file=sys.stderr)
        return 1
    try:
        check_output_dir(args.out)  # before the work, not when writing its result
    except BackendError as exc:
        print(f"moec: error: {exc}", file=sys.stderr)
        return 1
    comp = compile_model(args.file, pipeline=args.pipeline)
    plan = None
    if args.plan:
        try:
            with open(args.plan) as fh:
                plan = json.load(fh)
        except (OSError, ValueError) as exc:
            print(f"moec: error: cannot read placement plan `{args.plan}`: {exc}", file=sys.stderr)
            return 1
    options = {"static": args.static, "plan": plan} if args.target in ("pytorch", "triton") else {
        "dialect": args.dialect or "linalg", "batch": args.batch or 1, "tokens": args.tokens or 8}
    if args.target == "hls":
        options = {"seed": 0 if args.seed is None else args.seed}
    from moec.backends.mlir import MlirLoweringError, MlirUnavailableError

    try:
        files = available[args.target](comp, args.out, **options)
    except (BackendError, MlirUnavailableError, MlirLoweringError) as exc:
        print(f"moec: error: {exc}", file=sys.stderr)
        return 1
    for f in files:
        print(os.path.join(args.out, f))
    return 0


def cmd_place(args) -> int:
    from moec.driver import compile_model
    from moec.passes import PassContext
    from moec.passes.place_experts import PlaceExperts, format_plan

    comp = compile_model(args.file)
    defaults = comp.spec.placement
    devices = args.devices or defaults.get("devices")
    if devices is None:
        print("moec: error: how many devices? give --devices N or `placement { devices = N }` in the file",
              file=sys.stderr)
        return 1
    memory = args.memory if args.memory is not None else defaults.get("memory")
    redundant = args.redundant if args.redundant is not None else defaults.get("redundant", 0)
    ctx = PassContext()
    try:
        PlaceExperts(devices=devices, memory=memory, redundant=redundant, profile=args.profile,
                     method=args.method, modality_devices=args.modality_devices).run(comp.graph, ctx)
    except (ValueError, OSError) as exc:  # a bad profile, memory size or device count: the user's to fix
        print(f"moec: error: {exc}", file=sys.stderr)
        return 1
    plan = ctx.results["placement"]
    if args.out:
        from moec.backends import write_tree

        write_tree(os.path.dirname(os.path.abspath(args.out)), {os.path.basename(args.out): json.dumps(plan, indent=1)})
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    return 0


def cmd_train(args) -> int:
    from moec.train import run_cli

    return run_cli(args.file, args.steps, args.tokens, args.seq, args.lr, args.seed, args.profile, args.plan)


def _pipeline_option(parser) -> None:
    from moec.passes import PIPELINES

    parser.add_argument("--pipeline", default="default", choices=[p for p in PIPELINES if p != "frontend"],
                        help="pass pipeline: default (fused) or unfused (same numerics, one op per primitive)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="moec", description="Compile Mixture-of-Experts model descriptions (.moe).")
    p.add_argument("--version", action="version", version=f"moec {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("check", help="validate .moe files; exit 1 on any error")
    c.add_argument("files", nargs="+")
    c.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    c.set_defaults(func=cmd_check)

    c = sub.add_parser("ir", help="print the IR after the default pipeline or after one pass")
    c.add_argument("file")
    c.add_argument("--after", metavar="PASS", help="stop after this pass (e.g. infer-shapes, lower-moe)")
    _pipeline_option(c)
    c.set_defaults(func=cmd_ir)

    c = sub.add_parser("report", help="parameters, FLOPs and activation bytes per token and modality")
    c.add_argument("file", nargs="?")
    c.add_argument("--plan", metavar="JSON", help="also show a placement plan written by `moec place`")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.add_argument("--target", choices=["pytorch", "hls"], default="pytorch",
                   help="hls: DSPs, on-chip memory and cycles per token of the HLS project")
    _pipeline_option(c)
    c.set_defaults(func=cmd_report)

    c = sub.add_parser("compile", help="generate code for a target")
    c.add_argument("file")
    c.add_argument("--target", "-t", default="pytorch",
                   help="pytorch (default), triton, mlir (needs torch-mlir) or hls (Vitis-HLS-style C++ project)")
    c.add_argument("-o", "--out", required=True, type=_path,
                   help="output directory (written completely or not at all)")
    c.add_argument("--static", action="store_true", help="pytorch: static-shape (capacity-padded) export form")
    c.add_argument("--plan", metavar="JSON", help="pytorch: expert-parallel form for a plan from `moec place`")
    c.add_argument("--dialect", choices=["linalg", "stablehlo", "tosa", "torch", "raw"],
                   help="mlir: output dialect (default linalg-on-tensors)")
    c.add_argument("--tokens", type=_positive, help="mlir: sequence length of the exported shapes (default 8)")
    c.add_argument("--batch", type=_positive, help="mlir: batch size of the exported shapes (default 1)")
    c.add_argument("--seed", type=_seed, help="hls: seed of the PyTorch weights written to the project (default 0)")
    _pipeline_option(c)
    c.set_defaults(func=cmd_compile)

    c = sub.add_parser("csim", help="C-simulate the HLS project with g++ and compare with PyTorch")
    c.add_argument("file")
    c.add_argument("--input", metavar="NPY", help="float inputs [T, dim] or [B, T, dim] (default: random)")
    c.add_argument("--modality", metavar="NPY", help="integer modality ids [T] or [B, T]")
    c.add_argument("--task", metavar="NPY", help="integer task ids [T] or [B, T] (task-routed experts)")
    c.add_argument("--tokens", type=_positive, help="tokens of the random input (default: min(16, max_tokens))")
    c.add_argument("--seed", type=_seed, default=0, help="seed of the PyTorch weights and the random input")
    c.set_defaults(func=cmd_csim)

    c = sub.add_parser("place", help="assign experts and redundant replicas to expert-parallel devices")
    c.add_argument("file")
    c.add_argument("--devices", "-n", type=_positive, help="devices (default: the file's placement section)")
    c.add_argument("--memory", help="expert-weight memory per device, e.g. 80GB, 512MiB")
    c.add_argument("--redundant", type=int, help="extra replicas of hot experts per MoE layer (default 0)")
    c.add_argument("--profile", metavar="JSON", help="routing profile from `moec train --profile`")
    c.add_argument("--method", choices=["place", "eplb", "round-robin"], default="place")
    c.add_argument("--modality-devices", metavar="SPEC", help="where tokens live, e.g. image=0-3,text=4-7")
    c.add_argument("-o", "--out", metavar="JSON", type=_path,
                   help="write the plan (EPLB's phy2log/log2phy/logcnt) here")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_place)

    c = sub.add_parser("train", help="train the generated PyTorch model briefly on synthetic multimodal data")
    c.add_argument("file")
    c.add_argument("--steps", type=_positive, default=50, help="optimizer steps (default 50)")
    c.add_argument("--tokens", type=_positive, default=512, help="tokens per step (default 512)")
    c.add_argument("--seq", type=_positive, default=64, help="sequence length (default 64)")
    c.add_argument("--lr", type=_positive_float, default=3e-3, help="AdamW learning rate (default 3e-3)")
    c.add_argument("--seed", type=_seed, default=0)
    c.add_argument("--profile", metavar="JSON", type=_path,
                   help="write tokens per expert per MoE layer (a routing profile)")
    c.add_argument("--plan", metavar="JSON", help="expert-parallel training with a plan from `moec place` "
                                                  "(under torchrun --nproc_per_node=N)")
    c.set_defaults(func=cmd_train)

    from moec.interop.command import add_parser as add_import_parser

    add_import_parser(sub)
    return p


def _out_of_memory(exc: Exception) -> int:
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    print("moec: error: out of memory: the model (or its inputs) does not fit in this machine's memory"
          + (f" ({detail})" if detail else ""), file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:  # a malformed command line: the usage, then the error (exit 1)
        usage, message = exc.args
        sys.stderr.write(usage)
        print(f"moec: error: {message}", file=sys.stderr)
        return 1
    try:
        return args.func(args)
    except CompileError as exc:
        return _fail(exc.diagnostics)
    except BrokenPipeError:  # the reader of stdout went away (`moec ... | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as exc:  # a file the user named cannot be read or written
        print(f"moec: error: {exc.strerror or exc}: `{exc.filename}`" if exc.filename else f"moec: error: {exc}",
              file=sys.stderr)
        return 1
    except MemoryError as exc:  # a model too large to build on this machine
        return _out_of_memory(exc)
    except KeyboardInterrupt:
        print("moec: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # never show a traceback for a user's input; say what broke
        if isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc):  # torch's CPU allocator
            return _out_of_memory(exc)
        if os.environ.get("MOEC_TRACEBACK"):
            raise
        print(f"moec: internal error: {type(exc).__name__}: {exc}\n"
              "moec: this is a bug in moec; set MOEC_TRACEBACK=1 to see where it happened", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
