"""Templates ask each domain for what it has, render extra attributes, keep their constant part first,
and a template's variables are checked against its context before any entity runs."""

import polars as pl
import pytest

from recaug.augmenters.base import (
    AugmentInputs, Augmenter, ContractError, check_contract, get_augmenter, known_augmenters, template_variables,
    template_variables_used,
)
from recaug.augmenters.context import item_context
from recaug.augmenters.domains import DOMAINS, domain_variables
from recaug.pipelines.augment import build_pending, run_augmenter
from recaug.pipelines.cache import GenerationCache
from recaug.core.config import AugmenterConfig, EngineConfig
from recaug.pipelines.engines.fake import FakeEngine
from recaug.pipelines.runners.local import LocalRunner


def make_inputs(domain, with_attributes=True):
    items = pl.DataFrame(
        {"item_id": ["i0", "i1", "i2", "i3"], "title": ["Emma", "Dune", "Ulysses", "Beloved"],
         "year": [1815, 1965, None, 1987], "genres": [["Romance"], ["Science Fiction"], [], ["Fiction"]],
         "description": [None, "Desert planet.", None, None]},
        schema_overrides={"year": pl.Int32, "description": pl.String},
    )
    if with_attributes:  # the canonical `attr_<name>` columns the input side adds (dataset.items.attributes)
        items = items.with_columns(pl.Series("attr_author", ["Jane Austen", "Frank Herbert", None, "Toni Morrison"]),
                                   pl.Series("attr_publisher", ["John Murray", None, None, None], dtype=pl.String))
    users = pl.DataFrame({"user_id": ["u1", "u2"], "age": [30, None], "gender": ["F", None], "occupation": ["writer", None],
                          "region": ["Lyon", None]}, schema_overrides={"age": pl.Int32, "region": pl.String,
                                                                        "gender": pl.String, "occupation": pl.String})
    history = pl.DataFrame({"user_id": ["u1", "u1", "u2", "u2"], "item_id": ["i0", "i1", "i2", "i3"],
                            "rating": [5.0, 4.0, 3.0, 2.0], "timestamp": [1, 2, 3, 4]})
    return AugmentInputs(users=users, items=items, history=history, domain=domain,
                         count_tokens=lambda ts: [len(t.split()) for t in ts])


def _options(aug):
    return aug.options({"cold_max_interactions": 5} if aug.name == "once_cold_item_generator" else {}) | {
        "history_token_budget": 200}


def rendered(name, inputs):
    aug = get_augmenter(name)
    opts = _options(aug)
    ids = ["u1", "u2"] if aug.entity_kind == "user" else ["i0", "i1", "i2"]
    ctx = aug.build_context(inputs, ids, opts)
    return [aug.prompt.render(template_variables({**domain_variables(inputs.domain), **opts}, row))
            for row in ctx.to_dicts()]


@pytest.mark.parametrize("domain", sorted(DOMAINS))
def test_every_template_renders_for_every_domain_and_passes_its_contract(domain):
    inputs = make_inputs(domain)
    for name in known_augmenters():
        aug = get_augmenter(name)
        check_contract(aug, inputs, _options(aug))
        for messages in rendered(name, inputs):
            text = "\n".join(m["content"] for m in messages)
            assert DOMAINS[domain].item_noun in text
            if domain != "movies":
                assert "director" not in text.lower(), (name, text)


def test_books_ask_for_authors_and_publishers_and_show_the_catalogue_attributes():
    inputs = make_inputs("books")
    knowledge = rendered("kar_item_knowledge", inputs)[0][-1]["content"]
    assert "author" in knowledge and "Author: Jane Austen" in knowledge and "Publisher: John Murray" in knowledge
    attrs = rendered("llmrec_item_attributes", inputs)
    assert '"author", "publisher", "language"' in attrs[0][-1]["content"]
    assert "Publisher:" not in attrs[1][-1]["content"]  # an empty value is left out, not shown blank
    profile = rendered("llmrec_user_profile", inputs)[0][-1]["content"]
    assert '"liked_authors"' in profile and "region Lyon" in profile

    aug = get_augmenter("llmrec_item_attributes")
    schema = aug.decoding_schema("books")
    assert set(schema["properties"]) == {"author", "publisher", "language"}
    assert set(aug.decoding_schema("movies")["properties"]) == {"director", "country", "language"}
    # the catalogue's value wins over the model's; the answer fills only what the catalogue lacks
    parsed = aug.parse('{"author": "Someone Else", "publisher": "Penguin", "language": "English"}',
                       {"domain": "books", "attributes": {"author": "Jane Austen"}})
    assert parsed.record["author"] == "Jane Austen" and parsed.record["from_catalogue"] == ["author"]
    assert parsed.text == "author: Jane Austen; publisher: Penguin; language: English"
    prof = get_augmenter("llmrec_user_profile").parse(
        '{"liked_genres": ["Fiction"], "liked_authors": ["Toni Morrison"]}', {"domain": "books"})
    assert "authors: Toni Morrison" in prof.text


def test_templates_tolerate_a_context_without_attributes():
    inputs = make_inputs("movies", with_attributes=False)
    for name in known_augmenters():
        assert rendered(name, inputs)


