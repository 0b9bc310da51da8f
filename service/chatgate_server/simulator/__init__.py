"""An OpenAI-compatible (and Azure OpenAI) chat-completions simulator with fault scenarios.

A real HTTP/1.1 server on a loopback port for tests, the demo and benchmarks, in place
of api.openai.com. Modules, each owning one thing:

- ``server``: ``Simulator``, start/stop and what tests read and script;
- ``app``: routing, the control endpoints, and turning one request into a response plan;
- ``plan``: a response plan and the stream faults; ``sending``: writing plans over time;
- ``connection``: the ``asyncio.Protocol`` per TCP connection (keep-alive, early close);
- ``wire``: HTTP/1.1 request parsing and response framing;
- ``scenario``: the fault spec (``gpt-4o-mini::status=500,times=2``);
- ``content``: what the model says (one-token words, JSON, refusal, tool calls), token counts;
- ``schema_example``: a value that fits a JSON schema; ``models``: models and context windows;
- ``stream``: SSE chunk and completion bytes; ``errors``: OpenAI-shaped errors;
- ``flavor``: what differs between OpenAI and Azure; ``azure``: Azure's URLs, bodies, headers;
- ``ratelimit``: the scriptable rate-limit budget and its headers;
- ``keys``: which key a request carried, as a fingerprint or a name;
- ``records``: per-request records and counters; ``cli``: the command line;
- ``testing``: small helpers for tests that read the simulator's streams and records.
"""

from .records import RequestRecord
from .scenario import Scenario, ScenarioError, parse_scenario
from .server import Simulator

__all__ = ["RequestRecord", "Scenario", "ScenarioError", "Simulator", "parse_scenario"]
