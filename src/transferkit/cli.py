"""Command line: parses arguments, calls one library function per command, prints where the output is.

Every failure is one line on stderr (`transferkit: error: ...`) and exit status 2; `--debug` shows the
traceback instead. Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from pathlib import Path

from transferkit.errors import ConfigError, TransferkitError, message_on_one_line
from transferkit.options import DefaultsShown, add_options, field_comments, flags, given, show_default

# TrainConfig fields that take a comma-separated list on the command line
_LIST_FIELDS = {"data", "unlabeled", "head_weights", "teachers"}
_BOOL_FIELDS = {"compile", "tensorboard", "distribution_alignment", "adapt_bn"}
# TrainConfig fields that name one of a few choices (config.py checks the value): their metavar lists them
_CHOICE_FIELDS = {"augment": "AUGMENTS", "adversarial_training": "ADVERSARIAL"}
_NOT_FLAGS = {"out"}  # added by hand below
# `train --help` groups: the first TrainConfig field of each group, in the config's order (docs/guide-training.md's table too)
_TRAIN_GROUPS = {
    "data": "data",
    "backbone": "model",
    "epochs": "schedule",
    "pseudo_threshold": "pseudo-labels",
    "teachers": "distillation",
    "adversarial_training": "hardening",
    "seed": "system",
}
_TRAIN_EXAMPLES = """examples:
  transferkit train --data mnist,fashion-mnist --image-size 32 --epochs 4 --out runs/demo
  transferkit train --data imagefolder:~/photos --image-size 224 --batch-size 32 --freeze-epochs 1
  transferkit train --data mnist --unlabeled digits --rounds 3          # labelled source, unlabeled target
  transferkit train --init runs/demo --unlabeled traffic:captured/demo  # adapt to what serve --capture kept
  transferkit train --resume runs/demo                                  # continue after an interruption

datasets:
{datasets}"""
_DISTILL_EXAMPLES = """example:
  transferkit distill --teachers runs/mnist,runs/fashion --data mnist,fashion-mnist --image-size 32 --epochs 6

datasets:
{datasets}"""
# an unexpected exception's message is cut here (torch's can run to pages); --debug shows all of it
_MAX_MESSAGE = 400
_TRACK_HELP = "log to MLflow as part of the run's tracked run (created by train --track): metrics, report and files"
_DEBUG_HELP = "on an error, show the full traceback instead of one line"


class _Parser(argparse.ArgumentParser):
    """A usage error is one line too, pointing at `--help` instead of printing the usage block."""

    def error(self, message: str):
        self.exit(2, f"transferkit: error: {message} (see `{self.prog} --help`)\n")


def _field_help() -> dict[str, str]:
    """Each TrainConfig field's trailing comment is its --help text: one source of documentation."""
    from transferkit.config import TrainConfig

    return {k: v for k, v in field_comments(TrainConfig, above_too=False).items() if v}


_TRAIN_TEXT = (
    "fine-tune one backbone on one or more datasets",
    "Fine-tune a pretrained backbone on several datasets at once (one head per label space). "
    "Options override --config FILE, which overrides the defaults shown.",
)
_DISTILL_TEXT = (
    "train a student from the soft targets of trained runs (--teachers) and the labels",
    "Knowledge distillation: training with teachers. The student gets one head per teacher label space "
    "(teacher heads with the same class names share one, their soft targets averaged); loss = kd_weight x "
    "T^2 x KL(teachers || student at temperature T) on every image + (1 - kd_weight) x cross-entropy where a "
    "label exists. Every training option applies. Options override --config FILE.",
)


