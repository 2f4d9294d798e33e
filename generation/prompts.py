"""Text prompts for the diffusion backend, as 3D-DST writes them.

The template has one placeholder, `{class}`, replaced by the category's prompt name ("polar_bear" is
written "polar bear"). A config overrides the template and the negative prompt by validating a
`PromptTemplate` from its YAML, e.g. a mapping like::

    template: "A photo of a {class} in the wild, best quality"
    negative_prompt: "lowres, cropped"
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, field_validator

DEFAULT_TEMPLATE = "An image of {class}, best quality, extremely detailed"
DEFAULT_NEGATIVE_PROMPT = (
    "longbody, lowres, bad anatomy, bad hands, missing fingers, extra digit, fewer digits, cropped, "
    "worst quality, low quality"
)
PLACEHOLDER = "{class}"


def _fill(template: str, class_name: str) -> str:
    return template.replace(PLACEHOLDER, class_name)


class PromptTemplate(BaseModel):
    """A prompt template with one `{class}` placeholder and the negative prompt used with it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    template: str = DEFAULT_TEMPLATE
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT

    @field_validator("template")
    @classmethod
    def _has_placeholder(cls, value: str) -> str:
        if PLACEHOLDER not in value:
            raise ValueError(
                f"prompt template {value!r} has no {PLACEHOLDER} placeholder; write e.g. "
                f"'An image of {PLACEHOLDER}, best quality'"
            )
        return value

    def format(self, category_name: str) -> tuple[str, str]:
        """(prompt, negative_prompt) for one category."""
        return prompt_for(category_name, self)


def class_phrase(category_name: str) -> str:
    """The category name as it is written in a prompt: underscores become spaces, ends trimmed."""
    phrase = " ".join(category_name.replace("_", " ").split())
    if not phrase:
        raise ValueError(
            f"category name {category_name!r} is empty; give the class name to put in the prompt"
        )
    return phrase


def prompt_for(category_name: str, template: PromptTemplate | str | None = None) -> tuple[str, str]:
    """(prompt, negative_prompt) for `category_name`.

    template: None for 3D-DST's template and negative prompt; a `PromptTemplate` for both overridden;
    a plain string overrides the template only (it must contain `{class}`) and keeps the default
    negative prompt.
    """
    if template is None:
        template = PromptTemplate()
    elif isinstance(template, str):
        template = PromptTemplate(template=template)
    return _fill(template.template, class_phrase(category_name)), template.negative_prompt
