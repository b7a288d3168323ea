"""Walk the config through one student training: which modules it visits, in what order.

    python tools/cfg_walk.py            # the tiny config, cpsd mode, one epoch each
    python tools/cfg_walk.py --with-loss-settings   # also follow the loss's settings object

Runs ``run_local`` on the tiny config (in-process, no Ray) and, from the entry into
``mlcore.cpsd.train_student`` to its return, records the first call of every function of
``mlcore``/``workflows`` that receives a config object (an instance of any dataclass defined
in ``mlcore.config``, or a registered loss's settings) as an argument. Consecutive calls in one
module are one *stay*; a stay in a module the walk had already left is a *return*. Many returns
mean a reader following ``cfg`` keeps jumping back to files already read: the measure of issue
#22 ("Walking ``cfg`` from ``train_student``"). Prints the stays in order, then ``stays``,
``rooms`` (distinct modules) and ``returns``.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mlcore import config as config_module  # noqa: E402
from mlcore.cpsd import run_local  # noqa: E402
from mlcore.losses import LOSSES, AdaptiveAsymmetrySettings  # noqa: E402
from workflows.config import config_path, load_config  # noqa: E402

# The sections of mlcore.config (the measure); --with-loss-settings adds each registered
# loss's settings, which live in the loss modules since losses became components.
CONFIG_TYPES = tuple(
    obj
    for obj in vars(config_module).values()
    if isinstance(obj, type)
    and dataclasses.is_dataclass(obj)
    and obj.__module__ == config_module.__name__
)
LOSS_SETTINGS = (*(spec.settings for spec in LOSSES.values()), AdaptiveAsymmetrySettings)
PACKAGES = (str(REPO / "mlcore"), str(REPO / "workflows"))


def _receives_config(frame, types: tuple[type, ...]) -> bool:
    code = frame.f_code
    names = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]
    return any(isinstance(frame.f_locals.get(n), types) for n in names)


def walk(cfg, types: tuple[type, ...] = CONFIG_TYPES) -> list[str]:
    """Modules of each config-passing call edge inside train_student, first traversals in order."""
    seen: set = set()
    order: list[str] = []
    inside = [0]

    def profile(frame, event, arg):
        code = frame.f_code
        if code.co_name == "train_student" and frame.f_globals.get("__name__") == "mlcore.cpsd":
            inside[0] += 1 if event == "call" else -1 if event == "return" else 0
        edge = (frame.f_back.f_code if frame.f_back else None, code)
        if event != "call" or not inside[0] or edge in seen:
            return
        if not code.co_filename.startswith(PACKAGES) or not _receives_config(frame, types):
            return
        seen.add(edge)
        order.append(frame.f_globals.get("__name__", code.co_filename))

    with tempfile.TemporaryDirectory() as out:
        sys.setprofile(profile)
        try:
            run_local(cfg, Path(out), log=lambda _: None)
        finally:
            sys.setprofile(None)
    return order


def stays(order: list[str]) -> list[str]:
    return [m for i, m in enumerate(order) if i == 0 or order[i - 1] != m]


def main(argv: list[str]) -> int:
    types = CONFIG_TYPES + (LOSS_SETTINGS if "--with-loss-settings" in argv else ())
    with tempfile.TemporaryDirectory() as data:
        cfg = load_config(
            config_path("tiny"),
            [
                f"data.cache_dir={data}",
                f"storage_path={data}/runs",
                "train.epochs=1",
                "cpsd.teacher_epochs=1",
                "mlflow.enabled=false",
            ],
        )
        visits = stays(walk(cfg, types))
    left: set[str] = set()
    returns = 0
    for i, module in enumerate(visits):
        if module in left:
            returns += 1
            print(f"{i + 1:3d}  {module}  (return)")
        else:
            print(f"{i + 1:3d}  {module}")
        if i > 0:
            left.add(visits[i - 1])
    print(f"stays {len(visits)}, rooms {len(set(visits))}, returns {returns}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