def _add_train_parser(sub, command: str = "train", text: tuple[str, str] = _TRAIN_TEXT) -> None:
    from transferkit import config as config_module
    from transferkit.config import TrainConfig
    from transferkit.data.registry import available_datasets

    names = "\n".join(f"  {name:15s} {text}" for name, text in available_datasets().items())
    examples = _TRAIN_EXAMPLES if command == "train" else _DISTILL_EXAMPLES
    p = sub.add_parser(
        command,
        help=text[0],
        description=text[1],
        epilog=examples.format(datasets=names),
        formatter_class=DefaultsShown,
    )
    helps = _field_help()
    defaults = TrainConfig()
    group = p
    for f in dataclasses.fields(TrainConfig):
        if f.name in _TRAIN_GROUPS:
            group = p.add_argument_group(_TRAIN_GROUPS[f.name])
        if f.name in _NOT_FLAGS:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        default = "auto" if f.name == "batch_size" and default == 0 else default  # 0 is how a config says auto
        text = helps.get(f.name, "")
        if f.name in _BOOL_FIELDS:
            switch = group.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text
            )
            show_default(switch, default)
        elif f.name == "augment":
            _add_augment_flags(group, text, default)
        else:
            meta = "A,B,..." if f.name in _LIST_FIELDS else f.name.upper()
            if f.name in _CHOICE_FIELDS:
                meta = "|".join(getattr(config_module, _CHOICE_FIELDS[f.name]))
            shown = group.add_argument(flag, dest=f.name, metavar=meta, default=argparse.SUPPRESS, help=text)
            show_default(shown, default)
    p.add_argument("--config", metavar="FILE", help="YAML file of TrainConfig keys")
    p.add_argument(
        "--out", metavar="DIR", default=argparse.SUPPRESS, help="run directory (if not given: runs/<data>-<time>)"
    )
    p.add_argument("--resume", metavar="RUN", help="continue an interrupted run from its last checkpoint")


def _add_augment_flags(group, text: str, default: str) -> None:
    """--augment NAME; before it took a name it was an on/off switch, so `--augment` alone still means default and
    `--no-augment` means none."""
    from transferkit.config import AUGMENTS

    augment = group.add_argument(
        "--augment",
        dest="augment",
        metavar="|".join(AUGMENTS),
        nargs="?",
        const="default",
        default=argparse.SUPPRESS,
        help=text,
    )
    show_default(augment, default)
    group.add_argument(
        "--no-augment",
        dest="augment",
        action="store_const",
        const="none",
        default=argparse.SUPPRESS,
        help="the same as --augment none",
    )


def _parse_value(name: str, raw: str):
    """A command-line string as the field's type reads it, not as YAML would (`--weights no` is the name "no", not
    false): config_from_dict converts numbers and lists by the field's type hint and checks them like a config
    file's. `null` or `none` unsets an optional number."""
    from typing import get_type_hints

    from transferkit.config import TrainConfig

    hint = str(get_type_hints(TrainConfig)[name])
    optional_number = "None" in hint and not hint.startswith("str") and name not in _LIST_FIELDS
    return None if optional_number and raw.strip().lower() in ("null", "none") else raw


def cmd_train(args) -> None:
    from transferkit.config import config_from_dict, load_config_file
    from transferkit.training import resume, train

    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config", "resume", "func", "debug")}
    if args.resume:
        if flags or args.config:
            raise TransferkitError(
                f"--resume continues a run with its own config; drop {sorted('--' + k.replace('_', '-') for k in flags) or '--config'}"
            )
        run_dir = resume(args.resume)
    else:
        values = load_config_file(args.config) if args.config else {}
        values.update({k: _parse_value(k, v) for k, v in flags.items()})
        try:
            run_dir = train(config_from_dict(values, source=args.config or "command line"))  # validates first
        except ConfigError as exc:  # said as the command line says it, unless a config file was given
            raise ConfigError(_as_flags(str(exc)) if not args.config else str(exc)) from None
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
        print(run_dir)


def _as_flags(message: str) -> str:
    """A config error as the command line says it: `image_size` -> `--image-size` (the multi-word keys only:
    `data` or `lr` could be plain words in the sentence)."""
    from transferkit.config import TrainConfig

    for name in sorted((f.name for f in dataclasses.fields(TrainConfig) if "_" in f.name), key=len, reverse=True):
        message = re.sub(rf"(?<![\w-]){name}\b", "--" + name.replace("_", "-"), message)
    return message


def cmd_distill(args) -> None:
    """`train` with teachers: the same options, and --teachers required (on the command line or in --config)."""
    if args.resume:
        from transferkit.runs import load_run

        if not load_run(args.resume).config.teachers:
            raise TransferkitError(
                f"{args.resume} is not a distillation; continue it with `transferkit train --resume`"
            )
    elif not getattr(args, "teachers", None):
        from transferkit.config import load_config_file

        if not (args.config and load_config_file(args.config).get("teachers")):
            raise TransferkitError(
                "distill needs --teachers RUN[,RUN...]: the finished runs whose heads teach the student"
            )
    cmd_train(args)


