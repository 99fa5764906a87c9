"""The train stage: features file to a self-contained best checkpoint, logs and curves.

The loop reads top to bottom: load and check the features, split (groups kept together), fit
normalisation on the training clips, build the model, then per epoch :func:`train_one_epoch`,
:func:`~deepfusion.inference.clips.predict_clips` on the validation clips, checkpoints, CSV, plot.
``last.pth`` makes ``resume`` continue where a run stopped; the crops, shuffles and dropout of
epoch *e* are seeded by (seed, e), so a resumed CPU run repeats the uninterrupted one. Under
``torchrun`` the loop runs in every process with DistributedDataParallel (rank 0 writes).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from deepfusion.backbones import default_backbone
from deepfusion.config import (ARCHITECTURE_FIELDS, AUTO_FIELDS, ModelConfig, RuntimeConfig,
                               TrainConfig)
from deepfusion.data.dataset import (Augment, feature_config_of, make_train_loader, segment_frames,
                                     segments_per_clip)
from deepfusion.data.normalize import fit_normalization
from deepfusion.data.splits import choose_split, split_summary, ungrouped_warning
from deepfusion.errors import CheckpointError, DeepFusionError, ParameterError
from deepfusion.inference.clips import clip_loss, predict_clips
from deepfusion.io.atomic import remove_stale_temps
from deepfusion.io.features_file import FeatureSet, load_features
from deepfusion.io.guard import check_destinations, check_free_space, same_file
from deepfusion.io.run_folder import claim_run_folder, destinations as run_destinations
from deepfusion.models.checkpoint import expected_sizes, load_checkpoint, save_checkpoint
from deepfusion.models.net import build_model, check_input_size, count_parameters
from deepfusion.models.weights import pretrained_mode, resolve_pretrained
from deepfusion.progress import duration_text, epoch_legend, epoch_seconds, plan_line, progress_bar
from deepfusion.runtime import ddp
from deepfusion.runtime.device import (backend_settings, default_num_workers, precision_for,
                                       requested_precision, restore_scaler)
from deepfusion.runtime.memory import memory_check, memory_guard
from deepfusion.runtime.seed import rng_state, seed_everything, seed_torch, set_rng_state
from deepfusion.train import finetune
from deepfusion.train.loop import all_finite, lr_factor, step_seconds, train_one_epoch
from deepfusion.train.probe_run import train_probe
from deepfusion.train.recipe import resolve_recipe, resume_model, resume_recipe
from deepfusion.train.result import TrainResult, base_payload
from deepfusion.train.run_writer import RunWriter, write_log
from deepfusion.views import AUX_KEYS, PRETRAINED_KEY


def train(features: Path, *, model_dir: Path = Path("models"), config: TrainConfig = TrainConfig(),
          runtime: RuntimeConfig = RuntimeConfig(), backbone: Optional[str] = None, share_backbone: bool = False, pretrained: Any = "auto",
          weights_path: Optional[Path] = None, resume: bool = False, overwrite: bool = False,
          quiet: bool = False,
          echo: Callable[[str], None] = print, split: Optional[np.ndarray] = None,
          feature_set: Optional[FeatureSet] = None,
          model_options: Optional[dict[str, Any]] = None) -> TrainResult:
    """Train the multi-modal network (or the linear probe) on a features file.

    Writes into ``model_dir``: ``best.pth`` (self-contained; chosen by ``config.select``),
    ``last.pth`` (every epoch; with optimizer, scheduler, scaler, EMA and RNG states for
    ``resume``), ``training_history.csv`` and ``training_history.png``.

    ``config``'s "auto" fields (None) are filled per backbone (:func:`resolve_recipe`).
    ``runtime`` says where the run executes (device, mixed precision, workers); with
    ``resume`` the recipe is the stored run's and the runtime this call's.
    ``pretrained``: "auto" (ImageNet weights from ``weights_path``, the torch cache or a
    download; from scratch with one line when they cannot be had), "require"/True (stop when
    they cannot be had) or "never"/False. ``split`` (an array of 'train'/'val'/'test'/'' per
    clip) and ``feature_set`` (the loaded ``features``) serve cross-validation;
    ``model_options`` are further :class:`ModelConfig` fields (``band_stats``).

    One run per folder: a second writer is refused while this one runs, and a folder that
    holds a run needs ``resume`` (continue it) or ``overwrite`` (replace it).

    Under ``torchrun`` (:mod:`deepfusion.runtime.ddp`) each process trains its share of every epoch
    with DistributedDataParallel, ``config.batch_size`` segments per process and step; rank 0
    alone holds the folder, reads and writes its files and prints. All return the same result.

    Raises
    ------
    FeaturesFileError, DatasetError, ParameterError, WeightsNotFoundError, CheckpointError
        Before any training: bad features, impossible split, bad options, missing pretrained
        weights (when required), nothing to resume.
    OutputError
        ``model_dir`` cannot be written, is in use, or holds a run not resumed or overwritten.
    """
    inputs = {Path(p): what for p, what in ((weights_path, "--weights-path"),
                                             (config.split_file, "the --split-file"),
                                             (config.init_from, "the --init-from checkpoint"),
                                             (features, "the features file")) if p}
    model_dir = Path(model_dir)
    with ddp.process_group(runtime.device) as group, contextlib.ExitStack() as folder:
        if group is not None and not group.main:
            echo, quiet = (lambda line: None), True

        def claim() -> None:    # rank 0's: the other ranks never touch the folder
            if group is not None and config.model == "probe":
                raise ParameterError("the linear probe is fitted in one step by one process; "
                                     "run --model probe without torchrun")
            # a file of another kind where the run writes is refused (--overwrite replaces
            # it); an --init-from source in the folder was read whole before (below)
            check_destinations(run_destinations(model_dir), inputs, overwrite=overwrite or resume,
                               loaded_first=[Path(config.init_from)] if source is not None else (),
                               option="--model-dir")
            folder.enter_context(claim_run_folder(model_dir, resume=resume, overwrite=overwrite))
            if resume and not (model_dir / "last.pth").is_file():
                raise CheckpointError(f"{model_dir}: nothing to resume (no last.pth there); drop "
                                      "--resume to start a new run")
            remove_stale_temps(model_dir)  # leftovers of a run killed while writing
        device = ddp.device(runtime.device)     # a device this machine lacks: one line, now
        precision_for(device, requested_precision(runtime.amp, runtime.amp_dtype))   # as a precision
        # an --init-from source among the files this run replaces (train --overwrite
        # --init-from M/best.pth --model-dir M) is read whole before the folder is touched
        source = None
        if config.init_from and not resume and any(
                same_file(Path(config.init_from), d.path) for d in run_destinations(model_dir)):
            source = ddp.on_main(load_checkpoint, Path(config.init_from))
        ddp.on_main(claim)
        folder.enter_context(backend_settings(device, deterministic=runtime.deterministic))
        folder.enter_context(memory_guard(device, batch_size=config.batch_size))   # one line
        return _train(features, model_dir=model_dir, config=config, runtime=runtime,
                      backbone=backbone, share_backbone=share_backbone, pretrained=pretrained,
                      weights_path=weights_path, resume=resume, quiet=quiet, echo=echo,
                      split=split, feature_set=feature_set, model_options=model_options,
                      source=source)


def _train(features: Path, *, model_dir: Path, config: TrainConfig, runtime: RuntimeConfig,
           backbone: Optional[str], share_backbone: bool, pretrained: Any,
           weights_path: Optional[Path], resume: bool, quiet: bool, echo: Callable[[str], None],
           split: Optional[np.ndarray], feature_set: Optional[FeatureSet],
           model_options: Optional[dict[str, Any]], source: Optional[dict] = None) -> TrainResult:
    """The run itself, in a folder :func:`train` holds (``source``: the ``--init-from``
    checkpoint when it was loaded before the folder was claimed)."""
    t_start = time.perf_counter()
    features, model_dir = Path(features), Path(model_dir)
    last_path, best_path = model_dir / "last.pth", model_dir / "best.pth"
    state = None
    mode = pretrained_mode(pretrained)
    if resume:   # last.pth is there (train checked): read by rank 0, handed to every process
        state = ddp.on_main(load_checkpoint, last_path, resume=True)
        config, notes = resume_recipe(state["train_config"], config, epochs_done=state["epoch"])
        backbone, share_backbone, model_options, more = resume_model(
            state["model_config"], backbone, model_options)
        notes += more
        for note in notes:
            echo(note)
    fs = feature_set if feature_set is not None else load_features(features)
    features_sha = fs.sha256
    if state is not None and state["features_sha256"] != features_sha:
        theirs = state.get("features_file") or "another features file"
        raise CheckpointError(f"{model_dir}: its run was trained on {theirs}, not {features}; "
                              f"give --features {theirs} to resume, or another --model-dir")
    feature_config = feature_config_of(fs)
    if not fs.has_pretrained:
        echo(f"warning: {features}: no pretrained view (extracted with --pretrained-view none or "
             "by an older deepfusion): training on the six hand-made views; extract again to add "
             "it (it helps on music from other sources)")
    loaded, source = source, None   # fine-tuning: the model this run starts from (a
    #                                 resumed run has its own)
    if config.init_from and state is None:
        source = finetune.load_source(Path(config.init_from), feature_config, loaded)
        mc = finetune.model_config_from(source, n_classes=len(fs.class_names), backbone=backbone,
                                        share_backbone=share_backbone,
                                        model_options=model_options, echo=echo)
        backbone, share_backbone = mc.backbone, mc.share_backbone
        model_options = {k: getattr(mc, k) for k in ARCHITECTURE_FIELDS}
    device = ddp.device(runtime.device)
    backbone_by = "given" if backbone else f"auto for {device.type}"
    backbone = backbone or default_backbone(device.type)

    ungrouped = ungrouped_warning(fs) if split is None and not config.split_file else None
    split = choose_split(fs, features, config, split)
    train_idx, val_idx, test_idx = (np.flatnonzero(split == s) for s in ("train", "val", "test"))

    if config.model == "probe":
        if resume:
            raise CheckpointError(f"{last_path}: a linear probe is fitted in one step; there is "
                                  "nothing to resume")
        return train_probe(fs, features, split, (train_idx, val_idx, test_idx), config=config,
                            feature_config=feature_config, model_dir=model_dir, echo=echo,
                            t_start=t_start, ungrouped=ungrouped)

    seg = segment_frames(config.segment_seconds, feature_config, fs.n_frames)
    check_input_size(backbone, n_mels=fs.rows()["mel_spec_orig"], frames=seg, clip_frames=fs.n_frames,
                     batch=min(resolve_recipe(config, backbone, False).batch_size,
                               -(-len(train_idx) // ddp.world_size())),
                     frame_seconds=feature_config.hop_length / feature_config.sample_rate)
    # ImageNet weights: a resumed run takes its weights from last.pth instead
    if state or source:
        backbone_by = "the run's" if state else f"from {config.init_from}"
        pre_state, pre_source = None, (state.get("pretrained_source", "not used") if state else
                                       f"fine-tuned from {config.init_from}")
    else:
        pre_state, pre_source = ddp.on_main(resolve_pretrained, backbone, mode=mode,
                                            weights_path=weights_path, echo=echo)
    was_pretrained = (state["model_config"]["pretrained"] if state else
                      source.model_config.pretrained if source else pre_state is not None)
    auto = [f for f in AUTO_FIELDS if getattr(config, f) is None]
    config = resolve_recipe(config, backbone, was_pretrained)

    norm = fit_normalization(fs, train_idx)
    model_config = ModelConfig(n_classes=len(fs.class_names), n_mels=fs.rows()["mel_spec_orig"],
                               aux_rows=tuple(fs.rows()[k] for k in AUX_KEYS), backbone=backbone,
                               share_backbone=share_backbone, pretrained=was_pretrained,
                               pretrained_view_rows=fs.rows().get(PRETRAINED_KEY, 0),
                               **(model_options or {}))
    seed_everything(config.seed)
    model = build_model(replace(model_config, pretrained=False), pretrained_state=pre_state)
    if source is not None:
        echo(finetune.initialise(model, source, list(fs.class_names), config.init_from))
    if config.freeze_branches:   # before DDP and the EMA copy see which weights train
        echo(f"--freeze-branches: {finetune.freeze_branches(model):,} branch parameters frozen")
    precision = precision_for(device, requested_precision(runtime.amp, runtime.amp_dtype))
    model.to(device)
    if runtime.channels_last and device.type != "mps":
        model.to(memory_format=torch.channels_last)
    ema = None
    if config.ema > 0:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema), use_buffers=True)
    scored = ema.module if ema is not None else model   # what is validated and saved
    net = ddp.wrap(model, sync_bn=runtime.sync_bn, echo=echo)   # what training steps go through

    augment = Augment(tilt_db=config.tilt_db, freq_mask=config.freq_mask, time_mask=config.time_mask)
    runtime = replace(runtime, num_workers=default_num_workers(   # what ran is recorded
        device.type, cpu_count=os.cpu_count(), processes=ddp.world_size(), given=runtime.num_workers))
    loader = make_train_loader(fs, norm, train_idx, seg=seg, batch_size=config.batch_size,
                               seed=config.seed, num_workers=runtime.num_workers,
                               pin_memory=device.type == "cuda", augment=augment,
                               rank=ddp.rank(), world_size=ddp.world_size())
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config, len(loader)))
    # fp16 needs loss scaling; bf16 has float32's range and does not
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)

    history: list[dict] = []
    start_epoch, best_score, best_epoch, bad_epochs = 1, -math.inf, 0, 0
    last_epoch = config.epochs
    if state is not None:
        model.load_state_dict(state["model_state_raw"] if "model_state_raw" in state else state["model_state"])
        if ema is not None and "ema_state" in state:
            ema.load_state_dict(state["ema_state"])
        optimizer.load_state_dict(state["optimizer_state"])
        scheduler.load_state_dict(state["scheduler_state"])
        restore_scaler(scaler, state["scaler_state"])   # empty from a bf16/fp32/CPU run
        set_rng_state(state["rng_state"], device)     # this run's device, not the stored run's
        history = list(state["history"])
        start_epoch = state["epoch"] + 1
        best_epoch, bad_epochs = state["best_epoch"], state["bad_epochs"]
        best_score = state.get("best_score", state.get("best_val_acc", -math.inf))
        echo(f"resuming after epoch {state['epoch']} (best.pth from epoch {best_epoch})")
        # a kill between last.pth and the history files leaves those an epoch behind
        ddp.on_main(write_log, model_dir, history)
        if bad_epochs >= config.patience:  # the run had stopped early: only the test is left
            last_epoch = state["epoch"]
            echo(f"the run stopped early at epoch {state['epoch']} ({bad_epochs} epochs without a "
                 f"better validation score); give a larger --patience to train on")
        elif start_epoch > last_epoch:
            echo(f"the run has its {config.epochs} epochs; give a larger --epochs to train on")

    if ddp.world_size() > 1:
        echo(ddp.describe(config.batch_size))
    echo(split_summary(fs, (train_idx, val_idx, test_idx)))
    warning = memory_check(model, device, backbone=backbone, precision=precision,
                           batch_size=config.batch_size, n_mels=model_config.n_mels, frames=seg)
    if warning:
        echo(warning)

    payload = base_payload(fs, features, split, norm, model_config=model_config,
                                 feature_config=feature_config, config=config, runtime=runtime,
                                 pretrained_source=pre_source)
    best_bytes, last_bytes = expected_sizes(scored, ema=ema is not None)
    ddp.on_main(check_free_space, model_dir, best_bytes + 2 * last_bytes + 2**23,
                "this run's checkpoints and logs", replaced=(best_path, last_path))

    to_go, per_epoch = last_epoch - start_epoch + 1, None
    if to_go > 0 and ddp.rank() == 0:   # what will run, and about how long it takes
        with memory_guard(device, batch_size=config.batch_size, frames=seg):
            step = step_seconds(model, loader, device=device, amp=precision, loss_fn=loss_fn)
        per_epoch = epoch_seconds(step, len(loader), len(val_idx) * segments_per_clip(
            fs.n_frames, seg), config.batch_size)
        echo(plan_line(f"{backbone}{' (shared)' if share_backbone else ''} ({backbone_by}"
                       f"{', ImageNet weights' if was_pretrained else ''})", config, auto=auto,
                       parameters=count_parameters(model), where=f"{device}, {precision}",
                       batches=len(loader), epochs=(start_epoch, last_epoch),
                       segment_seconds=seg * feature_config.hop_length / feature_config.sample_rate,
                       step=step, total=per_epoch * to_go))
        fast = default_backbone("cpu")
        if device.type == "cpu" and backbone != fast and per_epoch * to_go > 1800:
            echo(f"{backbone} on a CPU: about {duration_text(per_epoch * to_go)}; --backbone "
                 f"{fast} trains far faster")

    epoch = start_epoch - 1
    if ungrouped:               # said once every check has passed, before the work
        echo(ungrouped)
    if start_epoch <= last_epoch:
        echo(epoch_legend(config.select, runtime.save_every))
    writer, took = RunWriter(model_dir, runtime.save_every), []
    try:
        for epoch in range(start_epoch, last_epoch + 1):
            t0 = time.perf_counter()
            # every random draw of epoch e depends on (seed, e, rank) alone: resume repeats it
            seed_torch(config.seed * 1_000_003 + epoch + 7_919 * ddp.rank(), device)
            loader.sampler.set_epoch(epoch)
            left = f", about {duration_text(per_epoch * (last_epoch - epoch + 1))} to go" \
                if per_epoch else ""
            with progress_bar(len(loader), desc=f"epoch {epoch}/{config.epochs}{left}",
                              unit="batch", quiet=quiet, leave=False) as bar, \
                    memory_guard(device, batch_size=config.batch_size, frames=seg):
                train_loss, train_acc = train_one_epoch(
                    net, loader, optimizer, scheduler, scaler, loss_fn, device=device,
                    amp=precision, progress=bar, mixup=config.mixup, ema=ema)
            train_loss, train_acc = ddp.mean(train_loss, train_acc)   # over every process
            if not all_finite(net, scored):   # never a checkpoint of NaN weights
                raise DeepFusionError(
                    f"training diverged at epoch {epoch} (the weights became NaN or infinite); "
                    "give a lower --lr" + (", a longer --segment-seconds, or --no-amp"
                                           if precision not in (False, "fp32", None)
                                           else " or a longer --segment-seconds"))
            ddp.sync_buffers(scored)
            # validation and test in float32: the numbers evaluate reproduces on any machine
            val = predict_clips(scored, fs, norm, val_idx, seg=seg, batch_size=config.batch_size,
                                device=device, amp=False, shard=True)
            val_acc = float((val.predicted == fs.labels[val_idx]).mean())
            row = {"epoch": epoch, "train_loss": round(train_loss, 6),
                   "train_acc": round(train_acc, 6),
                   "val_loss": round(clip_loss(val, fs.labels), 6), "val_acc": round(val_acc, 6),
                   "lr": optimizer.param_groups[0]["lr"],
                   "seconds": round(time.perf_counter() - t0, 2),
                   "val_segment_acc": round(val.segment_correct / max(val.segment_total, 1), 6)}
            history.append(row)
            took.append(row["seconds"])
            per_epoch = sum(took) / len(took)
            # early stopping watches validation accuracy (select val_acc) or loss (otherwise)
            score = val_acc if config.select == "val_acc" else -row["val_loss"]
            improved = score > best_score
            if improved:
                best_score, bad_epochs = score, 0
            else:
                bad_epochs += 1
            saved = improved if config.select != "last" else True
            best_epoch = epoch if saved else best_epoch
            best = {**payload, "model_state": scored.state_dict(), "epoch": epoch,
                    "metrics": {"val": row}} if saved else None
            extra = {"ema_state": ema.state_dict(), "model_state_raw": model.state_dict()} \
                if ema else {}
            last = {
                **payload, "model_state": scored.state_dict(), "epoch": epoch,
                "optimizer_state": optimizer.state_dict(),
                "scheduler_state": scheduler.state_dict(), "scaler_state": scaler.state_dict(),
                "rng_state": rng_state(device), "history": history, "best_score": best_score,
                "best_epoch": best_epoch, "bad_epochs": bad_epochs, **extra}
            stop = bad_epochs >= config.patience
            ddp.on_main(writer.epoch_done, history, best=best, last=last,
                        final=stop or epoch == last_epoch)
            echo(f"epoch {epoch:3d}  train loss {train_loss:.4f} acc {train_acc:.3f}  "
                 f"val loss {row['val_loss']:.4f} acc {val_acc:.3f} "
                 f"(segments {row['val_segment_acc']:.3f})  {row['seconds']:.1f} s"
                 f"{'  *' if saved else ''}")
            if stop:
                what = "accuracy" if config.select == "val_acc" else "loss"
                echo(f"early stop: no better validation {what} for {config.patience} epochs")
                break
    except BaseException as exc:   # the finished epochs held in memory are written first
        if ddp.rank() == 0:
            writer.on_exit(exc, echo, history)
        raise

    best = ddp.on_main(load_checkpoint, best_path)
    best_row = best["metrics"]["val"]
    test_acc, test = None, None
    if len(test_idx):
        model.load_state_dict(best["model_state"])
        test = predict_clips(model, fs, norm, test_idx, seg=seg, batch_size=config.batch_size,
                             device=device, amp=False, shard=True)
        test_acc = float((test.predicted == fs.labels[test_idx]).mean())
        best["metrics"]["test"] = {"clip_acc": test_acc, "n_clips": int(len(test_idx)),
                                   "segment_acc": test.segment_correct / max(test.segment_total, 1),
                                   "precision": "fp32"}
        ddp.on_main(save_checkpoint, best_path,
                    {k: v for k, v in best.items() if k != "format_version"})
        echo(f"test: clip accuracy {test_acc:.3f} on {len(test_idx)} clips (best.pth: epoch "
             f"{best['epoch']})")
    return TrainResult(model_dir, int(best["epoch"]), float(best_row["val_acc"]), epoch,
                       time.perf_counter() - t_start, test_acc, history, test)


