-- wrk script for bench/serve.py: GET /recommendations/<user> over many user ids.
--   wrk -s bench/serve.lua <url> -- <key> <users-file> [k] [path-prefix]
-- Users are read from a file (one id per line) and picked at random per request;
-- with "-" as the users file every request is GET <path-prefix> as is (e.g. /healthz).
-- done() prints one JSON line (prefixed "WRK_JSON ") with the latency percentiles.
local users = {}
local key = ""
local k = "10"
local prefix = "/recommendations/"
local static = false

local function url_escape(s)
  return (s:gsub("[^%w%-%._~]", function(c) return string.format("%%%02X", string.byte(c)) end))
end

function init(args)
  key = args[1] or ""
  local path = args[2]
  k = args[3] or k
  prefix = args[4] or prefix
  if path == "-" then
    static = true
  elseif path then
    for line in io.lines(path) do
      if #line > 0 then users[#users + 1] = url_escape(line) end
    end
  end
  if #users == 0 then users[1] = "u1" end
  math.randomseed(os.time() + math.floor(os.clock() * 1e6))
end

function request()
  local headers = {}
  if key ~= "" then headers["X-API-Key"] = key end
  if static then return wrk.format("GET", prefix, headers) end
  local user = users[math.random(#users)]
  return wrk.format("GET", prefix .. user .. "?k=" .. k, headers)
end

function done(summary, latency, requests)
  local e = summary.errors
  local out = string.format(
    '{"requests":%d,"duration_us":%d,"bytes":%d,"connect_errors":%d,"read_errors":%d,' ..
    '"write_errors":%d,"status_errors":%d,"timeouts":%d,"p50_us":%d,"p90_us":%d,' ..
    '"p95_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(95),
    latency:percentile(99), latency.max, latency.mean)
  io.write("WRK_JSON " .. out .. "\n")
end
