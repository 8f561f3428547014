"""``compresscnn run|inspect ...``: a thin shell over the Python API.

Exit codes: 0 success; 2 a problem with the user's input (one line on stderr naming what and
where); 1 an internal error (a one-line summary; the traceback only with ``--debug``); 130
interrupted (Ctrl-C), 143 terminated (SIGTERM, what ``kill``, ``timeout``, ``docker stop``
and job schedulers send): both stop the run the same way (the lock released, a ``.partial``
that holds a fine-tuning checkpoint kept) and print one line saying how to resume.

Output: results on stdout (the plan, the paths written); stage lines, progress (a bar on a
terminal, a line at least every 10 s elsewhere) and warnings on stderr. ``--quiet`` keeps
only errors and warnings on stderr; ``-v`` adds details (the ``compresscnn`` logger at DEBUG).

``torchrun --nproc_per_node=N -m compresscnn run RECIPE`` fine-tunes with DDP: ``run`` sees
the launcher's ``RANK``/``WORLD_SIZE`` and initialises the process group (NCCL when training
on CUDA, with each process on the GPU ``LOCAL_RANK``; gloo on CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, Iterator, Sequence

from compresscnn import __version__
from compresscnn.errors import CompressError, ModelError

# torch and the modules of each subcommand are imported inside the function that runs the
# subcommand (they take seconds to load), so that --help and usage errors answer at once


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is (as Ctrl-C raises KeyboardInterrupt), so that a
    run stops through the same clean-up: lock released, resumable ``.partial`` kept."""

    exit_code = 143
    what = "terminated (SIGTERM)"


