"""Placement defaults and scale-up on an autoscaling Ray cluster.

**What the cluster can have.** An autoscaling cluster starts without GPU workers, so "one GPU
per model when the cluster has GPUs" would train everything on the head's CPUs. Left unset,
``ray.teacher_gpus`` (and with it ``student_gpus``, the baseline's, and a Tune trial's GPU)
therefore follows :func:`decide_gpus`: one GPU when the cluster has GPUs now *or its autoscaler
can add a node that has them*, else none. The decision is printed once with its reason and
recorded in the parent run's params (``placement.*``).

Ray 2.60 has no public API for the autoscaler's node types (ray-project/ray#37838, open). The
sources, in the order they are asked, all read on the driver:

1. ``ray.cluster_resources()`` (public): GPUs the cluster has now.
2. ``ray._private.state.state.get_cluster_config()`` (private): the node groups the autoscaler
   reported to the GCS. Ray Train and Ray Data read the same; but no autoscaler shipped with
   OSS Ray 2.60 reports it (nothing in the wheel calls ``report_cluster_config``; ``None`` was
   read on the fake multi-node cluster), so on ``ray up`` / KubeRay clusters it is empty.
3. A probe through the autoscaler itself: ``ray.autoscaler.sdk.request_resources`` (public,
   DeveloperAPI) asks for one ``{GPU: 1}`` bundle, and the autoscaler's status record in the
   GCS (the JSON ``ray status`` prints, KV key ``ray._private.ray_constants.
   DEBUG_AUTOSCALING_STATUS``, read with ``ray.experimental.internal_kv``; private) says whether
   it started a node with GPUs for it (``pending_resources``) within two of its updates. The
   request is withdrawn right after; a node it started then serves the first GPU stage (or the
   prewarm request) or is removed when idle. Only the v1 autoscaler (the default of ``ray up``
   and KubeRay) writes that record; under autoscaler v2 the probe is not made and the default
   is CPU-only unless GPUs are up (set ``ray.teacher_gpus: 1`` there).

``request_resources`` is one request per cluster: the probe and the prewarm replace any request
another job on the same cluster made.

**Prewarming** (``ray.prewarm``, default on where an autoscaler runs). At pipeline start the
stages that can run at once, the 2k teachers and the baseline, are requested in one
``request_resources`` call, so their nodes start together while partitions are computed
instead of one pending task at a time; the request shrinks as these stages finish and is
withdrawn at the end, so idle nodes go away after the autoscaler's idle timeout.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

from mlcore.cpsd import ENSEMBLES
from workflows.config import Config
from workflows.distributed import Role, model_resources, train_workers

Autoscaler = Literal["v1", "v2"]
# The probe's answer: a GPU node launched, or the autoscaler updated this often without one.
PROBE_UPDATES = 2
# How long the probe waits for those updates (the v1 autoscaler updates every 5 s).
PROBE_TIMEOUT_S = 60.0
# How often the prewarm request follows the stages that finished.
PREWARM_POLL_S = 1.0


@dataclass(frozen=True)
class Placement:
    """What :func:`resolve_placement` decided for one driver.

    Attributes:
        gpus: GPUs per model given to every setting left unset; None when none was unset.
        reason: Why, in words (printed and logged).
        autoscaler: The cluster's autoscaler version, None when none can add nodes.
        prewarm: Whether the pipeline asks the autoscaler for its parallel stages up front.
    """

    gpus: float | None
    reason: str
    autoscaler: Autoscaler | None
    prewarm: bool

    def params(self) -> dict[str, str]:
        """The parent run's ``placement.*`` params."""
        return {
            "placement.default_gpus": "unset" if self.gpus is None else f"{self.gpus:g}",
            "placement.reason": self.reason,
            "placement.autoscaler": self.autoscaler or "none",
            "placement.prewarm": str(self.prewarm).lower(),
        }


# ---------------------------------------------------------------------------------------------
# The autoscaler and what it can add


def is_local(cfg: Config) -> bool:
    """Whether ``init_ray`` started a local instance (no autoscaler there)."""
    return not (cfg.ray.address or os.environ.get("RAY_ADDRESS"))


