-- wrk script of benches/wrk-ingest.sh.
--   wrk -tN ... -s benches/wrk-ingest.lua URL -- PREFIX  → thread i replays the pre-signed
--     Fiserv webhooks of PREFIX-i.req (benches/wrk-requests.py: a line with the length L,
--     then complete requests of L bytes each), each once (a thread that runs out starts
--     over; those repeats are answered "duplicate", cheaper, and counted in the `repeats`
--     figure printed at the end).
--   wrk ... -s benches/wrk-ingest.lua URL                 → plain GETs of URL's path.
-- Either way it ends with one line "WRK_RESULT key=value …" for the shell script.
--
-- init() only reads its own file and cuts it at fixed offsets: wrk sets its threads up one
-- after the other and starts each at once, but starts its clock after the last one, so a
-- slow set-up would let the first threads send uncounted time (the previous version parsed
-- and formatted a shared file of tab-separated lines: ~3 s per thread).

local threads = {}
local counter = 0

function setup(thread)
   thread:set("index", counter)
   counter = counter + 1
   table.insert(threads, thread)
end

function init(args)
   local prefix = args[1]
   requests = {}
   repeats = 0
   sent = 0
   position = 0
   file = nil
   if prefix == nil then
      return
   end
   file = prefix .. "-" .. wrk.thread:get("index") .. ".req"
   local f = assert(io.open(file, "rb"))
   local data = f:read("*a")
   f:close()
   local newline = data:find("\n", 1, true)
   local length = tonumber(data:sub(1, newline - 1))
   local offset = newline + 1
   while offset + length - 1 <= #data do
      requests[#requests + 1] = data:sub(offset, offset + length - 1)
      offset = offset + length
   end
end

function request()
   if file == nil then
      return wrk.format("GET", wrk.path)
   end
   position = position + 1
   if position > #requests then
      position = 1
   end
   sent = sent + 1
   if sent > #requests then
      repeats = sent - #requests
   end
   return requests[position]
end

-- With WRK_LATENCY_OUT set, done() also writes the latency histogram there ("µs count" per
-- line), so that benches/wrk-merge.py can merge the runs of several wrk processes.
function done(summary, latency, _requests)
   local histogram_out = os.getenv("WRK_LATENCY_OUT")
   if histogram_out ~= nil and histogram_out ~= "" then
      local out = assert(io.open(histogram_out, "w"))
      for i = 1, #latency do
         local value, count = latency(i)
         out:write(string.format("%d %d\n", value, count))
      end
      out:close()
   end
   local total_repeats = 0
   for _, thread in ipairs(threads) do
      total_repeats = total_repeats + (tonumber(thread:get("repeats")) or 0)
   end
   local seconds = summary.duration / 1e6
   local non_2xx = summary.errors.status
   local transport = summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout
   local ok = summary.requests - non_2xx
   io.write(string.format(
      "WRK_RESULT requests=%d ok=%d non_2xx=%d transport_errors=%d seconds=%.3f ok_per_sec=%.1f p50_ms=%.2f p90_ms=%.2f p99_ms=%.2f p999_ms=%.2f max_ms=%.2f repeats=%d\n",
      summary.requests, ok, non_2xx, transport, seconds, ok / seconds,
      latency:percentile(50) / 1000, latency:percentile(90) / 1000,
      latency:percentile(99) / 1000, latency:percentile(99.9) / 1000,
      latency.max / 1000, total_repeats))
end
