from pathlib import Path

import pytest

from kd_keras.config import build_config, load_config, parse_override, to_toml
from kd_keras.errors import KDError

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "exp.toml"
    path.write_text(text)
    return path


def test_defaults_and_name_from_file(tmp_path):
    cfg = load_config(write(tmp_path, ""))
    assert cfg.run.name == "exp"
    assert cfg.run_dir == Path("runs") / "exp"
    assert cfg.distill.alpha == 0.5 and cfg.train.stages == ["teacher", "distill", "scratch"]


def test_every_default_passes_its_own_validation():
    """Each key's default is of its declared type and inside its own choices and bounds: a
    default the validator would refuse when written out explicitly fails here."""
    import dataclasses

    from kd_keras.config import SECTIONS, _check_value

    checked = 0
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            default = getattr(cls(), f.name)
            if default is None:
                continue
            assert _check_value(section, f, default) == default, f"{section}.{f.name}"
            checked += 1
    assert checked > 50


def test_unknown_key_names_key_and_valid_keys(tmp_path):
    with pytest.raises(KDError) as err:
        load_config(write(tmp_path, "[distill]\ntemprature = 3\n"))
    msg = str(err.value)
    assert "distill.temprature" in msg and "temperature" in msg and "alpha" in msg


def test_unknown_section(tmp_path):
    with pytest.raises(KDError, match=r"\[optim\].*valid sections: run, data"):
        load_config(write(tmp_path, "[optim]\nlr = 1\n"))


@pytest.mark.parametrize(
    "text, key",
    [
        ("[distill]\ntemperature = -1.0", "distill.temperature"),
        ("[distill]\nalpha = 1.5", "distill.alpha"),
        ('[distill]\nalpha = "high"', "distill.alpha"),
        ("[data]\nimage_size = 16", "data.image_size"),
        ("[data]\nbatch_size = true", "data.batch_size"),
        ('[distill]\nmode = "medium"', "distill.mode"),
        ('[train]\nstages = ["teacher", "finetune"]', "train.stages"),
        (
            '[student]\narch = "vit_small"\npatch_size = 7\n[data]\nimage_size = 32',
            "student.patch_size",
        ),
        ("[teacher]\nlearning_rate = 1e3", "teacher.learning_rate"),
        ("[student]\nlearning_rate = 1e3", "student.learning_rate"),
        ('[student]\nvariant = "huge"', "student.variant"),
        ('[train]\noptimizer = "adamw"\nweight_decay_mode = "l2"', "train.weight_decay_mode"),
    ],
)
def test_bad_values_name_the_key(tmp_path, text, key):
    with pytest.raises(KDError, match=key.replace(".", r"\.")):
        load_config(write(tmp_path, text))


def test_image_size_too_small_for_model_names_model(tmp_path):
    with pytest.raises(KDError, match="too small for teacher resnet50"):
        load_config(write(tmp_path, "[data]\nimage_size = 28\n"))


def test_invalid_toml_and_missing_file(tmp_path):
    with pytest.raises(KDError, match="not valid TOML"):
        load_config(write(tmp_path, "[data\n"))
    with pytest.raises(KDError, match="config file not found"):
        load_config(tmp_path / "nope.toml")


def test_relative_paths_resolve_against_config_file(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "exp.toml"
    path.write_text('[data]\npath = "../data/x.npz"\n[teacher]\nweights = "imagenet"\n')
    cfg = load_config(path)
    assert cfg.data.path == str((tmp_path / "data" / "x.npz").resolve())
    assert cfg.teacher.weights == "imagenet"


def test_overrides_are_typed_and_validated(tmp_path):
    cfg = load_config(
        write(tmp_path, ""), ["distill.temperature=2", 'train.stages=["distill"]', "run.name=abc"]
    )
    assert cfg.distill.temperature == 2.0 and isinstance(cfg.distill.temperature, float)
    assert cfg.train.stages == ["distill"] and cfg.run.name == "abc"
    with pytest.raises(KDError, match="distill.beta"):
        load_config(write(tmp_path, ""), ["distill.beta=-1"])
    with pytest.raises(KDError, match="section.key=value"):
        parse_override("temperature=2")


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, "[distill]\nalpha = 0.3\n"), ["data.image_size=48"])
    saved = cfg.save(tmp_path / "run" / "config.toml")
    again = load_config(saved)
    assert again.to_dict() == cfg.to_dict()
    assert "None" not in to_toml(cfg.to_dict())


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.teacher.arch and cfg.student.arch


def test_shipped_configs_exist():
    assert len(list((ROOT / "configs").glob("*.toml"))) >= 6


def test_gpu_configs_use_the_seed_recipes_coupled_l2():
    for path in (ROOT / "configs").glob("*_gpu.toml"):
        cfg = load_config(path)
        assert (cfg.train.optimizer, cfg.train.weight_decay_mode) == ("sgd", "l2"), path.name


@pytest.mark.parametrize(
    "text",
    [
        '[train]\nclass_weight = "balanced"\nbalanced_sampling = true',
        '[train]\nclass_weight = "balanced"\nlogit_adjustment = 1.0',
        "[train]\nbalanced_sampling = true\nlogit_adjustment = 1.0",
    ],
)
def test_stacked_prior_corrections_are_refused_unless_asked_for(tmp_path, text):
    with pytest.raises(KDError, match="over-correct.*train.stack_prior_corrections = true"):
        load_config(write(tmp_path, text))
    cfg = load_config(write(tmp_path, text + "\nstack_prior_corrections = true"))
    assert cfg.train.stack_prior_corrections


def test_build_config_rejects_non_table():
    with pytest.raises(KDError, match=r"\[data\] must be a table"):
        build_config({"data": 3}, Path("."))


def test_renamed_key_is_read_under_its_new_name_with_a_note(tmp_path, caplog):
    """eval.seed_subset (it meant the imbalanced subset, not a seed) is now
    eval.imbalanced_subset; the old key still works for one release, with a note."""
    new = write(tmp_path, "[eval]\nimbalanced_subset = false\n")
    assert load_config(new).eval.imbalanced_subset is False
    assert not caplog.records, "the new key is read silently"
    with caplog.at_level("WARNING", logger="kd_keras"):
        old = load_config(write(tmp_path, "[eval]\nseed_subset = false\n"))
    assert old.eval.imbalanced_subset is False
    assert [r.getMessage() for r in caplog.records] == [
        "note: config key eval.seed_subset is deprecated; it is read as eval.imbalanced_subset "
        "(rename it)"
    ]
    caplog.clear()
    with caplog.at_level("WARNING", logger="kd_keras"):
        cfg = build_config({}, tmp_path, ["eval.seed_subset=false"])
    assert cfg.eval.imbalanced_subset is False and len(caplog.records) == 1
    assert "seed_subset" not in to_toml(cfg.to_dict()), "saved under the new name"
    with pytest.raises(KDError, match="both eval.seed_subset and eval.imbalanced_subset"):
        build_config({"eval": {"seed_subset": True, "imbalanced_subset": False}}, tmp_path)
