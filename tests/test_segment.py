"""Incremental sentence segmentation: the rule table, split invariance, checkpoints, cost."""

from __future__ import annotations

import json
import random

import pytest

from consumers.segment import SentenceSegmenter

# (input, expected sentences).  Each case is also fed char by char, in random splits, and
# through a state()/from_state() checkpoint (see the tests below).
CASES: list[tuple[str, list[str]]] = [
    ("Hello world. This is a test.", ["Hello world.", "This is a test."]),
    ("Dr. Smith met Mr. Jones and Mrs. Brown. They talked.",
     ["Dr. Smith met Mr. Jones and Mrs. Brown.", "They talked."]),
    ("Use a tool, e.g. a hammer, i.e. something heavy. Bring nails, screws, etc. and glue.",
     ["Use a tool, e.g. a hammer, i.e. something heavy.",
      "Bring nails, screws, etc. and glue."]),
    ("Pick a name, e.g. Alice. Bring food, drinks, etc. Then go.",
     ["Pick a name, e.g. Alice.", "Bring food, drinks, etc.", "Then go."]),
    ("He moved to the U.S. in 2010. It was cold. She lives in the U.S. Her son too.",
     ["He moved to the U.S. in 2010.", "It was cold.", "She lives in the U.S.",
      "Her son too."]),
    ("We met at 9 a.m. and left at 5 p.m. Then we slept.",
     ["We met at 9 a.m. and left at 5 p.m.", "Then we slept."]),
    ("It costs $3.50 now. Version v1.2.3 is out. They raised $1.5M. Wow.",
     ["It costs $3.50 now.", "Version v1.2.3 is out.", "They raised $1.5M.", "Wow."]),
    ("See Fig. 3 and No. 5 in Vol. 2. Done.", ["See Fig. 3 and No. 5 in Vol. 2.", "Done."]),
    ("The year was 2010. 2011 was better.", ["The year was 2010.", "2011 was better."]),
    ("1. First item\n2. Second item\n3. Third", ["1. First item", "2. Second item", "3. Third"]),
    ("Steps:\n1. Open it. Then wait.\n2. Close it.\n- 3. Nested. Yes",
     ["Steps:", "1. Open it.", "Then wait.", "2. Close it.", "- 3. Nested.", "Yes"]),
    ("- a\n- b\n* c\n+ d", ["- a", "- b", "* c", "+ d"]),
    ("a. Apples\nb. Pears\nIV. Roman", ["a. Apples", "b. Pears", "IV. Roman"]),
    ("Wait... what? I see... Then we go.", ["Wait... what?", "I see...", "Then we go."]),
    ("It went\u2026 somewhere\u2026 Right.", ["It went\u2026 somewhere\u2026", "Right."]),
    ("Really?! No way!! Yes! ok? fine.", ["Really?!", "No way!!", "Yes! ok? fine."]),
    ('He said "Stop." Then he left.', ['He said "Stop."', "Then he left."]),
    ('"Stop." he said. "Why?" I asked.', ['"Stop." he said.', '"Why?"', "I asked."]),
    ("(See above.) Next step. [Done.] Yes.", ["(See above.)", "Next step.", "[Done.]", "Yes."]),
    ("He said \u201cgo.\u201d Then left.", ["He said \u201cgo.\u201d", "Then left."]),
    ("This is **important.** Next. *Really.* Ok", ["This is **important.**", "Next.",
                                                  "*Really.*", "Ok"]),
    ("Visit example.com or https://docs.example.org/a/b.html?x=1 for info. "
     "Email a.b@c.org. Edit main.py now. Read example.com. Then stop.",
     ["Visit example.com or https://docs.example.org/a/b.html?x=1 for info.",
      "Email a.b@c.org.", "Edit main.py now.", "Read example.com.", "Then stop."]),
    ("J. R. R. Tolkien wrote books. He died in 1973.",
     ["J. R. R. Tolkien wrote books.", "He died in 1973."]),
    ("Neither do I. Let us go.", ["Neither do I.", "Let us go."]),
    ("你好。我很好！你呢？好的。", ["你好。", "我很好！", "你呢？", "好的。"]),  # noqa: RUF001
    ("これはペンです。あれは本です。", ["これはペンです。", "あれは本です。"]),
    ("他说：“走吧。”然后走了。", ["他说：“走吧。”", "然后走了。"]),  # noqa: RUF001
    ("真的吗?是的。 OK", ["真的吗?", "是的。", "OK"]),
    ("No terminal mark at the end", ["No terminal mark at the end"]),
    ("# Title\nSome text here. More text\n## Sub heading\nEnd.",
     ["# Title", "Some text here.", "More text", "## Sub heading", "End."]),
    ("Para one.\n\nPara two\n\n\n", ["Para one.", "Para two"]),
    ("Line one\r\nLine two\r\n", ["Line one", "Line two"]),
    ("Done.\n) Then more", ["Done.", ") Then more"]),
    ("Code:\n```python\nx = 1. \nprint(x). Done\n\n```\nAfter. Yes.",
     ["Code:", "```python\nx = 1. \nprint(x). Done\n\n```", "After.", "Yes."]),
    ("~~~\na. B\n~~~\nok", ["~~~\na. B\n~~~", "ok"]),
    ("````md\n```\nnested. X\n```\n````\nEnd", ["````md\n```\nnested. X\n```\n````", "End"]),
    ("1. Run:\n   ```sh\n   ls\n   ```\n2. Done", ["1. Run:", "```sh\n   ls\n   ```", "2. Done"]),
    ("~~~\nA. B\n```\nstill code\n~~~~  \nout", ["~~~\nA. B\n```\nstill code\n~~~~", "out"]),
    ("Text: ```inline``` stays. Next.", ["Text: ```inline``` stays.", "Next."]),
    ("```js\nlet a = 1;\n", ["```js\nlet a = 1;"]),
    ("Close it:\n```\nx\n```", ["Close it:", "```\nx\n```"]),
    ("I said no.Then  ok", ["I said no.Then  ok"]),
    ("  Leading spaces.   Trailing   ", ["Leading spaces.", "Trailing"]),
    ("", []),
    ("   \n\n \t ", []),
]


