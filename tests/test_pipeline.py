"""Pipeline strings and the pass registry."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from unsloth_fx.pass_base import PassResult, graph_pass
from unsloth_fx.pipeline import DEFAULT_PASSES, Pipeline

SEED = list(DEFAULT_PASSES)


@graph_pass(name="count_nodes_for_test", stage="joint", options={"limit": 10, "scale": 1.0, "loud": False, "tag": "x"})
def count_nodes_for_test(gm, ctx, limit, scale, loud, tag):
    return PassResult(gm, False, {"nodes": len(gm.graph.nodes), "limit": limit, "scale": scale, "loud": loud, "tag": tag})


@pytest.mark.parametrize(
    "text",
    ["default", "default,+count_nodes_for_test", "default,-share_weights", "share_weights,plan_memory",
     "count_nodes_for_test{limit=3,loud=true}", "default,count_nodes_for_test{scale=0.5,tag=abc}"],
)
def test_canonical_strings_round_trip(text):
    assert str(Pipeline.parse(text)) == text


def test_default_expands_to_seed_passes_in_order():
    assert [s.name for s, _ in Pipeline.parse("default").passes()] == SEED


def test_plus_appends_minus_removes_and_options_are_typed():
    p = Pipeline.parse("default,-share_weights,+count_nodes_for_test{limit=3,scale=0.5,loud=on}")
    names = [s.name for s, _ in p.passes()]
    assert names == SEED[1:] + ["count_nodes_for_test"]
    assert p.passes()[-1][1] == {"limit": 3, "scale": 0.5, "loud": True}


def test_naming_a_pass_again_sets_its_options_in_place():
    p = Pipeline.parse("count_nodes_for_test,plan_memory,count_nodes_for_test{limit=5}")
    assert [(s.name, o) for s, o in p.passes()] == [("count_nodes_for_test", {"limit": 5}), ("plan_memory", {})]


def test_unknown_pass_lists_known_ones():
    with pytest.raises(ValueError) as e:
        Pipeline.parse("default,+nope")
    msg = str(e.value)
    assert "unknown pass 'nope'" in msg
    for name in SEED:
        assert name in msg


@pytest.mark.parametrize(
    "text, message",
    [("", "empty pipeline"), ("default{x=1}", "'default' takes no"), ("count_nodes_for_test{limit=abc}", "expected int"),
     ("count_nodes_for_test{nope=1}", "has no option 'nope'"), ("count_nodes_for_test{limit}", "is not key=value"),
     ("a b", "cannot parse pipeline item"), ("count_nodes_for_test{limit=1", "unbalanced"),
     ("-count_nodes_for_test{limit=1}", "takes no options")],
)
def test_malformed_strings(text, message):
    with pytest.raises(ValueError, match=message):
        Pipeline.parse(text)


def test_registering_a_different_function_under_a_taken_name_fails():
    with pytest.raises(ValueError, match="already registered"):
        @graph_pass(name="plan_memory")
        def impostor(gm, ctx):
            return PassResult(gm, False)


def test_bad_stage_is_rejected():
    with pytest.raises(ValueError, match="stage='sideways'"):
        graph_pass(name="x", stage="sideways")


names = st.sampled_from(SEED + ["count_nodes_for_test"])
items = st.one_of(
    names,
    names.map(lambda n: "+" + n),
    names.map(lambda n: "-" + n),
    st.just("count_nodes_for_test{limit=7}"),
    st.just("default"),
)


@given(st.lists(items, min_size=1, max_size=6))
def test_any_generated_pipeline_round_trips_and_reparses_to_the_same_passes(parts):
    text = ",".join(parts)
    p = Pipeline.parse(text)
    assert str(p) == text
    q = Pipeline.parse(str(p))
    assert [(s.name, o) for s, o in q.passes()] == [(s.name, o) for s, o in p.passes()]
    assert len({s.name for s, _ in p.passes()}) == len(p.passes())  # no pass runs twice
