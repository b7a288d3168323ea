"""Joining or starting Ray, and stopping cleanly on Ctrl-C or ``ray job stop`` (SIGTERM)."""

from __future__ import annotations

import os
import signal
import threading

from workflows.config import Config

STOP = threading.Event()


def _stop_requested(signum, frame) -> None:
    # Inside ray.wait/ray.get Ray's own signal check swallows exceptions raised here, so wait
    # loops poll STOP; elsewhere the KeyboardInterrupt propagates at once.
    STOP.set()
    raise KeyboardInterrupt(f"signal {signum}")


def init_ray(cfg: Config) -> None:
    """Join ``ray.address`` / ``RAY_ADDRESS`` when given, else start a local instance.

    ``ray.init`` installs its own SIGTERM handler (``sys.exit``); `ray job stop` must end runs
    as KILLED instead, so SIGTERM and SIGINT are taken back and treated alike.
    """
    import ray

    if not ray.is_initialized():
        address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            # "local" always starts a fresh instance; without it Ray may try to join whatever
            # cluster was last started on this machine (/tmp/ray/ray_current_cluster).
            ray.init(
                address="local",
                num_cpus=cfg.ray.num_cpus,
                num_gpus=cfg.ray.num_gpus,
                include_dashboard=False,
                log_to_driver=True,
            )
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop_requested)
        signal.signal(signal.SIGINT, _stop_requested)
