"""Stop sequences cut the answer exactly where OpenAI does, whatever the split of the answer into pieces."""
from __future__ import annotations

import random

import pytest

from exo_rkllm.api.stops import StopMatcher
from support import text_splits


def run(stops, pieces) -> tuple[str, str | None, bool]:
    """Feed pieces as the handler does: stop feeding once the matcher is done, flush at the end."""
    matcher = StopMatcher(stops)
    out = []
    for piece in pieces:
        out.append(matcher.push(piece))
        if matcher.done:
            break
    out.append(matcher.flush())
    return "".join(out), matcher.matched, matcher.done


def reference(stops, text: str) -> tuple[str, str | None]:
    """The rule spelled out the slow way: the stop starting first wins, the shorter one on a tie."""
    live = sorted({s for s in stops if s}, key=len)
    for i in range(len(text)):
        for stop in live:
            if text.startswith(stop, i):
                return text[:i], stop
    return text, None


CASES = [
    (["STOP"], "Hello world. STOP and this is dropped", "Hello world. ", "STOP"),
    (["STOP"], "STOP right away", "", "STOP"),  # a stop at position 0 leaves nothing
    (["\n\n"], "Line one.\nLine two.\n\nMore", "Line one.\nLine two.", "\n\n"),
    (["ab", "b c"], "xab c", "x", "ab"),  # overlapping stops: the one starting first wins
    (["ab", "b c"], "xb c", "x", "b c"),
    (["ab", "b c"], "a b c", "a ", "b c"),
    (["abcd", "bc"], "xabcd!", "x", "abcd"),  # a longer stop starting earlier beats one completed sooner
    (["abcd", "bc"], "xabcz", "xa", "bc"),
    (["abc", "ab"], "zabc", "z", "ab"),  # same start: the shorter wins
    (["世界", "🤖!"], "你好世界，再见", "你好", "世界"),  # unicode stops
    (["世界", "🤖!"], "beep 🤖 boop 🤖!", "beep 🤖 boop ", "🤖!"),
    (["User:"], "An answer with no stop. Use: this", "An answer with no stop. Use: this", None),
    (["aaa"], "aab aaab", "aab ", "aaa"),
]


@pytest.mark.parametrize("stops,text,expected,matched", CASES)
def test_every_split_gives_the_openai_answer(stops, text, expected, matched):
    assert reference(stops, text) == (expected, matched)  # the table agrees with the rule
    for pieces in text_splits(text):
        out, got, done = run(stops, pieces)
        assert (out, got, done) == (expected, matched, matched is not None), pieces


def test_random_texts_and_stops_match_the_reference_for_every_split():
    rng = random.Random(7)
    alphabet = "ab c\né"
    for _ in range(300):
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))
        expected = reference(stops, text)
        for pieces in text_splits(text, seed=rng.random()):
            out, matched, _ = run(stops, pieces)
            assert (out, matched) == expected, (stops, text, pieces)


def test_only_a_possible_stop_start_is_held_back():
    matcher = StopMatcher(["STOP"])
    assert matcher.push("abc S") == "abc "
    assert matcher.pending == "S"
    assert matcher.push("T") == ""
    assert matcher.pending == "ST"
    assert matcher.push("x and more") == "STx and more"  # it was not a stop after all
    assert matcher.pending == ""
    assert matcher.flush() == ""
    assert not matcher.done and matcher.matched is None


def test_a_stop_split_over_pieces_ends_the_answer_and_later_pushes_give_nothing():
    matcher = StopMatcher(["</answer>"])
    assert matcher.push("The result </ans") == "The result "
    assert not matcher.done
    assert matcher.push("wer> trailing") == ""
    assert matcher.done and matcher.matched == "</answer>"
    assert matcher.push("more text") == ""
    assert matcher.flush() == ""


def test_flush_settles_a_stop_that_was_waiting_for_a_longer_rival():
    matcher = StopMatcher(["abcd", "bc"])
    assert matcher.push("xabc") == "x"  # "bc" is complete but "abcd" may still start earlier
    assert not matcher.done
    assert matcher.flush() == "a"
    assert matcher.done and matcher.matched == "bc"


def test_no_stops_and_empty_stops_pass_everything_through():
    for stops in ([], [""], ("", "")):
        matcher = StopMatcher(stops)
        assert matcher.push("any text at all") == "any text at all"
        assert matcher.push("") == ""
        assert matcher.flush() == ""
        assert not matcher.done
    assert run(["", "x"], "abxcd")[:2] == ("ab", "x")  # an empty string among real stops is ignored


def test_one_string_is_one_stop_not_its_characters():
    assert run("ab", ["zzab"]) == ("zz", "ab", True)
    assert run("ab", ["a b"]) == ("a b", None, False)


def test_a_long_answer_keeps_only_a_short_window():
    stops = ["<|im_end|>", "\n\nUser:"]
    matcher = StopMatcher(stops)
    rng = random.Random(3)
    longest = max(map(len, stops))
    pieces = [rng.choice(["<", "|", "im", "_end", "\n", "User", ":", " ", "word"]) for _ in range(5000)]
    pieces += ["<|im_", "end|>", " tail"]  # make sure the answer does stop in the end
    fed, out = [], []
    for piece in pieces:
        fed.append(piece)
        out.append(matcher.push(piece))
        if matcher.done:
            break
        assert len(matcher.pending) < longest
    assert matcher.done
    assert ("".join(out) + matcher.flush(), matcher.matched) == reference(stops, "".join(fed))
