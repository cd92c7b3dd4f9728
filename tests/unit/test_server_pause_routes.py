"""vLLM's development routes for pausing (VLLM_SERVER_DEV_MODE=1): /sleep, /wake_up, /is_sleeping, /pause,
/resume, /is_paused, through AsyncLLM's own methods to the core calls they make (a fake core link records them)."""
import pytest
from fastapi.testclient import TestClient

from pagedllm.config import ServerConfig
from pagedllm.engine.async_llm import AsyncLLM
from pagedllm.server.api_server import build_app
from pagedllm.server.serving import ServingContext
from tests.unit.test_server_routes import FakeEngine


class FakeLink:
    def __init__(self):
        self.calls, self.paused = [], False

    async def call(self, name, *args):
        self.calls.append((name, *args))
        if name in ("pause", "resume"):
            self.paused = name == "pause"
        return self.paused if name == "is_paused" else None


class PausingEngine(FakeEngine):
    sleep, wake_up, is_sleeping = AsyncLLM.sleep, AsyncLLM.wake_up, AsyncLLM.is_sleeping
    pause_generation, resume_generation, is_paused = (AsyncLLM.pause_generation, AsyncLLM.resume_generation,
                                                      AsyncLLM.is_paused)

    def __init__(self):
        super().__init__()
        self.link = FakeLink()


@pytest.fixture
def client(monkeypatch):
    monkeypatch.setenv("VLLM_SERVER_DEV_MODE", "1")
    engine = PausingEngine()
    with TestClient(build_app(ServingContext(engine, "m", None), None, ServerConfig(), [])) as c:
        c.link = engine.link
        yield c


def test_sleep_level_0_and_wake_up_pause_and_resume_the_scheduler(client):
    assert client.post("/sleep?level=0&mode=keep").status_code == 200
    assert client.get("/is_sleeping").json() == {"is_sleeping": True}
    assert client.post("/wake_up?tags=scheduling").status_code == 200
    assert client.get("/is_sleeping").json() == {"is_sleeping": False}
    assert client.post("/pause?mode=wait&clear_cache=false").json() == {"status": "paused"}
    assert client.get("/is_paused").json() == {"is_paused": True}
    assert client.post("/resume").json() == {"status": "resumed"}
    assert client.post("/pause?wait_for_inflight_requests=true").status_code == 200
    assert [c for c in client.link.calls if c[0] == "pause"] == [("pause", "keep", False, 0), ("pause", "wait", False),
                                                                  ("pause", "wait", True)]


def test_what_is_not_built_or_not_vllms_is_a_400_naming_the_field(client):
    for url, field, words in [("/sleep", "level", "level=1"), ("/sleep?level=2", "level", "level=2"),
                              ("/sleep?level=x", "level", "integer"), ("/sleep?level=0&mode=soon", "mode", "mode"),
                              ("/pause?mode=soon", "mode", "pause mode"), ("/wake_up?tags=all", "tags", "tags")]:
        r = client.post(url)
        assert r.status_code == 400 and r.json()["error"]["param"] == field and words in r.text, (url, r.text)
    assert not any(c[0] == "pause" for c in client.link.calls)


def test_the_routes_are_404s_without_dev_mode(monkeypatch):
    monkeypatch.delenv("VLLM_SERVER_DEV_MODE", raising=False)
    with TestClient(build_app(ServingContext(PausingEngine(), "m", None), None, ServerConfig(), [])) as c:
        r = c.post("/sleep?level=0")
        assert r.status_code == 404 and "VLLM_SERVER_DEV_MODE=1" in r.text
