-- Shape: JSON verify API through the C module cjson (lua_api.md §8 #5 mailcow and #7
-- dovecot_web_auth): auth_password_verify POSTs JSON and maps every HTTP status to a
-- passdb result; success returns a table of userdb_* fields (numbers decoded by cjson
-- are floats); auth_passdb_lookup is a stub so credential lookups find nobody; the
-- userdb asks the API again; there is no auth_userdb_iterate.
-- dialect: 2.3
local cjson = require("cjson")

local api = "{{ BACKEND_URL }}/api"
local client = dovecot.http.client({timeout = 10000; max_attempts = 3; debug = false})

local status_results = {
  [401] = dovecot.auth.PASSDB_RESULT_PASSWORD_MISMATCH,
  [404] = dovecot.auth.PASSDB_RESULT_USER_UNKNOWN,
  [403] = dovecot.auth.PASSDB_RESULT_USER_DISABLED,
  [410] = dovecot.auth.PASSDB_RESULT_PASS_EXPIRED,
  [300] = dovecot.auth.PASSDB_RESULT_NEXT,
  [501] = dovecot.auth.PASSDB_RESULT_SCHEME_NOT_AVAILABLE,
}

function auth_password_verify(req, password)
  if req.domain == nil then
    return dovecot.auth.PASSDB_RESULT_USER_UNKNOWN, "no domain given"
  end
  local request = client:request({url = api .. "/verify", method = "POST"})
  request:add_header("Content-Type", "application/json")
  request:set_payload(cjson.encode({
    username = req.user,
    password = password,
    service = req.service,
    remote_ip = req.remote_ip or cjson.null,
  }))
  local response = request:submit()
  local status = response:status()
  if status == 200 then
    local data = cjson.decode(response:payload())
    return dovecot.auth.PASSDB_RESULT_OK, {
      userdb_uid = data.uid,
      userdb_gid = data.gid,
      userdb_home = data.home,
      userdb_quota_rule = "*:bytes=" .. data.quota,
      userdb_mail_crypt = data.crypt,
    }
  end
  local result = status_results[status]
  if result ~= nil then
    return result, "api said " .. status
  end
  return dovecot.auth.PASSDB_RESULT_INTERNAL_FAILURE, "api returned " .. status .. " " .. response:reason()
end

function auth_passdb_lookup(req)
  return dovecot.auth.PASSDB_RESULT_USER_UNKNOWN, ""
end

function auth_userdb_lookup(req)
  local response = client:request({url = api .. "/user/" .. req.user, method = "GET"}):submit()
  local status = response:status()
  if status == 404 then
    return dovecot.auth.USERDB_RESULT_USER_UNKNOWN, "unknown"
  elseif status ~= 200 then
    return dovecot.auth.USERDB_RESULT_INTERNAL_FAILURE, "userdb api returned " .. status
  end
  local data = cjson.decode(response:payload())
  return dovecot.auth.USERDB_RESULT_OK, {uid = data.uid, gid = data.gid, home = data.home}
end