def _v1_status() -> dict[str, Any] | None:
    """The v1 autoscaler's last status record (what ``ray status`` prints), or None."""
    from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(DEBUG_AUTOSCALING_STATUS)
    return json.loads(raw) if raw else None


def autoscaler_kind() -> Autoscaler | None:
    """The version of an autoscaler that can add nodes to the connected cluster, or None.

    Every head runs a v1 monitor; without an autoscaling config it mirrors the existing nodes
    as read-only node types named ``node_<node id>`` and never launches one.
    """
    import ray
    from ray.autoscaler.v2.utils import is_autoscaler_v2

    if is_autoscaler_v2(fetch_from_server=True):
        return "v2"
    status = _v1_status()
    report = (status or {}).get("autoscaler_report")
    if not report:
        return None
    mirrored = {f"node_{node['NodeID']}" for node in ray.nodes()}
    types = set(report.get("node_type_mapping", {}).values())
    return "v1" if types - mirrored else None


def _configured_gpu_groups() -> list[str] | None:
    """Node groups with GPUs from the GCS cluster config; None when nothing reported one."""
    from ray._private.state import state

    config = state.get_cluster_config()
    if config is None or not config.node_group_configs:
        return None
    return [
        group.name
        for group in config.node_group_configs
        if group.resources.get("GPU", 0) > 0 and group.max_count != 0
    ]


def probe_gpu_node(timeout_s: float = PROBE_TIMEOUT_S) -> bool | None:
    """Ask the v1 autoscaler for one GPU and watch whether it starts a node that has one.

    Returns True (a node with GPUs is starting or up), False (the autoscaler updated
    :data:`PROBE_UPDATES` times without starting one: no node type offers GPUs, or those that
    do are at their ``max_workers``), None (it did not update within ``timeout_s``).
    """
    import ray
    from ray.autoscaler.sdk import request_resources

    before = (_v1_status() or {}).get("time", 0.0)
    request_resources(bundles=[{"GPU": 1}])
    try:
        updates: set[float] = set()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = _v1_status() or {}
            report = status.get("autoscaler_report") or {}
            if (report.get("pending_resources") or {}).get("GPU", 0) > 0:
                return True
            if ray.cluster_resources().get("GPU", 0) > 0:
                return True
            if status.get("time", 0.0) > before:
                updates.add(status["time"])
            if len(updates) >= PROBE_UPDATES:
                return False
            time.sleep(0.2)
        return None
    finally:
        request_resources(bundles=[])


def decide_gpus(local: bool, autoscaler: Autoscaler | None) -> tuple[float, str]:
    """GPUs per model for settings left unset, and why (module docstring)."""
    import ray

    now = ray.cluster_resources().get("GPU", 0)
    if now > 0:
        return 1.0, f"the cluster has {now:g} GPUs"
    if local:
        return 0.0, "local Ray instance without GPUs"
    groups = _configured_gpu_groups()
    if groups is not None:
        if groups:
            return 1.0, f"the autoscaler's node groups {', '.join(groups)} have GPUs"
        return 0.0, "no GPUs, and no node group of the autoscaler has any"
    if autoscaler is None:
        return 0.0, "no GPUs and no autoscaler"
    if autoscaler == "v2":
        return 0.0, "no GPUs now; autoscaler v2 does not say which node types it has"
    launched = probe_gpu_node()
    if launched:
        return 1.0, "no GPUs now, but the autoscaler starts a GPU node when asked for one"
    if launched is None:
        return 0.0, "no GPUs now, and the autoscaler did not answer a GPU request in time"
    return 0.0, "no GPUs, and the autoscaler has no node type with GPUs to add"


def resolve_placement(cfg: Config, log: Callable[[str], None] = print) -> tuple[Config, Placement]:
    """``cfg`` with ``ray.teacher_gpus`` set when it was unset, and what was decided.

    Call on the driver after ``init_ray``; the returned config travels to every stage. The
    student and the baseline follow ``teacher_gpus`` unless ``student_gpus`` is set. Prints the
    decision once.
    """
    local = is_local(cfg)
    autoscaler = None if local else autoscaler_kind()
    prewarm = autoscaler is not None if cfg.ray.prewarm is None else cfg.ray.prewarm
    if cfg.ray.teacher_gpus is not None:
        return cfg, Placement(None, "set in the config", autoscaler, prewarm and not local)
    gpus, reason = decide_gpus(local, autoscaler)
    log(f"placement: {gpus:g} GPU per teacher, student, baseline and trial ({reason})")
    placed = replace(cfg, ray=replace(cfg.ray, teacher_gpus=gpus))
    return placed, Placement(gpus, reason, autoscaler, prewarm and not local)


