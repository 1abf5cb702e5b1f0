-- wrk script: POST loadtest/postdata.txt's body to the URL given to wrk.
local f = assert(io.open((os.getenv("POSTDATA") or "loadtest/postdata.txt"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
wrk.headers["Content-Type"] = "application/json"
f:close()
