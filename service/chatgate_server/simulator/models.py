"""The models the simulator knows, with their context windows (in tokens).

A request for another model gets OpenAI's 404 ``model_not_found``; one whose prompt
(plus the completion it asks room for) does not fit the window gets the 400
``context_length_exceeded``. Dated snapshots of a known name
(``gpt-4o-mini-2024-07-18``) share its window. ``Simulator(any_model=True)`` (or
``--any-model``) accepts every name, with ``ANY_MODEL_CONTEXT_WINDOW``.

Windows as OpenAI's model pages give them; prompt sizes are the simulator's estimate
(about 4 characters per token), so a prompt near the limit may land on either side.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

# fmt: off
CONTEXT_WINDOWS: Mapping[str, int] = {
    "gpt-3.5-turbo": 16_385,
    "gpt-4": 8_192,
    "gpt-4-turbo": 128_000,
    "gpt-4o": 128_000,
    "gpt-4o-mini": 128_000,
    "gpt-4.1": 1_047_576,
    "gpt-4.1-mini": 1_047_576,
    "gpt-4.1-nano": 1_047_576,
    "o1": 200_000,
    "o1-mini": 128_000,
    "o1-pro": 200_000,
    "o3": 200_000,
    "o3-mini": 200_000,
    "o3-pro": 200_000,
    "o4-mini": 200_000,
    "gpt-5": 400_000,
    "gpt-5-mini": 400_000,
    "gpt-5-nano": 400_000,
}
# fmt: on
ANY_MODEL_CONTEXT_WINDOW = 128_000

_SNAPSHOT = re.compile(r"^(?P<base>.+)-\d{4}-\d{2}-\d{2}$")


def context_window(model: str, *, any_model: bool = False) -> int | None:
    """The model's context window, or None when the simulator does not serve it.

    A fine-tuned model (``ft:<base>:<org>:<suffix>:<id>``) has its base model's window,
    as on the real API."""
    if model.startswith("ft:"):
        model = model.split(":")[1]
    window = CONTEXT_WINDOWS.get(model)
    if window is None and (dated := _SNAPSHOT.match(model)):
        window = CONTEXT_WINDOWS.get(dated["base"])
    if window is None and any_model:
        return ANY_MODEL_CONTEXT_WINDOW
    return window
