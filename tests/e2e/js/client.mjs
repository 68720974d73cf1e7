// A Matrix client as Element Call is one: matrix-js-sdk 43 talks to the homeserver,
// the token flows are the ones Element Call runs (docs/appservice-synapse.md#real-client).
//
//   node client.mjs '<json options>'     (RTCAUTH_JS_CLIENT_DIR: where npm ci put the SDK)
//
// Options: baseUrl, userId, accessToken, deviceId, roomId, memberId, flow ("openid" for
// the legacy OpenID /get_token against the transport's livekit_service_url, "cs" for the
// homeserver-proxied MSC4195 get_token), shape ("member" as the SDK types the C-S body,
// "member_id" as newer Element Call sends it), serverName (C-S only).
// Prints one line "RESULT <json>" on stdout; exits 1 with "ERROR <json>" on failure.
import { join } from "node:path";
import { pathToFileURL } from "node:url";

const SLOT_ID = "m.call#ROOM";
const options = JSON.parse(process.argv[2]);
const dir = process.env.RTCAUTH_JS_CLIENT_DIR;
const sdk = await import(pathToFileURL(join(dir, "node_modules", "matrix-js-sdk", "lib", "index.js")).href);
(await import(pathToFileURL(join(dir, "node_modules", "matrix-js-sdk", "lib", "logger.js")).href)).logger.setLevel("silent");

// Element Call's delegation probe: an empty POST, no credentials, no custom headers.
async function probe(url) {
    try {
        const res = await fetch(url, { method: "POST" });
        return { status: res.status, allowOrigin: res.headers.get("access-control-allow-origin") };
    } catch (e) {
        return { error: String(e) };
    }
}

async function main() {
    const client = sdk.createClient({
        baseUrl: options.baseUrl,
        userId: options.userId,
        accessToken: options.accessToken,
        deviceId: options.deviceId,
    });
    const transports = await client._unstable_getRTCTransports();
    const transport = transports.find((t) => t.type === "livekit");
    if (!transport) throw new Error(`no livekit transport in ${JSON.stringify(transports)}`);
    const result = { flow: options.flow, transport };

    if (options.flow === "openid") {
        const openid = await client.getOpenIdToken();
        const res = await fetch(`${transport.livekit_service_url}/get_token`, {
            method: "POST",
            headers: { "Content-Type": "application/json" },
            body: JSON.stringify({
                room_id: options.roomId,
                slot_id: SLOT_ID,
                openid_token: openid,
                member: { id: options.memberId, claimed_user_id: options.userId, claimed_device_id: options.deviceId },
            }),
        });
        const body = await res.json();
        if (res.status !== 200) throw new Error(`get_token answered ${res.status}: ${JSON.stringify(body)}`);
        Object.assign(result, { status: res.status, url: body.url, jwt: body.jwt, keys: Object.keys(body) });
    } else if (options.flow === "cs") {
        const body = { url: transport.url, room_id: options.roomId, slot_id: SLOT_ID };
        if (options.shape === "member_id") body.member_id = options.memberId;
        else body.member = { id: options.memberId };
        if (options.serverName) body.server_name = options.serverName;
        const got = await client._unstable_getLivekitToken(body);
        Object.assign(result, { jwt: got.jwt, keys: Object.keys(got) });
    } else {
        throw new Error(`unknown flow ${options.flow}`);
    }

    const base = options.baseUrl.replace(/\/$/, "");
    result.probe = {
        homeserver: await probe(`${base}/_matrix/client/unstable/io.element.msc4195/rtc/livekit/delegate_delayed_leave`),
        service: transport.livekit_service_url ? await probe(`${transport.livekit_service_url}/delegate_delayed_leave`) : null,
    };
    client.stopClient();
    return result;
}

try {
    console.log("RESULT " + JSON.stringify(await main()));
} catch (e) {
    console.log("ERROR " + JSON.stringify({ name: e.name, errcode: e.errcode, httpStatus: e.httpStatus, message: String(e.message) }));
    process.exitCode = 1;
}
