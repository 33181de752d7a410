"""Property-based tests of the ``"agoq"`` block: every valid block is accepted with exactly its
values, every invalid one is rejected naming each bad key path and what is allowed there.

Valid and invalid blocks are generated from the JSON Schema the config models publish
(``rel_config_schema.py``), not from a hand list: a new field, value or bound is covered as soon as
it exists. Part of the sample also goes through ``deepspeed.initialize`` on a real (gloo) rank:
invalid blocks must fail there with agoq's message, raised before DeepSpeed builds anything (no
traceback from inside DeepSpeed); valid blocks must give a working engine that trains.
"""

from __future__ import annotations

import copy
import json
import os
import re

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from agoq_ds import config as config_module
from agoq_ds.config import AgoqConfig, AgoqConfigError, parse_agoq_config
from agoq_ds.testing.distributed import run_ranks
from tests.reliability import rel_config_schema as cs

EXAMPLES = int(os.environ.get("AGOQ_REL_CONFIG_EXAMPLES", "300"))
"""Hypothesis examples of the in-process properties."""
INIT_VALID = int(os.environ.get("AGOQ_REL_INIT_VALID", "6"))
"""Valid blocks taken through ``deepspeed.initialize`` and two optimizer steps."""
INIT_INVALID = int(os.environ.get("AGOQ_REL_INIT_INVALID", "25"))
"""Invalid blocks (and unsupported DeepSpeed settings) taken through ``deepspeed.initialize``."""

SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)


# --- the generator is complete ------------------------------------------------------------------


def _models() -> list[type]:
    return [m for m in vars(config_module).values() if isinstance(m, type) and issubclass(m, config_module._Model)]


def test_generator_knows_every_model_validator() -> None:
    """Constraints outside the JSON Schema must be known to the generator (``EXTRA_RULES``), and the
    only field validator is the documented refinement of lax mode (no booleans for numbers)."""
    with_model_validators = {m.__name__ for m in _models() if m.__pydantic_decorators__.model_validators}
    assert with_model_validators == set(cs.EXTRA_RULES)
    field_validators = {n for m in _models() for n in m.__pydantic_decorators__.field_validators}
    assert field_validators == {"_no_boolean_numbers"}


def test_every_model_is_reachable_in_the_schema() -> None:
    names = {m.__name__ for m in _models()} - {"_Model", "AgoqConfig"}
    assert names <= set(cs.DEFS), names - set(cs.DEFS)


# --- valid blocks -------------------------------------------------------------------------------


@SETTINGS
@given(block=cs.valid_blocks())
def test_every_valid_block_is_accepted_with_exactly_its_values(block: dict) -> None:
    assert cs.check(cs.ROOT, block) == []  # the generator's own output is valid by the schema
    cfg = parse_agoq_config(copy.deepcopy(block))
    assert cfg.model_dump(mode="json", by_alias=True) == cs.expected_value(cs.ROOT, block)
    again = parse_agoq_config(json.loads(json.dumps(cfg.model_dump(mode="json", by_alias=True))))
    assert again == cfg  # what a parsed config writes back is itself a valid block


# --- invalid blocks -----------------------------------------------------------------------------


def message_lines(err: AgoqConfigError) -> list[str]:
    text = str(err)
    assert text.startswith('invalid "agoq" config:\n'), text
    return [line.strip() for line in text.split("\n")[1:]]


def assert_message_names(err: AgoqConfigError, violations: list[cs.Violation]) -> None:
    """One line per violation, starting with its key path, saying what is allowed there."""
    lines = message_lines(err)
    assert len(lines) == len(violations), (lines, violations)
    for v in violations:
        path = cs.path_text(v.path)
        mine = [line for line in lines if line.startswith(path) and line[len(path) : len(path) + 1] in ("=", ":")]
        assert mine, (path, lines)
        line = mine[0]
        for fragment in cs.expectation(v):
            assert fragment in line, (fragment, line)
        listed = cs.enum_listed(v)
        if listed is not None:
            allowed = re.split(r", | or ", line.rsplit("must be one of ", 1)[1])
            assert sorted(allowed) == sorted(listed), (line, listed)


