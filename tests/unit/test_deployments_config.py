"""chatgate.toml: what loads, and the one line each mistake gets."""

from __future__ import annotations

from pathlib import Path

import pytest

from chatgate_server.cli import main
from chatgate_server.config import ConfigError, Settings
from chatgate_server.deployments import load_config
from chatgate_server.domain import FEATURES

ENV = {"OPENAI_KEY": "sk-one", "AZURE_KEY": "az-two"}

GOOD = """
[[deployments]]
name = "openai-main"
kind = "openai"
key_env = "OPENAI_KEY"
models = ["gpt-4o", "gpt-4o-mini"]
weight = 3
headers = { "OpenAI-Project" = "proj_1" }

[[deployments]]
name = "azure-east"
kind = "azure"
resource = "https://east.openai.azure.com/"
api_version = "2024-10-21"
key_env = "AZURE_KEY"
models = { "gpt-4o-mini" = "mini-prod" }
max_concurrent_streams = 200

[[deployments]]
name = "local"
kind = "compatible"
base_url = "http://127.0.0.1:11434/v1"
models = ["llama3.1"]

[routes.fast]
model = "gpt-4o-mini"
deployments = ["azure-east", "openai-main"]
strategy = "weighted"
fallback = "gpt-4o"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "chatgate.toml"
    path.write_text(text)
    return path


def test_a_full_file_loads(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, GOOD), ENV)
    openai, azure, local = config.deployments
    assert openai.base_url == "https://api.openai.com/v1" and openai.api_key is not None
    assert openai.api_key.value == "sk-one" and openai.weight == 3.0
    assert openai.headers == (("OpenAI-Project", "proj_1"),)
    assert azure.base_url == "https://east.openai.azure.com" and azure.models == {"gpt-4o-mini": "mini-prod"}
    assert azure.max_concurrent_streams == 200
    assert local.api_key is None and local.models == {"llama3.1": "llama3.1"}
    [fast] = config.routes
    assert (fast.name, fast.model, fast.deployments, fast.weighted, fast.fallback) == (
        "fast",
        "gpt-4o-mini",
        ("azure-east", "openai-main"),
        True,
        "gpt-4o",
    )
    assert "sk-one" not in repr(config)


@pytest.mark.parametrize(
    ("change", "where"),
    [
        (('key_env = "OPENAI_KEY"', 'key = "sk-inline"'), "deployments[0].key: keys are never written"),
        (
            ('key_env = "AZURE_KEY"', 'key_env = "MISSING"'),
            "(azure-east).key_env: the environment variable MISSING",
        ),
        (('api_version = "2024-10-21"', 'api_version = "latest"'), "(azure-east).api_version"),
        (('kind = "compatible"', 'kind = "ollama"'), "deployments[2] (local).kind: must be one of"),
        (('"OpenAI-Project" = "proj_1"', '"Authorization" = "Bearer x"'), "headers.Authorization"),
        (
            ('deployments = ["azure-east", "openai-main"]', 'deployments = ["azure-west"]'),
            "routes.fast.deployments",
        ),
        (
            ('fallback = "gpt-4o"', 'fallback = "gpt-9"'),
            "routes.fast.fallback: no route or deployment serves",
        ),
        (("weight = 3", "weight = 0"), "(openai-main).weight: must be a number above 0"),
        (('name = "local"', 'name = "openai-main"'), "deployments[2].name: 'openai-main' is used twice"),
        (("[routes.fast]", "[router.fast]"), "router: unknown key"),
        (
            ("weight = 3", 'accepts = ["logprobs", "seed"]'),
            "(openai-main).accepts: 'seed' is not one of reasoning_effort,",
        ),
        (("weight = 3", 'accepts = "logprobs"'), "(openai-main).accepts: a list of request options"),
    ],
)
def test_each_mistake_is_one_line_naming_file_and_key(
    tmp_path: Path, change: tuple[str, str], where: str
) -> None:
    old, new = change
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(ConfigError) as refused:
        load_config(path, ENV)
    message = str(refused.value)
    assert message.startswith(f"{path}: ") and where in message and "\n" not in message
    assert "sk-inline" not in message and "sk-one" not in message


def test_each_kind_accepts_its_default_request_options_unless_told(tmp_path: Path) -> None:
    openai, azure, local = load_config(write(tmp_path, GOOD), ENV).deployments
    assert openai.accepts == set(FEATURES)
    # Azure's priority processing is a per-deployment preview, and it has no flex tier.
    assert azure.accepts == set(FEATURES) - {"service_tier"}
    assert local.accepts == frozenset()  # a compatible server: only what it is said to take
    told = GOOD.replace('models = ["llama3.1"]', 'models = ["llama3.1"]\naccepts = ["logprobs"]')
    told = told.replace(
        "max_concurrent_streams = 200", 'max_concurrent_streams = 200\naccepts = ["service_tier"]'
    )
    _, azure, local = load_config(write(tmp_path, told), ENV).deployments
    assert azure.accepts == {"service_tier"} and local.accepts == {"logprobs"}


def test_a_route_to_a_deployment_that_does_not_serve_its_model_is_refused(tmp_path: Path) -> None:
    text = GOOD.replace('model = "gpt-4o-mini"\ndeployments', 'model = "gpt-4o"\ndeployments')
    with pytest.raises(ConfigError, match=r"deployment 'azure-east' does not serve 'gpt-4o'"):
        load_config(write(tmp_path, text), ENV)


def test_not_toml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[[deployments]\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path, ENV)


def test_with_a_config_file_openai_api_key_is_not_required(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    settings = Settings.from_env({"DATABASE_URL": "postgresql://x/y", "CHATGATE_CONFIG": str(path), **ENV})
    assert settings.config_file == path
    with pytest.raises(ConfigError, match="OPENAI_API_KEY is not set"):
        Settings.from_env({"DATABASE_URL": "postgresql://x/y"})


def test_config_check_prints_the_routes_and_never_a_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    path = write(tmp_path, GOOD)
    assert main(["config", "check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "route fast: gpt-4o-mini on azure-east, openai-main (weighted), then gpt-4o" in out
    assert "accepts reasoning_effort, verbosity, prompt_cache_key, logprobs)" in out  # azure-east
    assert "models llama3.1; accepts no extra options)" in out  # local
    assert "sk-one" not in out and "az-two" not in out
    monkeypatch.delenv("AZURE_KEY")
    assert main(["config", "check", str(path)]) == 2
    assert "AZURE_KEY is not set" in capsys.readouterr().err


def test_the_readmes_worked_example_loads(tmp_path: Path) -> None:
    from tests.conftest import REPO_ROOT

    readme = (REPO_ROOT / "README.md").read_text()
    start = readme.index("```toml\n# chatgate.toml") + len("```toml\n")
    example = readme[start : readme.index("```", start)]
    prices = tmp_path / "prices.csv"
    prices.write_text("model,input,cached_input,output,valid_from\nllama-3.1-70b,0,,0,2025-01-01\n")
    example = example.replace("/etc/chatgate/self-hosted-prices.csv", str(prices))
    config = load_config(write(tmp_path, example), {"OPENAI_API_KEY": "sk-x", "AZURE_EAST_KEY": "az-y"})
    assert [d.name for d in config.deployments] == ["openai-main", "azure-east", "local-vllm"]
    assert [d.accepts for d in config.deployments][1:] == [set(FEATURES) - {"service_tier"}, {"logprobs"}]
    assert [(r.name, r.model, r.weighted) for r in config.routes] == [
        ("fast", "gpt-4o-mini", False),
        ("gpt-4o", "gpt-4o", True),
    ]


def test_a_deployment_can_carry_its_own_prices(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    from chatgate_server.deployments import deployment_prices
    from chatgate_server.domain import TokenUsage

    prices = tmp_path / "azure-prices.csv"
    prices.write_text("model,input,cached_input,output,valid_from\ngpt-4o-mini,1.00,,2.00,2025-01-01\n")
    text = GOOD.replace('name = "azure-east"', f'name = "azure-east"\nprices_file = "{prices}"')
    config = load_config(write(tmp_path, text), ENV)
    tables = deployment_prices(config, None)
    assert set(tables) == {"azure-east"}
    cost = tables["azure-east"].cost("gpt-4o-mini", TokenUsage(1_000_000, 1_000_000), datetime.now(UTC))
    assert cost.usd_micros == 3_000_000
    prices.write_text("model,input\ngpt-4o-mini,lots\n")
    with pytest.raises(ConfigError, match=r"deployments\[1\] \(azure-east\)\.prices_file: "):
        load_config(write(tmp_path, text), ENV)
