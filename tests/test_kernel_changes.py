"""Release-keyed expectations of the selftests (selftests/kernel_changes.py)."""
from __future__ import annotations

import pytest

from kvmpy.selftests.kernel_changes import CLEAR_SPLIT_OFF_BY_ONE, SPLIT_ON_FAULT, expect, has, parse_release

BEFORE, SINCE = {"pages_4k": 1, "pages_2m": -1}, {"pages_4k": 512, "pages_2m": -1}


def test_release_of_debian_and_upstream_kernels():
    assert parse_release("6.1.0-57-amd64") == (6, 1)
    assert parse_release("6.12.117+deb12-amd64") == (6, 12)
    assert parse_release("6.8.0-rc3-myfix") == (6, 8)
    with pytest.raises(ValueError):
        parse_release("linux")
    assert not has(SPLIT_ON_FAULT, "6.1.0-57-amd64") and has(SPLIT_ON_FAULT, "6.12.117+deb12-amd64")
    # Releases compare as numbers: 6.12 is after 6.8.
    assert has(CLEAR_SPLIT_OFF_BY_ONE, "6.12.0") and not has(CLEAR_SPLIT_OFF_BY_ONE, "6.7.9")


@pytest.mark.parametrize("release, got", [("6.1.0-57-amd64", BEFORE), ("6.12.117+deb12-amd64", SINCE)])
def test_each_release_gets_its_own_expectation(release, got):
    expect("write fault", got, SPLIT_ON_FAULT, before=BEFORE, since=SINCE, release=release)


def test_the_other_releases_behaviour_names_the_commit():
    with pytest.raises(AssertionError) as e:
        expect("write fault", SINCE, SPLIT_ON_FAULT, before=BEFORE, since=SINCE, release="6.1.0-57-amd64")
    msg = str(e.value)
    assert msg.startswith("write fault: got {'pages_4k': 512, 'pages_2m': -1}")
    assert "this kernel (6.1.0-57-amd64) behaves as if it has c4b33d28ea51" in msg and "(v6.2)" in msg
    with pytest.raises(AssertionError, match="behaves as if it lacks c4b33d28ea51"):
        expect("write fault", BEFORE, SPLIT_ON_FAULT, before=BEFORE, since=SINCE, release="6.12.117+deb12-amd64")


def test_neither_behaviour_names_both_and_the_commit():
    with pytest.raises(AssertionError) as e:
        expect("write fault", {"pages_4k": 7}, SPLIT_ON_FAULT, before=BEFORE, since=SINCE, release="6.12.9")
    msg = str(e.value)
    assert f"expected {SINCE} on 6.12.9" in msg
    assert f"before c4b33d28ea51 \"KVM: x86/mmu: Split huge pages mapped by the TDP MMU on fault\" (v6.2) " \
           f"KVM gives {BEFORE}, since it {SINCE}" in msg


def test_eager_split_changes_name_their_commits_and_releases():
    from kvmpy.selftests.kernel_changes import CLEAR_EAGER_SPLIT, NESTED_EAGER_SPLIT, TDP_EAGER_SPLIT

    assert (TDP_EAGER_SPLIT.commit, TDP_EAGER_SPLIT.first) == ("a3fe5dbda0a4", "v5.18")
    assert (CLEAR_EAGER_SPLIT.commit, CLEAR_EAGER_SPLIT.first) == ("cb00a70bd4b7", "v5.18")
    assert (NESTED_EAGER_SPLIT.commit, NESTED_EAGER_SPLIT.first) == ("ada51a9de737", "v6.0")
    assert has(TDP_EAGER_SPLIT, "5.18.0") and not has(TDP_EAGER_SPLIT, "5.17.15")
    # The beds' kernels (Debian 6.1 and 6.12) both split the nested MMU eagerly; 5.19 did not.
    assert has(NESTED_EAGER_SPLIT, "6.1.0-57-amd64") and has(NESTED_EAGER_SPLIT, "6.12.117+deb12-amd64")
    assert not has(NESTED_EAGER_SPLIT, "5.19.17")


def test_a_kernel_without_nested_eager_split_fails_naming_the_commit():
    """test_nested_split's expectation at enable: a 5.19 kernel that split the nested MMU eagerly
    fails naming ada51a9de737; one that did not passes; 6.1 must split."""
    from kvmpy.selftests.kernel_changes import NESTED_EAGER_SPLIT

    lazy, eager = {"pages_4k": 0, "pages_2m": 0}, {"pages_4k": 512 * 8, "pages_2m": -8}
    expect("enable", lazy, NESTED_EAGER_SPLIT, before=lazy, since=eager, release="5.19.17")
    with pytest.raises(AssertionError, match=r'behaves as if it lacks ada51a9de737 "KVM: x86/mmu: Extend Eager '
                                             r'Page Splitting to nested MMUs" \(v6.0\)'):
        expect("enable", lazy, NESTED_EAGER_SPLIT, before=lazy, since=eager, release="6.1.0-57-amd64")
    with pytest.raises(AssertionError, match="behaves as if it has ada51a9de737"):
        expect("enable", eager, NESTED_EAGER_SPLIT, before=lazy, since=eager, release="5.19.17")
