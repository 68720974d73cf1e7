"""The Redis keys and Lua scripts that let several instances share one Redis (docs/several-instances.md).

Every cluster key lives beside ``lk-jwt:jobs`` under ``rtcauth:``, so the jobs hash stays
byte-for-byte upstream's. Each change that has to be atomic is one Lua script: Redis
runs a script to the end before any other command, which is what makes an ownership
check and the write it guards one step (compare-and-set with a fencing token).

Ownership of a job is the pair (fencing token, instance): ``rtcauth:owners`` maps the
job's hash field to ``"<fence>|<instance id>"``, where the fence comes from ``INCR
rtcauth:fence`` and so only grows. An instance holds that job's lease for as long as the
entry names this token and its own liveness key ``rtcauth:instance:<id>`` (``SET NX PX``,
renewed by compare-and-set) exists. Renewing one key per instance instead of one per
job keeps the steady-state cost independent of the number of jobs.

Keys computed inside the scripts (``owned:<id>``, ``pending:<field>``, ``instance:<id>``)
are fine on a single Redis or behind Sentinel; Redis Cluster is not supported.
"""

from __future__ import annotations

import attr

__all__ = ["ClusterKeys", "SCRIPTS"]

OWNERS = b"rtcauth:owners"
CONNECTED = b"rtcauth:connected"
FENCE = b"rtcauth:fence"
INSTANCES = b"rtcauth:instances"
PREFIX = b"rtcauth:"


@attr.s(frozen=True, slots=True, auto_attribs=True)
class ClusterKeys:
    """Key and channel names for one database. Pub/sub channels are server-wide (not
    per database), so they carry the db number: two deployments on db 0 and db 1 of one
    Redis never hear each other."""

    db: int = 0

    def instance(self, iid: bytes) -> bytes:
        return PREFIX + b"instance:" + iid

    def owned(self, iid: bytes) -> bytes:
        return PREFIX + b"owned:" + iid

    @property
    def channel_prefix(self) -> bytes:
        return PREFIX + b"%d:to:" % self.db

    def channel(self, iid: bytes) -> bytes:
        return self.channel_prefix + iid

    @property
    def broadcast(self) -> bytes:
        return PREFIX + b"%d:all" % self.db


# A token is "<fence>|<iid>"; the instance id is everything after the first bar.
_OWNER_OF = "local function owner_of(token) return token and string.match(token, '^%d+|(.*)$') end\n"

#: KEYS: instance key, instances set. ARGV: iid, lease ms. 1 = acquired.
ACQUIRE = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 0 end
redis.call('SADD', KEYS[2], ARGV[1])
return 1
"""

#: KEYS: instance key. ARGV: iid, lease ms. 1 = still ours and extended, 0 = lost.
RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

#: KEYS: instance key. ARGV: iid, broadcast channel. Gives the jobs up at once (SIGTERM):
#: with the liveness key gone the owner is dead, and the broadcast wakes the others.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
redis.call('PUBLISH', ARGV[2], 'gone\\n' .. ARGV[1])
return 1
"""

#: KEYS: jobs, owners, fence, connected. ARGV: field, value, iid, key prefix, channel prefix.
#: A new delegation supersedes the job wherever it runs; the old owner is told.
REGISTER = _OWNER_OF + """
local old = owner_of(redis.call('HGET', KEYS[2], ARGV[1]))
local fence = redis.call('INCR', KEYS[3])
local token = fence .. '|' .. ARGV[3]
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], token)
redis.call('HDEL', KEYS[4], ARGV[1])
redis.call('DEL', ARGV[4] .. 'pending:' .. ARGV[1])
redis.call('SADD', ARGV[4] .. 'owned:' .. ARGV[3], ARGV[1])
if old and old ~= ARGV[3] then
  redis.call('SREM', ARGV[4] .. 'owned:' .. old, ARGV[1])
  redis.call('PUBLISH', ARGV[5] .. old, 'superseded\\n' .. fence .. '\\n' .. ARGV[1])
end
return token
"""

#: KEYS: jobs, owners, connected. ARGV: field, value, token. A restart succeeded:
#: write RestartedAt and remember that the participant had connected. 0 = not ours.
RESTARTED = """
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[3] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[3], ARGV[1], '1')
return 1
"""

#: KEYS: jobs, owners, connected. ARGV: field, token, key prefix, iid, 'claim' or ''.
#: The job ended: its record goes. With 'claim' (before sending the leave) the
#: instance's liveness key must still be its own too. 1 = done, 0 = not ours, -1 = lease lost.
FINISH = """
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] then return 0 end
if ARGV[5] == 'claim' and redis.call('GET', ARGV[3] .. 'instance:' .. ARGV[4]) ~= ARGV[4] then return -1 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('SREM', ARGV[3] .. 'owned:' .. ARGV[4], ARGV[1])
redis.call('DEL', ARGV[3] .. 'pending:' .. ARGV[1])
return 1
"""

