"""Every config file composes, names importable targets, and typos are refused."""

import pytest
from conftest import CONFIG_DIR
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

GROUPS = ("data", "model", "trainer", "callbacks", "logger", "experiment", "debug")
OPTIONS = [(group, path.stem) for group in GROUPS
           for path in sorted((CONFIG_DIR / group).glob("*.yaml"))]


def _targets(node):
    """Every _target_ string in a config tree."""
    if isinstance(node, DictConfig):
        if "_target_" in node:
            yield node._target_
        for key in node:
            yield from _targets(node[key])
    elif isinstance(node, ListConfig):
        for item in node:
            yield from _targets(item)


def test_every_group_has_options():
    for group in GROUPS:
        assert any(g == group for g, _ in OPTIONS), f"configs/{group}/ is empty"


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_with_importable_targets(compose_train, group, option):
    cfg = compose_train(f"{group}={option}")
    assert {"seed", "ckpt_path", "train", "test"} <= set(cfg)
    for target in _targets(cfg):
        assert get_object(target) is not None, target


def test_model_config_leaves_sizes_to_the_data(compose_train):
    model = compose_train().model
    assert model.sizes is None
    assert "num_features" not in model and "num_classes" not in model


def test_experiments_change_what_they_promise(compose_train):
    assert compose_train("experiment=xor_single_neuron").model.hidden_sizes == []
    assert compose_train("experiment=xor_hidden").data._target_.endswith("XORDataModule")
    sigmoid = compose_train("experiment=vanishing_sigmoid").model
    relu = compose_train("experiment=deep_relu").model
    assert (sigmoid.activation, relu.activation) == ("sigmoid", "relu")
    assert sigmoid.hidden_sizes == relu.hidden_sizes and len(relu.hidden_sizes) >= 6
    assert compose_train("experiment=mnist_nielsen").model.hidden_sizes == [100]


def test_ddp_cpu_preset_is_two_cpu_processes(compose_train):
    trainer = compose_train("trainer=ddp_cpu").trainer
    assert (trainer.accelerator, trainer.devices, trainer.strategy) == ("cpu", 2, "ddp_spawn")


def test_debug_fdr_is_fast_dev_run(compose_train):
    assert compose_train("debug=fdr").trainer.fast_dev_run is True


def test_a_typo_in_a_key_is_refused_naming_it(compose_train):
    with pytest.raises(ConfigCompositionException, match="hidden_sizez"):
        compose_train("model.hidden_sizez=[8]")


def test_a_typo_in_an_option_is_refused_naming_it(compose_train):
    with pytest.raises(MissingConfigException, match="spiral"):
        compose_train("data=spiral")


def test_run_folders_are_unique_to_the_microsecond():
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        hydra_cfg = OmegaConf.to_container(compose("train", return_hydra_config=True).hydra)
    for folder in (hydra_cfg["run"]["dir"], hydra_cfg["sweep"]["dir"]):
        assert folder.startswith("logs/") and "%f" in folder  # microseconds in the name
    assert hydra_cfg["job"]["chdir"] is False
