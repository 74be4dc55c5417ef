-- wrk script: POST with a unique Idempotency-Key per request.
--
-- Key: <run prefix>-<thread id>-<counter>. The run prefix is $BENCH_RUN_ID (bench/run.py sets
-- a fresh one for every wrk invocation) or, without it, random; the thread id keeps wrk's
-- threads apart and the counter makes every request of a thread distinct.
--
-- $NEW_KEYS_LIMIT_PER_THREAD (optional): each thread stops after that many responses, so a run
-- can be bounded by a request count as well as by wrk's -d duration.

local body = '{"sku":"tea","qty":1}'
local headers = { ["Content-Type"] = "application/json" }

-- main state: hand each thread its id and the run prefix (they become globals in the thread)
local next_thread = 1
local main_prefix = nil

function setup(thread)
  if main_prefix == nil then
    main_prefix = os.getenv("BENCH_RUN_ID")
    if main_prefix == nil or main_prefix == "" then
      math.randomseed(os.time() + math.floor(os.clock() * 1000000))
      main_prefix = string.format("%08x%08x", math.random(0, 0x7fffffff), math.random(0, 0x7fffffff))
    end
  end
  thread:set("thread_id", next_thread)
  thread:set("run_prefix", main_prefix)
  next_thread = next_thread + 1
end

-- thread state
local counter = 0

function request()
  counter = counter + 1
  headers["Idempotency-Key"] = run_prefix .. "-" .. thread_id .. "-" .. counter
  return wrk.format("POST", nil, headers, body)
end

local limit = tonumber(os.getenv("NEW_KEYS_LIMIT_PER_THREAD") or "")
if limit ~= nil then
  local answered = 0
  function response(status, response_headers, response_body)
    answered = answered + 1
    if answered >= limit then
      wrk.thread:stop()
    end
  end
end
