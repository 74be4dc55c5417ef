-- wrk script: an unkeyed request with a body, the same for every request.
--
-- $BODY_METHOD (POST by default) and $BODY_BYTES: 21 sends the benchmark's small JSON body
-- ({"sku":"tea","qty":1}, as new_keys.lua), any other size that many bytes of
-- application/octet-stream (1048576 for the streamed large body).

local size = tonumber(os.getenv("BODY_BYTES") or "21")
wrk.method = os.getenv("BODY_METHOD") or "POST"
if size == 21 then
  wrk.body = '{"sku":"tea","qty":1}'
  wrk.headers["Content-Type"] = "application/json"
else
  wrk.body = string.rep("x", size)
  wrk.headers["Content-Type"] = "application/octet-stream"
end
