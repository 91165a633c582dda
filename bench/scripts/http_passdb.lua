-- The Nextcloud app-password shape (docker-mailserver's script): a WebDAV PROPFIND with HTTP
-- Basic auth decides. The runner replaces @BACKEND_URL@ with the local benchmark backend; the
-- flood scenario (bench/flood.py) also fills in @SLOW_URL@, a backend that never answers the user "flood".
local BACKEND_URL = "@BACKEND_URL@"
local SLOW_URL = "@SLOW_URL@"

local http_client = dovecot.http.client{
  max_attempts = 1;
}

local B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

local function base64(data)
  local out = {}
  for i = 1, #data, 3 do
    local a, b, c = data:byte(i, i + 2)
    local n = (a << 16) | ((b or 0) << 8) | (c or 0)
    local chunk = {}
    for j = 1, 4 do
      local index = (n >> (6 * (4 - j))) & 63
      chunk[j] = B64:sub(index + 1, index + 1)
    end
    if c == nil then chunk[4] = "=" end
    if b == nil then chunk[3] = "=" end
    out[#out + 1] = table.concat(chunk)
  end
  return table.concat(out)
end

function auth_passdb_lookup(req)
  local url = req.user == "flood" and SLOW_URL or BACKEND_URL
  local request = http_client:request{
    url = url .. "/remote.php/dav/files/" .. req.user .. "/";
    method = "PROPFIND";
  }
  request:add_header("Authorization", "Basic " .. base64(req.user .. ":" .. req.password))
  local response = request:submit()
  local status = response:status()
  if status == 207 then
    return dovecot.auth.PASSDB_RESULT_OK, "nopassword=y"
  elseif status == 401 then
    return dovecot.auth.PASSDB_RESULT_PASSWORD_MISMATCH, ""
  end
  return dovecot.auth.PASSDB_RESULT_INTERNAL_FAILURE,
    "backend returned " .. status .. " " .. response:reason() .. " for " .. req.user
end

function auth_userdb_lookup(req)
  return dovecot.auth.USERDB_RESULT_OK, "uid=65534 gid=65534 home=/srv/bench/" .. req.user
end
