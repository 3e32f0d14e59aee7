-- wrk script: POST one text message per request. Set by the environment:
--   WA_PATH  the send route (gateway: /v1/sessions/<name>/messages, pod: /v1/messages)
--   WA_KEY   the bearer (an API key for the gateway, the pod token for the pod and nginx)
--   WA_IDEM  "1" to send a unique Idempotency-Key per request (what the gateway does itself)
local path = os.getenv("WA_PATH")
local key = os.getenv("WA_KEY")
local idem = os.getenv("WA_IDEM") == "1"
local body = '{"to":"+15551234567","type":"text","text":"benchmark message"}'
local counter = 0
local thread_id = 0

function setup(thread)
  thread_id = thread_id + 1
  thread:set("tid", thread_id)
end

function init(args)
  counter = 0
end

function request()
  counter = counter + 1
  local headers = {
    ["Authorization"] = "Bearer " .. key,
    ["Content-Type"] = "application/json",
  }
  if idem then
    headers["Idempotency-Key"] = string.format("bench-%d-%d-%d", tid, os.time(), counter)
  end
  return wrk.format("POST", path, headers, body)
end

-- wrk prints "Non-2xx or 3xx responses: N" itself when there are any; run.sh fails on it.
