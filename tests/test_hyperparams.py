import json
from dataclasses import dataclass, field
from typing import Optional

import pytest

from lm_human_preferences.utils import hyperparams
from lm_human_preferences.utils.errors import UserError


@dataclass
class AdaptiveKL(hyperparams.HParams):
    target: Optional[float] = None
    horizon: int = 10000


@dataclass
class Rewards(hyperparams.HParams):
    kl_coef: float = 0.2
    adaptive_kl: Optional[AdaptiveKL] = None
    trained_model: Optional[str] = None
    train_new_model: bool = True


@dataclass
class PPO(hyperparams.HParams):
    lr: float = 5e-6
    total_episodes: int = 2000000
    whiten_rewards: bool = True


@dataclass
class Top(hyperparams.HParams):
    name: str = "x"
    seed: Optional[int] = None
    rewards: Rewards = field(default_factory=Rewards)
    ppo: PPO = field(default_factory=PPO)


def test_typed_overrides():
    hp = Top()
    hp.override_from_str("ppo.lr", "1e-5")
    hp.override_from_str("ppo.total_episodes", "1e6")
    hp.override_from_str("ppo.whiten_rewards", "off")
    hp.override_from_str("seed", "3")
    hp.override_from_str("rewards.trained_model", "gs://lm-human-preferences/runs/x")
    assert hp.ppo.lr == 1e-5 and isinstance(hp.ppo.lr, float)
    assert hp.ppo.total_episodes == 1000000 and isinstance(hp.ppo.total_episodes, int)
    assert hp.ppo.whiten_rewards is False
    assert hp.seed == 3
    assert hp.rewards.trained_model == "gs://lm-human-preferences/runs/x"
    hp.override_from_str("seed", "None")
    assert hp.seed is None
    hp.override_from_str("rewards.train_new_model", "True")
    assert hp.rewards.train_new_model is True


def test_optional_group_on_off_and_implicit_on():
    hp = Top()
    hp.override_from_str("rewards.adaptive_kl", "on")
    assert hp.rewards.adaptive_kl == AdaptiveKL()
    hp.override_from_str("rewards.adaptive_kl", "off")
    assert hp.rewards.adaptive_kl is None
    hp.override_from_str("rewards.adaptive_kl.target", "6.0")
    assert hp.rewards.adaptive_kl == AdaptiveKL(target=6.0, horizon=10000)
    hp.override_from_str("rewards.adaptive_kl", "on")  # stays on with its values
    assert hp.rewards.adaptive_kl.target == 6.0


@pytest.mark.parametrize("key, value, message", [
    ("ppo.lrr", "1", r"unknown hparam 'ppo.lrr'; did you mean 'ppo.lr'\?"),
    ("rewards.adaptive_kl.targt", "1", r"did you mean 'rewards.adaptive_kl.target'\?"),
    ("ppo.total_episodes", "1.5", r"'ppo.total_episodes': cannot parse '1.5' as int"),
    ("ppo.lr", "fast", r"'ppo.lr': cannot parse 'fast' as float"),
    ("ppo.whiten_rewards", "maybe", r"'ppo.whiten_rewards': cannot parse 'maybe' as bool"),
    ("ppo", "on", r"'ppo' is a group"),
    ("rewards.adaptive_kl", "6", r"'rewards.adaptive_kl' is a group; set it with 'on' or 'off'"),
    ("ppo.lr.x", "1", r"unknown hparam 'ppo.lr.x'"),
    # a key given without its groups, or misspelt there: the full keys it may mean
    ("adaptive_kl.target", "1", r"unknown hparam 'adaptive_kl.target'; did you mean 'rewards.adaptive_kl.target'\?"),
    ("lr", "1", r"unknown hparam 'lr'; did you mean 'ppo.lr'\?"),
    ("horizn", "1", r"did you mean 'rewards.adaptive_kl.horizon'\?"),
    ("rewards.target", "1", r"unknown hparam 'rewards.target'; did you mean 'rewards.adaptive_kl.target'\?"),
    ("xyz", "1", r"unknown hparam 'xyz'; valid keys here: name, seed, rewards, ppo$"),
])
def test_bad_overrides_name_key_and_value(key, value, message):
    with pytest.raises(UserError, match=message):
        Top().override_from_str(key, value)


def test_dict_json_round_trip():
    hp = Top()
    hp.override_from_dict({"ppo": {"lr": 1}, "rewards.adaptive_kl": {"target": 6}, "seed": 1})
    assert hp.ppo.lr == 1.0 and isinstance(hp.ppo.lr, float)
    assert hp.rewards.adaptive_kl.target == 6.0
    nested = hp.to_nested_dict()
    assert nested["rewards"]["adaptive_kl"] == {"target": 6.0, "horizon": 10000}
    assert nested["rewards"]["kl_coef"] == 0.2
    again = Top.from_json(hp.to_json())
    assert again == hp
    assert json.loads(again.to_json()) == nested
    hp.override_from_dict({"rewards": {"adaptive_kl": None}})
    assert hp.rewards.adaptive_kl is None


def test_dict_errors():
    with pytest.raises(UserError, match="'ppo.lr' must be float, got 'x'"):
        Top().override_from_dict({"ppo": {"lr": "x"}})
    with pytest.raises(UserError, match="unknown hparam 'rewards.kl'"):
        Top().override_from_dict({"rewards": {"kl": 1.0}})
    with pytest.raises(UserError, match="'ppo' cannot be switched off"):
        Top().override_from_dict({"ppo": None})
    with pytest.raises(UserError, match="malformed"):
        Top.from_json("{not json")


def test_validate_catches_wrong_types_set_directly():
    hp = Top()
    hp.ppo.total_episodes = "many"
    with pytest.raises(UserError, match="'ppo.total_episodes' must be int"):
        hp.validate()
    hp = Top()
    hp.name = None
    with pytest.raises(UserError, match="'name' may not be None"):
        hp.validate()
    Top().validate()



def test_nearest_keys_end_with_the_key_else_are_spelt_like_it():
    keys = {"run.seed", "ppo.lr", "rewards.train_new_model.lr", "rewards.train_new_model.run.seed", "ppo.batch_size"}
    assert hyperparams.nearest_keys("seed", keys) == ["run.seed", "rewards.train_new_model.run.seed"]
    assert hyperparams.nearest_keys("lr", keys, n=1) == ["ppo.lr"]
    assert hyperparams.nearest_keys("ppo.batchsize", keys) == ["ppo.batch_size"]
    assert hyperparams.nearest_keys("epochs", keys) == []


def test_flags_set_in_order_and_a_field_of_a_group_switched_off_is_refused():
    hp = Top()
    hp.override_from_flags({"rewards.adaptive_kl.target": "3", "ppo.lr": "1"})
    assert hp.rewards.adaptive_kl.target == 3.0 and hp.ppo.lr == 1.0
    for flags in ({"rewards.adaptive_kl": "off", "rewards.adaptive_kl.target": "3"},
                  {"rewards.adaptive_kl.horizon": "5", "rewards.adaptive_kl": "None"}):
        with pytest.raises(UserError, match=r"--rewards.adaptive_kl.\w+ sets a field of rewards.adaptive_kl, which "
                                            r"--rewards.adaptive_kl \w+ switches off"):
            Top().override_from_flags(flags)
    hp = Top()
    hp.override_from_flags({"rewards.adaptive_kl": "on", "rewards.adaptive_kl.target": "3"})
    assert hp.rewards.adaptive_kl.target == 3.0
