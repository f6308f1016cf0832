"""Who may call the routes this extension adds: the WebUI's own guards, for our routes.

No ``from __future__ import annotations`` here: FastAPI reads a dependency's parameter types from its annotations,
and postponed (string) annotations would be looked up in this module's globals, where the lazily imported FastAPI
names are not (the engine tests import the glue without FastAPI).
"""
from modules import shared


def api_dependencies() -> list:
    """The WebUI's own API routes' guard (modules/api/api.py: ``Api.auth``): with ``--api-auth user:pass[,...]``
    every route of ours asks for the same HTTP basic credentials."""
    from secrets import compare_digest

    from fastapi import Depends, HTTPException
    from fastapi.security import HTTPBasic, HTTPBasicCredentials

    spec = getattr(shared.cmd_opts, "api_auth", None)
    if not spec:
        return []
    credentials = dict(item.split(":", 1) for item in spec.split(",") if ":" in item)

    def auth(given: HTTPBasicCredentials = Depends(HTTPBasic())) -> bool:
        if given.username in credentials and compare_digest(given.password, credentials[given.username]):
            return True
        raise HTTPException(status_code=401, detail="Incorrect username or password", headers={"WWW-Authenticate": "Basic"})

    return [Depends(auth)]


def page_dependencies(app) -> list:
    """The guard of routes the page itself calls (like the WebUI's ``/internal/...``): with ``--gradio-auth``, the
    login cookie gradio gave this browser (gradio's own ``get_current_user``)."""
    from fastapi import Depends, HTTPException, Request

    def logged_in(request: Request) -> None:
        if getattr(app, "auth", None) is None:
            return
        token = request.cookies.get("access-token") or request.cookies.get("access-token-unsecure")
        if app.tokens.get(token) is None:
            raise HTTPException(status_code=401, detail="Not authenticated")

    return [Depends(logged_in)]