def run(pieces: list[str]) -> list[str]:
    seg = SentenceSegmenter()
    out = [s for piece in pieces for s in seg.feed(piece)]
    return out + seg.flush()


def random_split(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), min(max(len(text) - 1, 0), rng.randint(0, 12))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


def check_invariants(text: str, out: list[str]) -> None:
    assert all(s and s == s.strip() for s in out)
    assert "".join("".join(out).split()) == "".join(text.split())  # nothing lost or doubled


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_table(text: str, expected: list[str]) -> None:
    assert run([text]) == expected
    assert run(list(text)) == expected
    rng = random.Random(text)
    for _ in range(20):
        assert run(random_split(text, rng)) == expected
    check_invariants(text, expected)


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_checkpoint_anywhere(text: str, expected: list[str]) -> None:
    for cut in range(len(text) + 1):
        seg = SentenceSegmenter()
        out = seg.feed(text[:cut])
        seg = SentenceSegmenter.from_state(json.loads(json.dumps(seg.state())))
        assert out + seg.feed(text[cut:]) + seg.flush() == expected


def test_emits_as_soon_as_proven() -> None:
    seg = SentenceSegmenter()
    steps = [
        ("Hello world.", []), (" ", []), ("T", ["Hello world."]),
        ("his is Dr.", []), (" ", []), ("S", []), ("mith. ", []), ("and", []),
        (" more.\n", ["This is Dr. Smith. and more."]),
        ("- item one", []), ("\n", ["- item one"]),
        ("你好。", []), ("我", ["你好。"]), ("\n", ["我"]),
        ("```py\nx = 1. Y\n", []), ("```", []), ("\n", ["```py\nx = 1. Y\n```"]),
        ("Tail", []),
    ]
    for piece, expected in steps:
        assert seg.feed(piece) == expected, piece
    assert seg.flush() == ["Tail"]
    assert seg.flush() == []  # flush starts over
    assert seg.feed("Again. X") == ["Again."]


def test_random_text_invariants() -> None:
    # Fuzz over the characters the rules react to: any split and any checkpoint give the
    # same sentences, and no character is lost or repeated.
    alphabet = ["a", "B", "Dr", "e.g", "1", ".", ".", "...", "?", "!", " ", " ", "\n", "\n\n",
                "```", "~~~", '"', ")", "*", "\u3002", "\u4e2d", "#", "- ", "\t"]
    rng = random.Random(1234)
    for _ in range(400):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        whole = run([text])
        check_invariants(text, whole)
        assert run(list(text)) == whole
        assert run(random_split(text, rng)) == whole
        cut = rng.randint(0, len(text))
        seg = SentenceSegmenter()
        out = seg.feed(text[:cut])
        seg = SentenceSegmenter.from_state(json.loads(json.dumps(seg.state())))
        assert out + seg.feed(text[cut:]) + seg.flush() == whole


@pytest.mark.parametrize("bad", [{}, {"version": 99}, {**SentenceSegmenter().state(), "pend": "x"}])
def test_from_state_rejects_foreign_data(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="SentenceSegmenter state"):
        SentenceSegmenter.from_state(bad)


def test_long_buffers_fed_char_by_char() -> None:
    # 50,000 characters with no boundary, one character per feed: the per-token cost must
    # not grow with the pending text (measured at well under a second each).
    code = "```python\n" + "".join(f"x{i} = {i}. 5  # e.g. Dr. Who? Yes!\n" for i in range(1_600))
    code = code[:50_000]
    seg = SentenceSegmenter()
    assert [s for c in code for s in seg.feed(c)] == []
    assert seg.feed("\n```\n") == [code.strip() + "\n```"]

    prose = ("word, and more words with no end mark " * 1_400)[:50_000]
    seg = SentenceSegmenter()
    assert [s for c in prose for s in seg.feed(c)] == []
    assert seg.flush() == [prose.strip()]
