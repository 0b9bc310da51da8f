"""An OpenAI-compatible chat-completions simulator with fault scenarios.

A real HTTP/1.1 server on a loopback port for tests, the demo and benchmarks, in place
of api.openai.com. Modules, each owning one thing:

- ``server``: ``Simulator``, start/stop and what tests read;
- ``app``: routing, and turning one request into a response plan and bytes;
- ``connection``: the ``asyncio.Protocol`` per TCP connection (keep-alive, early close);
- ``wire``: HTTP/1.1 request parsing and response framing;
- ``scenario``: the fault spec (``gpt-4o-mini::status=500,times=2``);
- ``content``: what the model says (one-token words, JSON, refusal, tool calls), token counts;
- ``schema_example``: a value that fits a JSON schema; ``models``: models and context windows;
- ``stream``: SSE chunk and completion bytes; ``errors``: OpenAI-shaped errors;
- ``records``: per-request records and counters; ``cli``: the command line.
"""

from .records import RequestRecord
from .scenario import Scenario, ScenarioError, parse_scenario
from .server import Simulator

__all__ = ["RequestRecord", "Scenario", "ScenarioError", "Simulator", "parse_scenario"]