@pytest.mark.parametrize("name", sorted(known_augmenters()))
def test_constant_instructions_come_first_and_the_entity_data_last(name):
    """Two entities' prompts share the whole instruction part: the first line that differs is data."""
    inputs = make_inputs("books")
    first, second = rendered(name, inputs)[:2]
    assert first[0] == second[0]  # the system message
    a, b = first[-1]["content"].splitlines(), second[-1]["content"].splitlines()
    shared = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    instructions = [line for line in a if line.startswith(("Describe", "Analyse", "Reply", "Give", "Profile",
                                                           "Invent", "Rewrite", "Choose", "Below", "In at most",
                                                           "Answer"))]
    assert instructions and all(a.index(line) < shared for line in instructions), (name, a, b)


def test_a_template_variable_nobody_provides_fails_before_any_entity_runs(tmp_path, monkeypatch):
    (tmp_path / "typo.j2").write_text("{% block user %}Describe {{ titel }} ({{ year }}) for {{ noun }}.{% endblock %}")
    monkeypatch.setenv("RECAUG_PROMPTS_PATH", str(tmp_path))
    aug = Augmenter(name="typo", entity_kind="item", template="typo.j2", build_context=item_context)
    assert template_variables_used(aug.prompt) == {"titel", "year", "noun"}
    inputs = make_inputs("movies")
    engine = FakeEngine(EngineConfig(kind="fake"))
    calls = []
    with pytest.raises(ContractError) as err:
        run_augmenter(aug, AugmenterConfig(name="typo"), inputs, engine, EngineConfig(kind="fake"),
                      GenerationCache(tmp_path / "cache"), lambda *a: calls.append(a), shard_size=4)
    message = str(err.value)
    assert "typo.j2" in message and "'titel'" in message and "title" in message and "item_context" in message
    assert calls == []
    # the same template with the right name passes
    (tmp_path / "typo.j2").write_text("{% block user %}Describe {{ title }} ({{ year }}) for {{ noun }}.{% endblock %}")
    fixed = Augmenter(name="typo", entity_kind="item", template="typo.j2", build_context=item_context)
    out = run_augmenter(fixed, AugmenterConfig(name="typo"), inputs, engine, EngineConfig(kind="fake"),
                        GenerationCache(tmp_path / "cache2"), LocalRunner(engine).execute, shard_size=4)
    assert out.stats.parsed == 4


def test_the_cli_refuses_a_broken_template_before_the_first_augmenter_runs(tmp_path, write_config, capsys, monkeypatch):
    from recaug.pipelines import cli
    from tests.test_cli_end_to_end import shop_config, write_shop

    write_shop(tmp_path)
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "broken.j2").write_text("{% block user %}{{ title }} by {{ athor }}{% endblock %}")
    (tmp_path / "my_augs.py").write_text(
        "from recaug.augmenters.base import Augmenter, register\n"
        "from recaug.augmenters.context import item_context\n\n"
        "@register\n"
        "def broken_item():\n"
        "    return Augmenter(name='broken_item', entity_kind='item', template='broken.j2', build_context=item_context)\n")
    monkeypatch.setenv("RECAUG_PROMPTS_PATH", str(prompts))
    path = shop_config(write_config, augmenter_modules=["my_augs.py"],
                       augmenters=[{"name": "kar_item_knowledge"}, {"name": "broken_item"}])
    assert cli.main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "'athor'" in err and "broken.j2" in err
    assert not (tmp_path / "work" / "cache").exists() or not any((tmp_path / "work" / "cache").rglob("*.parquet"))


def test_kar_answers_keep_whole_sentences_and_drop_repeats():
    aug = get_augmenter("kar_item_knowledge")
    looping = ("It is a romantic comedy with a warm tone. It is a romantic comedy with a warm tone. "
               "The director is British. The story is a romantic comedy with a roman")
    parsed = aug.parse(looping, {"title": "Emma"})
    assert parsed.record["knowledge"] == "It is a romantic comedy with a warm tone. The director is British."
    assert parsed.text == "Emma. It is a romantic comedy with a warm tone. The director is British."
    # an answer without any sentence end is kept as it is rather than emptied
    assert aug.parse("a comedy   about a family", {"title": "X"}).record["knowledge"] == "a comedy about a family"
    # a list answer's lines are its units: the unfinished last line goes, like a cut sentence
    listed = aug.parse("Genre: Comedy\nDirector: Douglas McGrath\nSoundtrack: Rachel", {"title": "Emma"})
    assert listed.record["knowledge"] == "Genre: Comedy Director: Douglas McGrath"
    user = get_augmenter("kar_user_preference")
    out = user.parse("They like dramas. They dislike horror. They like drama", {"history": ["- A"], "encode": "answer"})
    assert out.record["reasoning"] == "They like dramas. They dislike horror."


def test_domain_variables_enter_every_request_key(monkeypatch):
    from recaug.augmenters import domains
    from recaug.pipelines.augment import _key_parts

    engine = FakeEngine(EngineConfig(kind="fake"))
    aug = get_augmenter("kar_item_knowledge")
    before = _key_parts(aug, engine, (), 64, "books")["domain_variables"]
    books = domains.DOMAINS["books"]
    monkeypatch.setitem(domains.DOMAINS, "books", domains.Domain(books.name, books.noun, books.item_noun,
                                                                 books.factors + ("cover art",), books.creator,
                                                                 books.item_attributes))
    domains.domain_hash.cache_clear()
    try:
        assert _key_parts(aug, engine, (), 64, "books")["domain_variables"] != before
    finally:
        domains.domain_hash.cache_clear()
