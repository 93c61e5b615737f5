"""The format and precision names, in one place, so the CLI's choices, the typed configs (profiles,
manifests, lab files) and the capability table cannot drift apart.

Formats are not listed here: a format is a runtime module of ``edgeq.device.runtimes`` (what runs it on a
device), and ``edgeq.convert.registry`` holds its host side (what builds it). ``Format`` checks a name
against that list, so adding a format adds no name anywhere else.
"""

from typing import Annotated, Literal

from pydantic import AfterValidator
from pydantic_core import PydanticCustomError

from edgeq.device.runtimes import formats

PRECISIONS = ("int8", "fp16", "bf16", "fp32", "dynamic")
Precision = Literal[PRECISIONS]  # type: ignore[valid-type]  # Literal[tuple] is Literal of its members


def format_names() -> tuple[str, ...]:
    """Every artifact format, sorted by name."""
    return formats()


def _known_format(name: str) -> str:
    if name not in formats():
        # Worded like pydantic's own Literal error, which this replaces.
        *head, last = (repr(n) for n in formats())
        raise PydanticCustomError("format", "Input should be {expected}",
                                  {"expected": f"{', '.join(head)} or {last}" if head else last})
    return name


Format = Annotated[str, AfterValidator(_known_format)]
