"""Config: presets, overrides, YAML, validation errors that name the key and value."""

from __future__ import annotations

import pytest

from pirl import config as C
from pirl.methods import fit_to_dataset
from pirl.presets import PRESETS, view_preset


def test_defaults_are_the_paper_recipe() -> None:
    cfg = C.Config()
    assert (cfg.model.arch, cfg.model.embed_dim) == ("resnet50", 128)
    assert (cfg.views.jigsaw_crop, cfg.views.cell, cfg.views.patch) == (255, 85, 64)
    assert cfg.views.jigsaw_scale_min == 0.6
    assert (cfg.objective.tau, cfg.objective.num_negatives, cfg.objective.lam) == (0.07, 32000, 0.5)
    assert cfg.objective.bank_momentum == 0.5
    assert (cfg.optim.base_lr, cfg.optim.batch_size, cfg.optim.epochs) == (0.03, 1024, 800)
    assert (cfg.optim.momentum, cfg.optim.weight_decay) == (0.9, 1e-4)


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_validates_and_fits_a_small_dataset(name: str) -> None:
    cfg = C.from_preset(name)
    C.validate(cfg)
    notes = fit_to_dataset(cfg, dataset_size=300)
    if cfg.objective.method in ("pirl", "npid"):
        assert cfg.objective.num_negatives <= 299
    if C.from_preset(name).objective.num_negatives > 299:
        assert notes and "299" in notes[0]


@pytest.mark.parametrize("size", [224, 96, 64, 32])
def test_view_presets_fit_their_geometry(size: int) -> None:
    p = view_preset(size)
    assert p["cell"] * 3 <= p["jigsaw_crop"]
    assert p["patch"] < p["cell"]
    # patch ~ cell * 64/85 within a pixel; crop ~ 255/224 * size rounded to a multiple of 3
    assert abs(p["patch"] - p["cell"] * 64 / 85) <= 1
    assert abs(p["jigsaw_crop"] - size * 255 / 224) <= 1.5 and p["jigsaw_crop"] % 3 == 0


def test_dotted_and_bare_overrides() -> None:
    cfg = C.from_preset("demo")
    C.apply_overrides(cfg, ["base_lr=0.5", "objective.tau=0.2", "small_stem=false"])
    assert cfg.optim.base_lr == 0.5 and cfg.objective.tau == 0.2 and cfg.model.small_stem is False


def test_unknown_key_suggests_the_right_one() -> None:
    with pytest.raises(C.ConfigError, match=r"unknown config key 'bse_lr'.*'base_lr'"):
        C.apply_overrides(C.Config(), ["bse_lr=0.1"])


