-- wrk script for bench/coordinator_bench.py: POST /v1/checkin, a different device token on
-- every request (tokens file: one per line, path in the FEDKEYS_TOKENS environment variable).
-- FEDKEYS_DELAY_MS paces each connection (a fixed offered rate instead of as fast as answers
-- come). Prints one JSON line with the totals and latency percentiles when the run ends.
local tokens = {}
for line in io.lines(os.getenv("FEDKEYS_TOKENS")) do
  tokens[#tokens + 1] = line
end
local body = os.getenv("FEDKEYS_BODY")
-- paced load: each connection waits this long after an answer before its next request
local pause = tonumber(os.getenv("FEDKEYS_DELAY_MS") or "0")
local idx = 0
local non200 = 0

function setup(thread)
  thread:set("offset", math.random(#tokens))
end

function init(args)
  idx = offset or 0
end

function request()
  idx = idx % #tokens + 1
  return wrk.format("POST", "/v1/checkin", {
    ["Authorization"] = "Bearer " .. tokens[idx],
    ["Content-Type"] = "application/json",
  }, body)
end

function delay()
  return pause
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "seconds": %.3f, "p50_ms": %.3f, "p99_ms": %.3f, "max_ms": %.3f, ' ..
    '"non2xx": %d, "socket_errors": %d}\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50) / 1000,
    latency:percentile(99) / 1000, latency.max / 1000, e.status,
    e.connect + e.read + e.write + e.timeout))
end
