"""``prance run``: every stage of the pipeline, in order, resumable stage by stage.

    resolve settings → check them against RUN/stages.json → write RUN/config.yaml →
    for each stage: done with these settings (and no earlier stage ran now)? skip : run it
    (its own resume continues an interrupted one) → record it done.

A stage recorded done (or started) with other settings than this invocation's is refused in
one line that names the stage and the setting — its results, and every later stage's, come
from the old value — with the fixes: ``--restart-from STAGE`` (that stage and every later one
start over; earlier ones are kept), a new ``--out``, or the run's own settings
(``--config RUN/config.yaml``). Results are never mixed silently: once a stage has run, every
later one runs again even if it was recorded done (a stage new to a run folder made by an older
version, for instance, feeds the ones after it).

Under ``torchrun`` every process runs this and joins one process group for the whole run: the
training stages run in all of them (each stage's command uses that group), everything else —
the config, the stage record, sweep, evaluation, bench and report — in rank 0 alone, while the
others wait at a barrier (up to :data:`STAGE_WAIT`) until rank 0 has written what the next
training stage reads; after the last training stage they are done. The run folder must be on a
file system every process sees.
"""

from __future__ import annotations

import os
import shutil
import time
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from prance.errors import PranceError
from prance.files import atomic_write
from prance.pipeline.config import STAGES, RunConfig, stage_settings, to_yaml
from prance.pipeline.ledger import LEDGER, Ledger
from prance.pipeline.stages import STAGE_LIST, Context, remove_outputs

if TYPE_CHECKING:
    from prance.training.run import DistContext

CONFIG = "config.yaml"


#: How long the other processes may wait at a barrier while rank 0 alone sweeps, evaluates or benchmarks.
STAGE_WAIT = timedelta(hours=24)


def run_pipeline(cfg: RunConfig, out: str | os.PathLike[str], *, restart_from: str | None = None,
                 reuse: str | os.PathLike[str] | None = None, say: Callable[[str], None] = print) -> Path:
    """Run (or continue) every stage of ``cfg`` in the run folder ``out``; returns its absolute path.

    ``reuse`` — another run folder whose leading stages, done there with exactly these settings, are copied
    instead of run again (e.g. one dense model and meta-network for runs at several budgets)."""
    from prance.devices import resolve_device
    from prance.training.run import close_distributed, init_distributed

    run = Path(out).resolve()
    if run.exists() and not run.is_dir():
        raise PranceError(f"--out {out} is a file, not a folder; choose another --out")
    if restart_from is not None and restart_from not in STAGES:
        raise PranceError(f"--restart-from {restart_from}: unknown stage; use one of {', '.join(STAGES)}")
    resolve_device(cfg.device)  # a missing GPU is an error before anything is written
    redo = STAGES.index(restart_from) if restart_from is not None else len(STAGES)
    source = None if reuse is None else _reuse_source(Path(reuse), run)
    settings = {stage: stage_settings(cfg, stage) for stage in STAGES}
    Ledger.read(run, writer=False).check_unchanged(settings, run / CONFIG, STAGES[:redo])
    if cfg.threads is not None:
        import torch

        torch.set_num_threads(cfg.threads)
    group = init_distributed(cfg.device, timeout=STAGE_WAIT)  # one process group for every stage (torchrun)
    try:
        _stages(cfg, run, restart_from, set(STAGES[redo:]), settings, group, say, source)
    finally:
        close_distributed(group)
    return run


