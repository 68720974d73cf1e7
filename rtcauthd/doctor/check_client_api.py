"""The homeserver's client API at ``m.homeserver.base_url``, and whether it has MSC4140."""

from __future__ import annotations

from rtcauthd.doctor.answers import json_of, status_text, transport_fix
from rtcauthd.doctor.check_discovery import find_well_known
from rtcauthd.doctor.context import Context
from rtcauthd.doctor.report import Result, Status
from rtcauthd.outbound.client import OutboundError

VERSIONS_PATH = "/_matrix/client/versions"
MSC4140_FEATURE = "org.matrix.msc4140"


async def check_client_api(ctx: Context) -> list[Result]:
    """``/_matrix/client/versions`` at base_url, and whether it advertises MSC4140."""
    title = "Homeserver API"
    info = await ctx.finding(find_well_known)
    base = info.base_url
    if base is None:
        return [Result("client-api", title, Status.SKIP, "no m.homeserver.base_url (see Client discovery)")]
    url = base + VERSIONS_PATH
    fix = ["m.homeserver.base_url must be the public URL of the homeserver's client API."]
    try:
        response = await ctx.fetch(b"GET", url, headers={"Accept": "application/json"}, step="GET")
    except OutboundError as e:
        return [Result("client-api", title, Status.FAIL, f"{url}: {e.reason}", fix=transport_fix(e, fix))]
    try:
        document = json_of(response) if response.code == 200 else None
    except ValueError:
        document = None
    versions = document.get("versions") if isinstance(document, dict) else None
    if not isinstance(versions, list):
        return [Result("client-api", title, Status.FAIL, f"{url} answers {status_text(response)}, not a versions list", fix=fix)]
    latest = versions[-1] if versions else "none"
    results = [Result("client-api", title, Status.PASS, f"{base} serves the client API (latest spec version {latest})")]
    features = document.get("unstable_features")
    if isinstance(features, dict) and features.get(MSC4140_FEATURE) is True:
        results.append(Result("msc4140", "MSC4140", Status.PASS, f"the homeserver advertises {MSC4140_FEATURE} (delayed events)"))
    else:
        results.append(
            Result(
                "msc4140",
                "MSC4140",
                Status.WARN,
                f"the homeserver does not advertise {MSC4140_FEATURE} (delayed events): clients "
                "cannot schedule their leave event, so one that crashes or loses its network "
                "stays in the call as a phantom participant",
                fix=["Synapse: set max_event_delay_duration: 24h in homeserver.yaml and restart it. "
                     "Other homeservers: enable MSC4140 delayed events."],
            )
        )
    return results
