"""Bearer-token guard for the admin routes (``/admin/*``, and the job API that reuses it).

Without ``APP_ADMIN_TOKEN`` the admin routes are disabled (403 saying how to enable them); there is no
default token. A missing or non-Bearer ``Authorization`` header gets 401, a wrong token 403. The
comparison is constant-time (``hmac.compare_digest``), so response timing does not leak the token.

Use it as ``dependencies=[RequireAdmin]`` on a router or route.
"""

from __future__ import annotations

import hmac

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.config import Settings

_bearer = HTTPBearer(auto_error=False, description="APP_ADMIN_TOKEN")


async def require_admin(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
    settings: Settings = request.app.state.settings
    if settings.admin_token is None:
        raise HTTPException(403, "admin routes are disabled: set APP_ADMIN_TOKEN to a secret of at least 16 "
                                 "characters and restart the service to enable them")
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise HTTPException(401, "send the admin token as 'Authorization: Bearer <APP_ADMIN_TOKEN>'",
                            headers={"WWW-Authenticate": "Bearer"})
    expected = settings.admin_token.get_secret_value().encode()
    if not hmac.compare_digest(credentials.credentials.encode(), expected):
        raise HTTPException(403, "the admin token is wrong")


RequireAdmin = Depends(require_admin)
