"""KAR (Xi et al. 2023): user preference reasoning and item factual knowledge, factorization
prompting, free text. KAR encodes the user's history text together with the answer."""

from __future__ import annotations

from typing import Any

from recaug.augmenters.base import Augmenter, Parsed, free_text_answer, register
from recaug.augmenters.context import item_context, user_context


def parse_user_reasoning(raw: str, context: dict[str, Any]) -> Parsed:
    answer = free_text_answer(raw, whole_sentences=True)
    history = "\n".join(context.get("history") or [])
    # `encode: history+answer` (KAR's choice) or `answer`
    text = f"{history}\n{answer}" if context.get("encode", "history+answer") == "history+answer" and history else answer
    return Parsed(record={"reasoning": answer}, text=text)


def parse_item_knowledge(raw: str, context: dict[str, Any]) -> Parsed:
    answer = free_text_answer(raw, whole_sentences=True)
    return Parsed(record={"knowledge": answer}, text=f"{context['title']}. {answer}")


@register
def kar_user_preference() -> Augmenter:
    return Augmenter(
        name="kar_user_preference",
        family="KAR",
        entity_kind="user",
        template="kar_user_preference.j2",
        build_context=user_context,
        parse=parse_user_reasoning,
        # 2: shared free-text helper: white space collapsed, whole sentences, no repeats;
        # 3: sentence ends from core/sentences.py (an initial or "Dr." does not end a sentence)
        parser_version="3",
        max_sentences=1,  # the prompt asks for one sentence
        default_options={"encode": "history+answer", "min_history": 2},
        description="user preference reasoning along the domain's factors (free text)",
    )


@register
def kar_item_knowledge() -> Augmenter:
    return Augmenter(
        name="kar_item_knowledge",
        family="KAR",
        entity_kind="item",
        template="kar_item_knowledge.j2",
        build_context=item_context,
        parse=parse_item_knowledge,
        # 2: shared free-text helper: white space collapsed, whole sentences, no repeats;
        # 3: sentence ends from core/sentences.py (an initial or "Dr." does not end a sentence)
        parser_version="3",
        max_sentences=1,  # the prompt asks for one sentence
        description="item factual knowledge along the domain's factors (free text)",
    )
