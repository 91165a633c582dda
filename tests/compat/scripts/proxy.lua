-- Shape: Mailu's older core/nginx/dovecot/login.lua (lua_api.md §8 #3): ask an nginx-style
-- mail auth endpoint with request headers, read the answer from response headers with
-- header(), and return the proxy fields as one string
-- (proxy=y host=... port=... destuser=... proxy_timeout=... nopassword=Y proxy_noauth=Y).
-- dialect: 2.3
local client = dovecot.http.client({timeout = 2000; max_attempts = 3})

function auth_passdb_lookup(req)
  local request = client:request({url = "{{ BACKEND_URL }}/auth/email", method = "GET"})
  request:add_header("Auth-Method", "plain")
  request:add_header("Auth-User", req.user)
  request:add_header("Auth-Pass", req.password)
  request:add_header("Auth-Protocol", req.service)
  request:add_header("Client-Ip", req.remote_ip or "127.0.0.1")
  request:add_header("Client-Port", req.remote_port)
  local response = request:submit()
  local status = response:header("Auth-Status")
  if status == "OK" then
    return dovecot.auth.PASSDB_RESULT_OK,
      "proxy=y host=" .. response:header("Auth-Server") .. " port=" .. response:header("Auth-Port") ..
      " destuser=" .. response:header("Auth-User") .. " proxy_timeout=15 nopassword=Y proxy_noauth=Y"
  elseif status == "" then
    return dovecot.auth.PASSDB_RESULT_INTERNAL_FAILURE,
      "mail auth endpoint returned " .. response:status() .. " without Auth-Status"
  end
  return dovecot.auth.PASSDB_RESULT_PASSWORD_MISMATCH, status
end
