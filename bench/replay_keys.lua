-- wrk script: POST with keys from a fixed set, all stored beforehand, so every answer is a replay.
--
-- Keys: $REPLAY_PREFIX-<i> for i in 0 .. $REPLAY_KEYS-1 (default "replay", 1000), cycled; each
-- thread starts at its own offset. bench/run.py sends every key once before the timed runs
-- (same method, path and body, so the fingerprints match).

local body = '{"sku":"tea","qty":1}'
local headers = { ["Content-Type"] = "application/json" }
local key_prefix = os.getenv("REPLAY_PREFIX") or "replay"
local key_count = tonumber(os.getenv("REPLAY_KEYS") or "1000")

local next_thread = 0

function setup(thread)
  thread:set("thread_id", next_thread)
  next_thread = next_thread + 1
end

local index = nil

function request()
  if index == nil then
    index = (thread_id * 7919) % key_count
  end
  index = (index + 1) % key_count
  headers["Idempotency-Key"] = key_prefix .. "-" .. index
  return wrk.format("POST", nil, headers, body)
end