def cmd_eval(args) -> None:
    from transferkit.evaluation.robust_options import RobustnessOptions
    from transferkit.tracking import check_track
    from transferkit.tracking.records import track_eval

    robustness = RobustnessOptions(**given(args, RobustnessOptions))  # refused before the model or data load
    from transferkit.evaluation import evaluate_run

    check_track(args.track)  # a tracking server that is down is refused before the evaluation, not after
    result = evaluate_run(args.run, extra_data=_split_list(args.data), split=args.split, robustness=robustness)
    track_eval(args.track, Path(args.run), result.eval_path, result.report_path)
    print(result.table)
    print(f"wrote {result.eval_path} and {result.report_path}")
    print(result.report_path.parent)


def cmd_export(args) -> None:
    from transferkit.export import export_run, format_export_table
    from transferkit.export.job import ExportOptions
    from transferkit.tracking import check_track
    from transferkit.tracking.records import track_export

    options = ExportOptions(**given(args, ExportOptions))
    if args.register and not args.track:
        raise ConfigError("--register NAME publishes to MLflow's registry: add --track mlflow:URI")
    check_track(args.track)
    result = export_run(
        args.run,
        formats=_split_list(args.format),
        precision=_split_list(args.precision) or [],
        verify_images=args.verify_images,
        device=args.device,
        options=options,
        data=_split_list(args.data),
    )
    table = format_export_table(result)
    print(table)  # ends with the BentoML model tag
    version = track_export(args.track, Path(args.run), result.export_dir, table, args.register if result.ok else None)
    if version:
        print(f"registered: models:/{args.register}/{version}")
    print(result.export_dir)
    if not result.ok:
        raise TransferkitError("a requested format failed export or verify (see the table and verify.json)")


def cmd_drift(args) -> None:
    import datetime as dt

    from transferkit.evaluation.drift import run_drift
    from transferkit.evaluation.drift_report import format_drift_table, write_drift_report

    since = None
    if args.since:
        try:
            since = dt.datetime.fromisoformat(args.since)
        except ValueError:
            raise ConfigError(f"--since {args.since!r}: use an ISO time, e.g. 2026-12-01 or 2026-12-01T08:00") from None
        since = since if since.tzinfo else since.replace(tzinfo=dt.timezone.utc)
    if args.window < 0:
        raise ConfigError(f"--window must be >= 0 rows, got {args.window}")
    report = run_drift(
        args.run, args.traffic, args.model, since, args.window, args.alpha, args.reference_images, args.mmd
    )
    out = Path(args.out) if args.out else Path(args.run) / "drift" / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    write_drift_report(report, out)
    print(format_drift_table(report))
    print(out)
    if report["drift"]:
        sys.exit(3)  # for schedulers and CI: the newest window drifted


def cmd_compare(args) -> None:
    import datetime as dt

    from transferkit.evaluation.compare import compare_runs, format_compare, write_compare

    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be >= 1 image, got {args.limit}")
    extra = _split_list(args.data) or []
    report = compare_runs(args.new, args.old, args.traffic, extra, args.split, args.limit, args.tolerance)
    out = Path(args.out) if args.out else Path(args.new) / "compare" / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    write_compare(report, out)
    print(format_compare(report))
    print(out)
    if report["verdict"] != "promote":
        sys.exit(3)  # for CI: NEW is not proven at least as good as OLD on the labelled data


def cmd_benchmark(args) -> None:
    from transferkit.export.benchmark import benchmark_run, format_benchmark_table

    rows = benchmark_run(args.run, repeats=args.repeats)
    print(format_benchmark_table(rows))
    print(Path(args.run) / "export" / "benchmark.json")


def _local_run(run: str, for_serving: bool = False) -> str:
    """A run folder as given, or a registered MLflow model version (models:/NAME/VERSION or @ALIAS) downloaded,
    checked, and for serving put in the BentoML model store, as a local run folder."""
    from transferkit.tracking.registry import fetch_registered, is_registry_uri

    if not is_registry_uri(run):
        return run
    local = fetch_registered(run)
    print(f"{run}: {local}", file=sys.stderr, flush=True)
    if for_serving:
        _store_for_serving(local)
    return str(local)


