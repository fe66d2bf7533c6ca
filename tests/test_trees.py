"""The one name-by-name comparison of flat trees."""

from nsync_jax import trees


def test_diff_names_each_kind_in_mapping_order():
    expected = {"b": (2,), "a": (1,), "c": (3,), "d": (4,)}
    actual = {"z": (0,), "a": (1,), "c": (9,), "y": (0,)}
    result = trees.diff(expected, actual)
    assert result.missing == ["b", "d"]
    assert result.unexpected == ["z", "y"]
    assert result.misshapen == ["c"]
    assert result


def test_equal_trees_and_a_custom_comparison():
    assert not trees.diff({"a": [1, 2]}, {"a": (1, 2)}, same=lambda e, a: tuple(e) == tuple(a))
    assert not trees.diff({}, {})
    assert trees.diff({"a": [1]}, {"a": (1,)}).misshapen == ["a"]
