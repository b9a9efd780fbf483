"""The ``onnx-compress`` command line.

    onnx-compress IN.onnx OUT.onnx [options]     compress (default lossless pipeline), verify, save
    onnx-compress IN OUT --prune 0.3 [--quantize int8 --calib DATA]   lossy steps, reported
    onnx-compress inspect IN.onnx [--groups]     op histogram, parameters, MACs, inputs/outputs
    onnx-compress run MODEL --input F.npz --output O.npz [--backend numba|onnxruntime]
    onnx-compress bench MODEL [--backend numba|onnxruntime|both] [--batch N] [--threads T]

Exit codes (also in the README):

    0  success
    1  internal error (a bug: please report it with the traceback from -v)
    2  usage error, or the output cannot be written (same as input, folder missing or unwritable)
    3  the input is not a valid ONNX model, or uses something unsupported
    4  verification failed: the result does not compute what the original computed; nothing written
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

from . import __version__
from .api import compress_with_report
from .ir import io as ir_io
from .ir.errors import (
    InvalidModelError,
    OnnxCompressError,
    OutputPathError,
    PassError,
    UnsupportedModelError,
    VerificationError,
)
from .ir.stats import file_size, model_stats
from .options import CompressOptions, option_fields
from .passes.registry import DEFAULT_PIPELINE, PASS_FACTORIES

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_INVALID_MODEL = 3
EXIT_VERIFICATION = 4

SUBCOMMANDS = ("inspect", "run", "bench")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse exits 2 on usage errors; keep it one line
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"onnx-compress: error: {message}\n")


def _parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    name, sep, dims = text.rpartition(":")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME:DIMS like input:1x3x224x224, got '{text}'")
    try:
        shape = tuple(int(d) for d in dims.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad dimensions in '{text}'") from None
    if any(d <= 0 for d in shape):
        raise argparse.ArgumentTypeError(f"dimensions must be positive in '{text}'")
    return name, shape


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each pass does")
    parser.add_argument("-q", "--quiet", action="store_true", help="print errors only")


def _compress_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="onnx-compress",
        description="Make an ONNX model smaller and faster, and prove it still computes the same function.",
        epilog=(
            f"passes: {', '.join(PASS_FACTORIES)}. default pipeline: {', '.join(DEFAULT_PIPELINE)}. "
            "Other commands: 'onnx-compress inspect MODEL [--groups]', 'onnx-compress run', 'onnx-compress bench'. Exit codes: 0 ok, 2 usage/output path, "
            "3 invalid or unsupported model, 4 verification failed, 1 internal error."
        ),
    )
    parser.add_argument("input", help="input .onnx model (never modified)")
    parser.add_argument("output", help="output .onnx path (written atomically)")
    parser.add_argument("--report", metavar="PATH", help="write a machine-readable JSON report")
    parser.add_argument("--external-data", action="store_true", help="store weights in OUTPUT.data beside the model")
    parser.add_argument("--version", action="version", version=f"onnx-compress {__version__}")
    _add_common(parser)
    for f in option_fields():
        meta = f.metadata
        dest = f.name
        if meta["kind"] == "flag":
            parser.add_argument(meta["flag"], dest=dest, action="store_true", help=meta["help"])
        elif meta["kind"] == "negflag":
            parser.add_argument(meta["flag"], dest=dest, action="store_false", help=meta["help"])
        elif meta["kind"] == "list":
            parser.add_argument(
                meta["flag"], dest=dest, metavar=meta["metavar"], help=meta["help"],
                type=lambda s: tuple(p.strip() for p in s.split(",") if p.strip()),
            )
        elif meta["kind"] == "shapes":
            parser.add_argument(meta["flag"], dest=dest, action="append", type=_parse_shape, metavar=meta["metavar"], help=meta["help"])
        elif meta["choices"]:
            parser.add_argument(meta["flag"], dest=dest, choices=meta["choices"],
                                help=f"{meta['help']} (default: {f.default})")
        else:
            default = f.default
            value_type = meta["type"] or (type(default) if default is not None else str)
            parser.add_argument(meta["flag"], dest=dest, type=value_type,
                                metavar=meta["metavar"], help=f"{meta['help']} (default: {default})")
        # "append" actions extend their default in place, so theirs is None (= not given)
        parser.set_defaults(**{dest: None if meta["kind"] == "shapes" else dataclasses.MISSING})
    return parser


def _options_from_args(args: argparse.Namespace) -> dict:
    options = {}
    for f in option_fields():
        value = getattr(args, f.name)
        if value is dataclasses.MISSING or (value is None and f.metadata["kind"] == "shapes"):
            continue
        options[f.name] = value
    return options


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.4g}{suffix}{unit}" if suffix or isinstance(n, float) else f"{int(n)}{unit}"
        n /= 1000.0
    return f"{n:.4g}P{unit}"


def _bytes(n: int) -> str:
    for suffix in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.4g} {suffix}" if suffix != "B" else f"{n} B"
        n /= 1024.0
    return f"{n:.4g} TiB"


def _change(before: float, after: float) -> str:
    if before == 0:
        return ""
    return f"{(after - before) / before * 100:+.1f}%"


def _print_table(report, out) -> None:
    b, a = report.before, report.after
    rows = [
        ("nodes", str(b.nodes), str(a.nodes), _change(b.nodes, a.nodes)),
        ("parameters", _human(b.parameters), _human(a.parameters), _change(b.parameters, a.parameters)),
        ("file size", _bytes(report.size_before), _bytes(report.size_after), _change(report.size_before, report.size_after)),
        ("MACs" + (" (symbolic dims = 1)" if b.macs_symbolic else ""), _human(b.macs), _human(a.macs), _change(b.macs, a.macs)),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'':<{width}}  {'before':>10}  {'after':>10}  {'change':>8}", file=out)
    for label, before, after, change in rows:
        print(f"{label:<{width}}  {before:>10}  {after:>10}  {change:>8}", file=out)
    if report.prune is not None:
        p = report.prune
        pruned = sum(1 for g in p.groups if g.removed)
        print(f"pruning: {pruned} of {len(p.groups)} channel groups pruned ({len(p.frozen)} frozen), "
              f"MACs {_human(p.macs_before)} -> {_human(p.macs_after)}, importance {p.importance}, "
              f"strategy {p.strategy}" + (f", {len(p.reconstructed)} layers refitted" if p.reconstructed else ""), file=out)
    changed = ", ".join(f"{k} {v}" for k, v in report.pass_changes.items() if v)
    print(f"passes: {changed or 'nothing to change'}", file=out)
    if report.verification is None:
        print("verification: skipped (--no-verify)", file=out)
    else:
        lossy = report.prune is not None or report.quantization is not None
        label = "verification (lossless passes)" if lossy else "verification"
        print(f"{label}: {report.verification.summary()}", file=out)
    if report.quantization is not None:
        q = report.quantization
        kernels = ""
        if q.kernels is not None:
            kernels = (f", in ORT {sum(q.kernels.integer_ops.values())} integer kernels and "
                       f"{len(q.kernels.float_islands)} float islands")
        print(f"quantization: {len(q.quantized_nodes)} nodes INT8 ({q.method} calibration on {q.samples} samples)"
              f"{kernels}" + (f", {len(q.float_layers)} layers kept in float" if q.float_layers else "")
              + ("" if q.holdout is None else f"; held-back split: {q.holdout.summary()}"), file=out)
    if report.fidelity is not None:
        f = report.fidelity
        top1 = f.top1_agreement
        print("fidelity vs original (lossy, reported): "
              + ("not measured: " + f.skipped_reason if f.skipped_reason else
                 f"cosine {f.min_cosine:.5f}, max |diff| {f.max_abs_diff:.3g} ({f.max_rel_diff:.3g} of range)"
                 + ("" if top1 is None else f", top-1 agreement {top1 * 100:.1f}%")
                 + f" on {f.feeds} input set(s) ({f.real_feeds} real)"), file=out)


def _write_report(path: str, payload: dict) -> None:
    try:
        Path(path).write_text(json.dumps(payload, indent=2, default=str) + "\n")
    except OSError as exc:
        raise OutputPathError(f"cannot write report {path}: {exc.strerror}") from exc


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else (logging.ERROR if quiet else logging.WARNING)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _run_compress(argv: Sequence[str]) -> int:
    parser = _compress_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    options = _options_from_args(args)
    try:
        CompressOptions.from_kwargs(**options)
        from .api import resolve_pipeline

        resolve_pipeline(CompressOptions.from_kwargs(**options))
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    if args.report:
        ir_io.check_output_path(args.report, args.input)
    ir_io.check_output_path(args.output, args.input)
    try:
        compressed, report = compress_with_report(args.input, **options)
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))
    except VerificationError as exc:
        if args.report and exc.report is not None:
            _write_report(args.report, exc.report.as_dict())
        if not args.quiet and exc.report is not None:
            _print_table(exc.report, sys.stderr)
        raise
    ir_io.save_model(compressed, args.output, external_data=True if args.external_data else None, protect=(args.input,))
    if args.report:
        _write_report(args.report, report.as_dict())
    if not args.quiet:
        _print_table(report, sys.stdout)
        if report.verification is not None and report.verification.skipped_reason:
            print("warning: the result was not verified; pass --input-shape or --inputs", file=sys.stderr)
    return EXIT_OK


def _run_inspect(argv: Sequence[str]) -> int:
    parser = _Parser(prog="onnx-compress inspect", description="Describe an ONNX model.")
    parser.add_argument("input")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--groups", action="store_true", help="list the coupled-channel groups structured pruning sees")
    _add_common(parser)
    args = parser.parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    model = ir_io.load_model(args.input)
    if args.groups:
        return _print_groups(model, as_json=args.json)
    stats = model_stats(model)
    if args.json:
        print(json.dumps({**stats.as_dict(), "bytes": file_size(model)}, indent=2))
        return EXIT_OK
    producer = f"{model.producer_name} {model.producer_version}".strip()
    print(f"{args.input}: opset {stats.opset}, IR {model.ir_version}, producer '{producer}'")
    print(f"nodes {stats.nodes}, parameters {_human(stats.parameters)}, MACs {_human(stats.macs)}"
          + (" (symbolic dims = 1)" if stats.macs_symbolic else "") + f", size {_bytes(file_size(model))}")
    for kind, values in (("input", stats.inputs), ("output", stats.outputs)):
        for name, dtype, shape in values:
            dims = "x".join(str(d) if d is not None else "?" for d in shape)
            print(f"{kind:6} {name}: {dtype}[{dims}]")
    print("ops:")
    for op, count in stats.op_histogram.items():
        print(f"  {op:28} {count}")
    if model.metadata_props:
        print("metadata: " + ", ".join(p.key for p in model.metadata_props))
    return EXIT_OK


def _print_groups(model, *, as_json: bool) -> int:
    from .prune import list_groups

    groups = list_groups(model)
    if as_json:
        print(json.dumps([g.as_dict() for g in groups], indent=2))
        return EXIT_OK
    frozen = sum(1 for g in groups if g.frozen)
    print(f"{len(groups)} channel groups, {len(groups) - frozen} prunable, {frozen} frozen")
    for g in groups:
        members = ", ".join(str(m) for m in g.members[:4]) + (f", ... (+{len(g.members) - 4})" if len(g.members) > 4 else "")
        state = "FROZEN: " + "; ".join(g.reasons) if g.frozen else "prunable"
        print(f"  group {g.id:3d}: {g.channels:5d} channels, {len(g.members):3d} members  {state}")
        print(f"             {members}")
    return EXIT_OK


def _run_run(argv: Sequence[str]) -> int:
    parser = _Parser(prog="onnx-compress run", description="Run a model on feeds from an .npz and save the outputs.")
    parser.add_argument("model")
    parser.add_argument("--input", required=True, metavar="FEEDS.npz", help="inputs keyed by input name")
    parser.add_argument("--output", required=True, metavar="OUT.npz", help="where the outputs go (atomic write)")
    parser.add_argument("--backend", choices=("numba", "onnxruntime"), default="numba")
    parser.add_argument("--threads", type=int, default=None)
    _add_common(parser)
    args = parser.parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    from .runtime_cli import run_command

    ir_io.check_output_path(args.output, args.model, args.input)
    run_command(args.model, args.input, args.output, args.backend, threads=args.threads)
    if not args.quiet:
        print(f"wrote {args.output}")
    return EXIT_OK


def _run_bench(argv: Sequence[str]) -> int:
    parser = _Parser(prog="onnx-compress bench", description="Median/p90 latency per back end, and their ratio.")
    parser.add_argument("model")
    parser.add_argument("--backend", choices=("numba", "onnxruntime", "both"), default="both")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    _add_common(parser)
    args = parser.parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    from .runtime_cli import bench_command

    bench_command(args.model, backend=args.backend, batch=args.batch, threads=args.threads,
                  repeats=args.repeats, warmup=args.warmup)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "-v" in argv or "--verbose" in argv
    try:
        if argv and argv[0] == "inspect":
            return _run_inspect(argv[1:])
        if argv and argv[0] == "run":
            return _run_run(argv[1:])
        if argv and argv[0] == "bench":
            return _run_bench(argv[1:])
        return _run_compress(argv)
    except VerificationError as exc:
        print(f"onnx-compress: {exc}; nothing written", file=sys.stderr)
        return EXIT_VERIFICATION
    except OutputPathError as exc:
        print(f"onnx-compress: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (InvalidModelError, UnsupportedModelError) as exc:
        print(f"onnx-compress: {exc}", file=sys.stderr)
        return EXIT_INVALID_MODEL
    except PassError as exc:
        if verbose:
            logging.getLogger(__name__).exception("pass failed")
        print(f"onnx-compress: internal error: {exc}", file=sys.stderr)
        return EXIT_INTERNAL
    except OnnxCompressError as exc:
        print(f"onnx-compress: {exc}", file=sys.stderr)
        return EXIT_INTERNAL
    except SystemExit as exc:  # argparse: usage errors (2), --help/--version (0)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_USAGE)
    except BrokenPipeError:  # output piped into `head` and friends
        sys.stderr.close()
        return EXIT_OK
    except KeyboardInterrupt:
        print("onnx-compress: interrupted; nothing written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
