"""A reload that cannot be applied whole is refused whole: when the operator's price
file (CHATGATE_PRICES_FILE) was broken since start-up and chatgate.toml changes, the
reload says so and keeps the running deployments, routes and prices — never a router
swapped in half (new deployments routed, the service still on the old ones)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import grpc

from tests.integration.test_faults import call
from tests.integration.test_routing import M, Sims, StartRouted, deployment

pytest_plugins = ["tests.integration.test_routing"]  # its fixtures: sims, start_routed

PRICES = "model,input,cached_input,output,valid_from\ngpt-4o-mini,0,,0,2020-01-01\n"


async def test_a_reload_with_a_broken_price_file_changes_nothing(
    sims: Sims, start_routed: StartRouted
) -> None:
    a, b = await sims(2)
    folder = Path(tempfile.mkdtemp(prefix="chatgate-prices-"))
    (folder / "operator.csv").write_text(PRICES)
    (folder / "own.csv").write_text(PRICES)
    app, stub = await start_routed(
        deployment("a", a.base_url, {"m": M}, prices_file=str(folder / "own.csv")),
        prices_file=folder / "operator.csv",
    )
    assert app.settings.config_file is not None and app.router is not None
    before = app.router
    (folder / "operator.csv").write_text("not,a,price,file\n")
    app.settings.config_file.write_text(
        deployment("a", a.base_url, {"m": M}, prices_file=str(folder / "own.csv"))
        + deployment("b", b.base_url, {"n": M})
    )
    assert await app.reload() is False
    assert app.router is before and [d.name for d in app.router.deployments] == ["a"]
    assert (await call(stub, "m")).code == grpc.StatusCode.OK
