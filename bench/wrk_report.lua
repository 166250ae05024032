-- wrk reporter: prints one machine-readable line that bench.py parses.
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCHJSON {\"requests\":%.0f,\"bytes\":%.0f,\"duration_us\":%.0f," ..
    "\"p50_us\":%.1f,\"p90_us\":%.1f,\"p99_us\":%.1f,\"p999_us\":%.1f," ..
    "\"max_us\":%.1f,\"mean_us\":%.1f," ..
    "\"err_connect\":%.0f,\"err_read\":%.0f,\"err_write\":%.0f,\"err_status\":%.0f," ..
    "\"err_timeout\":%.0f}\n",
    summary.requests, summary.bytes, summary.duration,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9),
    latency.max, latency.mean,
    e.connect, e.read, e.write, e.status, e.timeout))
end
