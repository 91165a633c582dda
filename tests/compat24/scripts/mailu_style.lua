-- dialect: 2.4
-- A Mailu-style 2.4 script (after core/dovecot/conf/login.lua, written anew for
-- authd's tests): a client with 2.4 option names (request_timeout = "2s"), a JSON
-- module, request data sent as headers using 2.4 field names (req.protocol,
-- req.mechanism, req.local_port...), and passdb/userdb answers that are the
-- decoded JSON tables themselves. API_URL comes from lua_settings.

json = require("cjson")

local api

function script_init(settings)
  api = settings.api_url
end

local http_client = dovecot.http.client {
  request_timeout = "2s";
  request_max_attempts = 3;
}

local function url_encode(text)
  return (text:gsub("[^%w_.~-]", function(c) return string.format("%%%02X", string.byte(c)) end))
end

local function ask(kind, req)
  local request = http_client:request {
    url = api .. "/api/mailu/" .. kind .. "/" .. url_encode(req.user);
    method = "POST";
  }
  request:add_header("Auth-Port", req.local_port)
  request:add_header("Auth-User", url_encode(req.user))
  if req.password ~= nil then request:add_header("Auth-Pass", url_encode(req.password)) end
  if req.protocol ~= nil then request:add_header("Auth-Protocol", req.protocol) end
  if req.remote_ip ~= nil then request:add_header("Client-Ip", req.remote_ip) end
  if req.mechanism ~= nil then request:add_header("Auth-Method", req.mechanism) end
  request:add_header("Auth-SSL", req.secured)
  return request:submit()
end

function auth_passdb_lookup(req)
  local response = ask("passdb", req)
  if response:status() == 200 then
    return dovecot.auth.PASSDB_RESULT_OK, json.decode(response:payload())
  elseif response:status() == 404 then
    return dovecot.auth.PASSDB_RESULT_USER_UNKNOWN, "no such user"
  end
  return dovecot.auth.PASSDB_RESULT_INTERNAL_FAILURE,
    "backend answered " .. response:status() .. " " .. response:reason()
end

function auth_userdb_lookup(req)
  local response = ask("userdb", req)
  if response:status() == 200 then
    return dovecot.auth.USERDB_RESULT_OK, json.decode(response:payload())
  elseif response:status() == 404 then
    return dovecot.auth.USERDB_RESULT_USER_UNKNOWN
  end
  return dovecot.auth.USERDB_RESULT_INTERNAL_FAILURE, "backend answered " .. response:status()
end

function auth_userdb_iterate()
  local response = http_client:request({url = api .. "/api/mailu/users"}):submit()
  if response:status() ~= 200 then return {} end
  return json.decode(response:payload())
end
