"""Where a sentence ends (core/sentences.py), the sentence limit every engine honours
(`finish_at_sentences`), and the config rule that keeps it off JSON augmenters."""

from __future__ import annotations

import pytest

from recaug.augmenters.base import get_augmenter
from recaug.core.config import AugmenterConfig
from recaug.core.sentences import cut_after_sentences, sentence_end_offsets, split_sentences
from recaug.pipelines.augment import sentence_limit
from recaug.pipelines.engines.base import FINISH_ERROR, FINISH_LENGTH, FINISH_STOP, GenerationRequest, GenerationResult, finish_at_sentences


@pytest.mark.parametrize("text, sentences, rest", [
    # initials, titles and abbreviations do not end a sentence; decimals and ellipses neither
    ("Gaslight is a 1944 film. It stars John C. Reilly and Dr. Watson. It", ["Gaslight is a 1944 film.", "It stars John C. Reilly and Dr. Watson."], "It"),
    ("Made in the U.S. by 1.5 studios... It won! Did it? Yes", ["Made in the U.S. by 1.5 studios... It won!", "Did it?"], "Yes"),
    ('He said "go." Then left.', ['He said "go."', "Then left."], ""),
    # a title's own "!" or "?" goes on in lower case; the sentence's does not
    ("That Darn Cat! is a 1997 film. Shall We Dance? is too. Wow! It", ["That Darn Cat! is a 1997 film.", "Shall We Dance? is too.", "Wow!"], "It"),
    # a list answer: each line with text is a unit, an empty line is not
    ("Title: Emma\n\nGenre: Comedy  \nDirector: Douglas", ["Title: Emma", "Genre: Comedy"], "Director: Douglas"),
    ("The movie is great.\nThe director: M. Night", ["The movie is great."], "The director: M. Night"),
    ("no end at all", [], "no end at all"),
])
def test_split_sentences(text, sentences, rest):
    assert split_sentences(text) == (sentences, rest)


def test_a_sentence_only_counts_once_the_next_word_has_started():
    # while an answer is being written, "John C." may go on: the white space after it decides
    assert sentence_end_offsets("It stars John C.") == []
    assert cut_after_sentences("It is a drama. It stars Tom", 2) is None
    assert cut_after_sentences("It is a drama. It stars Tom. Hanks", 2) == "It is a drama. It stars Tom."
    assert cut_after_sentences("It is a drama. It stars Tom. Hanks", 1) == "It is a drama."


def test_finish_at_sentences_cuts_and_marks_only_requests_with_a_limit():
    requests = [GenerationRequest("a", (), 64, None, 2), GenerationRequest("b", (), 64), GenerationRequest("c", (), 64, None, 2),
                GenerationRequest("d", (), 64, None, 2),
                GenerationRequest("e", (), 64, None, 2)]
    results = [GenerationResult("a", "One. Two. Three four five", 1, 64, FINISH_LENGTH, 0.0),
               GenerationResult("b", "One. Two. Three four five", 1, 64, FINISH_LENGTH, 0.0),
               GenerationResult("c", "Only one. And a cut", 1, 64, FINISH_LENGTH, 0.0),
               GenerationResult("d", "", 0, 0, FINISH_ERROR, 0.0, error="boom"),
               GenerationResult("e", "Capped right. At the end.", 1, 64, FINISH_LENGTH, 0.0)]
    out = finish_at_sentences(requests, results)
    assert (out[0].text, out[0].finish_reason, out[0].extra) == ("One. Two.", FINISH_STOP, {"sentence_limit": 2})
    assert (out[0].output_tokens) == 64  # what was generated stays counted
    assert (out[1].text, out[1].finish_reason) == ("One. Two. Three four five", FINISH_LENGTH)
    assert (out[2].text, out[2].finish_reason) == ("Only one. And a cut", FINISH_LENGTH)  # fewer sentences: still cut at the cap
    assert out[3].finish_reason == FINISH_ERROR
    # the cap reached right after the second full stop: the answer ended where it should
    assert (out[4].text, out[4].finish_reason) == ("Capped right. At the end.", FINISH_STOP)


def test_requests_cross_a_process_boundary_with_their_limit():
    r = GenerationRequest("k", ({"role": "user", "content": "x"},), 8, None, 3)
    assert GenerationRequest.from_record(r.to_record()) == r


def test_sentence_limit_comes_from_the_augmenter_or_the_config_and_never_cuts_json():
    kar = get_augmenter("kar_item_knowledge")
    assert sentence_limit(kar, AugmenterConfig(name=kar.name)) == 1  # the prompt asks for one sentence
    assert sentence_limit(kar, AugmenterConfig(name=kar.name, max_sentences=4)) == 4
    once = get_augmenter("once_content_summary")
    assert sentence_limit(once, AugmenterConfig(name=once.name)) is None
    json_aug = get_augmenter("llmrec_item_attributes")
    assert json_aug.response_model is not None
    with pytest.raises(ValueError, match="max_sentences applies to free-text augmenters only"):
        sentence_limit(json_aug, AugmenterConfig(name=json_aug.name, max_sentences=2))
