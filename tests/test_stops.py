"""StopMatcher: the cut must not depend on how the text was split into deltas."""

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mistral7b.errors import InputError
from mistral7b.stops import StopMatcher


def run(stops, deltas):
    """Feed deltas; return (everything emitted, stopped, emitted after each push)."""
    m = StopMatcher(stops)
    out, steps = "", []
    for d in deltas:
        text, stopped = m.push(d)
        out += text
        steps.append(out)
        if stopped:
            return out, True, steps
    out += m.flush()
    return out, m.stopped, steps


def expected_cut(text, stops):
    """Outside oracle: text before the first occurrence of any stop, or all of it."""
    hits = [text.find(s) for s in stops if s in text]
    return text[: min(hits)] if hits else text


def all_splits(text):
    """Every way of cutting text into non-empty consecutive pieces (2^(n-1) of them)."""
    n = len(text)
    for mask in range(2 ** (n - 1)):
        cuts = [0] + [i + 1 for i in range(n - 1) if mask >> i & 1] + [n]
        yield [text[a:b] for a, b in itertools.pairwise(cuts)]


def test_no_stop_strings_is_identity_and_immediate():
    m = StopMatcher([])
    for d in ["Hel", "lo", "", " wörld 🙂"]:
        assert m.push(d) == (d, False)
    assert m.flush() == ""
    assert not m.stopped


def test_worked_example():
    m = StopMatcher(["###"])
    assert m.push("Hello #") == ("Hello ", False)
    assert m.push("#") == ("", False)
    assert m.push("# bye") == ("", True)
    assert m.matched == "###"
    assert m.push("more") == ("", True)
    assert m.flush() == ""


def test_text_that_cannot_start_a_stop_is_emitted_at_once():
    m = StopMatcher(["</s>", "User:"])
    assert m.push("hello world") == ("hello world", False)
    assert m.push(" <") == (" ", False)
    assert m.push("b>") == ("<b>", False)  # "<b" ruled "</s>" out
    assert m.push(" Us") == (" ", False)
    assert m.push("ed") == ("Used", False)


@pytest.mark.parametrize(
    "text, stops, cut",
    [
        ("ab<|end|>cd", ["<|end|>"], "ab"),
        ("xabcd", ["abcd", "c"], "x"),  # earliest start wins, not first completed
        ("xabce", ["abcd", "c"], "xab"),
        ("aaab", ["aab"], "a"),  # self-overlapping stop
        ("STOPxy", ["STOP"], ""),  # stop at the very start
        ("abab", ["ba", "ab"], ""),
        ("héllo🙂wörld", ["🙂w"], "héllo"),
        ("一二三。\n\n四", ["。\n\n"], "一二三"),
        ("no stop here", ["STOP", "xyz"], "no stop here"),
        ("tail ST", ["STOP"], "tail ST"),  # held back, then flushed
    ],
)
def test_every_split_gives_the_same_cut(text, stops, cut):
    assert expected_cut(text, stops) == cut
    for deltas in all_splits(text):
        assert run(stops, deltas)[0] == cut, deltas


def test_same_start_reports_the_shorter_stop():
    m = StopMatcher(["abc", "ab"])
    assert m.push("xab") == ("x", True)
    assert m.matched == "ab"
    m = StopMatcher(["abc", "ab"])
    assert m.push("xabc") == ("x", True)
    assert m.matched == "ab"


def test_complete_stop_waits_for_a_longer_one_starting_earlier():
    m = StopMatcher(["abcd", "c"])
    assert m.push("xabc") == ("x", False)
    assert m.push("d") == ("", True) and m.matched == "abcd"
    m = StopMatcher(["abcd", "c"])
    assert m.push("xabc") == ("x", False)
    assert m.push("e") == ("ab", True) and m.matched == "c"
    m = StopMatcher(["abcd", "c"])
    assert m.push("xabc") == ("x", False)
    assert m.flush() == "ab"  # stream ended: "c" is the first stop in the text
    assert m.stopped and m.matched == "c"


def test_flush_returns_the_held_tail():
    m = StopMatcher(["END"])
    assert m.push("the EN") == ("the ", False)
    assert m.flush() == "EN"
    assert not m.stopped and m.matched is None


def test_multi_codepoint_unicode_stop():
    stop = "👋🏽"  # waving hand + skin tone: two code points
    assert len(stop) == 2
    m = StopMatcher([stop])
    assert m.push("hi 👋") == ("hi ", False)
    assert m.push("🏽 there") == ("", True)
    m = StopMatcher([stop])
    assert m.push("hi 👋") == ("hi ", False)
    assert m.push("!") == ("👋!", False)


def test_stop_validation():
    with pytest.raises(InputError, match="non-empty"):
        StopMatcher([""])
    with pytest.raises(InputError, match="non-empty"):
        StopMatcher(["ok", None])
    m = StopMatcher("###")  # a single string is one stop, not three "#"
    assert m.stops == ("###",)
    assert m.push("a#b") == ("a#b", False)


def safe_prefix(pushed, stops):
    """Oracle for how much may be emitted after `pushed`: up to the first position where a
    stop occurs or could still occur (pushed[j:] is a prefix of a stop)."""
    for j in range(len(pushed) + 1):
        tail = pushed[j:]
        if any(tail.startswith(s) or s.startswith(tail) for s in stops if tail):
            return pushed[:j]
    return pushed


alphabet = st.sampled_from("ab c")
stop_strings = st.lists(st.text(alphabet, min_size=1, max_size=4), min_size=1, max_size=3)


@settings(max_examples=400, deadline=None)
@given(
    text=st.text(alphabet, max_size=24),
    stops=stop_strings,
    cuts=st.lists(st.integers(0, 24), max_size=10),
)
def test_property_cut_is_split_independent_and_maximally_early(text, stops, cuts):
    points = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    deltas = [text[a:b] for a, b in itertools.pairwise(points)]
    deltas.insert(len(deltas) // 2, "")  # empty deltas are allowed
    cut = expected_cut(text, stops)
    m = StopMatcher(stops)
    pushed = emitted = ""
    for d in deltas:
        pushed += d
        piece, stopped = m.push(d)
        emitted += piece
        if stopped:
            break
        # not stopped yet: exactly the part before any possible stop start is out
        assert emitted == safe_prefix(pushed, stops)
    else:
        emitted += m.flush()
    assert emitted == cut
    assert m.stopped == any(s in text for s in stops)


@given(text=st.text(max_size=12), stop=st.text(min_size=1, max_size=3))
@settings(max_examples=200, deadline=None)
def test_property_any_unicode_one_char_at_a_time(text, stop):
    full = text + stop + text
    out, stopped, _ = run([stop], list(full))
    assert out == expected_cut(full, [stop]) and stopped


def test_exhaustive_small_alphabet():
    stops = ["aba", "b", "bb"]
    for n in range(1, 7):
        for chars in itertools.product("ab", repeat=n):
            text = "".join(chars)
            for deltas in all_splits(text):
                assert run(stops, deltas)[0] == expected_cut(text, stops), (text, deltas)