def _store_for_serving(run_dir: Path) -> None:
    """Put a downloaded version into this machine's BentoML model store, once, as `serve RUN` expects."""
    from transferkit.export.store import store_export
    from transferkit.manifest import read_manifest, write_manifest
    from transferkit.runtimes.resolve import stored_model_path

    export_dir = run_dir / "export"
    manifest = read_manifest(export_dir)
    if manifest.tag and stored_model_path(manifest.tag) is not None:
        return
    # named after the registered model (the folder above the version), like an export is after its run
    write_manifest(export_dir, store_export(export_dir, manifest, run_dir.parent))


def cmd_serve(args) -> None:
    from transferkit.serving.server import SETTING_FLAGS, serve

    overrides = {name: getattr(args, name) for name in SETTING_FLAGS}
    args.run = [_local_run(r, for_serving=True) for r in args.run]
    sys.exit(
        serve(
            args.run,
            host=args.host,
            port=args.port,
            drain_timeout=args.drain_timeout,
            api_key_file=args.api_key_file,
            **overrides,
        )
    )


def cmd_predict(args) -> None:
    import json

    from transferkit.serving.client import api_key_from, check_out, expand_images, predict_files, write_results

    if args.out:
        check_out(args.out)  # refused before any request
    files = expand_images(args.images)
    results = predict_files(
        files,
        url=args.url,
        top_k=args.top_k,
        api_key=api_key_from(args.api_key_file),
        concurrency=args.concurrency,
        errors="record",
        model=args.model,
        version=args.model_version,
    )
    if args.out:
        print(write_results(results, args.out))
    else:
        print(json.dumps(results, indent=2))
    failed = [r for r in results if "error" in r]
    if failed:
        raise TransferkitError(
            f"{len(failed)} of {len(results)} images were refused, e.g. {failed[0]['file']}: {failed[0]['error']}"
        )


def cmd_score(args) -> None:
    from transferkit.scoring.job import score

    summary = score(
        _local_run(args.run),
        args.inputs,
        args.out,
        top_k=args.top_k,
        runtime=args.runtime,
        batch_size=args.batch_size,
        workers=args.workers,
        threads=args.threads,
        part_rows=args.part_rows,
        progress=True,
        engine=args.engine,
        ray_address=args.ray_address,
        num_cpus=args.num_cpus,
        num_gpus=args.num_gpus,
    )
    print(summary.describe())


def cmd_build(args) -> None:
    from transferkit.serving.build import build_bento

    k8s = _k8s_options(args)  # refused before the minute-long build, not after it
    result = build_bento(args.run, base_image=args.base_image, runtime=args.runtime, image=args.image)
    print(f"bento: {result.tag}")
    print(f"dockerfile: {result.dockerfile_path}")
    if result.image:
        print(f"image: {result.image}")
        print(f"run: docker run --rm -p 127.0.0.1:3000:3000 {result.image}")
    else:
        print(f"containerize: {result.containerize_command}  (or: transferkit build RUN --image TAG)")
    if k8s is not None:
        from transferkit.serving.k8s import bento_model_tag, write_manifests

        paths = write_manifests(
            args.k8s,
            image=args.image or result.tag,
            model_tag=bento_model_tag(result.bento_path),
            options=k8s,
            runtime=args.runtime,
            image_from_bento=not args.image,
            kserve=args.kserve,
        )
        print(f"kubernetes: {' '.join(str(p) for p in paths)}  (kubectl apply -f {args.k8s})")
        if args.kserve:
            print(f"kserve: on a cluster with KServe, kubectl apply -f {Path(args.k8s) / 'kserve'} instead")
    print(result.bento_path)


def _k8s_options(args):
    """build's --k8s-* options as K8sOptions (unset ones keep its defaults); None without --k8s."""
    from transferkit.serving.k8s import K8sOptions, check_out_dir

    chosen = given(args, K8sOptions, prefix="k8s-")
    if not args.k8s:
        if args.kserve:
            raise TransferkitError("--kserve: only with --k8s DIR (the InferenceService goes to DIR/kserve/)")
        if chosen:
            names = flags(K8sOptions, prefix="k8s-")
            raise TransferkitError(
                f"{', '.join(names[n] for n in chosen)}: only with --k8s DIR (the folder for the Kubernetes manifests)"
            )
        return None
    check_out_dir(args.k8s)
    options = K8sOptions(**chosen)
    options.require_auth()
    return options


