"""The stage graph: one builder that submits a config's stages to Ray, memoised by stage key.

``pipeline`` (one config), ``study`` (a grid of configs over seeds) and ``demo`` all build their
work through :class:`StageGraph`. For one config the graph is::

                  partition-cgp ─┬─ teacher-cgp-0 ─ logits ─┐
    (pretrain) ─► partition-dgp ─┼─ ...                      ├─ student
                                 └─ teacher-dgp-<k-1> ─ logits ┘   ↑
                                    teachers ─ ensemble-target     │
                  baseline ─────────────────────── (cpsd.student_init: baseline)
                  control-0..N-1 ─┴─ ensemble-baseline  (cpsd.control_ensemble: N)

``pretrain`` (``pretrain.enabled``) runs first and alone: its backbone file becomes every
model's ``model.pretrained_file``, so every key below depends on its bytes. ``ensemble-target``
scores the logits the student regresses to, ``ensemble-baseline`` the mean of the baseline and
its control models (plain models with other seeds).

Every node is a Ray task (``workflows.stages``). A node is identified by its storage folder,
``<stage>-<key>``, whose key is the fingerprint of what it computes; submitting a node that is
already in the graph returns the existing ref, even while that task is still running, so
variants of a study share partitions, teachers, logits and baselines. Dependencies are Ray refs
passed as task arguments: each teacher's logits start as soon as that teacher finishes, and the
student as soon as its inputs exist. Baselines and partitions are submitted before any teacher,
so the baseline is never queued behind all teachers.

Stages already finished in storage return at once (their task only reads the record). On
Ctrl-C, ``ray job stop`` or a stage that fails for good, :meth:`StageGraph.cancel` cancels every
outstanding task of the graph; checkpoints stay and a rerun resumes.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mlcore.cpsd import (
    CONTROL,
    ENSEMBLES,
    TARGET,
    TeacherSpec,
    baseline_fingerprint,
    control_config,
    held_out_splits,
    plan_teachers,
    student_fingerprint,
    teacher_fingerprint,
    trains_baseline,
)
from mlcore.data.loading import OpenDataset, open_dataset
from mlcore.distill import ensemble_weights
from mlcore.fingerprint import stable_hash
from mlcore.pretrain import pretrain_fingerprint, with_pretrained
from workflows.config import Config
from workflows.console import ProgressLine
from workflows.distributed import model_resources, task_options
from workflows.runtime import STOP
from workflows.stages import (
    JobContext,
    baseline_stage,
    combination_stage,
    control_stage,
    logits_stage,
    partition_key,
    partition_of,
    partition_stage,
    pretrain_stage,
    student_stage,
    teacher_stage,
)


@dataclass
class ConfigRefs:
    """The refs of one config's stages (``final``: the student, or the baseline in mode
    ``baseline``; ``combinations``: ``ensemble-target`` and ``ensemble-baseline``). ``cfg`` is
    the config as run: with ``pretrain`` enabled, its ``model.pretrained_file`` is filled;
    ``dataset``: its data, opened once (without image bytes) for the stage keys."""

    cfg: Config
    ctx: JobContext
    dataset: OpenDataset
    specs: list[TeacherSpec] = field(default_factory=list)
    partitions: dict[str, Any] = field(default_factory=dict)
    teachers: dict[str, Any] = field(default_factory=dict)
    logits: dict[str, Any] = field(default_factory=dict)
    baseline: Any = None
    controls: list[Any] = field(default_factory=list)
    combinations: dict[str, Any] = field(default_factory=dict)
    final: Any = None


class StageGraph:
    """Submits stages to Ray at most once each and waits on them with progress lines.

    Args:
        log: One line per finished stage.
        line: The live progress line (``workflows.console.ProgressLine``), or None.
    """

    def __init__(self, log: Callable[[str], None] = print, line: ProgressLine | None = None):
        self.log = log
        self.line = line
        self._refs: dict[str, Any] = {}  # stage folder -> ref
        self._labels: dict[Any, str] = {}  # ref -> label for progress lines
        self._finished: set[Any] = set()
        self._started = time.time()

    # -- submission ---------------------------------------------------------------------------

    def submit(self, rel: str, label: str, fn, options: dict[str, Any], *args) -> Any:
        """``fn.remote(*args)`` as a Ray task, unless the node ``rel`` is already in the graph."""
        import ray

        if rel in self._refs:
            return self._refs[rel]
        ref = ray.remote(fn).options(name=label, **options).remote(*args)
        self._refs[rel] = ref
        self._labels[ref] = label
        return ref

    def start(self, cfg: Config, ctx: JobContext) -> ConfigRefs:
        """Phase 1 of a config: its partitions and its baseline (both before any teacher),
        after the upstream model when ``pretrain`` is enabled (waited for here)."""
        retries = {"max_retries": cfg.ray.max_retries}
        if cfg.pretrain.enabled:
            key = pretrain_fingerprint(cfg)
            ref = self.submit(
                ctx.stage_rel("pretrain", key),
                "pretrain",
                pretrain_stage,
                {**task_options(cfg, "baseline"), **retries},
                ctx,
                key,
            )
            cfg = with_pretrained(cfg, self.wait({"pretrain": ref})["pretrain"]["backbone"])
            ctx = dataclasses.replace(ctx, cfg=cfg)
        c = cfg.cpsd
        dataset = open_dataset(cfg.data, with_bytes=False)
        refs = ConfigRefs(cfg, ctx, dataset)
        for kind in ENSEMBLES[c.mode]:
            key = partition_key(cfg, dataset, kind)
            # Zero CPUs: planning the graph waits on partitions, which take seconds; they must
            # not queue behind training tasks that hold every CPU for hours. On the driver's
            # node when it can: a task holding no resource leaves an autoscaled worker "idle",
            # and the autoscaler may remove that node under it.
            refs.partitions[kind] = self.submit(
                ctx.stage_rel(f"partition-{kind}", key),
                f"partition-{kind}",
                partition_stage,
                {"num_cpus": 0, "scheduling_strategy": _driver_node(), **retries},
                ctx,
                kind,
                key,
            )
        if trains_baseline(cfg):
            key = baseline_fingerprint(cfg, dataset)
            refs.baseline = self.submit(
                ctx.stage_rel("baseline", key),
                "baseline",
                baseline_stage,
                {**task_options(cfg, "baseline"), **retries},
                ctx,
                key,
            )
            keys = [key]
            for i in range(c.control_ensemble):
                keys.append(baseline_fingerprint(control_config(cfg, i), dataset))
                refs.controls.append(
                    self.submit(
                        ctx.stage_rel(f"control-{i}", keys[-1]),
                        f"control-{i}",
                        control_stage,
                        {**task_options(cfg, "baseline"), **retries},
                        ctx,
                        i,
                        keys[-1],
                    )
                )
            if refs.controls:
                everything = list(range(dataset.num_classes))
                members = [refs.baseline, *refs.controls]
                refs.combinations[CONTROL] = self._combination(
                    refs,
                    CONTROL,
                    [[(k, everything)] for k in keys],
                    [[ref] for ref in members],
                    [1.0 / len(members)] * len(members),
                )
        if not ENSEMBLES[c.mode]:
            refs.final = refs.baseline
        return refs

    def finish(self, refs: ConfigRefs) -> ConfigRefs:
        """Phase 2: with its partitions known, submit the config's teachers, logits, the
        target's evaluation and the student."""
        cfg, ctx = refs.cfg, refs.ctx
        c = cfg.cpsd
        if not ENSEMBLES[c.mode]:
            return refs
        self.teachers(refs)
        key = student_fingerprint(cfg, refs.dataset, refs.specs)
        retries = {"max_retries": cfg.ray.max_retries}
        n = len(refs.specs)
        teacher_refs = [refs.teachers[s.name] for s in refs.specs]
        logit_refs = [refs.logits[s.name] for s in refs.specs] if refs.logits else []
        needs_baseline = c.student_init == "baseline"
        refs.final = self.submit(
            ctx.stage_rel("student", key),
            "student",
            _student_task,
            {**task_options(cfg, "student"), **retries},
            ctx,
            refs.specs,
            key,
            n,
            len(logit_refs),
            needs_baseline,
            *teacher_refs,
            *logit_refs,
            *([refs.baseline] if needs_baseline else []),
        )
        return refs

    def teachers(self, refs: ConfigRefs) -> ConfigRefs:
        """With its partitions known, submit a config's teachers, their cached logits and the
        evaluation of the student's target (also what a student sweep trains against)."""
        cfg, ctx = refs.cfg, refs.ctx
        c = cfg.cpsd
        records = self.wait({f"partition-{k}": r for k, r in refs.partitions.items()}, quiet=True)
        partitions = {k: partition_of(records[f"partition-{k}"]) for k in refs.partitions}
        refs.specs = plan_teachers(partitions)
        retries = {"max_retries": cfg.ray.max_retries}
        teacher_task = {**task_options(cfg, "teacher"), **retries}
        # A teacher's logits are one pass of one model: the resources of one copy.
        logits_task = {**model_resources(cfg, "teacher"), **retries}
        for spec in refs.specs:
            key = teacher_fingerprint(cfg, refs.dataset, spec)
            rel = ctx.stage_rel(spec.name, key)
            refs.teachers[spec.name] = self.submit(
                rel, spec.name, teacher_stage, teacher_task, ctx, spec, key
            )
            if c.teacher_mode == "cached":
                refs.logits[spec.name] = self.submit(
                    f"{rel}/logits-{c.logits_dtype}",
                    f"{spec.name}-logits",
                    logits_stage,
                    logits_task,
                    ctx,
                    spec,
                    refs.teachers[spec.name],
                )
        kinds = dict.fromkeys(s.kind for s in refs.specs)  # ENSEMBLES slot order
        groups = [[s for s in refs.specs if s.kind == kind] for kind in kinds]
        refs.combinations[TARGET] = self._combination(
            refs,
            TARGET,
            [
                [(teacher_fingerprint(cfg, refs.dataset, s), list(s.subset)) for s in g]
                for g in groups
            ],
            [[refs.teachers[s.name] for s in g] for g in groups],
            list(ensemble_weights(len(groups), c.kd_alpha)),
        )
        return refs

    def _combination(
        self,
        config: ConfigRefs,
        name: str,
        members: list[list[tuple[str, list[int]]]],
        refs: list[list[Any]],
        weights: list[float],
    ) -> Any:
        """Submit a combination of trained models' logits: ``members[g]`` are the (stage key,
        class subset) of group g, ``refs[g]`` their refs, ``weights[g]`` its share."""
        ctx = config.ctx
        cfg = ctx.cfg
        # Keyed by its members, its shares and the data it is scored on (val is in every
        # member's key; the held-out splits are not).
        held_out = held_out_splits(config.dataset)[1]
        key = stable_hash("combination", name, members, weights, held_out)
        layout = [[subset for _, subset in group] for group in members]
        return self.submit(
            ctx.stage_rel(name, key),
            name,
            _combination_task,
            {**model_resources(cfg, "teacher"), "max_retries": cfg.ray.max_retries},
            ctx,
            name,
            key,
            layout,
            weights,
            *[ref for group in refs for ref in group],
        )

    # -- waiting and cancelling ---------------------------------------------------------------

    def labelled(self) -> dict[str, Any]:
        """Every node's ref, named by its stage folder (``teacher-cgp-0-<key>``...)."""
        return {rel.split("/stages/", 1)[-1]: ref for rel, ref in self._refs.items()}

    def outstanding(self) -> list[Any]:
        return [ref for ref in self._refs.values() if ref not in self._finished]

    def wait(self, refs: dict[str, Any], *, quiet: bool = False) -> dict[str, Any]:
        """``ray.get`` of named refs, one progress line per finished stage (unless ``quiet``).

        Raises:
            KeyboardInterrupt: A stop was requested (SIGTERM/SIGINT via ``workflows.runtime``).
        """
        import ray

        pending = {ref: name for name, ref in refs.items()}
        done: dict[str, Any] = {}
        for ref in [r for r in pending if r in self._finished]:
            done[pending.pop(ref)] = ray.get(ref)
        while pending:
            # A timeout hands control back to Python every second, so signal handlers run.
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            if STOP.is_set():
                raise KeyboardInterrupt("stop requested")
            if self.line is not None and not quiet:
                self.line.update(len(self._finished), len(self._refs))
            if not ready:
                continue
            name = pending.pop(ready[0])
            record = ray.get(ready[0])
            self._finished.add(ready[0])
            done[name] = record
            if not quiet:
                self._progress(name, record)
        if self.line is not None:
            self.line.clear()
        return done

    def _progress(self, name: str, record: dict[str, Any]) -> None:
        total, finished = len(self._refs), len(self._finished)
        metrics = record.get("metrics", {})
        detail = f"val mAP {100 * metrics['val_mAP']:.2f}" if "val_mAP" in metrics else "done"
        test = (record.get("held_out") or {}).get("test")
        if test is not None:
            detail += f", test mAP {100 * test['mAP']:.2f}"
        where = record.get("attempts", [{}])[-1].get("gpu_ids") if record.get("attempts") else None
        if record.get("stale"):
            detail += f"; {record['stale']} (--retrain-stale trains it again)"
        if self.line is not None:
            self.line.clear()
        self.log(
            f"  {name}: {detail}{' (reused)' if record.get('reused') else ''}"
            f"{f' gpu {where}' if where else ''}  [{finished}/{total} stages, "
            f"{time.time() - self._started:.0f}s]"
        )

    def cancel(self) -> int:
        """Cancel every outstanding task of the graph; returns how many."""
        import ray

        outstanding = self.outstanding()
        for ref in outstanding:
            ray.cancel(ref, force=True)
        return len(outstanding)


def _driver_node() -> Any:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)


def _student_task(
    ctx: JobContext,
    specs: Sequence[TeacherSpec],
    key: str,
    num_teachers: int,
    num_logits: int,
    needs_baseline: bool,
    *inputs: dict[str, Any],
) -> dict[str, Any]:
    """Unpacks the records Ray resolved (refs only resolve as top-level arguments)."""
    teachers = list(inputs[:num_teachers])
    logits = list(inputs[num_teachers : num_teachers + num_logits]) or None
    baseline = inputs[num_teachers + num_logits] if needs_baseline else None
    return student_stage(ctx, specs, key, teachers, logits, baseline)


def _combination_task(
    ctx: JobContext,
    name: str,
    key: str,
    layout: list[list[list[int]]],
    weights: list[float],
    *records: dict[str, Any],
) -> dict[str, Any]:
    """Regroups the member records Ray resolved by ``layout`` (each group's class subsets)."""
    flat = iter(records)
    groups = [[(next(flat), subset) for subset in group] for group in layout]
    return combination_stage(ctx, name, key, groups, weights)
