-- Shape: systemli/userli's Dovecot adapter (lua_api.md §8 #4): settings from os.getenv
-- (needs import_environment), script_init() does an HTTP health check and returns 1 when
-- it fails, pcall(json.decode, ...), math.tointeger, numeric table values, userdb_*
-- fields from auth_password_verify, USER_DISABLED / PASS_EXPIRED paths, and one path
-- that returns INTERNAL_FAILURE with no second value.
-- dialect: 2.3
package.path = package.path .. ";{{ LUA_DIR }}/?.lua"
local json = require("json")

local api_url = os.getenv("USERLI_API_URL")
local api_token = os.getenv("USERLI_API_ACCESS_TOKEN")

local client = dovecot.http.client({
  timeout = 10000,
  max_attempts = 3,
  debug = false,
  user_agent = "userli-dovecot-adapter",
})

local function api_request(method, path, body)
  local request = client:request({url = api_url .. path, method = method})
  request:add_header("Authorization", "Bearer " .. api_token)
  request:add_header("Accept", "application/json")
  if body ~= nil then
    request:add_header("Content-Type", "application/json")
    request:set_payload(json.encode(body))
  end
  return request:submit()
end

local function decode_body(req, response)
  local ok, data = pcall(json.decode, response:payload())
  if not ok or type(data) ~= "table" or type(data.body) ~= "table" then
    req:log_error("userli: invalid JSON from the API")
    return nil
  end
  return data.body
end

function script_init()
  if api_url == nil or api_token == nil then
    dovecot.i_error("userli: USERLI_API_URL and USERLI_API_ACCESS_TOKEN must be set")
    return 1
  end
  local response = api_request("GET", "/api/dovecot/status")
  if response:status() ~= 200 then
    dovecot.i_error("userli: health check failed: " .. response:status() .. " " .. response:reason())
    return 1
  end
  return 0
end

function auth_userdb_lookup(req)
  local response = api_request("GET", "/api/dovecot/" .. req.user)
  local status = response:status()
  if status == 404 then
    req:log_info("userli: user not found")
    return dovecot.auth.USERDB_RESULT_USER_UNKNOWN, ""
  elseif status ~= 200 then
    req:log_error("userli: userdb lookup failed with " .. status)
    return dovecot.auth.USERDB_RESULT_INTERNAL_FAILURE, ""
  end
  local body = decode_body(req, response)
  if body == nil then
    return dovecot.auth.USERDB_RESULT_INTERNAL_FAILURE, ""
  end
  local attributes = {
    uid = math.tointeger(body.uid),
    gid = math.tointeger(body.gid),
    home = body.home,
  }
  if body.mailCrypt == 2 then
    attributes.mail_crypt_save_version = 2
    attributes.mail_crypt_global_public_key = body.mailCryptPublicKey
  end
  if body.quota ~= nil then
    attributes.quota_rule = "*:storage=" .. body.quota
  end
  return dovecot.auth.USERDB_RESULT_OK, attributes
end

function auth_password_verify(req, password)
  local response = api_request("POST", "/api/dovecot/" .. req.original_user, {password = password})
  local status = response:status()
  if status == 401 then
    req:log_info("userli: authentication failed")
    return dovecot.auth.PASSDB_RESULT_PASSWORD_MISMATCH, ""
  elseif status == 404 then
    return dovecot.auth.PASSDB_RESULT_USER_UNKNOWN, ""
  elseif status == 403 then
    req:log_warning("userli: account is disabled")
    return dovecot.auth.PASSDB_RESULT_USER_DISABLED, "account disabled"
  elseif status == 410 then
    return dovecot.auth.PASSDB_RESULT_PASS_EXPIRED, "password expired"
  elseif status ~= 200 then
    req:log_error("userli: passdb request failed with " .. status)
    return dovecot.auth.PASSDB_RESULT_INTERNAL_FAILURE
  end
  local body = decode_body(req, response)
  if body == nil then
    return dovecot.auth.PASSDB_RESULT_INTERNAL_FAILURE, "invalid JSON"
  end
  local fields = {
    userdb_uid = math.tointeger(body.uid),
    userdb_gid = math.tointeger(body.gid),
    userdb_home = body.home,
  }
  if body.mailCrypt == 2 then
    fields.userdb_mail_crypt_private_key = body.mailCryptPrivateKey
    fields.userdb_mail_crypt_private_password = password
  end
  return dovecot.auth.PASSDB_RESULT_OK, fields
end
