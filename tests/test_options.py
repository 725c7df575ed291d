"""Options: typed, validated, mirrored by UNSLOTH_FX_* variables."""

import pytest

from unsloth_fx.options import OptionError, Options, format_bytes, parse_bytes


@pytest.mark.parametrize(
    "text, expected",
    [("7GiB", 7 * 2**30), ("512MiB", 512 * 2**20), ("1.5 GiB", int(1.5 * 2**30)), ("3GB", 3 * 10**9),
     (8_000_000_000, 8_000_000_000), ("0.5", 0.5), (0.25, 0.25), (None, None)],
)
def test_memory_budget_forms(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize(
    "options, message",
    [
        ({"memory_budget": "7 parsecs"}, "memory_budget='7 parsecs': unknown unit 'parsecs'"),
        ({"memory_budget": "lots"}, "memory_budget='lots': expected bytes"),
        ({"memory_budget": -3}, "memory_budget=-3: must be positive"),
        ({"memory_budget": True}, "memory_budget=True"),
        ({"share_weights": "yes"}, "share_weights='yes': expected one of 'off', 'report', 'apply'"),
        ({"share_tolerance": 2}, "share_tolerance=2: expected a number in (0, 1)"),
        ({"lower": "tvm"}, "lower='tvm': expected one of 'inductor', 'eager'"),
        ({"fuse_optimizer": "maybe"}, "fuse_optimizer='maybe': expected a boolean"),
        ({"verify": "perhaps"}, "verify='perhaps': expected a boolean"),
        ({"pipeline": "default,+no_such_pass"}, "unknown pass 'no_such_pass'; known passes: "),
        ({"pipeline": 3}, "pipeline=3: expected a pipeline string"),
        ({"memroy_budget": "7GiB"}, "unknown option 'memroy_budget'; valid options: dump, fuse_optimizer, lower, memory_budget"),
    ],
)
def test_bad_options_name_key_value_and_choices(options, message):
    with pytest.raises(OptionError) as e:
        Options.from_user(options, env={})
    assert message in str(e.value)


def test_environment_mirrors_options_and_explicit_wins():
    env = {"UNSLOTH_FX_MEMORY_BUDGET": "7GiB", "UNSLOTH_FX_LOWER": "eager", "UNSLOTH_FX_VERIFY": "0"}
    o = Options.from_user({}, env=env)
    assert (o.memory_budget, o.lower, o.verify) == (7 * 2**30, "eager", False)
    o = Options.from_user({"lower": "inductor"}, env=env)
    assert o.lower == "inductor"


def test_bad_environment_value_is_reported_like_an_option():
    with pytest.raises(OptionError, match="share_weights='sometimes'"):
        Options.from_user({}, env={"UNSLOTH_FX_SHARE_WEIGHTS": "sometimes"})


def test_options_are_frozen():
    o = Options.from_user({}, env={})
    with pytest.raises(Exception):
        o.lower = "eager"  # type: ignore[misc]


def test_fraction_budget_needs_device_memory():
    o = Options.from_user({"memory_budget": 0.5}, env={})
    assert o.resolve_budget(80 * 2**30) == 40 * 2**30
    with pytest.raises(OptionError, match="fraction of device memory"):
        o.resolve_budget(None)


def test_format_bytes():
    assert format_bytes(7 * 2**30) == "7.00 GiB"
    assert format_bytes(1536) == "1.50 KiB"
