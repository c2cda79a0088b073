"""Prompt templates: Jinja2 files in this folder, rendered in a sandbox.

A template defines two blocks, ``system`` (optional) and ``user``. Its content hash is its version.
Values are inserted as data: item text such as ``{{ 7*7 }}`` is never evaluated, because Jinja only
renders the template source, not the values it substitutes. Rendering is deterministic: undefined
variables fail loudly (StrictUndefined) instead of rendering as empty strings.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from jinja2 import FileSystemLoader, StrictUndefined, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from recaug.core.errors import UsageError

PROMPTS_DIR = Path(__file__).resolve().parent


class PromptError(UsageError, ValueError):
    """A template that cannot be loaded or rendered (exit 2)."""


def _search_path() -> list[str]:
    # user prompt folders (RECAUG_PROMPTS_PATH, os.pathsep-separated) come before the built-ins
    extra = [p for p in os.environ.get("RECAUG_PROMPTS_PATH", "").split(os.pathsep) if p]
    return extra + [str(PROMPTS_DIR)]


@lru_cache(maxsize=8)
def _environment(search_path: tuple[str, ...]) -> ImmutableSandboxedEnvironment:
    return ImmutableSandboxedEnvironment(
        loader=FileSystemLoader(list(search_path)),
        undefined=StrictUndefined,
        autoescape=False,
        keep_trailing_newline=False,
        trim_blocks=True,
        lstrip_blocks=True,
    )


@lru_cache(maxsize=64)
def _compiled(prompts_path: str, source: str):
    # compiling costs ~100x a render: once per template source (and search path), not once per entity
    return _environment(tuple(_search_path())).from_string(source)


def _muted_block(context):
    return iter(())


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    source: str
    path: str

    @property
    def content_hash(self) -> str:
        return hashlib.sha256(self.source.encode("utf-8")).hexdigest()

    def render(self, variables: dict[str, Any]) -> tuple[dict[str, str], ...]:
        """Chat messages for one entity."""
        try:
            template = _compiled(os.environ.get("RECAUG_PROMPTS_PATH", ""), self.source)
            ctx = template.new_context(dict(variables))
            # the top level runs once, blocks muted, for its `{% set %}`s (e.g. the factor lists);
            # then each block renders once in that same context, so it sees them
            blocks, ctx.blocks = ctx.blocks, {name: [_muted_block] for name in ctx.blocks}
            for _ in template.root_render_func(ctx):
                pass
            ctx.blocks = blocks
            messages = []
            for role in ("system", "user"):
                if role in template.blocks:
                    text = "".join(template.blocks[role](ctx)).strip()
                    if text:
                        messages.append({"role": role, "content": text})
        except TemplateError as exc:
            raise PromptError(f"template {self.name}: {exc}") from None
        if not any(m["role"] == "user" for m in messages):
            raise PromptError(f"template {self.name} has no non-empty `user` block")
        return tuple(messages)


def load_template(name: str) -> PromptTemplate:
    for folder in _search_path():
        path = Path(folder) / name
        if path.is_file():
            source = path.read_text(encoding="utf-8")
            env = _environment(tuple(_search_path()))
            try:
                env.parse(source)
            except TemplateError as exc:
                raise PromptError(f"template {path} does not parse: {exc}") from None
            return PromptTemplate(name=name, source=source, path=str(path))
    raise PromptError(f"template {name!r} not found in {', '.join(_search_path())}")
