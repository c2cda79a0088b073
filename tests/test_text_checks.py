"""Output gate checks on text, not only vectors (issue 14 point 7): prompt echo, identical answers
across many entities, answers that contradict the catalogue record. Each becomes a dead letter with
its reason, and a floor (`output_gate.max_text_rejected_share`) stops publication."""

import datetime as dt

import polars as pl
import pyarrow as pa
import pytest

from recaug.augmenters.base import AugmentInputs, get_augmenter
from recaug.augmenters.vocab import VOCABULARY
from recaug.pipelines.augment import run_augmenter
from recaug.pipelines.cache import GenerationCache
from recaug.core.config import AugmenterConfig, EngineConfig, OutputGateConfig
from recaug.pipelines.engines.fake import FakeEngine
from recaug.pipelines.runners.local import LocalRunner
from recaug.schemas.output_gate import (
    TEXT_REASON_PREFIX, GateInput, TextChecks, contradiction, identical_answer_rows, looping, prompt_echo, run_output_gate,
)
from recaug.schemas.tables import DEAD_LETTER
from tests.test_output_gate import embeddings, generated

PROMPT = ({"role": "system", "content": "You are an expert in movies."},
          {"role": "user", "content": "Describe the movie below along these factors: genre, era.\n\nTitle: Heat\nYear: 1995"})


def test_prompt_echo_is_recognised_and_a_real_answer_is_not():
    assert "prompt echo" in prompt_echo("Describe the movie below along these factors: genre, era. Heat is...", PROMPT)
    assert "prompt echo" in prompt_echo("title: heat\nyear: 1995\nGenre: crime", PROMPT)
    assert prompt_echo("Heat is a 1995 crime film directed by Michael Mann.", PROMPT) is None
    assert prompt_echo("Heat", PROMPT) is None  # too short to call
    # a heading that is only the title is not an echo; what follows it is judged
    assert prompt_echo("**Heat**\nHeat is a 1995 crime film.", PROMPT, title="Heat") is None
    assert "prompt echo" in prompt_echo("Heat\nTitle: Heat\nYear: 1995", PROMPT, title="Heat")


@pytest.mark.parametrize("answer, title", [
    ("That Darn Cat!", "That Darn Cat!"), ("**Two Much**", "Two Much"), ("The Truman Show, The.", "Truman Show, The"),
    ("The movie Shall We Dance?", "Shall We Dance?"),
    ('The movie, titled "To Wong Foo, Thanks for Everything!"', "To Wong Foo, Thanks for Everything! Julie Newmar"),
])
def test_an_answer_that_says_nothing_but_the_title_is_an_echo(answer, title):
    assert "says nothing but the title" in prompt_echo(answer, PROMPT, title=title)
    # with one fact more it is an answer
    assert prompt_echo(answer.rstrip(".!?\"") + " is a 1990s comedy.", PROMPT, title=title) is None


def test_an_answer_that_only_asks_a_question_is_an_echo():
    assert "only asks a question" in prompt_echo("In one short sentence, what is not known about this movie?", PROMPT, title="Heat")
    assert "only asks a question" in prompt_echo("What is Heat about? Who made it?", PROMPT)
    assert prompt_echo("Heat is a crime film. Who could forget it?", PROMPT) is None
    assert prompt_echo("What's Eating Gilbert Grape? is a 1993 drama.", PROMPT, title="What's Eating Gilbert Grape") is None


def test_a_loop_is_recognised_and_repetition_in_language_is_not():
    assert "loops: says 'Horror'" in looping("Heat is a crime film. Horror, Horror, Horror, Horror, Hor")
    assert "'Drama, Thriller'" in looping("Genres: Drama, Thriller, Drama, Thriller, Drama, Thriller, Drama, Thriller")
    for fine in ("Heat is a very, very, very good film.", "New York, New York is set in New York.",
                 "It is rated 5/5, and it is rated 4/5 by critics."):
        assert looping(fine) is None, fine


def test_contradictions_with_the_record():
    ctx = {"title": "Heat", "year": 1995, "genres": ["Action", "Crime", "Thriller"]}
    movies = VOCABULARY["movies"]
    assert "1987" in contradiction("Heat was released in 1987 to acclaim.", ctx, movies, "movies")
    assert "1972" in contradiction("Heat (1972) follows a crew of thieves.", ctx, movies, "movies")
    assert "Western" in contradiction("Heat is a Western film set in Texas.", ctx, movies, "movies")
    for fine in ("Heat was released in 1995.", "Heat, released in December 1996, is a crime film.",
                 "Heat is a crime film set in 1960s Los Angeles.", "Heat is a Thriller movie."):
        assert contradiction(fine, ctx, movies, "movies") is None, fine
    assert contradiction("It was released in 1987.", {"title": "X", "year": None, "genres": []}, movies, "movies") is None


def test_identical_answers_across_different_prompts():
    table = generated([f"u{i}" for i in range(6)],
                      texts=["Same  answer."] * 4 + ["Other one.", "same answer."])
    mask = identical_answer_rows(table, limit=3).to_pylist()
    assert mask == [True, True, True, True, False, True]
    assert identical_answer_rows(table, limit=5).to_pylist() == [False] * 6


def _items(n=8):
    return pl.DataFrame(
        {"item_id": [f"i{k}" for k in range(n)], "title": [f"Movie {k}" for k in range(n)],
         "year": [1990 + k for k in range(n)], "genres": [["Comedy"]] * n, "description": [None] * n},
        schema_overrides={"year": pl.Int32, "description": pl.String})