def _stages(cfg: RunConfig, run: Path, restart_from: str | None, fresh: set[str],
            settings: dict[str, dict[str, Any]], group: DistContext, say: Callable[[str], None],
            source: Path | None) -> None:
    """Set the run folder up (rank 0), then each stage: skipped if done, else run where it runs, recorded."""
    writer = group.is_main
    if writer:
        run.mkdir(parents=True, exist_ok=True)
        ledger = Ledger.read(run)
        if restart_from is not None:
            for stage in STAGE_LIST[STAGES.index(restart_from):]:
                remove_outputs(Context(cfg, run), stage)
            forgotten = ledger.restart_from(restart_from)
            if forgotten:
                say(f"== restarting from {restart_from}: {', '.join(forgotten)} start over")
        text = to_yaml(cfg)
        atomic_write(run / CONFIG, lambda f: f.write(text.encode()))
        if source is not None:
            taken, why = _reuse(Context(cfg, run), source, ledger, settings, fresh)
            say(f"== reusing {', '.join(taken)} of {source} (done there with these settings)" + (
                f"; not the rest: {why}" if why else "") if taken else f"== nothing to reuse from {source}: {why}")
    group.barrier()  # every process reads the record rank 0 prepared
    if not writer:
        ledger = Ledger.read(run, writer=False)
        fresh.difference_update([s for s in fresh if ledger.done(s)])  # restarted stages done now were reused

    last_training = max(i for i, stage in enumerate(STAGE_LIST) if stage.training)
    ran = False  # a stage ran in this invocation: every later one runs again (e.g. a stage new to an old run)
    for index, stage in enumerate(STAGE_LIST):
        head = f"== stage {index + 1}/{len(STAGE_LIST)} {stage.name}"
        if not writer and index > last_training:
            break  # the rest is rank 0's
        if ran and ledger.done(stage.name) and stage.name not in fresh:  # its inputs may have changed
            fresh.update(STAGES[index:])
            if writer:
                say(f"== an earlier stage ran now, so {', '.join(ledger.restart_from(stage.name))} run again")
        if ledger.done(stage.name) and stage.name not in fresh:
            missing = [o for o in stage.files(cfg) if not (run / o).exists()]
            if missing:
                raise PranceError(f"{run}: stage {stage.name} is recorded done but {missing[0]} is missing; pass "
                                  f"--restart-from {stage.name} to redo it and every later stage")
            if writer:
                say(f"{head}: done already ({_duration(ledger.seconds(stage.name))}), skipped")
            continue
        ctx = Context(cfg, run, group.rank, fresh=stage.name in fresh, say=say)
        continuing = stage.training and stage.folder is not None and ctx.resume(stage.folder)
        if writer:
            if not continuing:
                remove_outputs(ctx, stage)
            ledger.start(stage.name, settings[stage.name])
            say(f"{head}: {stage.describe}" + (" (continuing the interrupted run)" if continuing else ""))
        if stage.training:
            group.barrier()  # rank 0 has cleared what an earlier attempt left
        start = time.perf_counter()
        if writer or stage.training:
            try:
                stage.run(ctx)
            except BaseException:
                if writer:
                    ledger.pause(stage.name, time.perf_counter() - start)
                raise
        seconds = time.perf_counter() - start
        ran = True
        if writer:
            missing = [o for o in stage.files(cfg) if not (run / o).exists()]
            if missing:
                raise PranceError(f"stage {stage.name} stopped before writing {run / missing[0]}; run the same "
                                  "command again to continue it")
            ledger.finish(stage.name, seconds)
            say(f"{head} done in {_duration(seconds)}")
        if index < last_training:
            group.barrier()  # the next training stage reads what rank 0 wrote


def _reuse_source(source: Path, run: Path) -> Path:
    """The run folder ``--reuse`` names, checked before anything is written."""
    source = source.resolve()
    if not (source / LEDGER).is_file():
        raise PranceError(f"--reuse {source}: not a prance run folder (no {LEDGER}); give the --out of an earlier "
                          "`prance run`")
    if source == run:
        raise PranceError(f"--reuse {source} is this run's own folder; give another run's --out")
    return source


def _reuse(ctx: Context, source: Path, ledger: Ledger, settings: dict[str, dict[str, Any]],
           fresh: set[str]) -> tuple[list[str], str]:
    """Copy from ``source`` its leading stages done there with ``settings`` (folder and record) into this run;
    returns the stages copied and why it stopped. Stops at the first stage that differs, is not done there, or
    has no folder of its own (the report, cheap to redo), and at a stage this run did itself: what follows it
    in ``source`` did not start from it. Each folder is copied beside its place and then moved in, so an
    interruption leaves the run as it was."""
    try:
        theirs = Ledger.read(source, writer=False)
    except PranceError as e:
        raise PranceError(f"--reuse {source}: {e}".split("; delete")[0] + "; give another run to --reuse or drop "
                          "it") from None
    other = _other_images(ctx.cfg, source)
    if other:
        return [], other
    taken: list[str] = []
    for stage in STAGE_LIST:
        name = stage.name
        missing = [o for o in stage.files(ctx.cfg) if not (source / o).exists()]
        changed = theirs.changed(name, settings[name]) if theirs.done(name) else None
        why = ("the report is always written anew" if stage.folder is None else
               f"stage {name} is not done there" if not theirs.done(name) else
               f"stage {name} ran there with another {changed}" if changed else
               f"stage {name} lacks {missing[0]} there" if missing else None)
        if why is None and ledger.done(name) and name not in fresh:
            if ledger.stages[name].get("reused_from") == str(source):
                continue
            why = f"this run did stage {name} itself, and the later stages there did not start from it"
        if why is not None:
            return taken, why
        assert stage.folder is not None
        staging = ctx.path(f".{stage.folder}.reuse")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            shutil.copytree(source / stage.folder, staging)
        except OSError as e:
            shutil.rmtree(staging, ignore_errors=True)
            raise PranceError(f"--reuse: cannot copy {source / stage.folder} ({e.strerror or e}); free disk space "
                              "or drop --reuse") from None
        remove_outputs(ctx, stage)
        os.replace(staging, ctx.path(stage.folder))
        ledger.adopt(name, theirs.stages[name], source)
        fresh.discard(name)
        taken.append(name)
    return taken, ""


def _other_images(cfg: RunConfig, source: Path) -> str:
    """Why ``source`` trained on other images than this run, if a folder of images is the data ('' if not)."""
    if cfg.data != "folder":
        return ""
    from prance.files import load_yaml

    path = source / CONFIG
    theirs = load_yaml(path, "run config") if path.is_file() else None
    their_dir = theirs.get("data_dir") if isinstance(theirs, dict) else None
    if their_dir is None or Path(their_dir).resolve() != Path(str(cfg.data_dir)).resolve():
        return f"it trained on the images of {their_dir or 'an unrecorded folder'}, this run on {cfg.data_dir}"
    return ""


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


__all__ = ["CONFIG", "run_pipeline"]
