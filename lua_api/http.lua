-- dovecot.http as Dovecot 2.3.19 defines it (lib-lua/dlua-dovecot-http.c), or 2.4.1+
-- for "2.4" states (other option names, set_payload's sync flag, request events):
-- clients, requests and responses are plain tables with raw method fields and an
-- `item`, and every check raises Dovecot's error text. submit() hands the request to
-- authd (lua_api/http.py) through the prelude's I/O hook and builds the response from
-- what comes back. Loaded once per state, after the prelude.
--
-- What crosses to Python is kept cheap, since it happens on every request: a client's
-- settings and a request's URL are parsed once, into Python objects this file only
-- passes back; a submitted request goes over as one flat array, and so does its
-- response. (A call into Python costs more than the array: each one lifts and restores
-- guard.lua's limits.)
local yield_io, io_kind, check_url, dialect, client_settings_23, client_settings_24, checks = ...
local v24 = dialect == "2.4"

local type, select, tostring, error, rawget, setmetatable, ipairs =
  type, select, tostring, error, rawget, setmetatable, ipairs
local table_remove = table.remove
local unpack = table.unpack or unpack
local format, find, sub, lower = string.format, string.find, string.sub, string.lower
local floor = math.floor
local tointeger = math.tointeger or function(x) return x end

local CLIENT = "struct http_client"
local REQUEST = "struct http_client_request"
local RESPONSE = "struct dlua_http_response"

-- What Dovecot keeps behind each object's item userdata, keyed by the item.
local objects = setmetatable({}, {__mode = "k"})

-- The prelude's argument checks (DLUA_REQUIRE_ARGS, luaL_argerror, luaL_typename, C strings).
local require_args, require_args_in = checks.args, checks.args_in
local bad_argument, type_name, c_string = checks.arg_error, checks.type_name, checks.c_string

-- dlua_check_http_*(): the object behind self's item.
local function check_object(self, kind)
  local object = type(self) == "table" and objects[rawget(self, "item")]
  if not object or object.kind ~= kind then
    error(format("Bad argument #1, expected %s got %s", kind, type(self)), 0)
  end
  return object
end

-- luaL_checkstring, then used as a C string.
local function check_string(value, argn)
  local t = type(value)
  if t == "number" then return tostring(value) end
  if t ~= "string" then bad_argument(argn, "string expected, got " .. type_name(value)) end
  return c_string(value)
end

-- luaL_checktype(L, argn, LUA_TTABLE)
local function check_table(value, argn)
  if type(value) ~= "table" then bad_argument(argn, "table expected, got " .. type_name(value)) end
end

---------------------------------------------------------------------------
-- Responses

-- A response object keeps what authd sent: {status, reason, payload, name, value, ...}.

local function response_status(...)
  require_args(select("#", ...), 1)
  return check_object((...), RESPONSE).result[1]
end

local function response_reason(...)
  require_args(select("#", ...), 1)
  return check_object((...), RESPONSE).result[2]
end

local function response_payload(...)
  require_args(select("#", ...), 1)
  return check_object((...), RESPONSE).result[3]
end

local function response_header(...)
  require_args(select("#", ...), 2)
  local self, name = ...
  local result = check_object(self, RESPONSE).result
  name = lower(check_string(name, 2))
  for index = 4, #result, 2 do
    if lower(result[index]) == name then return result[index + 1] end
  end
  return ""
end

local function new_response(result)
  local item = {}
  objects[item] = {kind = RESPONSE, result = result}
  return {
    item = item,
    status = response_status,
    reason = response_reason,
    payload = response_payload,
    header = response_header,
  }
end

---------------------------------------------------------------------------
-- Requests

-- Methods and header names authd can send (HTTP tokens). Dovecot sends anything, but
-- aborts the process (an assertion) on CR, LF or ':' in a name and on CR or LF in a
-- value, on a Proxy-Authorization header, and on changes after submit(); authd raises
-- an error at the script's line for all of these.
local TOKEN = "^[%w!#$%%&'*+%-.^_`|~]+$"

local function check_open(request)
  if request.submitted then
    error("authd: this request was already submitted (Dovecot would crash here)", 3)
  end
end

-- A request's headers are kept flat: {name, value, name, value, ...}.
local function find_header(headers, name)
  name = lower(name)
  for index = 1, #headers, 2 do
    if lower(headers[index]) == name then return index end
  end
end

local function request_add_header(...)
  require_args(select("#", ...), 3)
  local self, name, value = ...
  local request = check_object(self, REQUEST)
  name, value = check_string(name, 2), check_string(value, 3)
  check_open(request)
  if not find(name, TOKEN) or lower(name) == "proxy-authorization" then
    error(format("authd: cannot send the HTTP header name '%s'", name), 2)
  end
  if find(value, "[\1-\8\10-\31\127]") then
    error(format("authd: cannot send a control character in HTTP header %s", name), 2)
  end
  request.ever_set[#request.ever_set + 1] = lower(name)
  local headers = request.headers
  local index = find_header(headers, name)
  if index then
    headers[index + 1] = value
  else
    local n = #headers
    headers[n + 1], headers[n + 2] = name, value
  end
end

local function request_remove_header(...)
  require_args(select("#", ...), 2)
  local self, name = ...
  local request = check_object(self, REQUEST)
  name = check_string(name, 2)
  check_open(request)
  local headers = request.headers
  local index = find_header(headers, name)
  if index then
    table_remove(headers, index)
    table_remove(headers, index)
  end
end

local function request_set_payload(...)
  local nargs = select("#", ...)
  if v24 then require_args_in(nargs, 2, 3) else require_args(nargs, 2) end
  local self, payload, sync = ...
  local request = check_object(self, REQUEST)
  payload = check_string(payload, 2)  -- copied up to the first NUL
  check_open(request)
  if request.payload ~= nil then
    error("authd: the payload of this request was already set (Dovecot would crash here)", 2)
  end
  request.payload = payload
  request.sync = not v24 or (sync ~= nil and sync ~= false)
end

-- 2.4.3+: the event a request logs with.
local function request_set_event(...)
  require_args(select("#", ...), 2)
  local self, event = ...
  local request = check_object(self, REQUEST)
  if type(event) ~= "table" then
    error(format("Bad argument #2, expected struct event got %s", type(event)), 0)
  end
  request.event = event
end

local function request_get_event(...)
  require_args(select("#", ...), 1)
  local request = check_object((...), REQUEST)
  if request.event == nil then request.event = dovecot.event() end
  return request.event
end

local function request_submit(...)
  require_args(select("#", ...), 1)
  local request = check_object((...), REQUEST)
  check_open(request)
  request.submitted = true
  -- One flat array (Submission.from_lua() in http.py reads it): settings, method, url,
  -- payload or false, sync, how many header names were ever set, those names, then the
  -- headers (name, value, ...).
  local ever_set, headers = request.ever_set, request.headers
  local n_ever = #ever_set
  local spec = {request.settings, request.method, request.url, request.payload or false, request.sync ~= false,
    n_ever, unpack(ever_set, 1, n_ever)}
  local n = n_ever + 6
  for index = 1, #headers do spec[n + index] = headers[index] end
  return new_response(yield_io(io_kind, spec))
end

local function client_request(...)
  require_args(select("#", ...), 2)
  local self, spec = ...
  local client = check_object(self, CLIENT)
  check_table(spec, 2)
  local url = spec.url
  if url == nil then
    error("cannot create request: url not specified", 0)
  end
  url = check_string(url, -1)
  local method = spec.method
  if method == nil then
    method = "GET"
  else
    method = check_string(method, -1)
  end
  local parsed, problem, crash = check_url(url)
  if problem then
    error(format("Failed to parse url %s: %s", url, problem), 0)
  elseif crash then
    error(format("authd: %s (Dovecot would crash on submit)", crash), 2)
  end
  if not find(method, TOKEN) then
    error(format("authd: cannot send the HTTP method '%s'", method), 2)
  end
  local item = {}
  objects[item] = {
    kind = REQUEST,
    settings = client.settings,
    url = parsed,
    method = method,
    headers = {},
    ever_set = {},
  }
  return {
    item = item,
    add_header = request_add_header,
    remove_header = request_remove_header,
    set_payload = request_set_payload,
    submit = request_submit,
    set_event = v24 and request_set_event or nil,
    get_event = v24 and request_get_event or nil,
  }
end

---------------------------------------------------------------------------
-- Clients: parse_client_settings() reads these in this order.

local client_options = {
  {"user_agent", "string"},
  {"rawlog_dir", "string"},
  {"max_idle_time_msecs", "uint"},
  {"no_auto_redirect", "boolean"},
  {"no_auto_retry", "boolean"},
  {"max_redirects", "uint"},
  {"max_attempts", "uint"},
  {"max_connect_attempts", "uint"},
  {"connect_backoff_time_msecs", "uint"},
  {"connect_backoff_max_time_msecs", "uint"},
  {"request_absolute_timeout_msecs", "uint"},
  {"request_timeout_msecs", "uint"},
  {"connect_timeout_msecs", "uint"},
  {"soft_connect_timeout_msecs", "uint"},
  {"max_auto_retry_delay_secs", "uint"},
  {"debug", "boolean"},
}

local expected_text = {
  string = "string expected",
  uint = "non-negative number expected",
  boolean = "boolean expected",
}

-- dlua_table_get_*_by_str: a number that is an integer in 0..UINT_MAX, a real
-- boolean, a real string (used as a C string); nil means unset.
local function option_value(value, kind)
  if kind == "uint" then
    if type(value) == "number" and value == floor(value) and value >= 0 and value <= 4294967295 then
      return tointeger(value)
    end
  elseif type(value) == kind then
    return kind == "string" and c_string(value) or value
  end
end

local function setting_error(text)
  error("Invalid HTTP client setting: " .. text, 0)
end

local function http_client(...)
  require_args(select("#", ...), 1)
  local options = ...
  check_table(options, 1)
  local settings = {}
  for _, option in ipairs(client_options) do
    local name, kind = option[1], option[2]
    local value = options[name]
    if value ~= nil then
      value = option_value(value, kind)
      if value == nil then setting_error(name .. ": " .. expected_text[kind]) end
      settings[name] = value
    end
  end
  local proxy_url = options.proxy_url
  if type(proxy_url) == "string" then  -- other types are ignored
    proxy_url = c_string(proxy_url)
    local _, problem, crash = check_url(proxy_url)
    if problem then setting_error("proxy_url is invalid: " .. problem) end
    if crash then error(format("authd: proxy_url: %s (Dovecot would crash)", crash), 2) end
    settings.proxy_url = proxy_url
  end
  local parent = options.event_parent
  if parent ~= nil and type(parent) ~= "table" then
    error("Bad argument #-1, expected struct event got " .. type(parent), 0)
  end
  local item = {}
  objects[item] = {kind = CLIENT, settings = client_settings_23(settings)}
  return {item = item, request = client_request}
end

-- 2.4: every key is an http_client_*, ssl_* or dns_client_* setting name; values
-- are converted with tostring() and parsed like configuration (lua_api/http.py).
local function http_client_v24(...)
  require_args(select("#", ...), 1)
  local options = ...
  check_table(options, 1)
  local given = {}
  for key, value in next, options do
    local kt, vt = type(key), type(value)
    if kt ~= "string" and kt ~= "number" then
      error(format("authd: an HTTP client setting name is a %s (Dovecot would crash here)", kt), 2)
    end
    local text = (vt == "string" or vt == "number") and c_string(tostring(value)) or false
    given[#given + 1] = {c_string(tostring(key)), text}
  end
  local settings, problem, crash = client_settings_24(given)
  if crash then error(format("authd: %s (Dovecot would crash here)", crash), 2) end
  if problem then setting_error(problem) end
  local item = {}
  objects[item] = {kind = CLIENT, settings = settings}
  return {item = item, request = client_request}
end

dovecot.http = {client = v24 and http_client_v24 or http_client}
