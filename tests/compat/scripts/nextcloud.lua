-- Shape: Nextcloud app-password check (lua_api.md §8 #1, docker-mailserver's example):
-- a WebDAV PROPFIND with HTTP Basic auth built by a pure-Lua base64 module decides;
-- string results; client options as the docs write them (`timeout` is ignored by 2.3).
-- dialect: 2.3
-- {{ ... }} placeholders are filled in by the tests before the script is loaded.
package.path = package.path .. ";{{ LUA_DIR }}/?.lua"
local base64 = require("base64")

local nextcloud_url = "{{ BACKEND_URL }}"

local http_client = dovecot.http.client{
  timeout = 1000;
  max_attempts = 1;
  debug = false;
}

-- Nextcloud app passwords: five groups of five letters or digits joined by dashes.
local app_password_pattern = "^%w%w%w%w%w%-%w%w%w%w%w%-%w%w%w%w%w%-%w%w%w%w%w%-%w%w%w%w%w$"

function script_init()
  return 0
end

function script_deinit()
end

function auth_passdb_lookup(req)
  if not string.find(req.password, app_password_pattern) then
    -- not an app password: never sent to Nextcloud
    return dovecot.auth.PASSDB_RESULT_PASSWORD_MISMATCH, ""
  end
  local auth_request = http_client:request {
    url = nextcloud_url .. "/remote.php/dav/files/" .. req.user .. "/";
    method = "PROPFIND";
  }
  auth_request:add_header("Authorization", "Basic " .. base64.encode(req.user .. ":" .. req.password))
  if req.remote_ip ~= nil then
    auth_request:add_header("X-Forwarded-For", req.remote_ip)
  end
  local auth_response = auth_request:submit()
  local resp_status = auth_response:status()

  if resp_status == 207 then
    return dovecot.auth.PASSDB_RESULT_OK, "nopassword=y"
  elseif resp_status == 401 then
    return dovecot.auth.PASSDB_RESULT_PASSWORD_MISMATCH, ""
  end
  return dovecot.auth.PASSDB_RESULT_INTERNAL_FAILURE,
    "Auth request returned " .. resp_status .. " " .. auth_response:reason() .. " for " .. req.user
end
