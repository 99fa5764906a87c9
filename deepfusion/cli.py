"""The ``deepfusion`` command group: a thin shell over the Python API.

Heavy modules (numpy, librosa, torch) are imported inside the commands so that ``--help`` and
``--version`` answer at once. Every :class:`~deepfusion.errors.DeepFusionError` becomes one
line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

import click

from deepfusion import __version__
from deepfusion.config import (DEFAULT_FEATURES, DEFAULT_MODEL_DIR, PRETRAINED_VIEWS, FeatureConfig,
                               RuntimeConfig, TrainConfig)
from deepfusion.console import (CommandGroup, echo, found, say, say_repaired, stamp, torchrun_rank,
                                wrote)
from deepfusion.errors import ParameterError
from deepfusion.io.atomic import plural
from deepfusion.io.names import escape_bytes, shown
from deepfusion.options import (adapt_option, cache_dir_option, checkpoint_option, device_option,
                                extract_options, features_option, jobs_option, library_options,
                                model_options, overwrite_option, precision_option, quiet_option,
                                recipe_options, runtime_options, split_file_option, take,
                                timeout_option, train_features_option)


@click.group(cls=CommandGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="deepfusion")
def main() -> None:
    """deepfusion: multi-modal music-genre classification, from raw audio to a usable model."""


@main.command()
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path),
              default=Path("data/synth"), show_default=True, help="Folder to write (GTZAN layout).")
@click.option("--genres", type=click.IntRange(1), default=4, show_default=True,
              help="Number of genres.")
@click.option("--clips-per-genre", type=click.IntRange(1), default=10, show_default=True)
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), default=30.0,
              show_default=True, help="Seconds per clip.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--domain", type=click.Choice(["default", "shifted"]), default="default",
              show_default=True, help="Production: 'shifted' renders the same genres with "
                                      "another mix, EQ, tempo sub-range and timbres.")
@overwrite_option
def synth(out: Path, genres: int, clips_per_genre: int, duration: float, seed: int,
          domain: str, overwrite: bool) -> None:
    """Render a deterministic synthetic genre dataset (WAV, 22,050 Hz, mono)."""
    from deepfusion.synth import synthesize_dataset

    paths = synthesize_dataset(out, genres=genres, clips_per_genre=clips_per_genre,
                               duration=duration, seed=seed, domain=domain, overwrite=overwrite)
    echo(f"wrote {plural(len(paths), 'clip')} ({plural(genres, 'genre')} x {clips_per_genre}) "
         f"to {Path(out).absolute()}")


@main.command()
@extract_options
def extract(audio_dir: Path, out: Path | None, fmt: str, dtype: str, cache_dir: Path,
            manifest: Path | None,
            jobs: int | None, scheduler: str | None, quiet: bool, strict: bool, timeout: float,
            backend: str | None, device: str, overwrite: bool, no_metadata: bool,
            **kwargs: Any) -> None:
    """Compute the feature views of every clip (six hand-made ones and musicnn's), in
    parallel and cached.

    Writes OUT (a pickle: a list of dicts with 'features', 'label', 'path', ...; or a feature
    store folder) and extract_errors.csv beside it.
    """
    from deepfusion.extract import extract as run_extract

    config = take(FeatureConfig, kwargs)
    from click.core import ParameterSource

    from deepfusion.runtime.cluster import SCHEDULER_ENV, named_by

    # an address from the environment is named as the variable in messages, not as the flag
    given = click.get_current_context().get_parameter_source("scheduler")
    from deepfusion.extract import default_out

    before = stamp(out or default_out(fmt))
    with named_by(SCHEDULER_ENV if given is ParameterSource.ENVIRONMENT else "--scheduler"):
        result = run_extract(audio_dir, out=out, fmt=fmt, cache_dir=cache_dir,
                             jobs=jobs, config=config, manifest=manifest, quiet=quiet,
                             timeout=timeout or None, scheduler=scheduler or None, dtype=dtype,
                             backend=backend, device=device, overwrite=overwrite,
                             metadata=not no_metadata)
    for path, reason in result.errors:
        echo(f"skipped {shown(path)}: {shown(reason)}", err=True)
    genres = ", ".join(f"{k} {v}" for k, v in result.labels.items())
    if result.n_items == 0:     # nothing was written: no summary line that names the output
        echo(f"Error: none of the {plural(len(result.errors), 'file')} under {shown(audio_dir)} "
             f"could be used (reasons above and in {result.errors_csv.name}); nothing written",
             err=True)
        sys.exit(1)
    echo(f"{plural(result.n_items, 'clip')} ({result.computed} computed, {result.cached} from "
         f"cache) in {result.seconds:.1f} s")
    say_repaired(result.repaired)
    if result.metadata:
        echo(result.metadata)
    if genres:
        echo(f"genres: {genres}")
    if result.workers:
        echo("files per Dask worker: " + ", ".join(f"{w} {n}" for w, n in result.workers.items()))
    if result.duplicate_groups:
        n = sum(len(g) for g in result.duplicate_groups)
        groups = len(result.duplicate_groups)
        echo(f"{groups} group{'s' if groups > 1 else ''} of identical audio ({n} clips); "
                   "splits keep each group together:")
        for group in result.duplicate_groups:
            echo("  " + " = ".join(map(shown, group)))
    if result.errors:
        echo(f"{plural(len(result.errors), 'file')} skipped; reasons in extract_errors.csv",
             err=True)
    if before is not None and stamp(result.out) == before:
        echo(f"{result.out.absolute()} is up to date: nothing written")
    else:
        wrote([result.out, result.errors_csv])
    if result.computed:
        echo(f"cache {cache_dir.absolute()}: {plural(result.computed, 'new entry', 'new entries')}")
    if strict and result.errors:
        sys.exit(1)


@main.command()
@train_features_option
@click.option("--model-dir", type=click.Path(file_okay=False, path_type=Path),
              default=DEFAULT_MODEL_DIR, show_default=True, help="Where checkpoints and logs go.")
@recipe_options
@split_file_option
@model_options
@click.option("--pretrained/--no-pretrained", default=None,
              help="ResNets from ImageNet weights. Default (auto): from --weights-path, the torch "
              "cache, or torchvision's download; from scratch, said in one line, when they cannot "
              "be had. --pretrained insists (error without them); --no-pretrained never loads them.")
@click.option("--weights-path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="File with the torchvision ImageNet weights of the chosen ResNet.")
@device_option
@runtime_options
@click.option("--folds", type=click.IntRange(2), default=None,
              help="K-fold grouped, stratified cross-validation into MODEL_DIR/fold-1..K; writes "
              "cross_validation.csv and cross_validation_predictions.csv.")
@click.option("--resume", is_flag=True, help="Continue the run in --model-dir from last.pth: "
              "its recipe, with this call's --device, --amp, --channels-last and --num-workers.")
@click.option("--overwrite", is_flag=True, help="Replace the run --model-dir holds (its "
              "checkpoints, logs and reports are removed first); without it a used folder is "
              "refused.")
@quiet_option
def train(features: Path, model_dir: Path, pretrained: bool | None, weights_path: Path | None,
          folds: int | None, resume: bool, overwrite: bool, quiet: bool, **kwargs: Any) -> None:
    """Train the multi-modal network; writes best.pth, last.pth, training_history.csv/png."""
    config, runtime = take(TrainConfig, kwargs), take(RuntimeConfig, kwargs)
    common = dict(model_dir=model_dir, config=config, runtime=runtime,
                  backbone=kwargs.pop("backbone"), share_backbone=kwargs.pop("share_backbone"),
                  pretrained=pretrained, weights_path=weights_path, resume=resume,
                  overwrite=overwrite, quiet=quiet,
                  echo=say, model_options={"band_stats": kwargs.pop("band_stats")})
    if folds and torchrun_rank() is not None:
        raise ParameterError("--folds trains its folds one after another in one process; run "
                             "it without torchrun")
    from deepfusion.io.features_file import preload

    features = found(features, DEFAULT_FEATURES.parent, "features file")
    common["feature_set"] = preload(features)   # a wrong file: one line before torch loads
    if folds:
        from deepfusion.train.crossval import cross_validate

        cv = cross_validate(features, folds=folds, **common)
        echo(cv.table())
        wrote(cv.files)
        return
    from deepfusion.train.run import train as run_train

    result = run_train(features, **common)
    echo(f"best.pth: epoch {result.best_epoch} (validation clip accuracy "
         f"{result.best_val_acc:.3f}); {plural(result.epochs_run, 'epoch')} in "
         f"{result.seconds:.0f} s")
    from deepfusion.io.run_folder import TRAIN_FILES

    wrote(p for p in (Path(model_dir) / name for name in TRAIN_FILES) if p.exists())


@main.command()
@checkpoint_option
@features_option(default=None, help_default="the one the checkpoint was trained on")
@click.option("--split", type=click.Choice(["test", "val", "train", "all"]), default="test",
              show_default=True, help="Which clips: a split of the checkpoint (or --split-file), or all.")
@split_file_option
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where the report files go [default: beside the checkpoint].")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@device_option
@precision_option
@adapt_option()
@overwrite_option
def evaluate(checkpoint: Path, features: Path | None, split: str, split_file: str | None,
             out_dir: Path | None, batch_size: int, device: str, precision: str,
             adapt: str, overwrite: bool) -> None:
    """Report what a checkpoint does on held-out clips (table, CSVs, JSON, figures)."""
    from deepfusion.evaluate import evaluate as run_evaluate
    from deepfusion.io.run_folder import REPORT_FILES

    checkpoint = found(checkpoint, DEFAULT_MODEL_DIR, "checkpoint")
    features = features and found(features, DEFAULT_FEATURES.parent, "features file")
    report = run_evaluate(checkpoint, features=features, split=split, split_file=split_file,
                          out_dir=out_dir, batch_size=batch_size, device=device,
                          precision=precision, adapt=adapt, overwrite=overwrite, echo=echo,
                          warn=lambda line: echo(line, err=True))
    echo(report.table())
    for caution in report.cautions:
        echo(f"warning: {caution}", err=True)
    echo()
    wrote(Path(report.out_dir) / name for name in REPORT_FILES)


def _library(inputs, checkpoints, engine, cache_dir, device, precision, adapt,
             destinations=(), overwrite=False):
    from deepfusion.inference.library import Library

    checkpoints = [found(c, DEFAULT_MODEL_DIR, "checkpoint") for c in checkpoints]
    return Library(inputs, checkpoints=checkpoints, engine=engine, device=device,
                   cache_dir=cache_dir, destinations=destinations, overwrite=overwrite,
                   precision=precision, adapt=adapt)


@main.command()
@library_options
@adapt_option()
@click.option("--top-k", type=click.IntRange(1), default=3, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per file.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write a CSV: path, top-1 genre and probability, one probability column per "
              "genre, error (written when the run ends; per-file lines are then not printed).")
@overwrite_option
def predict(inputs: tuple[Path, ...], checkpoints: tuple[Path, ...], engine: str,
            cache_dir: Path, jobs: int | None, timeout: float, quiet: bool, device: str,
            precision: str, adapt: str, top_k: int, as_json: bool, out: Path | None,
            overwrite: bool) -> None:
    """Top genres of audio files (or every audio file under a folder), through the feature
    cache; several --checkpoint are averaged."""
    import json
    import time

    from deepfusion.inference.library import Prediction
    from deepfusion.predict import PredictionsCSV

    t0 = time.perf_counter()
    from deepfusion.io.guard import Destination

    library = _library(inputs, checkpoints, engine, cache_dir, device, precision, adapt,
                       [Destination(out, "--out", "predictions")] if out else (), overwrite)
    done = failed = computed = 0
    with contextlib.ExitStack() as stack:
        table = stack.enter_context(PredictionsCSV(out, library.class_names)) if out else None
        for result in library.run(jobs=jobs, timeout=timeout or None, quiet=quiet):
            if table is not None:
                table.add(result)
            if not isinstance(result, Prediction):
                failed += 1
                echo(f"skipped {shown(result[0])}: {shown(result[1])}", err=True)
                continue
            done += 1
            computed += result.computed > 0
            result.top = result.top[:top_k]
            if out is not None and not as_json:
                continue
            if as_json:
                line = json.dumps(result.to_dict(), ensure_ascii=False)
                if escape_bytes(line) != line:   # a name that is not UTF-8: JSON's \udcNN escapes
                    line = json.dumps(result.to_dict())   # keep it exact (json.loads, os.fsencode)
                echo(line)
            else:
                top = ", ".join(f"{g} {p:.3f}" for g, p in result.top)
                echo(f"{shown(result.path)}: {top}")
    say_repaired(library.repaired)
    if out is not None:
        echo(f"{plural(done, 'file')} classified ({computed} analysed, {done - computed} from the "
             f"cache), {failed} skipped in {time.perf_counter() - t0:.1f} s", err=as_json)
        wrote([out], err=as_json)
    if done == 0:
        echo(f"Error: none of the {plural(failed, 'file')} could be classified (reasons above)",
             err=True)
        sys.exit(1)


@main.command()
@library_options
# embeddings kept for an index must not move with the files embedded beside them
@adapt_option("none")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("embeddings.npz"),
              show_default=True, help="The .npz to write: paths, embeddings (n, d), attention "
              "(n, views), genres (top-1), probabilities, class_names, modalities.")
@overwrite_option
def embed(inputs: tuple[Path, ...], checkpoints: tuple[Path, ...], engine: str, cache_dir: Path,
          jobs: int | None, timeout: float, quiet: bool, device: str, precision: str,
          adapt: str, out: Path, overwrite: bool) -> None:
    """Clip embeddings (the classifier's input) and modality attention of audio files, for
    similarity search and clustering."""
    import time

    from deepfusion.embed import collect

    if len(checkpoints) != 1:
        raise ParameterError(f"--checkpoint given {len(checkpoints)} times: embed takes one (an "
                             "ensemble has no single embedding); give one --checkpoint")
    t0 = time.perf_counter()
    from deepfusion.io.guard import Destination

    library = _library(inputs, checkpoints, engine, cache_dir, device, precision, adapt,
                       [Destination(out, "--out", "embeddings")], overwrite)
    result = collect(library.run(jobs=jobs, timeout=timeout or None, quiet=quiet),
                     library.class_names, library.engines[0].embedding_dim)
    for path, reason in result.errors:
        echo(f"skipped {shown(path)}: {shown(reason)}", err=True)
    say_repaired(library.repaired)
    if len(result.paths) == 0:
        echo(f"Error: none of the {plural(len(result.errors), 'file')} could be embedded "
             "(reasons above)", err=True)
        sys.exit(1)
    result.save(out)
    echo(f"{plural(len(result.paths), 'file')} embedded ({result.embeddings.shape[1]} dimensions), "
         f"{len(result.errors)} skipped in {time.perf_counter() - t0:.1f} s")
    wrote([out])


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--model", type=click.Choice(PRETRAINED_VIEWS), default=PRETRAINED_VIEWS[0],
              show_default=True, help="musicnn trained on the Million Song Dataset (MSD) or on "
              "MagnaTagATune (MTT): each has its own 50 tags.")
@click.option("--top-k", type=click.IntRange(1), default=5, show_default=True,
              help="Tags printed per file (--json writes all).")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object per file: path, model and tags (every tag -> likelihood).")
@cache_dir_option
@jobs_option
@timeout_option
@quiet_option
def tag(inputs: tuple[Path, ...], model: str, top_k: int, as_json: bool, cache_dir: Path,
        jobs: int | None, timeout: float, quiet: bool) -> None:
    """musicnn's tag likelihoods of audio files (or every audio file under a folder), averaged
    over each file's 3-s patches, through the feature cache."""
    import json

    from deepfusion.tag import Tagger, Tags

    tagger = Tagger(inputs, model=model, cache_dir=cache_dir)
    done = failed = 0
    for result in tagger.run(jobs=jobs, timeout=timeout or None, quiet=quiet):
        if not isinstance(result, Tags):
            failed += 1
            echo(f"skipped {shown(result[0])}: {shown(result[1])}", err=True)
            continue
        done += 1
        if as_json:
            line = json.dumps(result.to_dict(), ensure_ascii=False)
            if escape_bytes(line) != line:     # a name that is not UTF-8: keep it exact
                line = json.dumps(result.to_dict())
            echo(line)
        else:
            echo(f"{shown(result.path)}: " + ", ".join(f"{t} {p:.3f}" for t, p in result.top[:top_k]))
    say_repaired(tagger.repaired)
    if done == 0:
        echo(f"Error: none of the {plural(failed, 'file')} could be tagged (reasons above)",
             err=True)
        sys.exit(1)


@main.command()
@checkpoint_option
@click.option("--format", "fmt", type=click.Choice(["onnx"]), default="onnx", show_default=True,
              help="Export format.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("model.onnx"),
              show_default=True, help="The file to write (only when the check passes).")
@click.option("--tolerance", type=click.FloatRange(min=0, min_open=True), default=1e-4,
              show_default=True, help="Largest probability (and attention) difference from torch "
              "allowed on the check windows.")
@click.option("--exporter", type=click.Choice(["auto", "dynamo", "torchscript"]), default="auto",
              show_default=True, help="torch's ONNX exporter: auto tries dynamo, then TorchScript.")
@click.option("--opset", type=click.IntRange(7), default=None, help="ONNX opset [default: the exporter's].")
@overwrite_option
def export(checkpoint: Path, fmt: str, out: Path, tolerance: float, exporter: str,
           opset: int | None, overwrite: bool) -> None:
    """Export a checkpoint for onnxruntime: the feature views of a batch of segments in,
    logits, attention and embedding out; checked against torch on real windows first."""
    from deepfusion.export import export_onnx

    checkpoint = found(checkpoint, DEFAULT_MODEL_DIR, "checkpoint")
    export_onnx(checkpoint, out, tolerance=tolerance, exporter=exporter, opset=opset,
                overwrite=overwrite, echo=echo)
    wrote([out])
