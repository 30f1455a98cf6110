"""A method's hyperparameters travel with the method: an option it does not take is an
error in the library, the trainer's configuration and the CLI alike (tests/cli's error sweep
has the command-line cases); the old top-level ``decay`` setting still works, with a
warning, and configurations saved before it moved still load."""

from __future__ import annotations

import pytest
from torch import nn

import nmsparse
from nmsparse.app.train.config import ConfigError, TrainConfig, from_dict


def test_the_library_refuses_an_option_the_method_does_not_take():
    with pytest.raises(ValueError, match="method 'ste' takes no decay"):
        nmsparse.sparsify(nn.Linear(8, 8), "2:4", "ste", decay=1e-3)
    assert nmsparse.make_method("srste", decay=1e-3) == nmsparse.SRSTE(decay=1e-3)
    with pytest.raises(ValueError, match="conflict with the method instance"):
        nmsparse.make_method(nmsparse.SRSTE(decay=1e-3), decay=2e-3)


def test_the_trainer_refuses_it_too_instead_of_dropping_it():
    with pytest.raises(ConfigError, match="method 'ste' takes no decay"):
        TrainConfig(method="ste", method_options={"decay": 1e-3}).validate()
    config = TrainConfig(method="srste", method_options={"decay": 1e-3}).validate()
    assert config.make_method() == nmsparse.SRSTE(decay=1e-3)
    assert TrainConfig().validate().make_method() == nmsparse.SRSTE()  # its own default


def test_the_old_decay_setting_warns_and_follows_the_same_rule():
    with pytest.warns(DeprecationWarning, match="method option"):
        config = TrainConfig(method="srste", decay=1e-3).validate()
    assert config.method_options == {"decay": 1e-3} and config.decay is None
    with pytest.warns(DeprecationWarning), \
            pytest.raises(ConfigError, match="method 'ste' takes no decay"):
        TrainConfig(method="ste", decay=1e-3).validate()
    with pytest.warns(DeprecationWarning), pytest.raises(ConfigError, match="disagree"):
        TrainConfig(decay=1e-3, method_options={"decay": 2e-3}).validate()


def test_a_configuration_saved_with_the_old_decay_key_still_loads():
    # versions up to 0.1 saved decay=2e-4 in every run, whatever its method
    assert from_dict({"method": "ste", "decay": 2e-4}).method_options == {}
    assert from_dict({"method": "srste", "decay": 1e-3}).make_method().decay == 1e-3
    both = from_dict({"method": "srste", "decay": 2e-4, "method_options": {"decay": 0.0}})
    assert both.make_method().decay == 0.0  # the option, as the old trainer used it