class _BuildRuntimes:
    """`build --runtime` choices: the runtimes serving/build.py can install (RUNTIME_PACKAGES), read only when the
    option is parsed or its help printed (hence metavar RUNTIME: argparse would list them while building the
    parser): that module pulls in numpy and the server, too slow for every command's start."""

    @staticmethod
    def _names() -> list[str]:
        from transferkit.serving.build import RUNTIME_PACKAGES

        return list(RUNTIME_PACKAGES)

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self):
        return iter(self._names())


def _split_list(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


_PROGRAM = (
    "transferkit fine-tunes one pretrained backbone on several image-classification datasets at once, exports it\n"
    "to ONNX, OpenVINO, TensorRT or AOTInductor artifacts checked against PyTorch, and serves the fastest\n"
    "verified one over HTTP with BentoML (or scores folders of images, or builds a container image)."
)
_EXAMPLE = """a first run, on built-in data:
  transferkit train --data mnist,fashion-mnist --image-size 32 --epochs 2 --out runs/demo
  transferkit export runs/demo --format onnx
  transferkit serve runs/demo                  # then: curl -F image=@digit.png 127.0.0.1:3000/predict
your own photos (one folder per class, ideally train/ val/ test/ below it):
  transferkit train --data imagefolder:photos --image-size 224 --batch-size 32 --out runs/photos

`transferkit COMMAND --help` lists a command's options."""


def build_parser() -> argparse.ArgumentParser:
    from transferkit.artifact import FORMAT_SPECS, PRECISIONS, RUNTIME_NAMES  # the formats table: choices below
    from transferkit.version import __version__

    parser = _Parser(prog="transferkit", description=_PROGRAM, epilog=_EXAMPLE, formatter_class=DefaultsShown)
    parser.add_argument("--version", action="version", version=f"transferkit {__version__}")
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train_parser(sub)
    _add_train_parser(sub, "distill", _DISTILL_TEXT)

    p = sub.add_parser(
        "eval",
        help="accuracy of every head on every dataset it can score; report with plots",
        description="Score every head on every dataset it can score and write eval.json, report.md and plots. "
        "--corruptions adds accuracy under the common corruptions (Hendrycks & Dietterich), --attack adversarial "
        "accuracy (FGSM or PGD on PyTorch, the same images through every exported artifact). Example: "
        "transferkit eval runs/demo --corruptions all --reference runs/source --attack pgd --eps 1/255,4/255",
    )
    p.add_argument("run", metavar="RUN")
    p.add_argument("--data", metavar="A,B,...", help="more datasets to score (if not given: the run's own)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--track", metavar="mlflow:URI", help=_TRACK_HELP)
    from transferkit.evaluation.robust_options import RobustnessOptions  # torch-free

    add_options(p.add_argument_group("robustness"), RobustnessOptions, unset_is_none=True)

    p = sub.add_parser("export", help="export, verify against PyTorch, store in the BentoML model store")
    p.add_argument("run", metavar="RUN")
    p.add_argument(
        "--format",
        default="onnx",
        metavar="{" + ",".join(FORMAT_SPECS) + "}[,...]",
        help="comma-separated; " + "; ".join(f"{s.name}: {s.description}" for s in FORMAT_SPECS.values()),
    )
    p.add_argument(
        "--precision",
        default=PRECISIONS[0],
        metavar="{" + ",".join(PRECISIONS) + "}[,...]",
        help="comma-separated; every format at each precision it takes: "
        + "; ".join(f"{n} {', '.join(s.precisions)}" for n, s in FORMAT_SPECS.items()),
    )
    p.add_argument(
        "--device",
        default="cpu",
        metavar="{cpu,cuda,cuda:N}",
        help="where device-bound artifacts run: aoti is compiled for it; ONNX is verified on CUDA through "
        "onnxruntime-gpu when it is cuda (fp16 ONNX is, wherever CUDA is there)",
    )
    p.add_argument(
        "--verify-images",
        default="auto",
        metavar="N|auto",
        help="held-out test images per dataset that every artifact is checked on against PyTorch; auto: the whole "
        "test split up to 50 megapixels of images (all of MNIST at 32 px), never fewer than 2000",
    )
    p.add_argument(
        "--data",
        metavar="[NAME=]SPEC,...",
        help="where the run's datasets are on this machine, for a run trained elsewhere: imagefolder:PATH (matched "
        "by folder name) or NAME=imagefolder:PATH (if not given: the paths saved at training)",
    )
    from transferkit.export.job import ExportOptions  # numpy, no torch

    add_options(p, ExportOptions)
    p.add_argument("--track", metavar="mlflow:URI", help=_TRACK_HELP)
    p.add_argument(
        "--register",
        metavar="NAME",
        help="with --track: publish the servable artifacts as a new version of the registered model NAME, the "
        "gate's verdicts as its tags; serve and score take it as models:/NAME/VERSION (or models:/NAME@ALIAS)",
    )

    p = sub.add_parser(
        "drift",
        help="has the served traffic moved away from the training data? (exit code 3: it has)",
        description="Compare the traffic captured by `serve --capture DIR` with the run's held-out test images, "
        "per head, on the model's own softmax outputs: KS per class (Bonferroni), chi-square of the predicted "
        "labels, KS of the top-1 confidence. Writes drift.json, drift.md and its plots; exit code 3 when the newest window "
        "drifts. Example: transferkit drift runs/photos --traffic captured/ --window 500",
    )
    p.add_argument("run", metavar="RUN", help="the exported run the traffic was served by")
    p.add_argument("--traffic", required=True, metavar="DIR", help="the folder given to serve --capture")
    p.add_argument("--model", metavar="NAME", help="the served model's name (if not given: the only one captured)")
    p.add_argument("--since", metavar="ISO-TIME", help="only rows captured at or after this time, e.g. 2026-12-01")
    p.add_argument("--window", type=int, default=0, metavar="N", help="test each N consecutive rows (0: all at once)")
    p.add_argument("--alpha", type=float, default=0.01, help="significance of each head's corrected tests")
    p.add_argument(
        "--reference-images",
        type=int,
        default=2000,
        metavar="N",
        help="test images per dataset, for an export with no stored reference",
    )
    p.add_argument(
        "--mmd",
        action="store_true",
        help="also a kernel MMD test per window on the backbone's features (the run's model.pt on the captured "
        "images against its test images; needs the run's datasets)",
    )
    p.add_argument("--out", metavar="DIR", help="where the report goes (if not given: RUN/drift/<time>)")

    p = sub.add_parser(
        "compare",
        help="may NEW replace OLD? no labelled regression proven, and both on captured traffic (exit code 3: no)",
        description="Score NEW and OLD on the same labelled test images (both runs' datasets and --data) and judge "
        "each (head, dataset) by the paired difference: ok when NEW is shown at 95% no worse than OLD by more "
        "than --tolerance points, regression when shown worse, unproven otherwise. With --traffic, also both on "
        "the captured images: agreement, confidence and each one's drift from its own reference (shown, not "
        "judged). Writes compare.json and compare.md; exit code 3 unless every cell is ok. Example: transferkit "
        "compare runs/adapted runs/photos --traffic captured/photos --data imagefolder:labelled_sample",
    )
    p.add_argument(
        "new", metavar="NEW", help="the candidate run (e.g. adapted with --init OLD --unlabeled traffic:DIR)"
    )
    p.add_argument("old", metavar="OLD", help="the run serving now")
    p.add_argument("--traffic", metavar="DIR", help="captured traffic (serve --capture) of one model: DIR/<model>")
    p.add_argument("--data", metavar="A,B,...", help="more labelled datasets to judge on, e.g. a labelled sample")
    p.add_argument("--split", default="test", choices=["val", "test"], help="the labelled split both are scored on")
    p.add_argument("--limit", type=int, metavar="N", help="images per dataset and split (if not given: all)")
    p.add_argument("--tolerance", type=float, default=1.0, metavar="POINTS", help="accuracy NEW may lose")
    p.add_argument("--out", metavar="DIR", help="where the report goes (if not given: NEW/compare/<time>)")

    p = sub.add_parser("benchmark", help="per-format table: status, size, accuracy, latency, speed vs PyTorch")
    p.add_argument("run", metavar="RUN")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per batch size (median reported)")

    p = sub.add_parser(
        "serve",
        help="serve the exported model over HTTP (BentoML)",
        description="Serve RUN's exported model until SIGTERM or Ctrl-C, which finish in-flight requests "
        "(up to --drain-timeout) and stop every server process. Unset options fall back to $TRANSFERKIT_* "
        "(see transferkit/serving/settings.py), then to the defaults.",
    )
    p.add_argument(
        "run",
        metavar="RUN",
        nargs="+",
        help="an exported run folder; several, each a model (or a version of one); or one model repository "
        "folder (DIR/<run>/ or DIR/<model>/<version>/), re-read every --poll-s seconds; or a registered MLflow "
        "model version, models:/NAME/VERSION or models:/NAME@ALIAS (from $MLFLOW_TRACKING_URI)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 for every interface")
    p.add_argument("--port", type=int, default=3000, help="port to listen on")
    from transferkit.serving.settings import DEFAULT_DRAIN_TIMEOUT, ServingSettings  # numpy-free

    add_options(p, ServingSettings, unset_is_none=True)  # unset: $TRANSFERKIT_*, then the defaults
    p.add_argument(
        "--api-key-file",
        metavar="PATH",
        help="require `Authorization: Bearer KEY` on /predict (if not given: $TRANSFERKIT_API_KEY, else off)",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=DEFAULT_DRAIN_TIMEOUT,
        metavar="S",
        help="on SIGTERM/SIGINT, how long in-flight requests may finish",
    )

    p = sub.add_parser(
        "predict",
        help="send images to a running server and print the answers as JSON",
        description="POST every image to a running `transferkit serve` (or its container) and print the answers as "
        "JSON, or write them with --out. A file the server refuses becomes a row with its error, the rest go on, "
        "and the exit status is 2. Example: transferkit predict photos/ --concurrency 8 --out preds.csv",
    )
    p.add_argument(
        "images",
        nargs="+",
        metavar="IMAGE",
        help="image files, folders (recursive: .jpg .jpeg .png .webp) or quoted globs ('shots/*.jpg')",
    )
    p.add_argument("--url", default="http://127.0.0.1:3000", help="the server")
    p.add_argument("--model", default=None, help="which model answers, when the server serves several")
    p.add_argument(
        "--model-version",
        default=None,
        metavar="V",
        help="which version of it (if not given: the model's default version)",
    )
    p.add_argument("--top-k", type=int, default=5, help="labels per head and image")
    p.add_argument(
        "--api-key-file",
        metavar="PATH",
        help="a file holding the server's API key (if not given: $TRANSFERKIT_API_KEY, then "
        "$TRANSFERKIT_API_KEY_FILE, else none)",
    )
    p.add_argument("--concurrency", type=int, default=4, metavar="N", help="requests in flight at once")
    p.add_argument(
        "--out", metavar="FILE", help="write the answers to FILE.jsonl or FILE.csv (if not given: JSON on stdout)"
    )

    p = sub.add_parser(
        "score",
        help="score many image files with the run's verified artifact into a Parquet/CSV/JSONL file",
        description="Score every image in the inputs with RUN's verified artifact, exactly as /predict would "
        "answer each file, into one predictions file (one row per input, in input order). Work is committed in "
        "parts: after a crash or kill, the same command resumes where it stopped. A file that cannot be scored "
        "is a row with its error. Example: transferkit score runs/demo --input photos/ --out preds.parquet",
    )
    p.add_argument(
        "run",
        metavar="RUN",
        help="a trained and exported run folder, or a registered MLflow model version (models:/NAME/VERSION or "
        "models:/NAME@ALIAS, from $MLFLOW_TRACKING_URI)",
    )
    p.add_argument(
        "--input",
        dest="inputs",
        action="append",
        required=True,
        metavar="SRC",
        help="a folder (recursive; .jpg .jpeg .png .webp), a quoted glob, a .txt/.csv/.parquet list with "
        "a `path` column, or imagefolder:PATH (class folders are true labels: accuracy per head); "
        "repeat for several",
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="PREDS",
        help="predictions file; the suffix picks the format: .parquet, .csv or .jsonl",
    )
    p.add_argument("--top-k", type=int, default=5, help="labels per head and row")
    p.add_argument(
        "--runtime",
        default="auto",
        metavar="{auto," + ",".join(RUNTIME_NAMES) + "} or ARTIFACT",
        help="which verified artifact, as for `serve`; auto: the fastest measured here",
    )
    p.add_argument("--batch-size", type=int, default=64, metavar="N", help="images per runtime call")
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="local: decode processes (if not given: one per core); ray: actors (if not given: the cluster's CPUs / "
        "--num-cpus)",
    )
    p.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="local: runtime threads in all, shared by one inference stream per core (if not given: one per core)",
    )
    p.add_argument(
        "--part-rows",
        type=int,
        default=8192,
        metavar="N",
        help="local: rows per committed part, at most what a crash costs",
    )
    p.add_argument(
        "--engine",
        default="local",
        choices=("local", "ray"),
        help="local: this machine, no extra services; ray: Ray Data actors on a Ray cluster, OUT becomes "
        "a folder of Parquet files (needs the [ray] extra)",
    )
    p.add_argument(
        "--ray-address",
        metavar="ADDRESS",
        help="ray: the cluster to join, e.g. 127.0.0.1:6379 or auto (if not given: start a local Ray)",
    )
    p.add_argument(
        "--num-cpus",
        type=float,
        metavar="N",
        help="ray: CPUs per actor, also its decode and runtime threads (if not given: 1)",
    )
    p.add_argument("--num-gpus", type=float, default=0.0, metavar="N", help="ray: GPUs per actor")

    p = sub.add_parser("build", help="bentoml build: a Bento with the model and its Dockerfile; --image: the image")
    p.add_argument(
        "run", metavar="RUN", nargs="+", help="an exported run, or several: one Bento serving each as a model"
    )
    p.add_argument(
        "--base-image",
        default=None,
        metavar="IMAGE",
        help="base image with Python 3.11 (if not given: python:3.11-slim)",
    )
    p.add_argument(
        "--runtime",
        default="onnxruntime",
        choices=_BuildRuntimes(),
        metavar="RUNTIME",
        help="the runtime installed in the image, its Python packages only: %(choices)s (the run needs "
        "a verified artifact it serves)",
    )
    p.add_argument(
        "--image",
        default=None,
        metavar="TAG",
        help="also build the container image TAG with `bentoml containerize` (needs Docker)",
    )
    p.add_argument(
        "--k8s",
        default=None,
        metavar="DIR",
        help="also write Kubernetes manifests into DIR: deployment.yaml, service.yaml, hpa.yaml "
        "(image: --image TAG, else the Bento tag); needs no Docker",
    )
    p.add_argument(
        "--kserve",
        action="store_true",
        help="with --k8s: also a KServe InferenceService (custom predictor, Open Inference Protocol v2) in DIR/kserve/",
    )
    from transferkit.serving.k8s import K8sOptions

    add_options(p, K8sOptions, prefix="k8s-", unset_is_none=True)  # only with --k8s; unset: K8sOptions' defaults

    for name, func in (
        ("train", cmd_train),
        ("distill", cmd_distill),
        ("eval", cmd_eval),
        ("export", cmd_export),
        ("drift", cmd_drift),
        ("compare", cmd_compare),
        ("benchmark", cmd_benchmark),
        ("serve", cmd_serve),
        ("predict", cmd_predict),
        ("score", cmd_score),
        ("build", cmd_build),
    ):
        sub.choices[name].set_defaults(func=func)
        # also after the command (`transferkit eval RUN --debug`); SUPPRESS keeps the global value otherwise
        sub.choices[name].add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)
    for command in sub.choices.values():  # every --help ends an option's text with its default, read from it
        command.formatter_class = DefaultsShown
    return parser


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """parse_args, but an unknown option is reported by its command's parser (`see transferkit train --help`)."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        sub.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        hint = " (resume training with --resume RUN)" if args.command in ("train", "distill") else ""
        print(f"transferkit: interrupted{hint}", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        if args.debug:
            raise
        if isinstance(exc, TransferkitError):  # expected: the message names the problem and the fix
            print(f"transferkit: error: {message_on_one_line(exc)}", file=sys.stderr)
        else:  # a bug or an environment problem we did not foresee: name it, keep the traceback one flag away
            message = message_on_one_line(exc)
            if len(message) > _MAX_MESSAGE:
                message = message[: _MAX_MESSAGE - 3] + "..."
            detail = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
            print(f"transferkit: error: {detail} (re-run with --debug for the traceback)", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