def trial_resources(cfg: Config, placement: Placement) -> dict[str, float]:
    """``tune.resources_per_trial``, with the default GPU when it names none."""
    resources = dict(cfg.tune.resources_per_trial)
    if "GPU" not in resources and placement.gpus:
        resources["GPU"] = placement.gpus
    return resources


# ---------------------------------------------------------------------------------------------
# Prewarming


def _bundle(cfg: Config, role: Role) -> list[dict[str, float]]:
    """The resource bundles one model of ``role`` trains on (one per Ray Train worker)."""
    r = model_resources(cfg, role)
    bundle = {"CPU": r["num_cpus"], **({"GPU": r["num_gpus"]} if r["num_gpus"] else {})}
    return [bundle] * train_workers(cfg, role)


def parallel_stages(cfg: Config) -> dict[str, int]:
    """Training stages of one config that can run at once: ``{"teacher": 2k, "baseline": 1}``."""
    c = cfg.cpsd
    kinds = ENSEMBLES[c.mode]
    return {
        "teacher": sum(1 if kind == "full" else c.k for kind in kinds),
        "baseline": int(not kinds or c.train_baseline),
    }


class Prewarm:
    """One ``request_resources`` for the parallel stages, shrunk as they finish (module doc).

    Args:
        cfg: The resolved config (:func:`resolve_placement`).
        graph: The stage graph whose ``labelled()`` refs tell which stages finished.
        log: Where the requests are reported.
    """

    def __init__(self, cfg: Config, graph: Any, log: Callable[[str], None] = print):
        self.cfg = cfg
        self.graph = graph
        self.log = log
        self.planned = parallel_stages(cfg)
        self._requested: list[dict[str, float]] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def bundles(self, finished: dict[str, int]) -> list[dict[str, float]]:
        """The bundles of the planned stages not finished yet."""
        out: list[dict[str, float]] = []
        for role, count in self.planned.items():
            left = max(count - finished.get(role, 0), 0)
            out += _bundle(self.cfg, role) * left  # type: ignore[arg-type]
        return out

    def finished(self) -> dict[str, int]:
        """Finished teacher and baseline stages of the graph (their logits excluded)."""
        import ray

        refs = {
            name: ref
            for name, ref in self.graph.labelled().items()
            if "/" not in name and name.split("-", 1)[0] in self.planned
        }
        if not refs:
            return {}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=0)
        done = set(ready)  # failed stages too: they hold nothing any more
        counts: dict[str, int] = {}
        for name, ref in refs.items():
            if ref in done:
                role = name.split("-", 1)[0]
                counts[role] = counts.get(role, 0) + 1
        return counts

    def _request(self, bundles: list[dict[str, float]]) -> None:
        from ray.autoscaler.sdk import request_resources

        if bundles == self._requested:
            return
        request_resources(bundles=bundles)
        self._requested = bundles
        gpus = sum(b.get("GPU", 0) for b in bundles)
        self.log(f"prewarm: requested {len(bundles)} bundles ({gpus:g} GPUs) from the autoscaler")

    def _follow(self) -> None:
        while not self._stop.wait(PREWARM_POLL_S):
            try:
                self._request(self.bundles(self.finished()))
            except Exception as err:  # the request is a hint; a failed poll must not end the job
                self.log(f"prewarm: update failed ({err})")

    def start(self) -> Prewarm:
        self._request(self.bundles({}))
        self._thread = threading.Thread(target=self._follow, name="cpsd-prewarm", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop following and withdraw the request."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._request([])


class _NoPrewarm:
    def close(self) -> None:
        pass


def start_prewarm(
    cfg: Config, placement: Placement, graph: Any, log: Callable[[str], None] = print
) -> Prewarm | _NoPrewarm:
    """A running :class:`Prewarm` when ``placement.prewarm``; else one whose close does nothing."""
    if not placement.prewarm:
        return _NoPrewarm()
    return Prewarm(cfg, graph, log).start()