def _inputs():
    users = pl.DataFrame({"user_id": ["u0"], "age": [30], "gender": ["M"], "occupation": ["x"], "region": [None]},
                         schema_overrides={"age": pl.Int32, "region": pl.String})
    history = pl.DataFrame({"user_id": ["u0"], "item_id": ["i0"], "rating": [4.0], "timestamp": [0]})
    return AugmentInputs(users=users, items=_items(), history=history, domain="movies",
                         count_tokens=lambda ts: [len(t.split()) for t in ts])


def answer(request):
    content = request.messages[-1]["content"]
    title = content.split("Title: ")[1].split("\n")[0]
    k = int(title.split()[-1])
    if k in (0, 1):
        return content  # the whole prompt back
    if k == 2:
        return f"{title} was released in 1950 and is a comedy."  # the record says 1992
    if k == 3:
        return f"{title} is a Western film about cowboys."  # the record says Comedy
    if k == 4:
        return f"{title} is a comedy about Horror, Horror, Horror, Horror, Horror."  # a small model's loop
    return f"{title} is a comedy from {1990 + k} with a warm tone."


def test_the_stage_turns_rejected_answers_into_dead_letters_with_the_reason(tmp_path):
    engine = FakeEngine(responder=answer)
    aug = get_augmenter("kar_item_knowledge")
    out = run_augmenter(aug, AugmenterConfig(name=aug.name), _inputs(), engine, EngineConfig(kind="fake"),
                        GenerationCache(tmp_path), LocalRunner(engine).execute, shard_size=4)
    dead = {r["entity_id"]: r["reason"] for r in out.dead_letter.to_pylist()}
    assert set(dead) == {"i0", "i1", "i2", "i3", "i4"}
    assert all(r.startswith(TEXT_REASON_PREFIX) for r in dead.values())
    assert "prompt echo" in dead["i0"] and "1950" in dead["i2"] and "Western" in dead["i3"]
    assert "loops: says 'Horror'" in dead["i4"]
    assert out.stats.text_rejected == 5 and out.stats.parsed == 3
    assert "(5 by text checks)" in out.stats.summary_line()


def test_one_answer_for_many_entities_is_rejected_in_the_stage(tmp_path):
    engine = FakeEngine(responder=lambda r: "I am sorry, I cannot help with that request.")
    aug = get_augmenter("kar_item_knowledge")
    out = run_augmenter(aug, AugmenterConfig(name=aug.name), _inputs(), engine, EngineConfig(kind="fake"),
                        GenerationCache(tmp_path), LocalRunner(engine).execute, shard_size=4,
                        text_checks=TextChecks(max_identical_answers=3))
    assert out.generated.num_rows == 0 and out.dead_letter.num_rows == 8
    assert out.dead_letter.schema.equals(DEAD_LETTER)
    reasons = set(out.dead_letter.column("reason").to_pylist())
    assert reasons == {f"{TEXT_REASON_PREFIX}identical answer given for 8 different prompts "
                       "(more than output_gate.max_identical_answers = 3)"}
    # JSON augmenters are not judged this way (the same small answer is legitimate there)
    js = get_augmenter("llmrec_implicit_feedback")
    assert js.response_model is not None


def _text_dead(ids):
    now = dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)
    n = len(ids)
    return pa.table({
        "entity_id": ids, "entity_kind": ["user"] * n, "augmenter": ["kar_user"] * n, "template_hash": ["t"] * n,
        "model": ["m"] * n, "cache_key": ids, "prompt": ["p"] * n, "raw_text": ["x"] * n,
        "reason": [f"{TEXT_REASON_PREFIX}prompt echo"] * n, "finish_reason": ["stop"] * n, "attempts": [1] * n,
        "created_at": [now] * n}, schema=DEAD_LETTER)


@pytest.mark.parametrize("rejected, passes", [(2, True), (8, False)])
def test_the_gate_floor_on_text_rejections_stops_publication(rejected, passes):
    ids = [f"u{i}" for i in range(40)]
    ok = ids[rejected:]
    cfg = OutputGateConfig(min_coverage=0.5, max_dead_letter_share=0.5, min_parse_rate=0.5, max_text_rejected_share=0.1)
    result = run_output_gate(GateInput("kar_user", embeddings(ok), generated(ok), _text_dead(ids[:rejected]),
                                       expected_entities=ids), cfg)
    check = result.check("text_checks")
    assert check.success is passes and result.success is passes
    assert result.metrics["kar_user"]["text_rejected_share"] == pytest.approx(rejected / 40)
    if not passes:
        assert "text_checks" in result.summary() and "in kar_user" in check.detail


def test_years_after_a_title_are_found_as_the_per_title_pattern_finds_them():
    """The "<title> (1987)" check scans for the title instead of compiling a pattern per title; it
    must find exactly what re.findall(escape(title) + r"\\s*\\((\\d{4})\\)") finds, regex characters in
    titles, repeats and overlaps included."""
    import random
    import re

    from recaug.schemas.output_gate import _years_after_title

    rnd = random.Random(0)
    titles = ["Heat", "Se7en (a.k.a. Seven)", "aa", "a", "[REC]", "Heat (1995)", "?", "x*y"]
    pieces = ["Heat", " (1995)", "(1987)", " ", "aa", "a", "(", ")", "[REC]", "\n(2001)", "?", "x*y", "  (1972)"]
    for _ in range(3000):
        title = rnd.choice(titles)
        answer = "".join(rnd.choice(pieces) for _ in range(rnd.randint(0, 12)))
        expected = [int(y) for y in re.findall(re.escape(title) + r"\s*\((\d{4})\)", answer)]
        assert _years_after_title(answer, title) == expected, (answer, title)
    assert _years_after_title("Heat (1995) and Heat (1972)", "Heat") == [1995, 1972]
