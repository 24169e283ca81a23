"""``ichd-ray`` command line: one sub-command per workflow.

Arguments are validated before any work starts; a bad value fails at once naming the flag.

Why one module of ~530 lines: the argparse tree in one place, so every sub-command's flags and
``--help`` text can be read (and checked against README) together; each handler only parses and calls
down into the package.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

__all__ = ["main", "build_parser"]


from ichd_ray.config.demo import DemoConfig
from ichd_ray.config.job import ConfigError
from ichd_ray.config.recipes import RECIPE_ALIASES, load_recipe, recipe_names, resolved_yaml
from ichd_ray.config.reference import json_schema, markdown_reference
from ichd_ray.config.train import train_config

#: The demo's defaults, from its config model (pydantic only: --help stays free of torch).
DEMO_DEFAULTS = DemoConfig()


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value}")
    return value


def _storage_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("storage (default: the standard AWS variables)")
    group.add_argument("--endpoint-url", help="S3-compatible endpoint, e.g. http://127.0.0.1:9000")
    group.add_argument("--region", help="S3 region")


def _storage_config(args: argparse.Namespace):
    from ichd_ray.io.storage import StorageConfig

    overrides = {k: v for k, v in (("endpoint_url", args.endpoint_url), ("region", args.region)) if v}
    return StorageConfig.from_env(**overrides)


def _recipe_args(parser: argparse.ArgumentParser, *, what: str) -> None:
    names = recipe_names() + sorted(RECIPE_ALIASES)
    parser.add_argument("--recipe", choices=names, default=None, metavar="NAME",
                        help=f"{what} (default: demo; `ichd-ray recipes` lists them: {', '.join(recipe_names())})")
    parser.add_argument("--preset", choices=names, default=None, help="deprecated alias of --recipe")


def _recipe_name(args: argparse.Namespace) -> str:
    """--recipe, or the deprecated --preset (with a note on stderr); both given must agree."""
    if args.preset is not None:
        print("ichd-ray: --preset is deprecated; use --recipe (same names)", file=sys.stderr)
        if args.recipe is not None and RECIPE_ALIASES.get(args.recipe, args.recipe) != RECIPE_ALIASES.get(args.preset, args.preset):
            raise ConfigError(f"--recipe {args.recipe} and --preset {args.preset} disagree; give --recipe only")
    return args.recipe or args.preset or "demo"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ichd-ray", description="Intracranial hemorrhage detection on head CT, on Ray."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    synth = sub.add_parser("synth", help="write a synthetic head-CT study set with labels")
    synth.add_argument("out", help="destination: local path, file:// or s3:// prefix")
    synth.add_argument("--studies", type=_positive_int, default=20)
    synth.add_argument("--slices", type=_positive_int, default=32, help="nominal slices per study (+-20%%)")
    synth.add_argument("--size", type=_positive_int, default=512, help="image side in pixels")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--compressed-fraction", type=_fraction, default=0.15)
    synth.add_argument("--bad-files", type=int, default=0, help="invalid objects to add (for testing)")
    synth.add_argument("--workers", type=_positive_int, default=max(1, os.cpu_count() or 1))
    _storage_args(synth)
    synth.set_defaults(func=_synth)

    index = sub.add_parser("index", help="read headers only and write a manifest (one row per object)")
    index.add_argument("input", help="prefix to list (local, file://, s3://) or a .txt/.parquet list of URIs")
    index.add_argument("--out", required=True, help="manifest Parquet to write")
    index.add_argument("--config", help="job YAML (see docs/config.md)")
    _storage_args(index)
    index.set_defaults(func=_index_or_score)

    score = sub.add_parser("score", help="score every study under INPUT with a model bundle")
    score.add_argument("input", nargs="?", help="prefix to list, or a .txt/.parquet list of URIs")
    score.add_argument("--model", required=True, help="model bundle URI")
    score.add_argument("--out", required=True, help="output prefix for the result tables")
    score.add_argument("--run-id", help="default: score-<UTC timestamp>; re-using one replaces that run")
    score.add_argument("--manifest", help="use this manifest instead of indexing INPUT")
    score.add_argument("--config", help="job YAML (see ichd_ray/config/job.py)")
    score.add_argument("--write-embeddings", action="store_true", default=None)
    score.add_argument("--num-actors", type=_positive_int)
    score.add_argument("--num-gpus-per-actor", type=float)
    score.add_argument("--device", choices=["auto", "cpu", "cuda"])
    score.add_argument("--no-progress", action="store_true")
    _storage_args(score)
    score.set_defaults(func=_index_or_score)

    model = sub.add_parser("model", help="model bundles")
    model_sub = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    init = model_sub.add_parser("init", help="write an untrained bundle (or one from local timm weights)")
    init.add_argument("out", help="bundle URI (folder or prefix)")
    init.add_argument("--backbone", required=True, help="timm model name, e.g. densenet121, resnet10t")
    init.add_argument("--weights", help="local .safetensors of pretrained timm weights for the backbone")
    init.add_argument("--folds", type=_positive_int, default=1)
    init.add_argument("--input-size", type=_positive_int, default=256)
    init.add_argument("--seed", type=int, default=0)
    _storage_args(init)
    init.set_defaults(func=_model_init)

    results = sub.add_parser("results", help="query committed result tables with DuckDB")
    results.add_argument("out", help="output prefix of a scoring run")
    results.add_argument("--sql", default="SELECT run_id, status, model_version, n_studies, n_slices_scored, n_rejected, finished_at FROM runs ORDER BY finished_at DESC")
    _storage_args(results)
    results.set_defaults(func=_results)

    train = sub.add_parser("train", help="k-fold training on Ray Train: CNN -> out-of-fold embeddings -> sequence -> bundle")
    train_sub = train.add_subparsers(dest="train_command", required=True, metavar="STAGE")
    for name, text in (
        ("all", "folds -> CNN per fold -> embeddings -> sequence model per fold -> bundle, with OOF metrics"),
        ("cnn", "folds, decoded cache and one CNN per fold (into --work)"),
        ("sequence", "out-of-fold embeddings, one sequence model per fold, metrics and the bundle"),
    ):
        stage = train_sub.add_parser(name, help=text)
        if name in ("all", "cnn"):
            stage.add_argument("--data", required=True, help="DICOM prefix (local, file://, s3://) or a .txt/.parquet URI list")
            stage.add_argument("--labels", required=True, help="labels CSV in the RSNA format (ID,Label)")
        if name in ("all", "sequence"):
            stage.add_argument("--out", required=True, help="bundle URI to write")
            stage.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --out")
        stage.add_argument("--work", required=name == "cnn", help="work folder: manifest, cache, checkpoints (default: <out>-work)")
        _recipe_args(stage, what="the recipe to start from")
        stage.add_argument("--config", help="training YAML overriding the recipe, by section (see docs/config.md)")
        stage.add_argument("--folds", type=_positive_int, help="override data.folds")
        stage.add_argument("--epochs", type=_positive_int, help="override cnn.epochs")
        stage.add_argument("--no-progress", action="store_true")
        _storage_args(stage)
        stage.set_defaults(func=_train)

    nightly = sub.add_parser("nightly", help="rescore an archive incrementally: only new or changed studies, or all on a new model")
    nightly.add_argument("--archive", required=True, help="archive prefix (local, file://, s3://)")
    nightly.add_argument("--model", required=True, help="model bundle URI")
    nightly.add_argument("--out", required=True, help="output prefix (tables, index, runs, lease)")
    nightly.add_argument("--run-id", help="default: nightly-<UTC date>-<model version>; a re-run replaces its own output")
    nightly.add_argument("--full", action="store_true", help="score every study, changed or not")
    nightly.add_argument("--inventory", metavar="MANIFEST_JSON",
                         help="tonight's listing from an S3 Inventory report (its manifest.json: CSV, Parquet or ORC) "
                              "instead of listing the archive; refused when older than the last committed run")
    nightly.add_argument("--dry-run", action="store_true", help="print the plan (studies, reasons, estimated time); change nothing")
    nightly.add_argument("--max-reject-fraction", type=_fraction, default=0.05,
                         help="commit the run as failed (exit 1) above this fraction of rejected inputs (default 0.05)")
    nightly.add_argument("--lease-ttl", type=float, default=300.0, metavar="SECONDS",
                         help="lease lifetime, renewed every third of it: a killed run blocks a re-run on another "
                              "host this long at most, on the same host not at all (default 300)")
    nightly.add_argument("--config", help="job YAML (see ichd_ray/config/job.py)")
    nightly.add_argument("--no-progress", action="store_true")
    _storage_args(nightly)
    nightly.set_defaults(func=_nightly)

    compact = sub.add_parser("compact", help="fold the nightly index's per-night changes into one snapshot (drops tombstones)")
    compact.add_argument("out", help="output prefix of nightly runs")
    compact.add_argument("--lease-ttl", type=float, default=300.0, metavar="SECONDS", help="as for nightly (default 300)")
    compact.add_argument("--config", help="job YAML: its storage section (see docs/config.md)")
    _storage_args(compact)
    compact.set_defaults(func=_compact)

    evaluate = sub.add_parser("evaluate", help="metrics of a scoring run against labels: table + JSON")
    evaluate.add_argument("--predictions", required=True, help="output prefix of a scoring run (OUT of ichd-ray score)")
    evaluate.add_argument("--labels", required=True, help="labels CSV in the RSNA format")
    evaluate.add_argument("--run-id", help="default: the newest committed run")
    evaluate.add_argument("--json", dest="json_out", help="where to write the metrics JSON (default: OUT/evaluation/<run_id>.json)")
    evaluate.add_argument(
        "--model",
        help="bundle whose thresholds to use: its slice_thresholds on slices and the ETH rule, its (study head) "
        "thresholds on the studies table (default: 0.5 per class, with a warning)",
    )
    _storage_args(evaluate)
    evaluate.set_defaults(func=_evaluate)

    demo = sub.add_parser("demo", help="the embedded default: synthesise, train (recipe demo), score, evaluate on local Ray")
    demo.add_argument("--out", default=DEMO_DEFAULTS.out)
    demo.add_argument("--studies", type=_positive_int, default=DEMO_DEFAULTS.studies)
    demo.add_argument("--slices", type=_positive_int, default=DEMO_DEFAULTS.slices)
    demo.add_argument("--dicom-size", type=_positive_int, default=DEMO_DEFAULTS.dicom_size, help="synthetic image side")
    demo.add_argument("--config", help="training YAML overriding the demo recipe")
    demo.add_argument("--seed", type=int, default=DEMO_DEFAULTS.seed)
    demo.add_argument("--workers", type=_positive_int, default=DEMO_DEFAULTS.workers)
    demo.set_defaults(func=_demo)

    recipes = sub.add_parser("recipes", help="training recipes: list them, print one resolved, copy one to edit",
                             usage="ichd-ray recipes [NAME | cp NAME FILE]")
    recipes.add_argument("words", nargs="*", metavar="NAME | cp NAME FILE",
                         help="none: list the recipes; NAME: print it resolved (every field); cp NAME FILE: write that to FILE")
    recipes.set_defaults(func=_recipes)

    config = sub.add_parser("config", help="the config reference and schema; validate a config file without running")
    config.add_argument("--schema", action="store_true", help="print the JSON Schema of every config")
    config.set_defaults(func=_config)
    config_sub = config.add_subparsers(dest="config_command", metavar="validate")
    validate = config_sub.add_parser("validate", help="check a config YAML: exit 0 and its resolved form, or 2 and why")
    validate.add_argument("file", help="local path or storage URI of the YAML")
    validate.add_argument("--kind", choices=["job", "train"], default=None,
                          help="job (score/nightly) or train; default: train when the file has a data/cnn/sequence section")
    _recipe_args(validate, what="the recipe a train config overlays")
    _storage_args(validate)
    return parser


def _config(args: argparse.Namespace) -> int:
    # Lazy: config files are read through io.storage (pyarrow, ~0.2 s): `ichd-ray --help` stays fast (start-up).
    from ichd_ray.io.config_files import load_job_config, load_train_config, read_yaml_sections

    if args.config_command != "validate":
        print(json.dumps(json_schema(), indent=2) if args.schema else markdown_reference())
        return 0
    try:
        kind = args.kind or ("train" if {"data", "cnn", "sequence"} & set(read_yaml_sections(args.file)) else "job")
        cfg = load_train_config(_recipe_name(args), args.file) if kind == "train" else load_job_config(args.file)
    except ConfigError as exc:
        print(f"ichd-ray config validate: {args.file}: {exc}", file=sys.stderr)
        return 2
    print(f"# {args.file}: a valid {kind} config (sha256 {cfg.sha256()}); resolved:")
    print(json.dumps(cfg.to_dict(), indent=2))
    return 0


def _recipes(args: argparse.Namespace) -> int:
    words = args.words
    if not words:  # one line each, like `tune ls`
        width = max(map(len, recipe_names()))
        for name in recipe_names():
            aliases = [a for a, b in RECIPE_ALIASES.items() if b == name]
            also = f" (alias: {', '.join(aliases)})" if aliases else ""
            print(f"{name:<{width}}  {load_recipe(name).description}{also}")
        return 0
    if len(words) == 1 or (len(words) == 3 and words[0] == "cp"):
        name = words[0] if len(words) == 1 else words[1]
        try:
            recipe = load_recipe(name)
            text = resolved_yaml(recipe, train_config(name).to_dict())
        except ConfigError as exc:
            print(f"ichd-ray recipes: {exc}", file=sys.stderr)
            return 2
        if len(words) == 1:
            print(text, end="")
            return 0
        try:  # "x": never replace a file someone may have edited
            with open(words[2], "x", encoding="utf-8") as f:
                f.write(text)
        except FileExistsError:
            print(f"ichd-ray recipes cp: {words[2]} exists; not replacing it", file=sys.stderr)
            return 2
        print(f"wrote recipe {recipe.name} resolved to {words[2]}; train with: ichd-ray train all --config {words[2]} ...")
        return 0
    print("usage: ichd-ray recipes [NAME | cp NAME FILE]", file=sys.stderr)
    return 2


#: Exit code when storage failed (unavailable past its retries, access denied, disk full): the run
#: committed nothing, and re-running the same command once storage is healthy completes it.
EXIT_STORAGE = 3


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ichd_ray.io.storage import StorageUnavailable  # here, not at the top: --help stays fast

    from ichd_ray.pipeline.index import EmptyInput

    try:
        return args.func(args)
    except BrokenPipeError:  # `ichd-ray config --schema | head`: the reader left; not a storage fault
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's documented recipe
        return 1
    except EmptyInput as exc:  # a mistyped prefix: an input error, not a storage fault
        print(f"ichd-ray {args.command}: {exc}; nothing was written", file=sys.stderr)
        return 2
    except (StorageUnavailable, OSError) as exc:
        # one line naming what failed (a URI, never a credential) instead of a Ray traceback
        detail = f"{exc.strerror}" if isinstance(exc, OSError) and exc.strerror else str(exc)
        where = f" ({exc.filename})" if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in detail else ""
        committed = "; nothing was committed" if args.command in ("score", "nightly") else ""
        print(f"ichd-ray {args.command}: storage failed: {detail}{where}{committed} (exit {EXIT_STORAGE}): "
              "fix the storage and run the same command again", file=sys.stderr)
        return EXIT_STORAGE


def _synth(args: argparse.Namespace) -> int:
    from ichd_ray.synthetic.generate import SynthConfig, generate

    if args.size < 32 or args.slices < 3:
        print("ichd-ray synth: --size must be >= 32 and --slices >= 3", file=sys.stderr)
        return 2
    cfg = SynthConfig(studies=args.studies, slices=args.slices, size=args.size, seed=args.seed,
                      compressed_fraction=args.compressed_fraction, bad_files=args.bad_files)
    summary = generate(args.out, cfg, workers=args.workers, storage_config=_storage_config(args))
    summary.pop("config")
    print(json.dumps(summary, indent=2))
    return 0


def _model_init(args: argparse.Namespace) -> int:
    from ichd_ray.models.bundle import init_bundle

    config = init_bundle(args.out, args.backbone, folds=args.folds, input_size=args.input_size,
                         weights_path=args.weights, seed=args.seed, storage_config=_storage_config(args))
    print(f"wrote bundle {args.out}: version {config.version_id}, backbone {config.backbone}, {config.folds} fold(s)")
    return 0


def _results(args: argparse.Namespace) -> int:
    import pandas as pd

    from ichd_ray.io.results import query

    with pd.option_context("display.max_rows", 200, "display.width", 200, "display.max_columns", 30):
        print(query(args.out, args.sql, _storage_config(args)).to_string(index=False))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from ichd_ray.demo import run_demo

    summary = run_demo(DemoConfig(out=args.out, studies=args.studies, slices=args.slices, dicom_size=args.dicom_size,
                                  config=args.config, seed=args.seed, workers=args.workers))
    return 0 if summary.status == "succeeded" else 1


def _train(args: argparse.Namespace) -> int:
    # Lazy: config files are read through io.storage (pyarrow, ~0.2 s): `ichd-ray --help` stays fast (start-up).
    from ichd_ray.io.config_files import load_train_config, storage_config

    overrides = {
        "storage": {"endpoint_url": args.endpoint_url, "region": args.region},
        "data": {"folds": args.folds},
        "cnn": {"epochs": args.epochs},
    }
    try:  # the whole config is validated before Ray starts
        recipe = _recipe_name(args)
        cfg = load_train_config(recipe, args.config, overrides)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"ichd-ray train {args.train_command}: {exc}", file=sys.stderr)
        return 2

    from ichd_ray.models.bundle import BundleError
    from ichd_ray.pipeline.ray_session import init_ray
    from ichd_ray.training.recipe import default_work_uri, train_all, train_cnn_stage, train_sequence_stage

    sc = storage_config(cfg.storage)
    source = {**load_recipe(recipe).provenance(), "config_file": args.config}  # into the bundle, beside the resolved config
    out = getattr(args, "out", None)
    work = args.work or default_work_uri(out)
    if out and not args.overwrite:
        from ichd_ray.io import storage
        from ichd_ray.models.bundle import CONFIG_NAME

        if storage.exists(storage.join(out, CONFIG_NAME), sc):
            print(f"ichd-ray train: a bundle already exists at {out} (pass --overwrite to replace it)", file=sys.stderr)
            return 2
    init_ray(cfg.ray)
    _quiet_ray(args.no_progress)
    try:
        if args.train_command == "cnn":
            result = train_cnn_stage(args.data, args.labels, work, cfg, storage_config=sc)
            print(f"CNN stage done in {result['seconds']:.0f} s: weights in {work}/cnn/; next: ichd-ray train sequence --work {work} --out BUNDLE")
            return 0
        if args.train_command == "sequence":
            result = train_sequence_stage(work, out, cfg, storage_config=sc, progress=not args.no_progress,
                                          overwrite=args.overwrite, provenance={"recipe": source})
        else:
            result = train_all(args.data, args.labels, out, cfg, work_uri=work, storage_config=sc, recipe=source,
                               progress=not args.no_progress, overwrite=args.overwrite)
    except (ConfigError, BundleError, ValueError, FileNotFoundError) as exc:
        print(f"ichd-ray train {args.train_command}: {exc}", file=sys.stderr)
        return 2
    print()
    print(result.table)
    print(f"\nbundle {result.bundle_uri}: version {result.version_id} ({result.seconds:.0f} s)")
    print(f"score with: ichd-ray score INPUT --model {result.bundle_uri} --out OUT")
    return 0


def _nightly(args: argparse.Namespace) -> int:
    # Lazy: config files are read through io.storage (pyarrow, ~0.2 s): `ichd-ray --help` stays fast (start-up).
    from ichd_ray.io.config_files import load_job_config

    import datetime as dt
    import math


    if not (math.isfinite(args.lease_ttl) and args.lease_ttl >= 1):
        print(f"ichd-ray nightly: --lease-ttl must be a number of seconds >= 1, got {args.lease_ttl}", file=sys.stderr)
        return 2

    try:
        job = load_job_config(args.config, {"storage": {"endpoint_url": args.endpoint_url, "region": args.region}})
    except (ConfigError, FileNotFoundError) as exc:
        print(f"ichd-ray nightly: {exc}", file=sys.stderr)
        return 2
    from ichd_ray.io.inventory import InventoryError  # lazy, as the imports below (start-up)
    from ichd_ray.io.lease import LeaseHeld
    from ichd_ray.models.bundle import BundleError
    from ichd_ray.pipeline.nightly import EXIT_LEASE_HELD, format_plan, nightly
    from ichd_ray.pipeline.ray_session import init_ray
    from ichd_ray.io.results import format_summary

    init_ray(job.ray)
    _quiet_ray(args.no_progress)
    try:
        result = nightly(
            args.archive, args.model, args.out, job=job, run_id=args.run_id, full=args.full, dry_run=args.dry_run,
            max_reject_fraction=args.max_reject_fraction, lease_ttl=dt.timedelta(seconds=args.lease_ttl),
            progress=not args.no_progress, inventory_uri=args.inventory,
        )
    except LeaseHeld as exc:
        print(f"ichd-ray nightly: {exc}; another run is writing {args.out}: not starting (exit {EXIT_LEASE_HELD})", file=sys.stderr)
        return EXIT_LEASE_HELD
    except (ConfigError, BundleError, InventoryError) as exc:
        print(f"ichd-ray nightly: {exc}", file=sys.stderr)
        return 2
    print(format_plan(result.plan))
    if result.summary is None:
        print("dry run: nothing written")
        return 0
    print(format_summary(result.summary))
    if result.summary.status != "succeeded":
        print("run FAILED (committed with status failed); look at:", file=sys.stderr)
        for problem in result.summary.problems:
            print(f"  - {problem}", file=sys.stderr)
        print(f"  ichd-ray results {args.out} --sql \"SELECT stage, reason, count(*) AS n FROM errors WHERE run_id = "
              f"'{result.summary.run_id}' GROUP BY ALL ORDER BY n DESC\"", file=sys.stderr)
        return 1
    return 0


def _compact(args: argparse.Namespace) -> int:
    # Lazy, as for nightly (start-up: `ichd-ray --help` imports neither DuckDB nor pyarrow).
    from ichd_ray.io.config_files import load_job_config, storage_config  # lazy
    from ichd_ray.io.lease import LeaseHeld  # lazy
    from ichd_ray.pipeline.compact import compact_index  # lazy
    from ichd_ray.pipeline.nightly import EXIT_LEASE_HELD  # lazy
    import datetime as dt  # lazy
    import math  # lazy

    if not (math.isfinite(args.lease_ttl) and args.lease_ttl >= 1):
        print(f"ichd-ray compact: --lease-ttl must be a number of seconds >= 1, got {args.lease_ttl}", file=sys.stderr)
        return 2
    try:
        job = load_job_config(args.config, {"storage": {"endpoint_url": args.endpoint_url, "region": args.region}})
        done = compact_index(args.out, storage_config=storage_config(job.storage), lease_ttl=dt.timedelta(seconds=args.lease_ttl))
    except LeaseHeld as exc:
        print(f"ichd-ray compact: {exc}; another run is writing {args.out}: not starting (exit {EXIT_LEASE_HELD})", file=sys.stderr)
        return EXIT_LEASE_HELD
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"ichd-ray compact: {exc}", file=sys.stderr)
        return 2
    print(f"compaction {done.run_id}: {done.objects} objects, {done.studies} studies; dropped {done.tombstones} "
          f"tombstones; folded {done.runs_folded} runs; deleted {done.files_deleted} superseded files")
    return 0


def _quiet_ray(no_progress: bool) -> None:
    """Ray Data progress bars only when asked for; Ray Train's per-report INFO lines stay in its logs."""
    import logging

    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = not no_progress
    for name in ("ray.train", "ray.data", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _evaluate(args: argparse.Namespace) -> int:
    from ichd_ray.io import storage
    from ichd_ray.evaluation.evaluate import evaluate, format_table

    sc = _storage_config(args)
    try:  # a bad bundle is a BundleError, a ValueError
        result = evaluate(args.predictions, args.labels, None, run_id=args.run_id, model=args.model, storage_config=sc)
    except (FileNotFoundError, ValueError) as exc:
        print(f"ichd-ray evaluate: {exc}", file=sys.stderr)
        return 2
    out_json = args.json_out or storage.join(args.predictions, "evaluation", f"{result.get('run_id') or 'run'}.json")
    storage.write_bytes(out_json, (json.dumps(result, indent=1, allow_nan=False) + "\n").encode(), sc)
    print(format_table(result))
    print(f"\nmetrics JSON: {out_json}")
    return 0


def _index_or_score(args: argparse.Namespace) -> int:
    # Lazy: config files are read through io.storage (pyarrow, ~0.2 s): `ichd-ray --help` stays fast (start-up).
    from ichd_ray.io.config_files import load_job_config, storage_config

    storage_overrides = {"endpoint_url": args.endpoint_url, "region": args.region}
    score_overrides = {}
    if args.command == "score":
        score_overrides = {
            "write_embeddings": args.write_embeddings,
            "num_actors": args.num_actors,
            "num_gpus_per_actor": args.num_gpus_per_actor,
            "device": args.device,
        }
    try:  # validated before Ray starts
        job = load_job_config(args.config, {"storage": storage_overrides, "score": score_overrides})
    except (ConfigError, FileNotFoundError) as exc:
        print(f"ichd-ray {args.command}: {exc}", file=sys.stderr)
        return 2
    if args.command == "score" and not (args.input or args.manifest):
        print("ichd-ray score: give INPUT or --manifest", file=sys.stderr)
        return 2

    from ichd_ray.pipeline.ray_session import init_ray

    init_ray(job.ray)
    if args.command == "index":
        from ichd_ray.pipeline.index import build_manifest, write_manifest

        sc = storage_config(job.storage)
        manifest = build_manifest(args.input, job.index, sc)
        write_manifest(manifest, args.out, sc)
        counts = manifest["reason"].fillna("selected").value_counts().to_dict()
        studies = manifest.loc[manifest["selected"].astype(bool), "study_uid"].nunique()
        print(f"indexed {len(manifest)} objects, {studies} studies -> {args.out}")
        print("  " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        return 0

    from ichd_ray.io.results import format_summary
    from ichd_ray.pipeline.score import score_job

    from ichd_ray.models.bundle import BundleError

    try:
        summary = score_job(
            args.input,
            args.model,
            args.out,
            job=job,
            run_id=args.run_id,
            manifest_uri=args.manifest,
            progress=not args.no_progress,
        )
    except (ConfigError, BundleError) as exc:
        print(f"ichd-ray score: {exc}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0 if summary.status == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
