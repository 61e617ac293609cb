"""The console at `/`: static HTML, CSS and JavaScript modules shipped in the package
(service/console/, no build step), talking to the public API with the key the person signs in with.

`GET /` is the page; its assets are under `/console/`. Nothing here reads the database or serves
data: everything the console shows comes from the same routes every other client calls."""
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

CONSOLE_DIR = Path(__file__).resolve().parents[1] / "console"
# The page runs only its own scripts and styles and talks only to this origin: a chat answer or a
# comment that happens to contain markup can do nothing (the scripts also never parse text as HTML).
HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",  # revalidate (ETag): an upgraded server never runs with stale scripts
}

router = APIRouter(tags=["console"], include_in_schema=False)


@router.get("/")
async def console() -> FileResponse:
    """The console's one page."""
    return FileResponse(CONSOLE_DIR / "index.html", media_type="text/html", headers=HEADERS)


class ConsoleAssets(StaticFiles):
    """The console's scripts, styles and icons, with the page's headers."""

    async def get_response(self, path: str, scope: Scope):
        response = await super().get_response(path, scope)
        response.headers.update(HEADERS)
        return response


assets = ConsoleAssets(directory=CONSOLE_DIR)
