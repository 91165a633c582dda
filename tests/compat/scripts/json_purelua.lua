-- Shape: Mailu's login.lua (lua_api.md §8 #2), written for the 2.3 API: a global
-- `json = require('json')` (a pure-Lua module), user names URL-encoded with gsub, request
-- details POSTed as JSON, and the decoded JSON objects returned as result tables as they
-- are (passdb tables with a hashed password and userdb_* fields, userdb tables); users
-- are listed over HTTP too.
-- dialect: 2.3
package.path = package.path .. ";{{ LUA_DIR }}/?.lua"
json = require('json')

local api = "{{ BACKEND_URL }}/api/mailu/"
local client = dovecot.http.client({timeout = 2000; max_attempts = 3})

local function urlencode(s)
  return (s:gsub("[^%w%-%._~]", function(c) return string.format("%%%02X", string.byte(c)) end))
end

local function post(path, data)
  local request = client:request({url = api .. path, method = "POST"})
  request:add_header("Content-Type", "application/json")
  request:set_payload(json.encode(data))
  local response = request:submit()
  return response:status(), response:payload()
end

local function details(req)
  return {
    user = req.user,
    password = req.password,
    protocol = req.service,
    remote_ip = req.remote_ip,
    remote_port = req.remote_port,
    local_port = req.local_port,
    secured = req.secured,
    mechanism = req.mechanism,
  }
end

function auth_passdb_lookup(req)
  local status, payload = post("passdb/" .. urlencode(req.user), details(req))
  if status == 200 then
    return dovecot.auth.PASSDB_RESULT_OK, json.decode(payload)
  elseif status == 404 then
    return dovecot.auth.PASSDB_RESULT_USER_UNKNOWN, ""
  end
  return dovecot.auth.PASSDB_RESULT_INTERNAL_FAILURE, "passdb api returned " .. status
end

function auth_userdb_lookup(req)
  local status, payload = post("userdb/" .. urlencode(req.user), details(req))
  if status == 200 then
    return dovecot.auth.USERDB_RESULT_OK, json.decode(payload)
  elseif status == 404 then
    return dovecot.auth.USERDB_RESULT_USER_UNKNOWN, ""
  end
  return dovecot.auth.USERDB_RESULT_INTERNAL_FAILURE, "userdb api returned " .. status
end

function auth_userdb_iterate()
  local response = client:request({url = api .. "users", method = "GET"}):submit()
  return json.decode(response:payload())
end