@SETTINGS
@given(sample=cs.invalid_blocks())
def test_every_invalid_block_is_rejected_naming_path_and_allowed_values(sample: tuple[dict, list]) -> None:
    block, violations = sample
    assume(violations)
    with pytest.raises(AgoqConfigError) as err:
        parse_agoq_config(copy.deepcopy(block))
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no pydantic traceback attached
    assert_message_names(err.value, violations)


@given(block=st.sampled_from(["yes", "auto", 0, 1, 2.5, [], [{}], "{}"]))
def test_a_block_that_is_not_an_object_is_rejected(block) -> None:
    with pytest.raises(AgoqConfigError, match=r"must be an object \(a JSON dict\), true or false"):
        parse_agoq_config(block)


# --- lax spellings --------------------------------------------------------------------------------


def _leaves(node: cs.Node, path: cs.Path = ()):
    """(path, node) of every scalar property reachable through objects."""
    for key, prop_schema in node.schema.get("properties", {}).items():
        prop = cs.resolve(prop_schema)
        main = cs.main_branch(prop) if len(cs.branches(prop)) > 1 else prop
        if main.schema.get("type") == "object" and "properties" in main.schema:
            yield from _leaves(main, (*path, key))
        elif "enum" not in main.schema and main.schema.get("type") in ("integer", "number", "boolean"):
            yield (*path, key), main


LEAVES = list(_leaves(cs.ROOT))
TRUE_WORDS = ("1", "true", "yes", "on", "t", "y")


def _put(path: cs.Path, value) -> dict:
    block: dict = {}
    target = block
    for p in path[:-1]:
        target = target.setdefault(p, {})
    target[path[-1]] = value
    return block


@SETTINGS
@given(data=st.data())
def test_lax_spellings_mean_the_value_they_spell(data: st.DataObject) -> None:
    """What pydantic's lax mode accepts beyond the schema (like every DeepSpeed config block): a
    number written as a string, a boolean as 0/1 or a word. Each must parse to the value it spells."""
    path, node = data.draw(st.sampled_from(LEAVES))
    value = data.draw(cs.valid(node))
    if node.schema["type"] == "boolean":
        word = data.draw(st.sampled_from(cs.BOOL_WORDS))
        spelled, value = data.draw(st.sampled_from([word, word.upper()])), word in TRUE_WORDS
    else:
        spelled = repr(value) if isinstance(value, float) else str(value)
    plain, lax = parse_agoq_config(_put(path, value)), parse_agoq_config(_put(path, spelled))
    assert lax == plain


def test_booleans_are_not_numbers() -> None:
    for path, node in LEAVES:
        if node.schema["type"] == "boolean":
            continue
        with pytest.raises(AgoqConfigError, match="not a boolean"):
            parse_agoq_config(_put(path, True))


def test_auto_is_the_default_everywhere() -> None:
    for path, _ in LEAVES:
        assert parse_agoq_config(_put(path, "auto")) == AgoqConfig()


# --- through deepspeed.initialize -----------------------------------------------------------------


@pytest.fixture(scope="module")
def initialize_outcomes() -> dict:
    from tests.reliability import rel_workers

    (result,) = run_ranks(rel_workers.initialize_properties, 1, (INIT_VALID, INIT_INVALID))
    return result


def test_invalid_blocks_fail_at_initialize_before_deepspeed_builds(initialize_outcomes: dict) -> None:
    out = initialize_outcomes
    assert out["invalid"] >= INIT_INVALID // 2, out
    assert out["unsupported"] >= 1, out
    assert out["failures"] == [], out["failures"]


def test_valid_blocks_build_an_engine_that_trains(initialize_outcomes: dict) -> None:
    out = initialize_outcomes
    assert out["valid_trained"] >= 1, out
    assert out["failures"] == [], out["failures"]
    print(f"\ninitialize sample: {out}")
