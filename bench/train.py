"""Training benchmark: out-of-fold metrics of `ichd-ray train all` on a synthetic set (issue 4's claim).

    python bench/train.py --studies 200 --config bench/train_200.yaml --write

Synthesises ``--studies`` studies with the generator's documented default difficulty (nothing retuned),
runs ``train all`` (recipe demo + ``--config``) on local Ray, and reports the out-of-fold weighted log
loss of the prior-only baseline, the CNN alone and CNN + sequence, the per-stage times and the CNN
training throughput. ``--write`` puts the figures into BENCHMARKS.md. An existing ``--root`` is reused
(synthesis and any finished training stage are skipped), so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=200)
    parser.add_argument("--slices", type=int, default=32)
    parser.add_argument("--dicom-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--config", default="bench/train_200.yaml")
    parser.add_argument("--root", default="/tmp/ichd-bench-train")
    parser.add_argument("--write", action="store_true", help="write the figures into BENCHMARKS.md")
    args = parser.parse_args()

    os.environ.setdefault("ICHD_PATIENT_SALT", "bench")
    import ray
    import ray.data

    from ichd_ray.synthetic.generate import SynthConfig, generate
    from ichd_ray.training.recipe import train_all
    from ichd_ray.io.config_files import load_train_config

    root = Path(args.root)
    data, model = root / "data", root / "model"
    if not (data / "labels.csv").exists():
        summary = generate(str(data), SynthConfig(studies=args.studies, slices=args.slices, size=args.dicom_size, seed=args.seed), workers=os.cpu_count() or 1)
        print(f"synthesised {summary['slices']} slices in {summary['seconds']} s", file=sys.stderr)
    cfg = load_train_config("demo", args.config)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    started = time.perf_counter()
    result = train_all(str(data), str(data / "labels.csv"), str(model), cfg, overwrite=True, log=lambda s: print(s, file=sys.stderr))
    seconds = time.perf_counter() - started
    print(result.table)

    training = json.loads((model / "config.json").read_text())["training"]
    metrics = training["metrics"]
    cnn_rates = [h[-1]["train_samples_per_s"] for h in training["cnn_history"]]
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, no GPU; {dt.date.today()}; Ray {ray.__version__}.",
        f"Command: `python bench/train.py --studies {args.studies} --config {args.config} --write` "
        f"({args.studies} synthetic studies x ~{args.slices} slices at {args.dicom_size}px, generator defaults, seed {args.seed}).",
        f"Config: recipe demo + `{args.config}`: {cfg.data.folds} folds by patient, {cfg.cnn.backbone} at {cfg.data.input_size}px, "
        f"{cfg.cnn.epochs} CNN epochs x {cfg.cnn.samples_per_study} samples per study, sequence {cfg.sequence.rnn} "
        f"{cfg.sequence.epochs} epochs on {cfg.sequence.window}-slice windows.",
        "",
        "Out of fold (every study predicted by the fold pair that never trained on it):",
        "",
        "```",
        result.table,
        "```",
        "",
        f"- CNN alone vs prior: {metrics['gains']['cnn_vs_prior']:+.1%} weighted log loss (goal <= -40%); "
        f"CNN + sequence vs CNN: {metrics['gains']['sequence_vs_cnn']:+.1%} (goal <= -10%); "
        f"CNN + sequence vs prior: {metrics['gains']['sequence_vs_prior']:+.1%} (goal <= -40%).",
        f"- Whole `train all`: {seconds / 60:.1f} min; CNN training {min(cnn_rates):.0f}-{max(cnn_rates):.0f} samples/s in the last epoch "
        f"(one Ray Train worker, 0.5 CPU + 2 torch threads, data tasks on the rest).",
        f"- Study-level thresholds chosen on the study head's OOF output: {json.dumps(metrics['thresholds'])}.",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        from benchmarks_md import write_section

        write_section("train", "Training: out-of-fold metrics (`bench/train.py`)", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
