"""Caption normalisation: whitespace, sentences, number templates, combining per-sentence labels."""

from __future__ import annotations

import math
import time

import pytest

from oni_sys.annotators.normalise import (
    caption_parts,
    collapse_whitespace,
    combine_max,
    number_template,
    split_sentences,
)


def test_collapse_whitespace():
    assert collapse_whitespace("  You  kill\tthe\nnewt!  ") == "You kill the newt!"
    assert collapse_whitespace("a\u2028b\r\nc") == "a b c"
    assert collapse_whitespace(" \n ") == ""


@pytest.mark.parametrize(
    "text, sentences",
    [
        (
            "You kill the newt!  You see here a newt corpse.",
            ["You kill the newt!", "You see here a newt corpse."],
        ),
        ("Ouch!  That hurts!", ["Ouch!", "That hurts!"]),
        (
            "You faint from lack of food.  You regain consciousness.",
            ["You faint from lack of food.", "You regain consciousness."],
        ),
        ("What? Really.", ["What?", "Really."]),
        ("$ - 12 gold pieces.", ["$ - 12 gold pieces."]),
        ("It's a wall.", ["It's a wall."]),
        ("Unknown command '^M'.", ["Unknown command '^M'."]),
        # an ellipsis inside a sentence is not an end
        ("Hmm... that felt odd.", ["Hmm... that felt odd."]),
        ("You hear a voice... It is gone.", ["You hear a voice... It is gone."]),
        # but two spaces (NetHack's separator between messages) are
        ("You feel sleepy...  You wake up.", ["You feel sleepy...", "You wake up."]),
        # abbreviations and initials
        ("Mr. Asidonhopo says hello.", ["Mr. Asidonhopo says hello."]),
        ("You see St. Cuthbert here.", ["You see St. Cuthbert here."]),
        ("J. R. R. Tolkien wrote it.", ["J. R. R. Tolkien wrote it."]),
        # lower case after a full stop is not a new sentence; numbers and "$" can start one
        ("The potion is cloudy. tastes odd", ["The potion is cloudy. tastes odd"]),
        ("You drop it.  3 arrows hit you.", ["You drop it.", "3 arrows hit you."]),
        ("Done.  $ - 5 gold pieces.", ["Done.", "$ - 5 gold pieces."]),
        ("", []),
        ("   ", []),
    ],
)
def test_split_sentences(text, sentences):
    assert split_sentences(text) == sentences


def test_quoted_text_is_never_split():
    """An engraving's sentences must not become questions of their own."""
    assert split_sentences('You read: "Ad aerarium.  You kill the newt!"  It fades.') == [
        'You read: "Ad aerarium. You kill the newt!"',
        "It fades.",
    ]
    # an unterminated quotation protects the rest of the message
    assert split_sentences('You read: "x.  You kill the newt!') == [
        'You read: "x. You kill the newt!'
    ]
    assert split_sentences('You hear "Hi!"  You feel better.') == [
        'You hear "Hi!"',
        "You feel better.",
    ]


def test_number_template():
    assert number_template("$ - 12 gold pieces.") == "$ - <n> gold pieces."
    assert number_template("$ - 12 gold pieces.") == number_template("$ - 3 gold pieces.")
    assert number_template("$ - a gold piece.") == "$ - a gold piece."
    assert number_template("f - 2 uncursed food rations.") == "f - <n> uncursed food rations."
    assert number_template("Welcome to experience level 10.") == (
        "Welcome to experience level <n>."
    )
    assert number_template("a +1 long sword, 1,000 zorkmids, v3.6.6") == (
        "a +<n> long sword, <n> zorkmids, v<n>"
    )
    assert number_template("It's a wall.") == "It's a wall."


def test_caption_parts():
    text = "You kill the newt!  $ - 12 gold pieces.  You kill the newt!"
    assert caption_parts(text) == ["You kill the newt!", "$ - 12 gold pieces."]
    assert caption_parts(text, split=False) == [
        "You kill the newt! $ - 12 gold pieces. You kill the newt!"
    ]
    assert caption_parts(text, template=True) == ["You kill the newt!", "$ - <n> gold pieces."]
    assert caption_parts("  ") == []


def test_combine_max():
    assert combine_max([0.2, 0.9, 0.4]) == 0.9
    assert combine_max(iter([0.0])) == 0.0
    for bad in ([], [1.5], [-0.1], [math.nan]):
        with pytest.raises(ValueError):
            combine_max(bad)


def test_fast_enough_for_every_new_caption():
    text = "You kill the newt!  You see here a newt corpse.  $ - 12 gold pieces."
    t0 = time.perf_counter()
    for _ in range(2000):
        caption_parts(text, split=True, template=True)
    assert (time.perf_counter() - t0) / 2000 < 1e-3
