"""The whole method in one call: ``prance run`` and :func:`prance.adapt`.

dense ViT → meta-network → static-subnet sweep → selector → joint fine-tuning → static-plan
fine-tuning → round-up of the decisions → test-split evaluation → benchmark → report, each stage
one of the commands that do the work, in one run folder, resumable stage by stage.

* :mod:`~prance.pipeline.config`    — every setting (one dataclass per stage) and what each stage depends on;
* :mod:`~prance.pipeline.schedules` — the named schedules (``demo``, ``full``);
* :mod:`~prance.pipeline.resolve`   — settings from defaults, a schedule, YAML and flags, checked up front;
* :mod:`~prance.pipeline.stages`    — what each stage calls and writes;
* :mod:`~prance.pipeline.ledger`    — RUN/stages.json: which stages are done, with which settings;
* :mod:`~prance.pipeline.run`       — the run itself (:func:`run_pipeline`);
* :mod:`~prance.pipeline.adapt`     — :func:`adapt`, the Python entry point.
"""

from prance.pipeline.adapt import adapt
from prance.pipeline.config import STAGES, RunConfig
from prance.pipeline.resolve import resolve_config
from prance.pipeline.run import run_pipeline

__all__ = ["STAGES", "RunConfig", "adapt", "resolve_config", "run_pipeline"]
