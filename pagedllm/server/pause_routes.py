"""vLLM's development routes for pausing the scheduler, served (as by vLLM) with VLLM_SERVER_DEV_MODE=1 only:
POST /sleep?level=0&mode=abort, POST /wake_up?tags=scheduling, GET /is_sleeping; POST /pause?mode=abort
&clear_cache=true, POST /resume, GET /is_paused (engine/pause.py says what each mode does). Sleep levels 1 and 2
are refused with a 400 naming level (vLLM's sleep mode is not built)."""
import os

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from pagedllm.server.errors import APIError


def dev_mode() -> bool:
    """vLLM's VLLM_SERVER_DEV_MODE: an integer, on when not 0."""
    value = os.environ.get("VLLM_SERVER_DEV_MODE", "0").strip() or "0"
    try:
        return bool(int(value))
    except ValueError:
        raise ValueError(f"VLLM_SERVER_DEV_MODE must be an integer (0 or 1), got {value!r}") from None


async def _call(field: str, coroutine):
    try:
        return await coroutine
    except (ValueError, TypeError, NotImplementedError) as e:
        raise APIError(400, str(e), field, "invalid_value") from e


def pause_routes(engine, dependencies: list) -> APIRouter:
    router = APIRouter(dependencies=dependencies)

    @router.post("/sleep")
    async def sleep(level: str = "1", mode: str = "abort"):
        try:
            number = int(level)
        except ValueError:
            raise APIError(400, f"level must be an integer, got {level!r}", "level", "invalid_value") from None
        await _call("mode" if number == 0 else "level", engine.sleep(number, mode))
        return Response(status_code=200)

    @router.post("/wake_up")
    async def wake_up(request: Request):
        tags = request.query_params.getlist("tags") or None   # none given: all (vLLM's)
        await _call("tags", engine.wake_up(tags))
        return Response(status_code=200)

    @router.get("/is_sleeping")
    async def is_sleeping():
        return {"is_sleeping": await engine.is_sleeping()}

    @router.post("/pause")
    async def pause(mode: str = "abort", wait_for_inflight_requests: bool = Query(False),
                    clear_cache: bool = Query(True)):
        await _call("mode", engine.pause_generation(mode=mode, wait_for_inflight_requests=wait_for_inflight_requests,
                                                    clear_cache=clear_cache))
        return {"status": "paused"}

    @router.post("/resume")
    async def resume():
        await engine.resume_generation()
        return {"status": "resumed"}

    @router.get("/is_paused")
    async def is_paused():
        return {"is_paused": await engine.is_paused()}

    return router