def test_wrong_type_names_key_and_value() -> None:
    with pytest.raises(C.ConfigError, match=r"optim.epochs='many': expected an integer"):
        C.apply_overrides(C.Config(), ["epochs=many"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("patch=90", "views.patch=90: a patch must fit in its cell"),
        ("tau=0", "objective.tau=0.0: must be positive"),
        ("loss=hinge", "objective.loss='hinge'"),
        ("bn_stats=patches", "model.bn_stats='patches'"),
        ("lam=1.5", "objective.lam=1.5"),
        ("batch_size=1", "optim.batch_size=1"),
        ("cell=90", "views.cell=90: grid x cell = 270 exceeds"),
    ],
)
def test_impossible_values_fail_with_one_line(override: str, message: str) -> None:
    cfg = C.Config()
    C.apply_overrides(cfg, [override])
    with pytest.raises(C.ConfigError) as err:
        C.validate(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_explicit_negatives_must_be_below_dataset_size() -> None:
    with pytest.raises(C.ConfigError, match="num_negatives=500: must be below the number of"):
        C.check_explicit_negatives(500, 500)
    C.check_explicit_negatives(499, 500)


def test_the_config_knows_which_values_were_set_explicitly(tmp_path) -> None:
    """A preset's values are not explicit; set_value, overrides and mappings are, in dotted
    form whatever form was used; the record is not saved and plays no part in equality."""
    cfg = C.from_preset("demo")
    assert cfg.explicit == set() and not cfg.is_explicit("objective.num_negatives")
    C.apply_overrides(cfg, ["num_negatives=50"])
    C.apply_mapping(cfg, {"optim": {"epochs": 3}, "tau": 0.1})
    C.set_value(cfg, "train.seed", 1)
    assert cfg.explicit == {"objective.num_negatives", "optim.epochs", "objective.tau",
                            "train.seed"}
    assert "explicit" not in C.to_dict(cfg)
    C.save_yaml(cfg, tmp_path / "c.yaml")
    again = C.from_dict(C.load_yaml(tmp_path / "c.yaml"))
    assert again == cfg and again.explicit == set()


def test_fit_to_dataset_caps_a_preset_and_refuses_an_explicit_num_negatives() -> None:
    cfg = C.from_preset("demo")  # num_negatives 1024 from the preset: an upper bound
    notes = fit_to_dataset(cfg, 120)
    assert cfg.objective.num_negatives == 119 and "using 119" in notes[0]
    cfg = C.from_preset("demo")
    C.apply_overrides(cfg, ["num_negatives=1024"])  # the same value, asked for
    with pytest.raises(C.ConfigError, match="num_negatives=1024: must be below the number of"):
        fit_to_dataset(cfg, 120)
    assert fit_to_dataset(cfg, 1025) == [] and cfg.objective.num_negatives == 1024
    cfg = C.from_preset("demo")
    C.apply_overrides(cfg, ["method=jigsaw", "num_negatives=1024"])  # no bank: nothing to check
    assert fit_to_dataset(cfg, 120) == []
    with pytest.raises(C.ConfigError, match="dataset has 1 image"):
        fit_to_dataset(cfg, 1)


def test_validate_only_checks() -> None:
    cfg = C.from_preset("imagenette96-r18")
    cfg.optim.epochs = 1
    before = C.to_dict(cfg)
    C.validate(cfg)
    assert C.to_dict(cfg) == before


def test_yaml_roundtrip_and_safe_loading(tmp_path) -> None:
    cfg = C.from_preset("tiny64-r18")
    path = tmp_path / "c.yaml"
    C.save_yaml(cfg, path)
    again = C.from_dict(C.load_yaml(path))
    assert again == cfg
    evil = tmp_path / "evil.yaml"
    evil.write_text("optim: !!python/object/apply:os.system ['touch hacked']\n")
    with pytest.raises(C.ConfigError, match="not valid YAML"):
        C.load_yaml(evil)
    assert not (tmp_path / "hacked").exists()


def test_nested_and_flat_yaml_mappings(tmp_path) -> None:
    cfg = C.Config()
    C.apply_mapping(cfg, {"optim": {"epochs": 3}, "tau": 0.1})
    assert cfg.optim.epochs == 3 and cfg.objective.tau == 0.1
    with pytest.raises(C.ConfigError, match="unknown config key 'optim.epoch'"):
        C.apply_mapping(cfg, {"optim": {"epoch": 3}})


def test_help_table_lists_every_field_with_help() -> None:
    text = C.help_table(C.from_preset("demo"))
    assert "base_lr: 0.03  # learning rate per 256 images" in text
    assert text.count("#") >= 40


def test_a_preset_warmup_shrinks_to_fit_a_short_run() -> None:
    """`--preset imagenette96-r18 --epochs 1` (2 warm-up epochs) runs, with a note."""
    cfg = C.from_preset("imagenette96-r18")
    cfg.optim.epochs = 1
    notes = fit_to_dataset(cfg, dataset_size=500)
    assert cfg.optim.warmup_epochs == pytest.approx(0.1)
    assert any("optim.warmup_epochs=2.0 does not fit in optim.epochs=1" in n for n in notes)
    cfg = C.from_preset("imagenette96-r18")  # a long enough run keeps its warm-up
    assert not [n for n in fit_to_dataset(cfg, dataset_size=500) if "warmup" in n]
    assert cfg.optim.warmup_epochs == 2.0
    with pytest.raises(C.ConfigError, match=r"optim.warmup_epochs=-1.0: must be non-negative"):
        C.apply_overrides(cfg, ["warmup_epochs=-1"])
        C.validate(cfg)