#: KEYS: jobs, owners, fence, connected. ARGV: field, key prefix, channel prefix, iid.
#: A job registered and ended while Redis was away: remove it wherever it was owned.
DROP = _OWNER_OF + """
local old = owner_of(redis.call('HGET', KEYS[2], ARGV[1]))
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[1])
redis.call('DEL', ARGV[2] .. 'pending:' .. ARGV[1])
if old then
  redis.call('SREM', ARGV[2] .. 'owned:' .. old, ARGV[1])
  if old ~= ARGV[4] then
    local fence = redis.call('INCR', KEYS[3])
    redis.call('PUBLISH', ARGV[3] .. old, 'superseded\\n' .. fence .. '\\n' .. ARGV[1])
  end
end
return 1
"""

#: KEYS: jobs, owners, fence, connected. ARGV: iid, key prefix, then (field, expected
#: owner token or '') pairs. Takes each job whose owner entry is still the expected one
#: (unowned, or a dead instance's); answers {field, token, value, connected, pending...}.
ADOPT = _OWNER_OF + """
local out = {}
for i = 3, #ARGV, 2 do
  local field, expected = ARGV[i], ARGV[i + 1]
  local current = redis.call('HGET', KEYS[2], field) or ''
  if current == expected then
    local old = owner_of(current)
    if old then redis.call('SREM', ARGV[2] .. 'owned:' .. old, field) end
    local value = redis.call('HGET', KEYS[1], field)
    if value then
      local token = redis.call('INCR', KEYS[3]) .. '|' .. ARGV[1]
      redis.call('HSET', KEYS[2], field, token)
      redis.call('SADD', ARGV[2] .. 'owned:' .. ARGV[1], field)
      local pending_key = ARGV[2] .. 'pending:' .. field
      local pending = redis.call('LRANGE', pending_key, 0, -1)
      redis.call('DEL', pending_key)
      table.insert(out, {field, token, value, redis.call('HGET', KEYS[4], field) or '', pending})
    elseif current ~= '' then
      redis.call('HDEL', KEYS[2], field)
    end
  end
end
return out
"""

#: KEYS: owners. ARGV: field, signal, key prefix, channel prefix, iid.
#: A webhook for a job this instance does not run: to its owner ('sent'), into the
#: inbox of a live owner that is not listening ('queued'), kept for whoever takes the
#: job of a dead owner over ('kept'), 'mine' (ours by Redis) or 'none' (no such job).
ROUTE = _OWNER_OF + """
local owner = owner_of(redis.call('HGET', KEYS[1], ARGV[1]))
if not owner then return 'none' end
if owner == ARGV[5] then return 'mine' end
if redis.call('EXISTS', ARGV[3] .. 'instance:' .. owner) == 1 then
  local message = 'signal\\n' .. ARGV[2] .. '\\n' .. ARGV[1]
  if redis.call('PUBLISH', ARGV[4] .. owner, message) > 0 then return 'sent' end
  -- alive but not listening (reconnecting): its inbox, read every lease round
  local inbox = ARGV[3] .. 'inbox:' .. owner
  redis.call('RPUSH', inbox, message)
  redis.call('LTRIM', inbox, -10000, -1)
  redis.call('PEXPIRE', inbox, 86400000)
  return 'queued'
end
local pending_key = ARGV[3] .. 'pending:' .. ARGV[1]
redis.call('RPUSH', pending_key, ARGV[2])
redis.call('LTRIM', pending_key, -16, -1)
redis.call('PEXPIRE', pending_key, 86400000)
return 'kept'
"""

#: KEYS: pending list. ARGV: signal. A signal routed to this instance for a job it is
#: just re-adopting: kept for the adoption, as for a dead owner.
KEEP = """
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('LTRIM', KEYS[1], -16, -1)
redis.call('PEXPIRE', KEYS[1], 86400000)
return 1
"""

#: KEYS: an instance's inbox. ARGV: how many. Takes the oldest messages out.
DRAIN = """
local messages = redis.call('LRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
if #messages > 0 then redis.call('LTRIM', KEYS[1], #messages, -1) end
return messages
"""

#: KEYS: instances, owned set of the dead one. ARGV: dead iid. Forget an instance
#: once nothing of it is left.
FORGET = """
if redis.call('SCARD', KEYS[2]) == 0 then redis.call('SREM', KEYS[1], ARGV[1]) return 1 end
return 0
"""

SCRIPTS = {
    "acquire": ACQUIRE,
    "renew": RENEW,
    "release": RELEASE,
    "register": REGISTER,
    "restarted": RESTARTED,
    "finish": FINISH,
    "drop": DROP,
    "adopt": ADOPT,
    "route": ROUTE,
    "forget": FORGET,
    "keep": KEEP,
    "drain": DRAIN,
}
