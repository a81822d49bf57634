import pytest

import jaxws
from jaxws import AllocationPolicy, LearningPolicy, SpillPolicy, WorkspaceConfiguration


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"initial_size": -1}, "initial_size=-1"),
        ({"min_size": 1.5}, "min_size=1.5"),
        ({"max_size": True}, "max_size=True"),
        ({"steps_number": 0}, "steps_number=0"),
        ({"overallocation_limit": -0.1}, "overallocation_limit=-0.1"),
        ({"overallocation_limit": float("nan")}, "overallocation_limit=nan"),
        ({"policy_spill": "fail"}, "SpillPolicy.FAIL"),
        ({"policy_learning": LearningPolicy.NONE}, "initial_size"),
        ({"policy_learning": LearningPolicy.OVER_TIME}, "cycles_before_initialization"),
        ({"max_size": 10, "min_size": 20}, "max_size=10"),
        ({"max_size": 10, "initial_size": 20}, "initial_size=20"),
    ],
)
def test_bad_values_are_rejected_with_the_value_and_the_fix(kwargs, fragment):
    with pytest.raises(ValueError, match="WorkspaceConfiguration") as info:
        WorkspaceConfiguration(**kwargs)
    assert fragment in str(info.value)


def test_configuration_is_keyword_only():
    with pytest.raises(TypeError):
        WorkspaceConfiguration(100)  # type: ignore[misc]


@pytest.mark.parametrize(
    "allocation, limit, needed, expected",
    [
        (AllocationPolicy.STRICT, 0.3, 100, 100),
        (AllocationPolicy.OVERALLOCATE, 0.3, 100, 130),
        (AllocationPolicy.OVERALLOCATE, 1.0, 7, 14),
        (AllocationPolicy.OVERALLOCATE, 0.0, 7, 7),
    ],
)
def test_round_up_follows_the_allocation_policy(allocation, limit, needed, expected):
    conf = WorkspaceConfiguration(policy_allocation=allocation, overallocation_limit=limit)
    assert conf.round_up(needed) == expected


def test_round_up_clamps_to_min_and_max_size():
    conf = WorkspaceConfiguration(min_size=50, max_size=120, overallocation_limit=1.0)
    assert conf.round_up(10) == 50
    assert conf.round_up(100) == 120
    assert conf.allocate(100) == 200  # capacities are not clamped by byte sizes


def test_learning_cycles():
    assert WorkspaceConfiguration().learning_cycles == 1
    conf = WorkspaceConfiguration(
        policy_learning=LearningPolicy.OVER_TIME, cycles_before_initialization=4
    )
    assert conf.learning_cycles == 4
    conf = WorkspaceConfiguration(policy_learning=LearningPolicy.NONE, initial_size=8)
    assert conf.learning_cycles == 0


def test_policies_are_exported():
    assert jaxws.SpillPolicy.REALLOCATE is SpillPolicy.REALLOCATE
    assert {p.name for p in jaxws.ResetPolicy} == {"BLOCK_LEFT", "ENDOFBUFFER_REACHED"}


def test_bad_values_raise_a_jaxws_error_that_is_also_a_value_error():
    with pytest.raises(jaxws.ConfigurationError) as info:
        WorkspaceConfiguration(steps_number=0)
    assert isinstance(info.value, jaxws.WorkspaceError) and isinstance(info.value, ValueError)
