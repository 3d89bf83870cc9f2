"""Property tests: whatever a config file or --set says, `vlfit` answers with exit code 0 or with
exit code 2 and one message per problem, never a traceback, and loads no data or model first."""

from __future__ import annotations

import copy
import math
import re

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vlfit.train

VALID = {"model": {"backbone": "tiny-clip"}, "data": {"num_images": 60, "image_size": 32},
         "train": {"epochs": 1, "micro_batch": 8}}

# "y", "n", "on", ... would be valid booleans: keep such words out of the letters.
not_a_number = st.one_of(st.text(alphabet="abcxz ", min_size=1), st.lists(st.integers(), min_size=3),
                         st.dictionaries(st.sampled_from("ab"), st.integers(), min_size=1))
not_finite = st.sampled_from([math.nan, math.inf, -math.inf])


def invalid_ints(low: int):
    """Integers below `low`, fractions, and things that are not numbers."""
    return st.one_of(st.integers(max_value=low - 1), not_a_number, st.floats(0.1, 0.9).map(lambda f: low + f))


def invalid_floats(low: float, high: float, low_open: bool = False, high_open: bool = False):
    """Numbers outside [low, high] (an open end itself included), NaN, infinities, non-numbers."""
    finite = dict(allow_nan=False, allow_infinity=False)
    edges = [v for v, is_open in ((low, low_open), (high, high_open)) if is_open]
    return st.one_of(st.floats(max_value=low - 1e-6, **finite), st.floats(min_value=high + 1e-6, **finite),
                     st.sampled_from(edges) if edges else st.nothing(), not_finite, not_a_number)


def not_one_of(*allowed: str):
    return st.one_of(st.text(min_size=1, max_size=12).filter(lambda s: s not in allowed), st.integers(), not_a_number)


# key -> values that must be refused for that key alone
INVALID = {
    "model.attn_implementation": not_one_of("sdpa", "eager"),
    "model.head_dropout": invalid_floats(0.0, 1.0, high_open=True),
    "model.trust_remote_code": not_a_number,
    "data.source": not_one_of("synthetic-har", "hub", "parquet", "disk", "kaggle", "imagefolder", "csv"),
    "data.num_images": invalid_ints(30),
    "data.image_size": st.one_of(invalid_ints(16), st.integers(1025, 10**6)),
    "data.val_fraction": invalid_floats(0.0, 1.0, low_open=True, high_open=True),
    "data.crop_scale": st.one_of(st.lists(st.floats(0.1, 1.0), max_size=1), st.tuples(st.floats(0.6, 1.0),
                                 st.floats(0.01, 0.5)).map(list), st.just([0.5, 2.0]), not_a_number),
    "data.hflip": invalid_floats(0.0, 1.0),
    "data.num_workers": invalid_ints(0),
    "train.epochs": invalid_ints(1),
    "train.micro_batch": st.one_of(invalid_ints(1), st.text(min_size=1, max_size=8).filter(
        lambda s: s != "auto" and not s.strip().isdigit())),
    "train.accum_steps": invalid_ints(1),
    "train.eval_batch": invalid_ints(1),
    "train.lr": st.one_of(st.floats(max_value=0.0, allow_nan=False, allow_infinity=False), not_finite, not_a_number),
    "train.warmup_ratio": invalid_floats(0.0, 1.0, high_open=True),
    "train.betas": st.one_of(st.just([1.5, 0.9]), st.just([0.9]), not_a_number),
    "train.grad_clip": st.one_of(st.floats(max_value=0.0, allow_nan=False, allow_infinity=False), not_finite),
    "train.precision": not_one_of("auto", "fp32", "bf16", "fp16"),
    "train.device": not_one_of("auto", "cpu", "cuda"),
    "train.checkpoint_every": invalid_ints(1),
    "train.nonfinite_patience": invalid_ints(1),
    "train.effective_batch": st.integers(1, 1000).filter(lambda v: v % 8),  # a multiple of micro_batch 8
    "train.layer_decay": invalid_floats(0.0, 1.0, low_open=True),
    "model.head": not_one_of("linear", "zeroshot"),
    "model.finetune": not_one_of("full", "linear_probe", "lora"),
    "model.mask.kind": not_one_of("none", "random", "attentive"),
    "model.mask.keep_ratio": invalid_floats(0.0, 1.0, low_open=True),
    "model.mask.block": st.one_of(st.integers(3, 64), st.integers(max_value=0), not_a_number),
    "model.mask.unmasked_epochs": invalid_ints(0),
    "model.lora.r": invalid_ints(1),
    "loss.contrastive_weight": st.one_of(st.floats(max_value=-1e-6, allow_nan=False, allow_infinity=False),
                                         not_finite, not_a_number),
}
# combinations that are wrong although each value alone is fine: (settings, key the message names)
COMBINATIONS = [
    ({"train.micro_batch": "auto"}, "train.effective_batch"),
    ({"train.micro_batch": "auto", "train.effective_batch": 64, "train.accum_steps": 2}, "train.effective_batch"),
    ({"train.micro_batch": 16, "train.accum_steps": 4, "train.effective_batch": 32}, "train.effective_batch"),
    ({"train.precision": "fp16", "train.device": "cpu"}, "train.device"),
    ({"model.finetune": "linear_probe", "model.mask.kind": "random"}, "model.mask.kind"),
    ({"model.finetune": "linear_probe", "loss.contrastive_weight": 1.0}, "loss.contrastive_weight"),
    ({"model.mask.unmasked_epochs": 1, "train.epochs": 3}, "model.mask.unmasked_epochs"),  # nothing masked before it
    ({"wise_ft.alphas": [0.5]}, "wise_ft.alphas"),
    ({"loss.train_text": True}, "loss.train_text"),
]


