from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.store import Store

from .support.archive import archive_lab
from .support.gateway_proc import GatewayProcess

__all__ = ["archive_lab", "gateway", "gateway_factory", "store"]

GatewayFactory = Callable[..., GatewayProcess]


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator[GatewayFactory]:
    """Start real gateway processes; every one still running is stopped at teardown."""
    made: list[GatewayProcess] = []

    def make(name: str = "gw", start: bool = True, **sections: dict[str, Any]) -> GatewayProcess:
        gw = GatewayProcess(tmp_path / name, **sections)
        made.append(gw)
        return gw.start() if start else gw

    yield make
    for gw in made:
        if gw.proc is not None and gw.proc.poll() is None:
            gw.kill()


@pytest.fixture
def gateway(gateway_factory: GatewayFactory) -> GatewayProcess:
    return gateway_factory()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """An open queue database in a real file."""
    s = Store(tmp_path / "q.sqlite3")
    s.open()
    yield s
    s.close()
