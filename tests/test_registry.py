"""Models by name (rlr_fast.models.registry): create_model, list_models, register_model."""
import argparse

import pytest

import rlr_fast
from rlr_fast.errors import UsageError
from rlr_fast.models import PatchCoreModel, ResADModel, RLRModel, UniADModel, create_model, list_models, register_model
from rlr_fast.models import registry
from rlr_fast.models.rlr import PAPER_NETWORK

# A tiny build of each model (with random backbone weights: no download); UniAD's 7 x 7 window needs
# a stride-16 grid of 8.
TINY = {RLRModel: dict(image_size=64), UniADModel: dict(image_size=128, hidden=32, num_heads=4, ffn_dim=64,
                                                          num_encoder_layers=1, num_decoder_layers=1),
        ResADModel: dict(image_size=64, coupling_layers=2, pos_embed_dim=16, shots=2),
        PatchCoreModel: dict(image_size=64)}


@pytest.fixture
def scratch_registry(monkeypatch):
    """Registrations made in a test are undone after it."""
    monkeypatch.setattr(registry, "_VARIANTS", dict(registry._VARIANTS))
    monkeypatch.setattr(registry, "_DEFAULT_VARIANT", dict(registry._DEFAULT_VARIANT))


def test_the_variants_are_listed_and_exported_from_the_package():
    names = list_models()
    assert names == sorted(names)
    assert {"rlr_lite0", "rlr_b6_paper", "uniad_b4", "uniad_lite0", "resad_lite0", "patchcore_lite0"} <= set(names)
    assert list_models("rlr_*") == ["rlr_b6_paper", "rlr_lite0"]
    assert rlr_fast.create_model is create_model and rlr_fast.list_models is list_models
    assert rlr_fast.register_model is register_model


@pytest.mark.parametrize("name", list_models())
def test_every_variant_builds(name):
    cls = registry.get_variant(name).model_class
    model = create_model(name, backbone_weights="random", **TINY[cls])
    assert isinstance(model, cls)
    assert model.image_size == TINY[cls]["image_size"]
    for key, value in registry.get_variant(name).defaults.items():  # the variant's defaults are in its config
        assert getattr(model.config, key) == value


def test_the_paper_variant_holds_the_papers_network_and_backbone():
    defaults = registry.get_variant("rlr_b6_paper").defaults
    assert defaults == {"backbone": "tf_efficientnet_b6", **PAPER_NETWORK}


def test_keyword_arguments_override_the_variants_defaults():
    model = create_model("rlr_b6_paper", backbone="tf_efficientnet_lite0", backbone_weights="random", image_size=64,
                         num_layers=1)
    assert model.config.num_layers == 1  # the variant's 4, overridden
    assert model.config.backbone == "tf_efficientnet_lite0"
    assert model.config.dim_base == PAPER_NETWORK["dim_base"]  # the variant's, kept
    assert model.config.feature_norm == "none"


def test_an_unknown_name_is_a_clear_error_listing_the_known_ones():
    with pytest.raises(UsageError, match="unknown model 'rlr_huge'; choose one of") as err:
        create_model("rlr_huge")
    for name in ["rlr", "patchcore", *list_models()]:
        assert name in str(err.value)


def test_register_model_refuses_a_name_twice(scratch_registry):
    with pytest.raises(ValueError, match="a model named 'rlr_lite0' is already registered"):
        register_model("rlr_lite0", RLRModel)
    with pytest.raises(ValueError, match="already registered"):
        register_model("rlr", RLRModel)  # a short name too
    with pytest.raises(ValueError, match="rlr already has a default variant, rlr_lite0"):
        register_model("rlr_other", RLRModel, default=True)


def test_a_registered_variant_is_built_with_its_defaults(scratch_registry):
    register_model("rlr_tiny_test", RLRModel, num_layers=1, dim_base=16)
    assert "rlr_tiny_test" in list_models()
    model = create_model("rlr_tiny_test", image_size=64, backbone_weights="random")
    assert (model.config.num_layers, model.config.dims) == (1, (32, 64))
    assert registry.model_class("rlr_tiny_test") is RLRModel


@pytest.mark.parametrize("short, variant, cls", [("rlr", "rlr_lite0", RLRModel), ("uniad", "uniad_b4", UniADModel),
                                                 ("resad", "resad_lite0", ResADModel),
                                                 ("patchcore", "patchcore_lite0", PatchCoreModel)])
def test_the_cli_short_names_map_to_their_default_variants(short, variant, cls):
    assert registry.default_variant(short) == variant
    assert registry.model_class(short) is cls and cls.name == short
    assert registry.get_variant(variant).defaults == {}  # the short name builds the class's own defaults


def test_train_offers_the_short_names_and_each_models_own_options():
    from rlr_fast.commands import train

    parser = argparse.ArgumentParser()
    train.configure(parser)
    (model,) = [a for a in parser._actions if "--model" in a.option_strings]
    assert list(model.choices) == ["rlr", "uniad", "resad", "patchcore"]
    flags = {f for a in parser._actions for f in a.option_strings}
    assert {"--feature-norm", "--score", "--anomaly-map", "--residual", "--coreset-ratio", "--shots"} <= flags
    kept = {option for option, where, _ in train.run_settings() if where == "config"}
    assert {"--feature-norm", "--score", "--anomaly-map", "--shots", "--residual", "--coreset-ratio"} <= kept


def test_the_models_declare_what_the_commands_need():
    assert [cls for cls in TINY if cls.takes_references] == [ResADModel]
    assert [cls for cls in TINY if cls.training_free] == [PatchCoreModel]
    assert {cls.name: cls.default_image_size() for cls in TINY} == {"rlr": 256, "uniad": 224, "resad": 224,
                                                                     "patchcore": 256}
    assert {cls.name: (cls.recipes["fast"], cls.recipes["paper"]) for cls in TINY} == {
        "rlr": ("rlr-fast", "paper"), "uniad": ("fast", "uniad"), "resad": ("resad-fast", "resad"),
        "patchcore": ("fast", "paper")}


def test_export_says_why_a_model_is_refused_as_declared_by_its_class(tmp_path, capsys):
    from rlr_fast.cli import main
    from rlr_fast.training import save_checkpoint

    resad = create_model("resad", backbone_weights="random", **TINY[ResADModel])
    save_checkpoint(tmp_path / "resad" / "checkpoint.pt", resad)
    assert main(["export", "--run", str(tmp_path / "resad"), "--format", "onnx"]) == 2
    assert ("--format onnx: ResAD runs cannot be exported as a graph yet (its reference images change per class); "
            "use --format weights") in capsys.readouterr().err
    patchcore = create_model("patchcore", backbone_weights="random", **TINY[PatchCoreModel])
    save_checkpoint(tmp_path / "patchcore" / "checkpoint.pt", patchcore)
    assert main(["export", "--run", str(tmp_path / "patchcore"), "--format", "weights", "--image-size", "96"]) == 2
    assert ("this run was trained at 64 px and its model only takes that size (its memory bank holds the features "
            "of images of that size)") in capsys.readouterr().err