def _stopped(exc: KeyboardInterrupt) -> tuple[str, int]:
    """What stopped the command (for its message) and its exit code: 143 for SIGTERM, 130
    for Ctrl-C."""
    if isinstance(exc, Terminated):
        return exc.what, exc.exit_code
    return "interrupted", 130


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While a command runs, SIGTERM raises :class:`Terminated` in the main thread (once:
    later ones are ignored while it cleans up); the previous handler is put back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = []

    def handler(signum: int, frame: Any) -> None:
        if not fired:
            fired.append(signum)
            raise Terminated()

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _init_distributed(device: str) -> bool:
    """Initialise the default process group when launched by ``torchrun`` (``RANK`` and
    ``WORLD_SIZE`` set); True when this call did it (the caller then destroys it)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    import torch
    import torch.distributed as dist

    from compresscnn.util.common import resolve_device

    if dist.is_initialized():
        return False
    if resolve_device(device).type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True


def _cmd_run(args: argparse.Namespace) -> int:
    from compresscnn.recipe import load_recipe
    from compresscnn.io.zoos import check_spec

    # the recipe and its model name are checked before torch is loaded (seconds)
    recipe = load_recipe(args.recipe, args.set or [])
    try:
        check_spec(recipe["model"]["spec"])
    except ModelError as e:
        raise ModelError(f"{args.recipe}: model.spec: {e}") from None

    from compresscnn.runs.pipeline import run
    from compresscnn.util.common import is_dist

    owned = not args.dry_run and _init_distributed(recipe["finetune"]["device"])
    try:
        run(recipe, out=args.out, dry_run=args.dry_run, resume=args.resume,
            overwrite=args.overwrite, quiet=args.quiet, recipe_path=str(args.recipe),
            distributed=is_dist())
    except KeyboardInterrupt as exc:
        what, code = _stopped(exc)
        _say_error(f"compresscnn: {what}; {_resume_hint(args, recipe['output'])}")
        return code
    if owned:  # only after success: on a failure the other ranks may be inside a
        import torch.distributed as dist  # collective, and torchrun ends them

        dist.destroy_process_group()
    return 0


def _resume_hint(args: argparse.Namespace, output: str) -> str:
    """How to continue an interrupted run: the same command with ``--resume`` when a
    fine-tuning checkpoint was saved, else that there is nothing to resume."""
    out = Path(args.out if args.out is not None else output)
    checkpoint = out.with_name(out.name + ".partial") / "checkpoints" / "last.pt"
    if not checkpoint.is_file():
        return "no fine-tuning checkpoint was saved yet, so there is nothing to resume: run " \
               "the same command again"
    cmd = ["compresscnn", "run", str(args.recipe)]
    cmd += ["--out", str(args.out)] if args.out is not None else []
    for kv in args.set or []:
        cmd += ["--set", kv]
    return f"to continue from {checkpoint}, run: {shlex.join(cmd + ['--resume'])}"


def _cmd_sweep(args: argparse.Namespace) -> int:
    from compresscnn.recipe.sweep import load_sweep
    from compresscnn.util.progress import result

    # every job's recipe is validated before the first one runs (seconds, no torch)
    sweep = load_sweep(args.sweep)
    if args.list:
        for name, job in sweep.jobs.items():
            result(f"{name}: {' '.join(job.command())}")
        return 0
    from compresscnn.runs.sweep import run_sweep

    out = args.out or Path("runs") / args.sweep.stem
    failed = run_sweep(sweep, args.jobs, out=out, results=args.results or out / "results",
                       threads=args.threads, say=result)
    if failed:
        _say_error(f"compresscnn: {len(failed)} job(s) failed: {' '.join(failed)}")
    return 1 if failed else 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from compresscnn.io.zoos import check_spec

    check_spec(args.model)  # before torch is loaded
    from compresscnn.measure.inspection import inspect_model
    from compresscnn.util.progress import result

    result(inspect_model(args.model, args.weights, args.input_size,
                        energies=tuple(args.energy)))
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from compresscnn.runs.compare import CompareError, compare, parse_data_arg
    from compresscnn.runs.compare_output import compare_outputs, write_compare
    from compresscnn.runs.compare_recipe import load_compare_recipe, run_compare_recipe
    from compresscnn.util.progress import emit, result

    def pairs(items: list[str] | None, flag: str) -> dict[str, str]:
        out = {}
        for it in items or []:
            k, eq, v = it.rpartition("=")
            if not eq or not k or not v:
                raise CompareError(f"{flag} {it!r}: expected SPEC=WEIGHTS")
            out[k] = v
        return out

    data: dict = {}
    for d in args.data or []:
        data.update(parse_data_arg(d))
    settings = dict(threads=args.threads, repeats=args.repeats,
                    weights_for=pairs(args.weights_for, "--weights-for") or None,
                    default_weights=args.default_weights, onnx=False if args.no_onnx else None,
                    latency=False if args.no_latency else None,
                    quantize=False if args.no_quantize else None, input_size=args.input_size,
                    latency_batches=args.latency_batches, runtimes=args.runtimes,
                    match_size=True if args.match_size else None)
    log = None if args.quiet else emit
    if args.recipe is not None:
        recipe = load_compare_recipe(args.recipe)
        settings["data"] = {**(recipe["data"] or {}), **data} or None
        rows = run_compare_recipe(args.recipe, out=args.out, extra_entries=args.models,
                                  json_path=args.json, log=log, overrides=settings)
        out = args.out or recipe["output"]
    else:
        if not args.models:
            raise CompareError("compare: give MODEL ... (specs or run directories) or --recipe FILE")
        out = args.out or Path("runs/compare")
        settings = {k: v for k, v in {**settings, "data": data or None}.items() if v is not None}
        rows = compare(args.models, settings, workdir=Path(out) / "onnx", log=log,
                       out_files=compare_outputs(out, args.json))
        write_compare(rows, out, title=args.title or "Model comparison", json_path=args.json)
    result(f"wrote {Path(out) / 'compare.md'}, compare.json, compare.png ({len(rows)} models)")
    return 0


def _verbosity(p: argparse.ArgumentParser, top: bool) -> None:
    """``-v``/``--quiet`` before or after the command (a subcommand's default does not hide
    the top level's value)."""
    d = {} if top else {"default": argparse.SUPPRESS}
    p.add_argument("-v", "--verbose", action="store_true", help="more detail on stderr", **d)
    p.add_argument("--quiet", action="store_true",
                   help="no progress bars or stage messages (errors and warnings only)", **d)


class _Stderr(logging.StreamHandler):
    """A handler on whatever ``sys.stderr`` is when a record is written."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: D102
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it
        pass


def _setup_logging(verbose: bool, quiet: bool) -> None:
    """The ``compresscnn`` logger on stderr: DEBUG with -v, WARNING with --quiet."""
    logger = logging.getLogger("compresscnn")
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        h = _Stderr()
        h.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(h)
        logger.propagate = False
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="compresscnn",
                                 description="Low-rank compression of pretrained CNNs.")
    ap.add_argument("--version", action="version", version=f"compresscnn {__version__}")
    ap.add_argument("--debug", action="store_true", help="show tracebacks of internal errors")
    _verbosity(ap, top=True)
    sub = ap.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a recipe: plan, apply, fine-tune, export, report")
    r.add_argument("recipe", type=Path)
    r.add_argument("--out", type=Path, help="run directory (default: the recipe's output)")
    r.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set finetune.epochs=3 (repeatable)")
    r.add_argument("--dry-run", action="store_true", help="print the plan and write nothing")
    r.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its last checkpoint")
    r.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    _verbosity(r, top=False)
    r.set_defaults(func=_cmd_run)

    _sweep_parser(sub)
    _inspect_parser(sub)
    _compare_parser(sub)
    return ap


def _sweep_parser(sub: Any) -> None:
    w = sub.add_parser("sweep", help="run the jobs of a sweep file (recipes/sweeps/*.yaml), "
                                     "each a recipe with overrides; a stopped sweep resumes")
    w.add_argument("sweep", type=Path)
    w.add_argument("--jobs", nargs="+", default=None, metavar="JOB",
                   help="the jobs to run (default: all, in the file's order)")
    w.add_argument("--list", action="store_true", help="print each job's command and stop")
    w.add_argument("--out", type=Path, help="run folders (default: runs/<sweep name>)")
    w.add_argument("--results", type=Path,
                   help="one summary JSON per job (default: <out>/results); jobs that have one "
                        "are skipped")
    w.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each job")
    _verbosity(w, top=False)
    w.set_defaults(func=_cmd_sweep)



def _inspect_parser(sub: Any) -> None:
    i = sub.add_parser("inspect", help="per-layer table, what fits the model and a "
                                       "recommended rule set, to help write a recipe")
    i.add_argument("model", help="model spec, e.g. torchvision:resnet18 or cifar:resnet20")
    i.add_argument("--weights", default=None)
    i.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"), default=None)
    i.add_argument("--energy", type=float, nargs="+", default=[0.9, 0.95, 0.99],
                   help="energy levels for the candidate-rank columns")
    _verbosity(i, top=False)
    i.set_defaults(func=_cmd_inspect)



def _compare_parser(sub: Any) -> None:
    c = sub.add_parser("compare", help="one table + plot: size, MACs, ONNX/int8 size, latency, accuracy")
    c.add_argument("models", nargs="*", metavar="MODEL", help="model specs or run directories")
    c.add_argument("--recipe", type=Path, help="a compare recipe (recipes/squeezenet_vs_alexnet_*.yaml)")
    c.add_argument("--out", type=Path, help="output folder (default runs/compare or the recipe's)")
    c.add_argument("--json", type=Path, help="also write the JSON list of rows here")
    c.add_argument("--title", default=None)
    c.add_argument("--weights-for", action="append", metavar="SPEC=PATH", help="weights of one spec (repeatable)")
    c.add_argument("--default-weights", default=None, help="weights of specs given none, e.g. DEFAULT")
    c.add_argument("--data", action="append", metavar="DATASET=PATH", help="e.g. imagenet=PATH (measures accuracy)")
    c.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"), default=None)
    c.add_argument("--threads", type=int, default=None, help="CPU threads while timing (default 2)")
    c.add_argument("--repeats", type=int, default=None, help="timed runs per latency (default 20)")
    c.add_argument("--latency-batches", type=int, nargs="+", default=None, help="default: 1 32")
    c.add_argument("--match-size", action="store_true",
                   help="also each larger model spec factorized to the smallest entry's size")
    c.add_argument("--no-onnx", action="store_true", help="skip ONNX export (sizes, onnxruntime)")
    c.add_argument("--no-latency", action="store_true", help="skip latency measurements")
    c.add_argument("--no-quantize", action="store_true", help="skip the int8 ONNX file")
    c.add_argument("--runtimes", nargs="+", default=None, choices=["torch", "onnxruntime", "openvino"],
                   help="runtimes to time in (default: torch onnxruntime; openvino needs the runtimes extra)")
    _verbosity(c, top=False)
    c.set_defaults(func=_cmd_compare)


def main(argv: Sequence[str] | None = None) -> int:
    code = _main(argv)
    try:  # what stays in stdout's buffer because it cannot be written (a full device, a
        sys.stdout.flush()  # closed pipe) goes nowhere, not into a message at exit
    except (OSError, ValueError):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = code or 2
    return code


def _main(argv: Sequence[str] | None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.verbose and args.quiet:
        ap.error("give -v/--verbose or --quiet, not both")
    _setup_logging(args.verbose, args.quiet)
    try:
        with _sigterm_raises():
            return args.func(args)
    except CompressError as e:
        msg = " ".join(str(e).split("\n"))
        _say_error(f"compresscnn: error: {msg}")
        return e.exit_code
    except KeyboardInterrupt as exc:
        what, code = _stopped(exc)
        _say_error(f"compresscnn: {what}")
        return code
    except Exception as e:  # internal error
        if args.debug:
            with contextlib.suppress(OSError):
                traceback.print_exc()
        else:
            _say_error(f"compresscnn: internal error: {type(e).__name__}: {e} "
                       f"(rerun with --debug for the traceback)")
        return 1


def _say_error(line: str) -> None:
    """The command's last line, on stderr; when stderr itself cannot be written (a full
    device, a closed pipe) the exit code alone says how it ended."""
    with contextlib.suppress(OSError, ValueError):
        try:
            print(line, file=sys.stderr, flush=True)
        except UnicodeEncodeError:  # a path with bytes that are not text (non-UTF-8 names)
            enc = getattr(sys.stderr, "encoding", None) or "utf-8"
            print(line.encode(enc, "backslashreplace").decode(enc), file=sys.stderr,
                  flush=True)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