def with_setting(config: dict, key: str, value) -> dict:
    out = copy.deepcopy(config)
    *sections, name = key.split(".")
    node = out
    for section in sections:
        node = node.setdefault(section, {})
    node[name] = value
    return out


@pytest.fixture
def nothing_loads(monkeypatch):
    fail = lambda *a, **k: pytest.fail("data or a model was loaded before the config was checked")  # noqa: E731
    monkeypatch.setattr(vlfit.train, "prepare_data", fail)
    monkeypatch.setattr(vlfit.train, "build_classifier", fail)


SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(data=st.data())
def test_each_invalid_value_is_refused_with_its_key(data, tmp_path, nothing_loads, run_vlfit):
    key = data.draw(st.sampled_from(sorted(INVALID)), label="key")
    value = data.draw(INVALID[key], label="value")
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(with_setting(VALID, key, value)))
    run_dir = tmp_path / "run"
    code, stderr = run_vlfit("train", config, "--run-dir", run_dir)
    assert code == 2, stderr
    assert stderr.startswith("error: ") and re.search(rf"\n  {re.escape(key)}(\.\d+)?: ", stderr), stderr
    assert "Traceback" not in stderr
    assert not run_dir.exists()


@pytest.mark.parametrize("settings_,key", COMBINATIONS)
def test_invalid_combinations_are_refused(settings_, key, tmp_path, nothing_loads, run_vlfit):
    config = VALID
    for k, v in settings_.items():
        config = with_setting(config, k, v)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    code, stderr = run_vlfit("train", path, "--run-dir", tmp_path / "run")
    assert code == 2 and f"\n  {key}: " in stderr and "Traceback" not in stderr


yaml_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10))
yaml_values = st.recursive(yaml_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)), max_leaves=8)
known_keys = st.sampled_from(["name", "model", "data", "train", *INVALID])


@SETTINGS
@given(document=st.one_of(
    st.text(max_size=80),  # anything at all, YAML or not
    st.dictionaries(st.one_of(known_keys, st.text(max_size=8)), yaml_values, max_size=4).map(yaml.safe_dump),
    st.dictionaries(st.sampled_from(["model", "data", "train"]),
                    st.dictionaries(st.text(max_size=12), yaml_values, max_size=3), max_size=3).map(yaml.safe_dump),
), overrides=st.lists(st.text(max_size=20), max_size=2))
def test_any_config_gives_a_result_or_a_clear_error(document, overrides, tmp_path, run_vlfit):
    path = tmp_path / "any.yaml"
    path.write_text(document)
    code, stderr = run_vlfit("validate", path, *[a for o in overrides for a in ("--set", o)])
    assert code in (0, 2), stderr
    assert "Traceback" not in stderr
    if code == 2:
        assert stderr.startswith(("error: ", "Error: ", "Usage: ")) and stderr.strip()
