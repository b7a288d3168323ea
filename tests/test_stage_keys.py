"""Stage keys: settings added later leave every published key unchanged until they are set."""

import dataclasses

from mlcore import configlib
from mlcore.cpsd import (
    baseline_fingerprint,
    compute_partitions,
    control_config,
    control_seed,
    plan_teachers,
    student_fingerprint,
    teacher_fingerprint,
)
from mlcore.data.loading import open_dataset
from mlcore.data.synth import config_hash
from workflows.stages import partition_key

# The tiny config's keys as computed by the code of commit cf3beb8 (main before issue 18's
# settings: control ensembles, pretraining, data.augment, data.synth.class_offset): load tiny,
# then baseline_fingerprint / partition_key / teacher_fingerprint / student_fingerprint on its
# CGP and DGP partitions, as _keys below does.
MAIN_KEYS = {
    "baseline": "cf6c976c585f",
    "partition-cgp": "5570d36fbcc2",
    "partition-dgp": "3b5613f11b4f",
    "teacher-cgp-0": "5e49b0af566f",
    "teacher-cgp-1": "7813d18c3632",
    "teacher-dgp-0": "fa294e5ea665",
    "teacher-dgp-1": "0ad7ab74fe54",
    "student": "6546e986cbd7",
}


def _keys(cfg) -> dict[str, str]:
    dataset = open_dataset(cfg.data, with_bytes=False)
    specs = plan_teachers(compute_partitions(cfg, dataset))
    return {
        "baseline": baseline_fingerprint(cfg, dataset),
        "partition-cgp": partition_key(cfg, dataset, "cgp"),
        "partition-dgp": partition_key(cfg, dataset, "dgp"),
        **{s.name: teacher_fingerprint(cfg, dataset, s) for s in specs},
        "student": student_fingerprint(cfg, dataset, specs),
    }


def test_new_settings_at_their_defaults_keep_mains_keys(tiny_config):
    assert _keys(tiny_config) == MAIN_KEYS
    # Spelled out at their defaults, and a control ensemble beside them: still main's keys.
    explicit = configlib.replace(
        tiny_config,
        [
            "data.augment=basic",
            "data.synth.class_offset=0",
            "pretrain.enabled=false",
            "cpsd.control_ensemble=2",
        ],
    )
    assert _keys(explicit) == MAIN_KEYS


def test_set_away_from_default_the_new_settings_count(tiny_config):
    randaug = configlib.replace(tiny_config, ["data.augment=randaug"])
    assert baseline_fingerprint(randaug, open_dataset(randaug.data)) != MAIN_KEYS["baseline"]
    synth = tiny_config.data.synth
    assert config_hash(dataclasses.replace(synth, class_offset=0)) == config_hash(synth)
    assert config_hash(dataclasses.replace(synth, class_offset=10)) != config_hash(synth)


def test_control_models_are_keyed_by_their_own_seeds(tiny_config):
    seeds = {control_seed(s, i) for s in (0, 1, 2) for i in range(3)}
    assert len(seeds) == 9 and not seeds & {0, 1, 2}  # never another seed's baseline
    dataset = open_dataset(tiny_config.data)
    keys = [baseline_fingerprint(control_config(tiny_config, i), dataset) for i in range(2)]
    assert len(set(keys)) == 2 and MAIN_KEYS["baseline"] not in keys
    # Keyed like a plain model: a student setting does not change them (shared by variants).
    other = configlib.replace(tiny_config, ["cpsd.cls_weight=50", "cpsd.mode=cgpd"])
    assert [baseline_fingerprint(control_config(other, i), dataset) for i in range(2)] == keys
