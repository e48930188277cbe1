"""Budget endpoints (DESIGN §7): authorization and the HTTP forms over `ingest.budget_desk.BudgetDesk`."""

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query

from ingest.budget_desk import (
    AppLimit,
    BudgetDesk,
    BudgetServices,
    CheckRequest,
    TagDelete,
    TagInfoRequest,
    TagNew,
    TagUpdate,
)
from ingest.exact import ExactJSONResponse
from ingest.publisher import EventPublisher


def create_router(
    services: BudgetServices,
    publisher: EventPublisher,
    topic: str,
    *,
    require_manage: Any,
    require_read: Any,
    require_check: Any,
) -> APIRouter:
    """The budget endpoints over a `BudgetDesk`: authorization and the HTTP forms; the work is the desk's."""
    router = APIRouter()
    desk = BudgetDesk(services, publisher, topic)
    Admin = Annotated[Any, Depends(require_manage)]
    Reader = Annotated[Any, Depends(require_read)]
    Caller = Annotated[Any, Depends(require_check)]

    @router.post("/tag/new", response_class=ExactJSONResponse, responses={409: {}, 422: {}})
    async def tag_new(body: TagNew, _: Admin) -> ExactJSONResponse:
        """Create a tag budget (LiteLLM-compatible). `max_budget` USD; `budget_duration` `Ns|Nm|Nh|Nd|Nmo`
        (`30d` is the calendar month, `24h` the day). The answer says which window applies and how much
        spend it already counts."""
        return ExactJSONResponse(await desk.create(body))

    @router.get("/tag/info", response_class=ExactJSONResponse, responses={404: {}})
    async def tag_info(
        _: Reader, names: Annotated[str, Query(min_length=1, description="comma-separated tag names")]
    ) -> ExactJSONResponse:
        """Budget, spend in the current window, reset time and block state, keyed by tag name."""
        return ExactJSONResponse(await desk.infos([n.strip() for n in names.split(",") if n.strip()]))

    @router.post("/tag/info", response_class=ExactJSONResponse, responses={404: {}})
    async def tag_info_post(body: TagInfoRequest, _: Reader) -> ExactJSONResponse:
        """`/tag/info` as LiteLLM's proxy takes it: `{"names": [...]}`."""
        return ExactJSONResponse(await desk.infos([n.strip() for n in body.names if n.strip()]))

    @router.get("/tag/list", response_class=ExactJSONResponse)
    async def tag_list(_: Reader) -> ExactJSONResponse:
        """Every tag budget, as `/tag/info` describes it, sorted by tag."""
        return ExactJSONResponse(await desk.listing())

    @router.post("/tag/update", response_class=ExactJSONResponse, responses={404: {}, 422: {}})
    async def tag_update(body: TagUpdate, _: Admin) -> ExactJSONResponse:
        """Change any of a budget's fields; the others stay. A raised budget lifts its block."""
        return ExactJSONResponse(await desk.update(body))

    @router.post("/tag/delete", responses={404: {}})
    async def tag_delete(body: TagDelete, _: Admin) -> dict[str, Any]:
        """Delete a budget (its spend stays in the ledger); a block on it lifts."""
        return await desk.delete(body)

    @router.post("/v1/limits/app", response_class=ExactJSONResponse, responses={422: {}})
    async def set_app_limit(body: AppLimit, _: Admin) -> ExactJSONResponse:
        """Set (or replace) an app's spending limit in credits (100 = $1): a budget on the tag `app:<app_id>`."""
        return ExactJSONResponse(await desk.set_app_limit(body))

    @router.get("/v1/usage/app/{app_id}/current", response_class=ExactJSONResponse)
    async def app_usage(app_id: str, _: Reader) -> ExactJSONResponse:
        """Usage in the current limit window, in credits (100 = $1); the calendar month when no limit is set."""
        return ExactJSONResponse(await desk.app_usage(app_id))

    @router.post("/v1/check", responses={503: {}})
    async def check(body: CheckRequest, key: Caller) -> dict[str, Any]:
        """May a call with this attribution go ahead? Answered from memory, like an embedded BudgetGuard.
        A bound producer key asks only about what it may claim (403 otherwise, as its events would get)."""
        return desk.check(body, getattr(key, "binding", None))

    return router
