"""vLLM's POST /start_profile and /stop_profile, served (as by vLLM) only when --profiler-config turns a profiler
on: the engine core's ranks (and, unless ignore_frontend, this API process) trace their work between the two into
torch_profiler_dir (profiler.py). Without it they are 404s that say which flag serves them."""
import logging

from fastapi import APIRouter
from fastapi.responses import Response

logger = logging.getLogger("pagedllm")


def profile_routes(engine, dependencies: list) -> APIRouter:
    router = APIRouter(dependencies=dependencies)

    @router.post("/start_profile")
    async def start_profile():
        logger.info("starting the profiler")
        await engine.start_profile()
        return Response(status_code=200)

    @router.post("/stop_profile")
    async def stop_profile():
        logger.info("stopping the profiler")
        await engine.stop_profile()
        logger.info("profiler stopped")
        return Response(status_code=200)

    return router
